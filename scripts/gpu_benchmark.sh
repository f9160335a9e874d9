#!/usr/bin/env bash
# bf16 second-stage throughput and MFU on one NVIDIA GPU: cde_jax with XLA attention, and with
# cuDNN attention where it runs, vs the PyTorch reference (SDPA) in bf16. Queries of 16 and
# documents of 256 tokens after a 512-document context, at several batch sizes, on a base
# synthetic checkpoint. Prints a table; writes $OUT/gpu_benchmark.json when OUT is set.
#
#   scripts/gpu_benchmark.sh              # on the GPU machine (about 5 minutes, at most 8)
#   scripts/gpu_benchmark.sh --cpu-smoke  # the same code on CPU: tiny preset, small batches
#
# GPU_BENCH_KINDS (e.g. "query:256:16,document:64:256": kind:batch:tokens) replaces the cases;
# GPU_BENCH_DEADLINE_S (default 400) is when the remaining cases are skipped (and listed).
# Needs jax (CUDA), torch, transformers, flax, orbax-checkpoint, tokenizers, safetensors;
# nothing is downloaded. Any error stops the script with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) mode=cpu-smoke ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU's memory
if [[ $mode == cpu-smoke ]]; then export JAX_PLATFORMS=cpu; fi

# `import cde_jax` and `cde_jax.convert` must come from this checkout.
checkout() {
  "$PY" -c 'import cde_jax.convert, pathlib
print(pathlib.Path(cde_jax.__file__).resolve().parents[1])' 2>/dev/null || true
}
site=""
work=$(mktemp -d)
trap 'rm -rf "$work" ${site:+"$site"}' EXIT
if [[ "$(checkout)" != "$PWD" ]]; then
  # A fresh GPU machine: install in place. Elsewhere never repoint a shared install: a
  # package tree of links put first on PYTHONPATH does the same for this script only.
  if [[ $mode == gpu ]] && "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
      && [[ "$(checkout)" == "$PWD" ]]; then
    :
  else
    site=$(mktemp -d)
    mkdir "$site/cde_jax"
    ln -s "$PWD"/cde_jax/* "$site/cde_jax/"
    ln -s "$PWD/convert" "$site/cde_jax/convert"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
[[ "$(checkout)" == "$PWD" ]] || { echo "cannot import cde_jax from $PWD" >&2; exit 1; }

"$PY" - "$work" "$mode" <<'EOF'
import json
import os
import platform
import sys
import time
from pathlib import Path

begin = time.perf_counter()
sys.path.insert(0, "scripts")
import benchmark as bench  # the harness

import jax
import torch

import cde_jax
from cde_jax import convert
from cde_jax.minicorpus import fallback_minicorpus
from cde_jax.prompts import DOCUMENT as DOCUMENT_PREFIX
from cde_jax.convert.synthetic import make_synthetic_checkpoint
from cde_jax.io_utils import atomic_file
from cde_jax.testing.torch_reference import TorchCde

work, mode = Path(sys.argv[1]), sys.argv[2]
# After this, remaining cases are skipped (and listed) to end within 8 min.
DEADLINE_S = float(os.environ.get("GPU_BENCH_DEADLINE_S", 400))
if mode == "gpu":
    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
        sys.exit(f"no GPU: jax backend {jax.default_backend()!r}, torch cuda "
                 f"{torch.cuda.is_available()}")
    preset, device, warmup, repeats = "base", "cuda", 2, 5
    kinds = [("query", b, 16) for b in (64, 256, 1024)] + \
        [("document", b, 256) for b in (16, 64, 256)]
    if os.environ.get("GPU_BENCH_KINDS"):  # e.g. "query:256:16,document:64:256"
        kinds = [(k, int(b), int(s)) for k, b, s in
                 (item.split(":") for item in os.environ["GPU_BENCH_KINDS"].split(","))]
    name = torch.cuda.get_device_name()
    # Dense bf16 peak: H100 SXM 989.5 TFLOP/s, the H200 the same; H100 PCIe 756.
    peak = 756e12 if "PCIe" in name else 989.5e12
else:
    preset, device, warmup, repeats = "tiny", "cpu", 1, 2
    kinds = [("query", 4, 16), ("document", 2, 256)]
    name, peak = platform.processor() or platform.machine(), 989.5e12
print(f"device: {name} | peak {peak / 1e12:.1f} TFLOP/s bf16 | jax {jax.__version__} "
      f"({jax.devices()[0].device_kind}) | torch {torch.__version__}", flush=True)

released = make_synthetic_checkpoint(work / "released", preset=preset)
converted = convert.convert(released, work / "converted")
bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
ours = {"ours_xla": cde_jax.load(converted, attention="xla", **bf16)}
ref = TorchCde(released, "sdpa").to(device, torch.bfloat16)
texts = fallback_minicorpus()
tok = ours["ours_xla"].tokenizer.tokenizer
sep = ours["ours_xla"].backbone_config.sep_token_id
n_ctx = ours["ours_xla"].config.transductive_corpus_size
dataset_nd = ref.first_stage(*bench.fixed_length_batch(tok, texts, DOCUMENT_PREFIX, n_ctx, 128,
                                                       sep))
notes = {"device": name, "peak_flops_bf16": peak, "jax": jax.__version__,
         "torch": torch.__version__, "preset": preset, "context_docs": n_ctx,
         "warmup": warmup, "repeats": repeats, "attention_flops": "windowed"}

# The cuDNN attention kernel, probed on the smallest batch of each kind, which the benchmark
# then reuses.
try:
    cudnn = cde_jax.load(converted, attention="cudnn", **bf16)
    errs = []
    for kind in ("query", "document"):
        _, batch, length = min(k for k in kinds if k[0] == kind)
        ids, mask = bench.fixed_length_batch(tok, texts, "", batch, length, sep)
        errs.append(bench.max_rel_err(cudnn.second_stage(ids, mask, dataset_nd),
                                      ours["ours_xla"].second_stage(ids, mask, dataset_nd)))
    notes["cudnn_vs_xla_max_rel_err"] = max(errs)
    ours["ours_cudnn"] = cudnn
except Exception as e:  # reported in the table and the JSON, the XLA path goes on
    notes["cudnn_error"] = f"{type(e).__name__}: {e}"[:800]
    print(f"cuDNN attention unavailable, XLA attention only: {notes['cudnn_error']}", flush=True)

results, skipped = {}, []
for kind in kinds:
    if time.perf_counter() - begin > DEADLINE_S:
        skipped.append("{}_b{}".format(*kind))
        continue
    results |= bench.bench_second_stage(ours, ref, dataset_nd, texts, [kind], warmup=warmup,
                                        repeats=repeats, peak=peak)
    print(f"  done {kind} at {time.perf_counter() - begin:.0f} s", flush=True)
if skipped:
    print(f"SKIPPED (time budget): {skipped}", flush=True)
    notes["skipped"] = skipped

names = list(ours) + ["torch"]
lines = ["| kind | batch x tokens | " + " | ".join(f"{n} texts/s (MFU)" for n in names) +
         " | " + " | ".join(f"{n}/torch" for n in ours) + " |",
         "|---|---|" + "---|" * (len(names) + len(ours))]
for kind, batch, length in kinds:
    tag = f"{kind}_b{batch}"
    if tag in skipped:
        continue
    rate = {n: results[f"second_stage_texts_per_s_{n}_{tag}"] for n in names}
    for n in ours:
        results[f"second_stage_ratio_torch_{n}_{tag}"] = rate[n] / rate["torch"]
    lines.append(f"| {kind} | {batch} x {length} | " + " | ".join(
        f"{rate[n]:.1f} ({results[f'second_stage_mfu_{n}_{tag}']:.3f})" for n in names) +
        " | " + " | ".join(f"{rate[n] / rate['torch']:.2f}" for n in ours) + " |")
notes["wall_seconds"] = round(time.perf_counter() - begin, 1)
print("\n".join(lines))
for key in ("cudnn_vs_xla_max_rel_err", "cudnn_error"):
    if key in notes:
        print(f"{key}: {notes[key]}")
print(f"wall: {notes['wall_seconds']} s")
if os.environ.get("OUT"):
    out = Path(os.environ["OUT"]) / "gpu_benchmark.json"
    with atomic_file(out, "w") as f:
        json.dump({**results, "notes": notes}, f, indent=2, default=float)
    print(f"wrote {out}")
EOF
