"""`cde-jax train`: fine-tune a cde checkpoint on JSONL (query, positive[, negatives, cluster])
with the two-stage contrastive loss; writes checkpoints, metrics.jsonl, TensorBoard logs
(OUT/logs) and the trained model (released layout) into OUT. With --eval-data, retrieval
metrics on a BEIR-layout split every --eval-every steps go to the logs, and --keep-best
exports the best step's model to OUT/best_model too. A run killed anywhere continues with
--resume.

Every setting is a field of `training.TrainConfig` (and its `batch` and `step` parts): the
flags are made from the config (`commands.flags`), named as its fields are.

example:
  cde-jax train --model cde-small-v2-jax --data pairs.jsonl --out run --total-steps 1000 \\
      --batch-size 32 --learning-rate 2e-5 --warmup-steps 100
  cde-jax train --model cde-small-v2-jax --data pairs.clustered.jsonl --out run \
      --total-steps 1000 --batch-size 64 --packed-batches --eval-data beir/scifact \
      --eval-split test --eval-every 100 --keep-best ndcg@10
"""

from __future__ import annotations

import argparse

from .. import distributed, storage
from ..training import TrainConfig, train
from . import flags, runtime


def register(subparsers) -> None:
    p = runtime.add_command(subparsers, "train", __doc__,
                            help="fine-tune a cde model (contrastive, both stages)")
    flags.add_config_flags(p, TrainConfig)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUT (same settings)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    distributed.add_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = flags.config_from_args(TrainConfig, args)
    storage.refuse("train", data=cfg.data, out=cfg.out, model=cfg.model)
    # Joins a multi-process run; a resumed or repeated run skips the compile.
    runtime.start(args, "the checkpoints are kept: run the same command with --resume on "
                        "every process")
    result = train(cfg, resume=args.resume,
                   show_progress=False if args.quiet else args.progress)
    if not distributed.is_main():
        return 0
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}")
    if result.history:
        last = result.history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, accuracy {last['accuracy']:.4f}")
    if result.best is not None:
        best = result.best
        print(f"best {best['metric']} {best['value']:.4f} at step {best['step']}: "
              f"{result.model_dir.parent / 'best_model'}")
    print(f"trained model (released layout): {result.model_dir}")
    return 0
