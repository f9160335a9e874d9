"""The released layout: `config.json` + `model.safetensors` (or a sharded index).

Reading validates every name and shape against the model that the configs describe and
reports all problems at once, each naming the tensor. Only safetensors are ever opened:
pickle checkpoints (`pytorch_model.bin` and friends) are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cde_jax.validation import UserError

from . import keymap

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SUPPORTED_DTYPES = ("F32", "F16", "BF16")


class CheckpointError(UserError):
    """A checkpoint that cannot be converted; the message names the file or tensor."""


def weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (one file, or a sharded index)."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / INDEX).exists():
        try:
            weight_map = json.loads((ckpt_dir / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt_dir / INDEX}: not a safetensors index ({e})") from e
        files = {name: ckpt_dir / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            _check_safetensors(path)
        for path in sorted(set(files.values())):
            with safe_open(path, "numpy") as f:
                for name in f.keys():
                    if files.get(name) != path:
                        raise CheckpointError(f"{path}: tensor {name!r} is not listed for this "
                                              f"file in {INDEX}")
        return files
    if (ckpt_dir / WEIGHTS).exists():
        path = ckpt_dir / WEIGHTS
        _check_safetensors(path)
        with safe_open(path, "numpy") as f:
            return {name: path for name in f.keys()}
    pickles = sorted(p.name for p in ckpt_dir.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{ckpt_dir}: only pickle weights ({', '.join(pickles)}); cde_jax "
                              "loads safetensors only and never unpickles a checkpoint")
    raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS} or {INDEX}")


def _check_safetensors(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: missing weight file")
    try:
        with safe_open(path, "numpy") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or of another "
                              f"format such as pickle ({e})") from e


def tensor_specs(files: dict[str, Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape), from the headers only."""
    specs = {}
    for path in sorted(set(files.values())):
        with safe_open(path, "numpy") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = (sl.get_dtype(), tuple(sl.get_shape()))
    return specs


def validate(specs: dict[str, tuple[str, tuple[int, ...]]],
             expected_jax: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, keymap.Transform]]:
    """Checks names and shapes against the model; returns name -> (JAX path, transform)."""
    errors, plan = [], {}
    for name, (dtype, shape) in sorted(specs.items()):
        mapped = keymap.to_jax_path(name)
        if mapped is None or mapped[0] not in expected_jax:
            errors.append(f"unexpected key {name!r}" + (
                "" if mapped is None else " (the model built from the configs has no such "
                "parameter: check the backbone config's bias settings and layer count)"))
            continue
        path, transform = mapped
        want = transform.torch_shape(expected_jax[path])
        if shape != want:
            errors.append(f"wrong shape for {name!r}: checkpoint {shape}, model expects {want}")
        if dtype not in SUPPORTED_DTYPES:
            errors.append(f"unsupported dtype {dtype} for {name!r}")
        plan[name] = mapped
    covered = {path for path, _ in plan.values()}
    for path in sorted(set(expected_jax) - covered):
        errors.append(f"missing key {keymap.to_hf_key(path)[0]!r}")
    if errors:
        shown = "\n  ".join(errors[:50]) + ("" if len(errors) <= 50 else
                                            f"\n  ... and {len(errors) - 50} more")
        raise CheckpointError(f"checkpoint does not match the model:\n  {shown}")
    return plan


def read_tensors(files: dict[str, Path], names: Iterable[str]):
    """Yields (name, numpy array) one at a time, opening each file per tensor so that at
    most one tensor's pages are mapped at once (bounded memory for large checkpoints)."""
    for name in names:
        with safe_open(files[name], "numpy") as f:
            yield name, f.get_tensor(name)


def check_finite(path: Path, name: str, tensor: np.ndarray, how: str = "") -> None:
    """Refuses a tensor with NaN or inf values, naming it: converted, they would turn every
    embedding that touches them into NaN without any error."""
    finite = np.isfinite(tensor)
    if finite.all():
        return
    bad = np.argwhere(~finite)
    first = tuple(int(i) for i in bad[0])
    kinds = " and ".join(k for k, present in (("NaN", np.isnan(tensor).any()),
                                               ("inf", np.isinf(tensor).any())) if present)
    raise CheckpointError(f"{path}: tensor {name!r}{' ' + how if how else ''} has {len(bad)} "
                          f"non-finite value(s) ({kinds}; the first at index {first})")


def fingerprint_update(h: hashlib._Hash, name: str, array: np.ndarray) -> None:
    h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    h.update(np.ascontiguousarray(array).tobytes())


def fingerprint(tensors: Iterable[tuple[str, np.ndarray]]) -> str:
    """sha256 over released-layout tensors in name order: identifies a model's weights."""
    h = hashlib.sha256()
    for name, array in tensors:
        fingerprint_update(h, name, array)
    return h.hexdigest()[:16]


def write_weights(path: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
