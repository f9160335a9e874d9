#!/usr/bin/env python
"""The base-size stages compiled for every accelerator target from this host, and their static
roofline (`cde_jax.aot`): a table in docs/performance.md and the figures in JSON.

    JAX_PLATFORMS=cpu python scripts/aot_report.py [--section NAME] [--targets T ...]
        [--planner] [--json OUT]
    JAX_PLATFORMS=cpu python scripts/aot_report.py --fidelity

Cases, ModernBERT-base with random weights (nothing is loaded), bfloat16, "auto" attention,
one device: the first stage on 64 documents of 256 tokens, the second stage on 64 documents
of 256 tokens and on 256 queries of 32 tokens after the 512 + 8 prefix. The table replaces the
block `<!-- aot:NAME -->` ... `<!-- /aot:NAME -->` of docs/performance.md (appended when
absent), so the file keeps one table per section ("before", "after"); the JSON goes to
docs/aot/NAME.json (--json elsewhere). --planner also compiles the "xla" and (on TPUs)
"splash" kernels (on the second stage's documents) and rewrites the generated table of
temporary bytes per token in cde_jax/buckets.py from every kernel's largest case. A base
compile takes 35-100 s on 2 cores (minutes on a loaded machine): every target is 5 to 15
minutes.
Needs the aot extra (`pip install -e '.[aot]'`).

--fidelity instead runs the base model on this CPU (random weights, the synthetic base
checkpoint) in float32 and in bfloat16 with each `activations` setting, and writes the worst
and mean per-row cosine to float32 of the dataset embeddings (the 512-document fallback
minicorpus cut to 64 tokens), 32 queries and 32 documents of 256 tokens (each model against
its own dataset embeddings, end to end) into the block `fidelity` (about 10 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts (see cde_jax.aot)

import numpy as np  # noqa: E402

import cde_jax  # noqa: E402
from cde_jax import aot, buckets, ops  # noqa: E402
from cde_jax.config import ACTIVATIONS  # noqa: E402
from cde_jax.convert import convert  # noqa: E402
from cde_jax.convert.synthetic import make_synthetic_checkpoint  # noqa: E402
from cde_jax.outputs import atomic_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_blocks import PERFORMANCE, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = (("first stage, 64 docs x 256", "first", 64, 256),
         ("second stage, 64 docs x 256", "second", 64, 256),
         ("second stage, 256 queries x 32", "second", 256, 32))
DEFAULT_KERNELS = ("rope_fused", "cudnn")  # what "auto" picks: the table's rows
OTHER_KERNELS = ("xla", "splash")  # --planner also records these (splash: TPU targets)


def run(targets, planner: bool):
    """Rows, one compile each: every case with "auto" attention on every target, then with
    --planner the kernels "auto" does not pick (`OTHER_KERNELS`) on the second stage's
    documents, for their temporaries per token."""
    passes = [("auto", CASES)] + [(kernel, CASES[1:2]) for kernel in OTHER_KERNELS] * planner
    for kernel, cases in passes:
        for target in targets:
            if kernel == "splash" and target.startswith("h100"):
                continue
            for label, stage, batch, length in cases:
                begin = time.perf_counter()
                report = aot.compile_stage(target, stage, batch, length, attention=kernel)
                row = report.to_dict() | {"case": label, "device_kind":
                                          aot.devices(target)[0].device_kind,
                                          "compile_seconds": time.perf_counter() - begin}
                print(f"{target:10} {row['attention']:10} {label:32} roof "
                      f"{row['roof_fraction']:.2f} {row['bytes_accessed'] / 1e9:7.1f} GB  "
                      f"{row['compile_seconds']:.0f} s", flush=True)
                yield row


def table(rows: list[dict]) -> str:
    lines = ["| target | case | FLOPs | bytes accessed | compute-only texts/s | roofline "
             "texts/s | roof fraction | peak memory | fused calls (attention, layer) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = ", ".join(f"{n} {k}" for k, n in (r["attention_calls"]
                                                  | r.get("layer_calls", {})).items()) or "none"
        lines.append(f"| {r['target']} | {r['case']} | {r['flops']:.3g} | "
                     f"{r['bytes_accessed'] / 1e9:.1f} GB | {r['compute_texts_per_s']:,.0f} | "
                     f"{r['roofline_texts_per_s']:,.0f} | {r['roof_fraction']:.2f} | "
                     f"{r['peak_memory'] / 2 ** 30:.1f} GiB | {calls} |")
    chips = {r["target"]: r["chip"] for r in rows}
    lines += ["", "Peaks assumed per device: " + "; ".join(
        f"{t}: {c['name']}, {c['bf16_flops'] / 1e12:g} TFLOP/s bf16, "
        f"{c['hbm_bandwidth'] / 1e9:g} GB/s, {c['hbm_bytes'] / 2 ** 30:.0f} GiB"
        for t, c in chips.items()) + ". FLOPs and bytes: " + "; ".join(sorted(
            {f"{r['flops_source']} / {r['bytes_source']}" for r in rows})) + "."]
    return "\n".join(lines)


def planner_table(rows: list[dict]) -> dict[str, dict[str, int]]:
    """{device kind: {kernel: largest temporary bytes per token of any case}}."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        kinds = out.setdefault(r["device_kind"], {})
        kinds[r["attention"]] = max(kinds.get(r["attention"], 0),
                                    int(round(r["temp_bytes_per_token"])))
    return out


