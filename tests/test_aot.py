"""Deviceless compiles for every accelerator target (`cde_jax.aot`), tiny preset: each target
compiles; TPU programs hold three Mosaic kernels per layer (rope_fused and fused_layer's two)
and no interpreter loops, the H100 program cuDNN's fused attention; on 4 and 8 chips the
kernels run per device with no collective and per-device FLOPs of one chip's / chips; with
model parallelism the layer runs XLA's matmuls around rope_fused and only the row-parallel
matmuls' all-reduces cross devices; the report's figures agree with flops.py;
the largest default batch fits 90% of each chip's memory, under the planner's bytes per
token. The compiles run in one process beside the tests (tests/aot_worker.py): libtpu and
the CUDA plugin stay out of this one. The base-size report is scripts/aot_report.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aot_worker import LARGEST, REFERENCE

from cde_jax import aot, buckets, flops, fused_layer, rope_attention
from cde_jax.config import CdeConfig, modernbert_tiny
from cde_jax.validation import UserError

WORKER = Path(__file__).resolve().parent / "aot_worker.py"
TINY = modernbert_tiny()
PREFIX_LEN = CdeConfig().num_context_tokens + CdeConfig().num_soft_prompt_tokens


@pytest.fixture(scope="module")
def aot_reports(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("aot_reports")
    out = tmp / "aot.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(WORKER), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {row["case"]: row for row in json.loads(out.read_text())}


def test_the_kernels_compile_alone_at_base_shapes(tmp_path):
    """fused_layer's two kernels and rope_attention at base width (d 768, MLP 1152, bfloat16,
    rows of 776 keys: prefix 520 + 256) compile for one v5e and one v6e chip, a global and a
    local layer, each a Mosaic call of its own name, within its computed VMEM budget."""
    out = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, str(WORKER), str(out), "--kernels"],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert set(rows) == {f"{t} {layer}" for t in ("v5e:2x2", "v6e:2x2")
                         for layer in ("global", "local")}
    for row in rows.values():
        assert row["kernels"] == {fused_layer.NORM_QKV: 1, rope_attention.NAME: 1,
                                  fused_layer.OUT_MLP: 1}
        assert row["while_loops"] == 0  # Mosaic, not the interpreter's loops
        # rope_attention's and fused_out_mlp's budgets exceed Mosaic's 16 MiB default
        assert max(row["scoped_vmem"]) > 16 * 2 ** 20, row["scoped_vmem"]


def tpu(row) -> bool:
    return not row["target"].startswith("h100")


def one_device(reports, target: str) -> dict:
    """The second stage on one device of `target`."""
    return reports[f"{target} largest" if target in LARGEST else f"{target} second"]


LAYERS = TINY.num_hidden_layers
FUSED = {fused_layer.NORM_QKV: LAYERS, fused_layer.OUT_MLP: LAYERS}


def test_every_target_compiles_its_fused_kernels(aot_reports):
    """TPU programs: per layer one rope_fused call and fused_layer's two, no while loop
    (interpret mode would loop); the H100: cuDNN's flash attention for every layer."""
    for target in aot.TARGETS:
        row = one_device(aot_reports, target)
        assert row["attention"] == ("rope_fused" if tpu(row) else "cudnn")
        if tpu(row):
            assert row["attention_calls"] == {"tpu_custom_call": LAYERS}
            assert row["layer_calls"] == FUSED
            assert row["while_loops"] == 0
        else:
            assert sum(row["attention_calls"].values()) == LAYERS and row["layer_calls"] == {}
            assert set(row["attention_calls"]) == {"__cudnn$fmhaSoftmax",
                                                   "__cudnn$fmhaScaleBiasSoftmax"}
    # The prefix: layer 0's q, k, v of the context, computed once (no attention).
    for stage, calls, layer_calls in (("first", LAYERS, FUSED), ("second", LAYERS, FUSED),
                                      ("prefix", 0, {fused_layer.NORM_QKV: 1})):
        row = aot_reports[f"{REFERENCE} {stage}"]
        assert sum(row["attention_calls"].values()) == calls and row["while_loops"] == 0
        assert row["layer_calls"] == layer_calls


