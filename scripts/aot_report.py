#!/usr/bin/env python
"""The base-size stages compiled for every accelerator target from this host, and their static
roofline (`cde_jax.aot`): a table in docs/performance.md and the figures in JSON.

    JAX_PLATFORMS=cpu python scripts/aot_report.py [--section NAME] [--targets T ...]
        [--planner] [--json OUT]

Cases, ModernBERT-base with random weights (nothing is loaded), bfloat16, "auto" attention,
one device: the first stage on 64 documents of 256 tokens, the second stage on 64 documents
of 256 tokens and on 256 queries of 32 tokens after the 512 + 8 prefix. The table replaces the
block `<!-- aot:NAME -->` ... `<!-- /aot:NAME -->` of docs/performance.md (appended when
absent), so the file keeps one table per section ("before", "after"); the JSON goes to
docs/aot/NAME.json (--json elsewhere). --planner also compiles the "xla" kernel and rewrites
the generated table of temporary bytes per token in cde_jax/buckets.py from every kernel's
largest case. A base compile takes 35-100 s on 2 cores: every target is 5 to 15 minutes.
Needs the aot extra (`pip install -e '.[aot]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts (see cde_jax.aot)

from cde_jax import aot, buckets  # noqa: E402
from cde_jax.outputs import atomic_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = (("first stage, 64 docs x 256", "first", 64, 256),
         ("second stage, 64 docs x 256", "second", 64, 256),
         ("second stage, 256 queries x 32", "second", 256, 32))
PLANNER_KERNELS = {"tpu": ("splash", "xla"), "gpu": ("cudnn", "xla")}


def run(targets, kernels_of) -> list[dict]:
    rows = []
    for target in targets:
        platform = aot.devices(target)[0].platform
        for kernel in kernels_of(platform):
            for label, stage, batch, length in CASES:
                begin = time.perf_counter()
                report = aot.compile_stage(target, stage, batch, length, attention=kernel)
                row = report.to_dict() | {"case": label, "device_kind":
                                          aot.devices(target)[0].device_kind,
                                          "compile_seconds": time.perf_counter() - begin}
                rows.append(row)
                print(f"{target:10} {kernel:7} {label:32} roof {row['roof_fraction']:.2f} "
                      f"{row['bytes_accessed'] / 1e9:7.1f} GB  {row['compile_seconds']:.0f} s",
                      flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| target | case | FLOPs | bytes accessed | compute-only texts/s | roofline "
             "texts/s | roof fraction | peak memory | attention calls |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        calls = ", ".join(f"{n} {k}" for k, n in r["attention_calls"].items()) or "none"
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


def write_section(path: Path, name: str, text: str) -> None:
    begin, end = f"<!-- aot:{name} -->", f"<!-- /aot:{name} -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if begin in old else old.rstrip() + "\n\n" + block
    with atomic_file(path, "w") as f:
        f.write(new.lstrip() + "\n")


def planner_table(rows: list[dict]) -> dict[str, dict[str, int]]:
    """{device kind: {kernel: largest temporary bytes per token of any case}}."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        kinds = out.setdefault(r["device_kind"], {})
        kinds[r["attention"]] = max(kinds.get(r["attention"], 0),
                                    int(round(r["temp_bytes_per_token"])))
    return out


def write_planner(table_of: dict[str, dict[str, int]]) -> None:
    path = ROOT / "cde_jax" / "buckets.py"
    body = "".join(f"    {kind!r}: {kernels!r},\n" for kind, kernels in sorted(table_of.items()))
    block = f"{buckets.GENERATED_BEGIN}\nBYTES_PER_TOKEN = {{\n{body}}}\n{buckets.GENERATED_END}"
    old = path.read_text()
    start, stop = old.index(buckets.GENERATED_BEGIN), old.index(buckets.GENERATED_END)
    with atomic_file(path, "w") as f:
        f.write(old[:start] + block + old[stop + len(buckets.GENERATED_END):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", default="current", help="the docs block to (re)write")
    ap.add_argument("--targets", nargs="+", default=list(aot.TARGETS))
    ap.add_argument("--planner", action="store_true",
                    help="also compile 'xla' attention and rewrite buckets.BYTES_PER_TOKEN")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "performance.md")
    args = ap.parse_args(argv)
    kernels_of = (lambda p: PLANNER_KERNELS[p]) if args.planner else (lambda p: ("auto",))
    rows = run(args.targets, kernels_of)
    defaults = [r for r in rows if r["attention"] in ("splash", "cudnn")]
    write_section(args.docs, args.section, table(defaults))
    out = args.json or ROOT / "docs" / "aot" / f"{args.section}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "w") as f:
        json.dump(rows, f, indent=1, default=str)
    if args.planner:
        write_planner(planner_table(rows))
    print(f"wrote {args.docs} ({args.section}) and {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