def write_planner(table_of: dict[str, dict[str, int]], docs: Path) -> None:
    """The table into cde_jax/buckets.py (`BYTES_PER_TOKEN`) and the docs' block `planner`."""
    write_section(docs, "planner", "\n".join(
        ["| device kind | kernel | temporary bytes per token |", "|---|---|---|"]
        + [f"| {kind} | {kernel} | {n:,} |" for kind, kernels in sorted(table_of.items())
           for kernel, n in sorted(kernels.items())]))
    path = ROOT / "cde_jax" / "buckets.py"
    body = "".join(f"    {kind!r}: {kernels!r},\n" for kind, kernels in sorted(table_of.items()))
    block = f"{buckets.GENERATED_BEGIN}\nBYTES_PER_TOKEN = {{\n{body}}}\n{buckets.GENERATED_END}"
    old = path.read_text()
    start = old.index("\n" + buckets.GENERATED_BEGIN + "\n") + 1  # the marker line, not
    stop = old.index("\n" + buckets.GENERATED_END + "\n") + 1       # the constants' values
    with atomic_file(path, "w") as f:
        f.write(old[:start] + block + old[stop + len(buckets.GENERATED_END):])


def fidelity() -> tuple[str, dict]:
    """(markdown, figures): bfloat16 with each `activations` setting against float32."""
    work = Path(tempfile.mkdtemp(prefix="cde-fidelity-"))
    converted = convert(make_synthetic_checkpoint(work / "released", preset="base"),
                        work / "converted")
    texts = cde_jax.fallback_minicorpus()
    variants = {"float32": dict(dtype="float32")} | {
        f"bfloat16, activations={a}": dict(dtype="bfloat16", activations=a) for a in ACTIVATIONS}
    outputs = {}
    for name, options in variants.items():
        begin = time.perf_counter()
        model = cde_jax.load(converted, **options)
        model.max_seq_length = 64
        dataset = model.embed_dataset(texts)
        model.max_seq_length = 256
        ctx = model.context(dataset)
        outputs[name] = {"dataset embeddings": dataset,
                         "queries": ctx.encode_query(texts[:32], normalize_embeddings=False),
                         "documents": ctx.encode_document(texts[32:64],
                                                          normalize_embeddings=False)}
        print(f"{name}: {time.perf_counter() - begin:.0f} s", flush=True)
    reference = outputs.pop("float32")
    figures = {name: {kind: cosines(out[kind], reference[kind]) for kind in out}
               for name, out in outputs.items()}
    lines = ["| compute | " + " | ".join(f"{k}: worst / mean cosine" for k in reference) + " |",
             "|---|" + "---|" * len(reference)]
    lines += [f"| {name} | " + " | ".join(f"{c['worst']:.6f} / {c['mean']:.6f}"
                                         for c in kinds.values()) + " |"
              for name, kinds in figures.items()]
    return "\n".join(lines), figures


def cosines(a_nd, b_nd) -> dict[str, float]:
    """Worst and mean per-row cosine, float64."""
    rows = (ops.l2_normalize(np.asarray(a_nd, np.float64))
            * ops.l2_normalize(np.asarray(b_nd, np.float64))).sum(1)
    return {"worst": float(rows.min()), "mean": float(rows.mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", default="current", help="the docs block to (re)write")
    ap.add_argument("--targets", nargs="+", default=list(aot.TARGETS),
                    help="in this order (default: every target)")
    ap.add_argument("--planner", action="store_true",
                    help="also compile 'xla' attention and rewrite buckets.BYTES_PER_TOKEN")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--docs", type=Path, default=PERFORMANCE)
    ap.add_argument("--fidelity", action="store_true",
                    help="measure bfloat16 against float32 on this CPU instead")
    args = ap.parse_args(argv)
    if args.fidelity:
        text, figures = fidelity()
        write_section(args.docs, "fidelity", text)
        out = args.json or ROOT / "docs" / "aot" / "fidelity.json"
        with atomic_file(out, "w") as f:
            json.dump(figures, f, indent=1)
        print(text)
        return 0
    out = args.json or ROOT / "docs" / "aot" / f"{args.section}.json"
    rows = []
    for row in run(args.targets, args.planner):  # written as they come: a long run keeps
        rows.append(row)                          # what it has done
        with atomic_file(out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
        write_section(args.docs, args.section,
                      table([r for r in rows if r["attention"] in DEFAULT_KERNELS]))
    if args.planner:
        write_planner(planner_table(rows), args.docs)
    print(f"wrote {args.docs} ({args.section}) and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
