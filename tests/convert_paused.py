"""Runs `scripts/convert_weights.py ARGS...` and pauses it mid-conversion: once orbax has
written the parameters into the hidden temp dir, and before the configs and the rename, it
prints `paused TEMP_DIR` and waits for a line on stdin (then finishes the conversion). A
test SIGKILLs it there, or lets it go on.

    python tests/convert_paused.py SOURCE OUT
"""

import runpy
import sys
from pathlib import Path

from cde_jax.convert import checkpoint

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    write_configs = checkpoint._write_configs

    def pause_then_write_configs(out: Path, ckpt) -> None:
        print("paused", out, flush=True)
        sys.stdin.readline()
        write_configs(out, ckpt)

    checkpoint._write_configs = pause_then_write_configs
    sys.argv = [str(REPO / "scripts" / "convert_weights.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
