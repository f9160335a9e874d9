"""Runs `cde-jax train ARGS...` and SIGKILLs it when it asks for the batch at data position
K: a crash at a deterministic point, some steps after a checkpoint. Each checkpoint save is
waited for here, so which checkpoint the resumed run finds does not depend on timing.

    python tests/train_killed.py K train --model ... --out ...
"""

import os
import signal
import sys

from cde_jax import cli
from cde_jax.training import checkpoint, data


def main() -> None:
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    save, batch = checkpoint.Checkpoints.save, data.TrainData.batch

    def save_and_wait(self, state):
        save(self, state)
        self.manager.wait_until_finished()

    def batch_or_die(self, position):
        if position == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return batch(self, position)

    checkpoint.Checkpoints.save = save_and_wait
    data.TrainData.batch = batch_or_die
    cli.main(argv)
    sys.exit("the run ended before it was killed")


if __name__ == "__main__":
    main()
