#!/usr/bin/env bash
# The second stage on one NVIDIA GPU, bfloat16: cde_jax with cuDNN and with XLA attention
# against PyTorch (HF SDPA, and PyTorch's best available attention), texts/s and MFU; the
# device-idle fraction of the bucketed runner; one profiled step split into matmul /
# attention / elementwise / copies. Base synthetic checkpoint; queries of 16 and documents
# of 256 tokens after a 512-document context. Harness: scripts/accel_benchmark.py.
#
#   scripts/gpu_benchmark.sh              # on the GPU machine (about 6 minutes)
#   scripts/gpu_benchmark.sh --cpu-smoke  # the same code on CPU: tiny preset, small batches
#
# Prints a table; writes $OUT/gpu_benchmark.json when OUT is set. ACCEL_BENCH_KINDS (e.g.
# "query:512:16,document:128:256", kind:batch:tokens) replaces the cases;
# ACCEL_BENCH_DEADLINE_S (default 300) is when the remaining cases are skipped (and listed).
# Needs jax (CUDA), torch (CUDA), transformers, flax, orbax-checkpoint, tokenizers,
# safetensors; nothing is downloaded. Any error stops the script with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) mode=cpu-smoke ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU's memory
if [[ $mode == cpu-smoke ]]; then export JAX_PLATFORMS=cpu; fi
source scripts/use_checkout.sh
smoke=()
if [[ $mode == cpu-smoke ]]; then smoke=(--cpu-smoke); fi
"$PY" scripts/accel_benchmark.py gpu "${smoke[@]}"
