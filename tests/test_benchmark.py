"""The benchmark's FLOP counts (against brute force and XLA's own count), a smoke run of
`scripts/benchmark.py --quick` (every number present, finite, and self-consistent), the
profile parser, and `scripts/gpu_benchmark.sh --cpu-smoke`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from cde_jax import flops, ops
from cde_jax.config import CdeConfig, ModernBertConfig
from cde_jax.params import abstract_model, flat_shapes

REPO = Path(__file__).resolve().parents[1]
# Base width, few layers: matmuls dominate as in the real model, lowering stays cheap.
WIDE = ModernBertConfig(num_hidden_layers=4, local_attention=32)


@pytest.mark.parametrize("q_start,seq,radius", [(0, 40, 16), (0, 10, 16), (25, 40, 7),
                                                (0, 33, None), (39, 40, 0)])
def test_visible_pairs_match_the_attention_mask(q_start, seq, radius):
    pos = jnp.arange(seq)
    mask = ops.attention_mask(ops.MaskSpec(jnp.ones((1, seq), bool), pos[q_start:], pos, radius))
    pairs = jnp.broadcast_to(mask, (1, 1, seq - q_start, seq)).sum()
    assert flops.visible_pairs(q_start, seq, radius) == int(pairs)


def test_linear_flops_are_twice_the_layer_weights():
    shapes = flat_shapes(abstract_model(WIDE, CdeConfig(), has_null_embedding=False))
    layer = "first_stage_model/embedder/layers/1/"
    weights = sum(math.prod(s) for p, s in shapes.items()
                  if p.startswith(layer) and p.endswith("kernel"))
    assert flops.linear_flops_per_token(WIDE) == 2 * weights


def test_windowed_count_drops_only_local_pairs_outside_the_window():
    b, s = 3, 100
    dense = flops.encoder_flops(WIDE, b, s, attention="dense")
    outside = s * s - flops.visible_pairs(0, s, WIDE.window_radius)
    n_local = WIDE.layer_types.count("local")
    assert dense - flops.encoder_flops(WIDE, b, s) == b * n_local * 4 * WIDE.hidden_size * outside
    with pytest.raises(ValueError, match="attention"):
        flops.encoder_flops(WIDE, b, s, attention="sparse")


def _xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def test_counts_agree_with_xla_on_global_layers():
    """With every layer global (no kernel choice for local layers), XLA's count of the traced
    program is ours plus elementwise work (norms, softmax, GELU: a few percent)."""
    cfg = WIDE.replace(global_attn_every_n_layers=1)
    graphdef, state = nnx.split(abstract_model(cfg, CdeConfig(), has_null_embedding=False))
    ids = jax.ShapeDtypeStruct((2, 96), jnp.int32)
    dataset = jax.ShapeDtypeStruct((512, cfg.hidden_size), jnp.float32)

    def encoder(st, i, m):
        return nnx.merge(graphdef, st).first_stage_model.embedder(i, m)

    def prefix(st, d):
        return nnx.merge(graphdef, st).second_stage_model.prefix(d)

    def second(st, i, m, d):
        stage = nnx.merge(graphdef, st).second_stage_model
        return stage(i, m, stage.prefix(d))

    ratio = _xla_flops(encoder, state, ids, ids) / flops.encoder_flops(cfg, 2, 96)
    assert 1.0 <= ratio <= 1.03, ratio
    per_batch = _xla_flops(second, state, ids, ids, dataset) - _xla_flops(prefix, state, dataset)
    ratio = per_batch / flops.second_stage_flops(cfg, 2, 96, 520)
    assert 1.0 <= ratio <= 1.03, ratio


# --- smoke run -----------------------------------------------------------------------------
SHAPES = ("32x128", "4x552")
KINDS = ("query", "document")
POSITIVE = (
    ["encoder_ratio_torch", "second_stage_ratio_torch", "minicorpus_ratio_recipe",
     "peak_fraction", "convert_rss_over_file", "peak_flops_matmul_f32",
     "minicorpus_seconds_ours", "minicorpus_seconds_recipe", "convert_peak_rss_bytes",
     "checkpoint_file_bytes", "stream_rss_small_bytes", "stream_rss_large_bytes"]
    + [f"{k}_{s}" for s in SHAPES for k in (
        "encoder_ratio_torch", "peak_fraction", "peak_fraction_dense", "encoder_seconds_ours",
        "encoder_seconds_torch", "encoder_tokens_per_s_ours", "encoder_tokens_per_s_torch")]
    + [f"second_stage_ratio_torch{d}_{k}" for k in KINDS for d in ("", "_bf16")]
    + ["second_stage_ratio_torch_bf16", "attention_speedup_head_major_median",
       "overlap_seconds_device_only", "overlap_seconds_in_flight_2"])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quick")
    out = tmp / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_reports_every_number(quick):
    r, stdout = quick
    for key in POSITIVE:
        assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, key
    assert math.isfinite(r["stream_rss_growth"]) and r["stream_rss_growth"] > -0.5
    assert r["sizes"]["mode"] == "quick" and r["sizes"]["preset"] == "tiny"
    assert "| encoder tokens/s | 32x128 |" in stdout


def test_quick_numbers_are_consistent(quick):
    r, _ = quick
    for s in SHAPES:
        b, n = map(int, s.split("x"))
        assert r[f"encoder_tokens_per_s_ours_{s}"] == pytest.approx(
            b * n / r[f"encoder_seconds_ours_{s}"])
        assert r[f"peak_fraction_{s}"] == pytest.approx(
            r[f"encoder_flops_{s}"] / r[f"encoder_seconds_ours_{s}"] / r["peak_flops_matmul_f32"])
        assert r[f"peak_fraction_dense_{s}"] >= r[f"peak_fraction_{s}"]
    assert r["encoder_ratio_torch"] == min(r[f"encoder_ratio_torch_{s}"] for s in SHAPES)
    assert r["second_stage_ratio_torch"] == min(r[f"second_stage_ratio_torch_{k}"]
                                                for k in KINDS)
    # (f): every timed kernel at every shape, "auto" the CPU's choice.
    assert r["attention_kernels_timed"] == ["xla", "head_major"]
    assert r["attention_auto"] == "head_major"
    assert all(r[f"attention_speedup_xla_{layer}_{tag}"] == 1.0 for layer in ("global", "local")
               for tag in ("32x128", "4x552", "8x536", "8x16of536"))
    # (h): several batches; idle fractions are fractions.
    assert r["overlap_batches"] >= 3
    assert all(0.0 <= r[f"device_idle_fraction_{n}"] < 1.0
               for n in ("in_flight_0", "in_flight_2", "in_flight_all"))
    # (i): the split covers the op time.
    profile = r["second_stage_profile"]
    assert set(profile["split"]) == {"matmul", "attention", "elementwise", "copies"}
    assert sum(profile["split"].values()) == pytest.approx(1.0)
    # A real share, not a bound on it: the run shares the machine with the other tests.
    assert profile["split"]["matmul"] > 0.05 and profile["op_ms"] > 0
    assert r["stream_rss_growth"] == pytest.approx(
        r["stream_rss_large_bytes"] / r["stream_rss_small_bytes"] - 1)
    assert r["convert_rss_within_bound"] == (r["convert_rss_over_file"] <= 1.5)
    # The timed minicorpus run reused the warmed-up bucket programs.
    assert r["minicorpus_ours_compiles_timed"] == 0


def test_quick_contenders_compute_the_same_thing(quick):
    """A speed-up that computes something else is no speed-up: float32 parity of the last
    outputs of every pair of contenders."""
    r, _ = quick
    errors = {k: v for k, v in r.items() if "max_rel_err" in k and "bf16" not in k}
    assert len(errors) == len(SHAPES) + len(KINDS) + 1, errors
    assert all(err <= 1e-4 for err in errors.values()), errors
    # bfloat16 compute against PyTorch float32: the cosine bound.
    cosines = {k: v for k, v in r.items() if "min_cosine_ours_bf16" in k}
    assert len(cosines) == len(KINDS) and all(c >= 0.9999 for c in cosines.values()), cosines


@pytest.mark.parametrize("op,category", [
    ("gemm_fusion_dot.12", "matmul"), ("ynn_fusion", "matmul"), ("cublas-gemm.3", "matmul"),
    ("custom-call.7 __cudnn$fmhaScaleBiasSoftmax", "attention"), ("splash_mha_fwd", "attention"),
    ("copy.4", "copies"), ("loop_transpose_fusion", "copies"), ("concatenate.2", "copies"),
    ("dynamic-update-slice.1", "copies"), ("loop_multiply_fusion", "elementwise"),
    ("input_reduce_fusion.1", "elementwise"), ("broadcast_select_fusion.3", "elementwise"),
])
def test_op_categories(op, category):
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    assert benchmark.op_category(op) == category


def test_op_times_reads_device_lanes():
    """An accelerator trace: kernels on the device's stream lines count (by hlo_op, else
    their name); the host's events and a whole-module line do not."""
    sys.path.insert(0, str(REPO / "scripts"))
    import benchmark

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #7"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8,
             "args": {"name": "XLA Modules"}}]
    kernels = [{"ph": "X", "pid": 2, "tid": 7, "name": "sm90_xmma_gemm", "dur": 3000,
                "args": {"hlo_op": "gemm_fusion_dot.1"}},
               {"ph": "X", "pid": 2, "tid": 7, "name": "cudnn_fmha_kernel", "dur": 1000},
               {"ph": "X", "pid": 2, "tid": 8, "name": "jit__second_fn", "dur": 9000},
               {"ph": "X", "pid": 1, "tid": 3, "name": "launch", "dur": 500,
                "args": {"hlo_op": "gemm_fusion_dot.1"}}]
    per_op, lanes = benchmark.op_times(meta + kernels)
    assert per_op == {"gemm_fusion_dot.1": 3.0, "cudnn_fmha_kernel": 1.0}
    assert lanes == ["Stream #7"]


@pytest.fixture(scope="module")
def gpu_smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_smoke")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_benchmark.sh"), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OUT": str(tmp)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((tmp / "gpu_benchmark.json").read_text())


def test_gpu_benchmark_cpu_smoke(gpu_smoke):
    """scripts/gpu_benchmark.sh --cpu-smoke: the GPU harness end to end on CPU (tiny preset):
    cuDNN refused with its reason, XLA against both PyTorch contenders, the step split, the
    idle fractions, JSON under $OUT."""
    r = gpu_smoke
    assert "needs an NVIDIA GPU" in r["notes"]["ours_cudnn_error"]
    assert r["notes"]["torch_best"].startswith("SDPA preferring cuDNN")
    for name in ("ours_xla", "torch_sdpa", "torch_best"):
        assert r[f"second_stage_texts_per_s_{name}_query_b4"] > 0
    assert r["second_stage_min_cosine_ours_xla_document_b2"] >= 0.9999
    assert sum(r["profiles"]["ours_xla"]["split"].values()) == pytest.approx(1.0)
    assert 0.0 <= r["device_idle_fraction_in_flight_2"] < 1.0
