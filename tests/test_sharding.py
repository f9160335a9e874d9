"""The same numbers on 1 device, 8 simulated devices (data and tensor parallel) and 2
processes joined by jax.distributed (each feeding its own rows)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, max_rel_err

from cde_jax.sharding import PARAM_AXES, logical_axes, make_mesh, spec

WORKER = Path(__file__).with_name("sharded_worker.py")


def run_worker(ckpt, out, *args):
    return subprocess.Popen([sys.executable, str(WORKER), str(ckpt), str(out), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def single(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    ckpt = tiny_checkpoint[1]
    finish(run_worker(ckpt, tmp / "one.npz", "--devices", 1))
    return dict(np.load(tmp / "one.npz"))


@pytest.fixture(scope="module")
def eight_devices(tiny_checkpoint, tmp_path_factory):
    """{model_parallel: outputs on 8 devices}"""
    tmp = tmp_path_factory.mktemp("eight_devices")
    outs = {mp: tmp / f"eight-{mp}.npz" for mp in (1, 2)}
    for mp, out in outs.items():
        finish(run_worker(tiny_checkpoint[1], out, "--devices", 8, "--model-parallel", mp))
    return {mp: dict(np.load(out)) for mp, out in outs.items()}


@pytest.mark.parametrize("model_parallel", [1, 2])
def test_eight_devices_match_one(single, eight_devices, model_parallel):
    one, eight = single, eight_devices[model_parallel]
    assert int(eight["devices"]) == 8
    expected = "model" if model_parallel > 1 else None
    assert str(eight["wqkv_spec"]) == str((None, None, expected, None))
    for key in ("context", "embeddings", "raw"):
        diff = np.abs(eight[key] - one[key]).max()
        print(f"1 vs 8 devices (model_parallel={model_parallel}) {key}: max abs diff {diff:.2e}")
        assert diff <= 1e-5, (key, diff)


@pytest.mark.parametrize("model_parallel", [1, 2])
def test_eight_devices_run_the_tpu_kernels(eight_devices, model_parallel):
    """rope_fused and fused_layer's kernels (interpret mode) on 8 devices: per device over
    "data", or with the heads split over "model" (XLA's matmuls around rope_fused there),
    equal to the CPU kernel on the same mesh. The kernels ran: the traced stage holds one
    rope_attention call per layer and, unless "model" is split, fused_layer's two (norm_qkv
    once more for the prefix's layer 0)."""
    out = eight_devices[model_parallel]
    layers = 4  # the tiny preset
    fused = model_parallel == 1
    kernels = {k.removeprefix("kernels_"): int(v) for k, v in out.items()
               if k.startswith("kernels_")}
    assert kernels == {"rope_attention": layers,
                       **({"fused_norm_qkv": layers + 1, "fused_out_mlp": layers} if fused
                          else {})}
    assert max_rel_err(out["fused"], out["unfused"]) <= 1e-5


def test_a_users_shard_map_runs_the_stages(eight_devices):
    """On 8 devices, the second stage inside the user's own shard_map equals the runner's."""
    got, want = eight_devices[1]["shard_map"], eight_devices[1]["shard_map_runner"]
    diff = np.abs(got - want).max()
    print(f"user's shard_map vs the runner, 8 devices: max abs diff {diff:.2e}")
    assert got.shape == (16, 64) and diff <= 1e-5


@pytest.fixture(scope="module")
def two_processes(tiny_checkpoint, tmp_path_factory):
    """Each process's outputs, in process order."""
    tmp = tmp_path_factory.mktemp("two_processes")
    port = free_port()
    outs = [tmp / f"p{i}.npz" for i in range(2)]
    procs = [run_worker(tiny_checkpoint[1], outs[i], "--process-id", i, "--num-processes", 2,
                        "--port", port) for i in range(2)]
    for p in procs:
        finish(p)
    return [dict(np.load(o)) for o in outs]


def test_two_processes_match_one(single, two_processes):
    one, parts = single, two_processes
    merged = np.concatenate([p["embeddings"] for p in sorted(parts, key=lambda p: p["start"])])
    assert merged.shape == one["embeddings"].shape
    for p in parts:
        assert int(p["devices"]) == 2
        assert np.abs(p["context"] - one["context"]).max() <= 1e-5
    diff = np.abs(merged - one["embeddings"]).max()
    print(f"1 vs 2 processes: max abs diff {diff:.2e}")
    assert diff <= 1e-5


def test_rules_table():
    assert logical_axes("second_stage_model/backbone/layers/3/attn/wqkv/kernel") == \
        ("embed", None, "heads", "head_dim")
    assert logical_axes("first_stage_model/mlp/fc1/kernel") == (None, None)  # replicated
    assert logical_axes("first_stage_model/embedder/final_norm/scale") == ()
    assert PARAM_AXES[-1][0] == r".*"
    from jax.sharding import PartitionSpec as P

    class FakeMesh:  # spec() reads only the axis sizes
        shape = {"data": 4, "model": 2}

    assert spec(("embed", None, "heads", "head_dim"), FakeMesh, (64, 3, 4, 16)) == \
        P(None, None, "model", None)
    # 3 heads do not split in 2: that dimension stays whole instead of failing.
    assert spec(("embed", None, "heads", "head_dim"), FakeMesh, (48, 3, 3, 16)) == \
        P(None, None, None, None)
    assert make_mesh().axis_names == ("data", "model")


def test_every_matrix_has_its_own_rule():
    """A parameter of two or more dimensions that only the catch-all row matches would be
    silently replicated on every device: each must have a row of its own."""
    from cde_jax.config import CdeConfig, modernbert_base
    from cde_jax.params import abstract_model, flat_shapes
    from cde_jax.sharding import CATCH_ALL

    shapes = flat_shapes(abstract_model(modernbert_base(), CdeConfig(), has_null_embedding=True))
    assert len(shapes) > 200
    unruled = []
    for path, shape in shapes.items():
        rule = next(pattern for pattern, _ in PARAM_AXES if re.search(pattern, path))
        axes = logical_axes(path)
        assert axes == () or len(axes) == len(shape), (path, axes, shape)
        if len(shape) >= 2 and rule == CATCH_ALL:
            unruled.append(path)
    assert not unruled, f"no sharding rule for: {unruled[:5]}"
