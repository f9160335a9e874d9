#!/usr/bin/env bash
# The second stage on one TPU, bfloat16: cde_jax with rope_fused and splash (Pallas) and with XLA attention,
# texts/s and MFU; the device-idle fraction of the bucketed runner; one profiled step split
# into matmul / attention / elementwise / copies. No PyTorch contender (torch_xla is not
# assumed). Harness: scripts/accel_benchmark.py, the same as scripts/gpu_benchmark.sh.
#
# UNTESTED ON A TPU: this project has no TPU machine. Only `--cpu-smoke` has run (the Pallas
# kernels in interpret mode on CPU); on a TPU the first run may need fixes.
#
#   scripts/tpu_benchmark.sh              # on a TPU VM (jax[tpu])
#   scripts/tpu_benchmark.sh --cpu-smoke  # the same code on CPU: tiny preset, small batches
#
# Prints a table; writes $OUT/tpu_benchmark.json when OUT is set. ACCEL_BENCH_KINDS and
# ACCEL_BENCH_DEADLINE_S as in gpu_benchmark.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=tpu
case "${1:-}" in
  "") ;;
  --cpu-smoke) mode=cpu-smoke ;;
  *) echo "usage: $0 [--cpu-smoke]" >&2; exit 2 ;;
esac
if [[ $mode == cpu-smoke ]]; then export JAX_PLATFORMS=cpu; fi
source scripts/use_checkout.sh
smoke=()
if [[ $mode == cpu-smoke ]]; then smoke=(--cpu-smoke); fi
"$PY" scripts/accel_benchmark.py tpu "${smoke[@]}"