@pytest.mark.parametrize("mesh", ["4x1", "8x1"])
def test_many_chips_compute_attention_per_device(aot_reports, mesh):
    """Data parallel: no collective at all (the prefix is computed replicated, the batch
    stays split), attention per device, FLOPs per device = one chip's / chips (XLA counts
    the same program on every TPU generation)."""
    target = "v5e:2x2" if mesh == "4x1" else "v4:2x2x1"
    for stage in aot.STAGES:
        row, one = aot_reports[f"{target} {stage} {mesh}"], aot_reports[f"{REFERENCE} {stage}"]
        assert row["mesh"] == [int(mesh[0]), 1] and row["collectives"] == {}
        assert row["attention_calls"] == one["attention_calls"] and row["while_loops"] == 0
        assert row["layer_calls"] == one["layer_calls"]
        share = 1 if stage == "prefix" else row["devices"]  # the prefix: every device, whole
        assert row["xla_flops"] * share == pytest.approx(one["xla_flops"], rel=0.05)


def test_model_parallel_splits_heads(aot_reports):
    """2 x 2 (data, model): XLA's matmuls around rope_fused, heads split, so each device does
    a quarter of the work: its matmul FLOPs are a quarter of flops.py's count (plus the
    norms' and GELU's elementwise work, up to 20% at the tiny width); only the all-reduces of
    the two row-parallel matmuls per layer (attention out, MLP out) cross devices, never an
    all-gather or all-to-all of activations."""
    row, one = aot_reports[f"{REFERENCE} second 2x2"], aot_reports[f"{REFERENCE} second"]
    assert row["collectives"] == {"all-reduce": 2 * LAYERS}
    assert row["attention_calls"] == one["attention_calls"] and row["layer_calls"] == {}
    quarter = one["model_flops_linear"] / 4  # one device's count / 4
    assert quarter <= row["xla_flops"] <= 1.2 * quarter


def test_report_figures_agree_with_the_flop_count(aot_reports):
    """TPU bytes add the Mosaic calls' operands and results to XLA's (which counts them as
    nothing); the H100's tally has none. XLA's TPU count covers the matmuls flops.py counts:
    inside fused_layer's kernels from their CostEstimate, elsewhere its own (attention is in
    rope_fused, which it cannot see), plus elementwise work flops.py leaves out (up to 20% of
    the tiny preset's matmul FLOPs at width 64 where the norms and GELU run in XLA, with model
    parallelism); the H100 HLO tally is the dense count (cuDNN computes local layers as
    masked dense attention)."""
    for row in aot_reports.values():
        devices = row["devices"]
        assert row["flops"] > 0 and row["bytes_accessed"] > 0
        assert 0 < row["roof_fraction"] <= 1
        assert row["compute_texts_per_s"] >= row["roofline_texts_per_s"] > 0
        assert row["peak_memory"] >= row["temp_memory"] >= 0
        if row["stage"] == "prefix":
            continue
        if tpu(row):  # bytes: XLA's, plus at least k and v of every layer read by Mosaic
            width = TINY.hidden_size // row["mesh"][1]  # the heads of one device
            kv_bytes = 2 * 2 * width * row["tokens"] * TINY.num_hidden_layers
            assert row["bytes_accessed"] > row["mosaic_bytes"] >= kv_bytes, row["case"]
        else:
            assert row["mosaic_bytes"] == 0
        if row["mesh"][1] > 1:
            continue
        if tpu(row):
            linear = row["model_flops_linear"]
            assert linear <= row["xla_flops"] <= 1.2 * linear, row["case"]
            assert row["flops"] == pytest.approx(
                row["xla_flops"] + row["model_flops"] - linear)
        else:
            dense = flops.second_stage_flops(TINY, row["batch"], row["length"], PREFIX_LEN,
                                             attention="dense") / devices
            assert row["flops"] == pytest.approx(dense, rel=1e-3)


def test_largest_default_batch_fits_the_chip(aot_reports):
    """The default plan's largest second-stage batch on one device of v5e (the least memory
    per TPU device) and the H100: its peak fits 90% of the chip's memory. On every target
    the temporaries per token stay under what the planner assumes (recorded from the base
    model, which needs more)."""
    for target in LARGEST:
        assert aot_reports[f"{target} largest"]["peak_memory"] <= 0.9 * aot.chip(
            target).hbm_bytes
    for target in aot.TARGETS:
        row = one_device(aot_reports, target)
        platform = "tpu" if tpu(row) else "gpu"
        assert row["temp_bytes_per_token"] <= buckets.bytes_per_token(
            platform, row["device_kind"], row["attention"])


def test_bad_targets_and_stages_are_named():
    with pytest.raises(UserError, match="unknown target 'v9:2x2'"):
        aot.compile_stage("v9:2x2", "second", 8, 128)
    with pytest.raises(UserError, match="unknown stage 'third'"):
        aot.compile_stage("v5e:2x2", "third", 8, 128)
