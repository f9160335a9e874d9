"""Converter: strict validation with clear errors, atomic output, bit-exact round trip."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TOKENIZER_DIR
from safetensors.numpy import load_file, save_file

import cde_jax
from cde_jax.convert import CheckpointError, convert, read_converted, read_released, write_released
from cde_jax.outputs import OutputExistsError

REPO = Path(__file__).resolve().parents[1]


def copy_released(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(ckpt: Path, edit) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_round_trip_is_bit_exact(synthetic, tmp_path):
    released, converted = synthetic(null_embedding=True)
    exported = write_released(read_converted(converted), tmp_path / "exported")
    a, b = load_file(released / "model.safetensors"), load_file(exported / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name
    assert json.loads((exported / "config.json").read_text()) == \
        json.loads((released / "config.json").read_text())
    # The export is itself a loadable released checkpoint with the same weights.
    assert cde_jax.load(exported).fingerprint == cde_jax.load(released).fingerprint


@pytest.mark.parametrize("case,edit,message", [
    ("missing", lambda t: t.pop("second_stage_model.backbone.layers.2.mlp.Wi.weight"),
     "missing key 'second_stage_model.backbone.layers.2.mlp.Wi.weight'"),
    ("extra", lambda t: t.__setitem__("second_stage_model.backbone.pooler.weight",
                                      np.zeros(3, np.float32)),
     "unexpected key 'second_stage_model.backbone.pooler.weight'"),
    ("extra-layer", lambda t: t.__setitem__("first_stage_model.embedder.layers.9.mlp_norm.weight",
                                            np.ones(64, np.float32)),
     "unexpected key 'first_stage_model.embedder.layers.9.mlp_norm.weight'"),
    ("shape", lambda t: t.__setitem__("first_stage_model.embedder.layers.1.attn.Wqkv.weight",
                                      np.zeros((192, 32), np.float32)),
     r"wrong shape for 'first_stage_model.embedder.layers.1.attn.Wqkv.weight': "
     r"checkpoint \(192, 32\), model expects \(192, 64\)"),
])
def test_bad_tensors_are_named_and_leave_nothing(synthetic, tmp_path, case, edit, message):
    ckpt = copy_released(synthetic()[0], tmp_path / "src")
    edit_weights(ckpt, edit)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=message):
        convert(ckpt, out)
    assert_nothing_written(out)


def test_truncated_file(synthetic, tmp_path):
    ckpt = copy_released(synthetic()[0], tmp_path / "src")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        convert(ckpt, out)
    assert_nothing_written(out)


def test_pickle_is_refused_never_loaded(synthetic, tmp_path):
    ckpt = copy_released(synthetic()[0], tmp_path / "src")
    (ckpt / "model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "PWNED").touch, ())

    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Boom()}))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="only pickle weights.*never unpickles"):
        convert(ckpt, out)
    # The same bytes under the safetensors name are rejected as not safetensors.
    shutil.move(ckpt / "pytorch_model.bin", ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        convert(ckpt, out)
    assert not (tmp_path / "PWNED").exists()
    assert_nothing_written(out)


def test_sharded_index(synthetic, tmp_path):
    released, _ = synthetic()
    ckpt = copy_released(released, tmp_path / "src")
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, ckpt / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert read_released(ckpt).fingerprint == read_released(released).fingerprint


def test_backbone_config_sources(synthetic, tmp_path):
    released, _ = synthetic()
    ckpt = copy_released(released, tmp_path / "src")
    backbone = ckpt / "modernbert_config.json"
    moved = shutil.move(backbone, tmp_path / "tiny_backbone.json")
    # The preset named by `embedder` (ModernBERT-base) does not match these tiny tensors.
    with pytest.raises(CheckpointError, match="wrong shape for 'first_stage_model.embedder."):
        read_released(ckpt)
    assert read_released(ckpt, backbone_config=moved).backbone.hidden_size == 64
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "embedder": "someone/unknown-bert"}))
    with pytest.raises(CheckpointError, match="no backbone settings for embedder "
                                              "'someone/unknown-bert'"):
        read_released(ckpt)
    with pytest.raises(CheckpointError, match="nope.json: backbone config not found"):
        read_released(ckpt, backbone_config=tmp_path / "nope.json")


def test_unsupported_upstream_flag(synthetic, tmp_path):
    ckpt = copy_released(synthetic()[0], tmp_path / "src")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "autoregressive_backbone": True}))
    with pytest.raises(CheckpointError, match="autoregressive_backbone=True is not supported"):
        read_released(ckpt)


def test_hub_source_fails_clearly_offline(tmp_path):
    """Real hub code, exercised up to the network: an unreachable or unknown repo id ends in
    one clear error and no output."""
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="could not download 'cde-jax-tests/no-such-repo' "
                                              "from the Hugging Face hub"):
        convert("cde-jax-tests/no-such-repo", out)
    assert_nothing_written(out)


def test_existing_output_is_not_touched(synthetic, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(synthetic()[0], out)
    assert (out / "keep.txt").read_text() == "mine"


def test_bfloat16_conversion(synthetic, tmp_path):
    """Every stored tensor is the float32 one rounded to bfloat16 (round to nearest even, bit
    for bit); the model computes as a float32 checkpoint cast at load does; and the rounding
    moves the first stage's output by what bfloat16 weights cost (measured 2.4e-3 of the
    max; 2^-9 is a weight's own worst relative rounding)."""
    import ml_dtypes

    released, converted = synthetic()
    out = convert(released, tmp_path / "bf16", param_dtype="bfloat16")
    ckpt, f32_flat = read_converted(out), read_converted(converted).flat
    assert {str(a.dtype) for a in ckpt.flat.values()} == {"bfloat16"}
    assert ckpt.flat.keys() == f32_flat.keys()
    for key, value in ckpt.flat.items():
        rounded = np.asarray(f32_flat[key]).astype(ml_dtypes.bfloat16)
        assert np.array_equal(np.asarray(value).view(np.uint16), rounded.view(np.uint16)), key
    f32, bf16 = cde_jax.load(released), cde_jax.load(out)
    ids = np.array([[50281, 8716, 64, 7267, 27, 23120, 50282]], np.int32)
    mask = np.ones_like(ids)
    a, b = f32.first_stage(ids, mask), bf16.first_stage(ids, mask)
    cast = cde_jax.load(released, param_dtype="bfloat16").first_stage(ids, mask)
    assert np.array_equal(b, cast)
    assert 1e-4 * np.abs(a).max() < np.abs(a - b).max() <= 5e-3 * np.abs(a).max()


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """scripts/make_synthetic_checkpoint.py, then scripts/convert_weights.py on its output and
    on a missing directory: (the three runs, the checkpoint, the converted dir)."""
    tmp = tmp_path_factory.mktemp("script_runs")
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True,
                                    cwd=REPO)
    made = run("scripts/make_synthetic_checkpoint.py", str(tmp / "syn"), "--preset", "tiny",
               "--seed", "3", "--ignore-instruction-tokens", "0", "--tokenizer-dir",
               str(TOKENIZER_DIR))
    done = run("scripts/convert_weights.py", str(tmp / "syn"), str(tmp / "conv"))
    bad = run("scripts/convert_weights.py", str(tmp / "missing-dir"), str(tmp / "x"))
    return (made, done, bad), tmp / "syn", tmp / "conv"


def test_scripts(script_runs):
    """The two CLIs end to end: synthetic checkpoint, then conversion; errors exit 2."""
    (made, done, bad), syn, conv = script_runs
    assert made.returncode == 0, made.stderr
    config = json.loads((syn / "config.json").read_text())
    assert config["pool_ignore_instruction_tokens"] is False
    assert done.returncode == 0, done.stderr
    assert cde_jax.load(conv).config.pool_ignore_instruction_tokens is False
    assert bad.returncode == 2 and "error:" in bad.stderr
