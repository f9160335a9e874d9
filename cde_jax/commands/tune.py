"""`cde-jax tune`: checks every attention kernel of this device against `xla` and times it now,
per bucket, and prints the table (kernel, largest error against xla, texts/s per bucket, the
buckets where it is chosen). The decisions also go to the cache that `load(attention="auto")`
reads on GPUs and TPUs (`cde_jax.tuning`). --json writes them as one file: what to attach
to an issue, and where docs/performance.md's measured rows come from.

On CPU the candidates are xla and head_major; --interpret adds the Pallas kernels (splash,
rope_fused) in interpret mode, slow, to check them off TPUs.

example:
  cde-jax tune --model cde-small-v2-jax --dtype bfloat16 --buckets 128 --buckets 512 \\
      --json tune.json
"""

from __future__ import annotations

import json

from .. import distributed, outputs, tuning
from ..config import ACTIVATIONS, DTYPES
from . import runtime


def register(subparsers) -> None:
    parser = runtime.add_command(subparsers, "tune", __doc__,
                                 help="check and time the attention kernels on this device")
    parser.add_argument("--model", required=True,
                        help="converted checkpoint dir, or a released one (config.json + "
                             "model.safetensors)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--activations", choices=ACTIVATIONS, default="compute",
                        help="with a half dtype, activations between ops in it or in float32")
    parser.add_argument("--buckets", type=runtime.positive_int, action="append", default=None,
                        help=f"a bucket length (tokens per text) to probe; repeat for more "
                             f"(default: {tuning.PROBE_LENGTH}, the bucket `load` probes)")
    parser.add_argument("--batch-size", type=runtime.positive_int, default=None,
                        help="probe rows per bucket (default: the run's plan for the bucket)")
    parser.add_argument("--repeats", type=runtime.positive_int, default=tuning.REPEATS,
                        help="timed runs per kernel and bucket, alternating (the median counts)")
    parser.add_argument("--interpret", action="store_true",
                        help="also the Pallas kernels in interpret mode (off TPUs; slow)")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write the decisions as JSON (atomically)")
    distributed.add_args(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    runtime.start(args)
    model = distributed.all_succeed(
        lambda: runtime.load(args.model, dtype=args.dtype, activations=args.activations,
                             attention=tuning.REFERENCE, tune=False), "loading the model")
    runner, backbone, cde = model.runner, model.backbone_config, model.config
    platform = model.mesh.devices.flat[0].platform
    kernels = tuning.candidates(platform, interpret=args.interpret)
    decisions = []
    for length in args.buckets or [tuning.PROBE_LENGTH]:
        plan = model.plan.with_batch_size(args.batch_size)
        rows = tuning.probe_rows(plan, model.mesh, cde, length)
        decision, _, _ = tuning.decide(runner, backbone, cde, kernels, rows=rows, length=length,
                                       platform=platform, cache=tuning.cache_file(),
                                       fresh=True, repeats=args.repeats)
        decisions.append(decision)
    if distributed.is_main():
        print(table(decisions))
        for decision in decisions:
            print(decision.line())
        if args.json:
            with outputs.atomic_file(args.json, "w") as f:
                json.dump({"decisions": [d.to_json() for d in decisions]}, f, indent=1)
    return 0


def table(decisions: list[tuning.Decision]) -> str:
    """kernel | max rel err vs xla | min cosine | texts/s per bucket | chosen (its buckets)."""
    first = decisions[0]
    head = ["kernel", "max rel err vs xla", "min cosine vs xla",
            *(f"texts/s {d.target.bucket}" for d in decisions), "chosen"]
    rows = [head]
    for trial in first.trials:
        trials = [d.trial(trial.kernel) for d in decisions]
        errors = [t.max_rel_err for t in trials if t.max_rel_err is not None]
        cosines = [t.min_cosine for t in trials if t.min_cosine is not None]
        speeds = [f"{t.texts_per_s:,.1f}" if t.texts_per_s else "-" for t in trials]
        chosen = [d.target.bucket for d in decisions if d.chosen == trial.kernel]
        rejected = next((t.error for t in trials if t.error), None)
        rows.append([trial.label, f"{max(errors):.2g}" if errors else "-",
                     f"{min(cosines):.6f}" if cosines else "-", *speeds,
                     f"rejected: {rejected}" if rejected else ", ".join(chosen) or "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
                     for r in rows)
