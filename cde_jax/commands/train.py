"""`cde-jax train`: fine-tune a cde checkpoint on JSONL (query, positive[, negatives, cluster])
with the two-stage contrastive loss; writes checkpoints, metrics.jsonl and the trained model
(released layout) into OUT. A run killed anywhere continues with --resume.

example:
  cde-jax train --model cde-small-v2-jax --data pairs.jsonl --out run --steps 1000 \
      --batch-size 32 --lr 2e-5 --warmup-steps 100
"""

from __future__ import annotations

import argparse

from .. import distributed
from ..training import BatchConfig, StepConfig, TrainConfig, train
from ..training.step import STAGES
from . import runtime


def register(subparsers) -> None:
    p = runtime.add_command(subparsers, "train", __doc__,
                            help="fine-tune a cde model (contrastive, both stages)")
    count = runtime.positive_int
    p.add_argument("--model", required=True, help="converted or released-layout checkpoint dir")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--out", required=True, help="output dir (must be new unless --resume)")
    p.add_argument("--steps", type=count, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=count, required=True,
                   help="examples per contrastive batch (global, over all devices)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="steps of linear warmup from 0 to --lr (then linear decay to 0)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay, on kernels and embeddings")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient norm limit")
    p.add_argument("--freeze", choices=("first", "second"), action="append", default=[],
                   help="keep a stage's parameters fixed (repeatable)")
    p.add_argument("--negatives", type=int, default=None,
                   help="hard negatives per example (default: the fewest any example has)")
    p.add_argument("--corpus-size", type=int, default=None,
                   help="override the config's transductive_corpus_size (also in the export)")
    p.add_argument("--oversample-corpus", action="store_true",
                   help="repeat a batch's documents up to the corpus size")
    p.add_argument("--group-by-cluster", action="store_true",
                   help="draw each batch from one `cluster` value where possible")
    p.add_argument("--query-length", type=count, default=64, help="query tokens (truncation)")
    p.add_argument("--document-length", type=count, default=256, help="document tokens")
    p.add_argument("--chunk-size", type=count, default=None,
                   help="gradient cache: rows per forward/backward chunk (default: no cache)")
    p.add_argument("--accum-steps", type=count, default=1,
                   help="contrastive batches whose gradients are averaged per step")
    p.add_argument("--sequence-dropout", type=float, default=None,
                   help="dataset-embedding dropout (default: the config's "
                        "transductive_sequence_dropout_prob)")
    p.add_argument("--no-permute", action="store_true",
                   help="keep the minicorpus order instead of shuffling it per row")
    p.add_argument("--seed", type=int, default=0,
                   help="data order, negatives, minicorpus and the model's random keys")
    p.add_argument("--checkpoint-every", type=count, default=100,
                   help="steps between orbax checkpoints (and at the end)")
    p.add_argument("--keep-checkpoints", type=count, default=2,
                   help="checkpoints kept on disk (the newest)")
    p.add_argument("--model-parallel", type=count, default=1,
                   help="devices that split heads and MLP units (tensor parallelism)")
    runtime.add_compute_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in OUT (same settings)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    distributed.add_args(p)
    p.set_defaults(func=run)


def config_from_args(args) -> TrainConfig:
    freeze = tuple(s for s in STAGES if s.split("_")[0] in args.freeze)
    return TrainConfig(
        model=args.model, data=args.data, out=args.out,
        batch=BatchConfig(batch_size=args.batch_size, negatives=args.negatives,
                          corpus_size=args.corpus_size, oversample_corpus=args.oversample_corpus,
                          group_by_cluster=args.group_by_cluster, query_length=args.query_length,
                          document_length=args.document_length),
        step=StepConfig(total_steps=args.steps, learning_rate=args.lr,
                        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                        clip_norm=args.clip_norm, freeze=freeze, chunk_size=args.chunk_size,
                        permute=not args.no_permute, sequence_dropout=args.sequence_dropout),
        accum_steps=args.accum_steps, seed=args.seed, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, model_parallel=args.model_parallel,
        dtype=args.dtype, attention=args.attention)


def run(args) -> int:
    cfg = config_from_args(args)
    runtime.start(args)  # joins a multi-process run; a resumed or repeated run skips the compile
    result = train(cfg, resume=args.resume,
                   show_progress=False if args.quiet else args.progress)
    if not distributed.is_main():
        return 0
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}")
    if result.history:
        last = result.history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, accuracy {last['accuracy']:.4f}")
    print(f"trained model (released layout): {result.model_dir}")
    return 0
