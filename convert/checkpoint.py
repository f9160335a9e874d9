"""Checkpoints in memory and on disk: released layout <-> converted cde_jax dir.

A converted dir holds:
  config.json             the upstream contextual config, verbatim
  modernbert_config.json  the backbone settings (HF vocabulary)
  cde_jax.json            format version, weights fingerprint, parameter dtype, source
  params/                 the parameters (orbax-checkpoint)
  tokenizer.json, ...     the tokenizer files, when the source had them
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np

from cde_jax import sharding
from cde_jax.config import CdeConfig, ModernBertConfig
from cde_jax.outputs import atomic_dir, claim
from cde_jax.params import abstract_model, flat_shapes, flatten, unflatten
from cde_jax.tokenization import instruction_end_id, load_tokenizer

from . import keymap, released, source

META_FILE = "cde_jax.json"
PARAMS_DIR = "params"
# What every converted dir holds (the tokenizer files are optional).
CONVERTED_FILES = (META_FILE, "config.json", source.BACKBONE_FILE, PARAMS_DIR)
FORMAT_VERSION = 1
NULL_EMBEDDING_KEY = "second_stage_model.sequence_dropout_null_embedding"
CHUNK_BYTES = 16 << 20  # the largest piece of an array that a conversion writes at once


@dataclasses.dataclass
class Checkpoint:
    """Parameters as a flat `{jax path: numpy array}` dict, plus everything that describes them."""

    flat: dict[str, np.ndarray]
    backbone: ModernBertConfig
    cde: CdeConfig
    config_json: dict
    fingerprint: str
    tokenizer_dir: Path | None = None

    @property
    def has_null_embedding(self) -> bool:
        return "second_stage_model/sequence_dropout_null_embedding" in self.flat


def is_converted(path: str | Path) -> bool:
    """A converted dir, or what is left of one (`params/` without `cde_jax.json`)."""
    return (Path(path) / META_FILE).exists() or (Path(path) / PARAMS_DIR).is_dir()


def _with_tokenizer(ckpt_dir: Path, cde: CdeConfig) -> tuple[CdeConfig, Path | None]:
    if not (ckpt_dir / "tokenizer.json").exists():
        return cde, None
    colon_id = instruction_end_id(load_tokenizer(ckpt_dir))
    return cde.replace(instruction_end_token_id=colon_id), ckpt_dir


def read_released(ckpt_dir: str | Path, *, backbone_config: str | Path | None = None,
                  param_dtype: str = "float32") -> Checkpoint:
    """Reads and strictly validates a released-layout checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    config_json = source.read_json(ckpt_dir / "config.json")
    try:
        cde = CdeConfig.from_dict(config_json)
    except (TypeError, ValueError) as e:
        raise released.CheckpointError(f"{ckpt_dir / 'config.json'}: {e}") from e
    backbone = source.backbone_config(ckpt_dir, config_json, backbone_config)
    cde, tok_dir = _with_tokenizer(ckpt_dir, cde)
    files = released.weight_files(ckpt_dir)
    specs = released.tensor_specs(files)
    expected = flat_shapes(abstract_model(backbone, cde,
                                          has_null_embedding=NULL_EMBEDDING_KEY in specs))
    plan = released.validate(specs, expected)
    h, flat = hashlib.sha256(), {}
    for name, tensor in released.read_tensors(files, sorted(plan)):
        released.check_finite(files[name], name, tensor)
        released.fingerprint_update(h, name, tensor)
        path, transform = plan[name]
        flat[path] = transform.to_jax(tensor, expected[path]).astype(param_dtype)
        if param_dtype != tensor.dtype:  # a float32 value past bfloat16's range becomes inf
            released.check_finite(files[name], name, flat[path], f"as {param_dtype}")
    return Checkpoint(flat, backbone.replace(param_dtype=param_dtype), cde, config_json,
                      h.hexdigest()[:16], tok_dir)


def released_tensors(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `read_released`'s mapping: `{released name: torch-layout array}`."""
    out = {}
    for path, array in flat.items():
        name, transform = keymap.to_hf_key(path)
        array = np.asarray(array)
        out[name] = transform.to_torch(array, transform.torch_shape(array.shape))
    return out


def write_released(ckpt: Checkpoint, out: str | Path, *, overwrite: bool = False) -> Path:
    """Writes `model.safetensors` + `config.json` (+ backbone config, tokenizer) atomically."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        released.write_weights(tmp / released.WEIGHTS, released_tensors(ckpt.flat))
        _write_configs(tmp, ckpt)
    return Path(out)


def _write_configs(out: Path, ckpt: Checkpoint) -> None:
    (out / "config.json").write_text(json.dumps(ckpt.config_json, indent=2) + "\n")
    (out / source.BACKBONE_FILE).write_text(json.dumps(ckpt.backbone.to_hf_dict(), indent=2) + "\n")
    if ckpt.tokenizer_dir is not None:
        for name in source.TOKENIZER_FILES:
            if (ckpt.tokenizer_dir / name).exists():
                shutil.copyfile(ckpt.tokenizer_dir / name, out / name)


def write_converted(ckpt: Checkpoint, out: str | Path, *, source_name: str = "",
                    overwrite: bool = False) -> Path:
    import orbax.checkpoint as ocp

    # Host arrays go to orbax without its defensive deep copy, without OCDBT (which buffers
    # the whole tree), and in chunks of at most CHUNK_BYTES (tensorstore copies and
    # compresses a chunk at a time; a whole 155 MB embedding table as one chunk held two
    # more copies of it): peak memory stays near one copy of the weights.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False)
    tree = unflatten({path: np.asarray(array) for path, array in ckpt.flat.items()})
    chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), tree)
    with atomic_dir(Path(out).absolute(), overwrite=overwrite) as tmp:  # orbax: absolute only
        ocp.Checkpointer(handler).save(tmp / "params",
                                       args=ocp.args.PyTreeSave(tree, save_args=chunked))
        _write_configs(tmp, ckpt)
        meta = {"format_version": FORMAT_VERSION, "fingerprint": ckpt.fingerprint,
                "param_dtype": ckpt.backbone.param_dtype, "source": str(source_name),
                "has_null_embedding": ckpt.has_null_embedding,
                "instruction_end_token_id": ckpt.cde.instruction_end_token_id}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out)


def read_converted(path: str | Path, *, mesh=None) -> Checkpoint:
    """Loads a converted dir: onto `mesh`, laid out by the sharding rules (orbax restores
    each device's part straight from disk), or to host memory without one."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()  # orbax refuses relative paths
    missing = [name for name in CONVERTED_FILES if not (path / name).exists()]
    if missing:
        raise released.CheckpointError(
            f"{path}: incomplete converted checkpoint (missing {', '.join(missing)}); convert "
            "it again")
    meta = source.read_json(path / META_FILE)
    if meta.get("format_version") != FORMAT_VERSION:
        raise released.CheckpointError(f"{path / META_FILE}: format_version "
                                        f"{meta.get('format_version')}, expected {FORMAT_VERSION}")
    config_json = source.read_json(path / "config.json")
    backbone = source.backbone_config(path, config_json, param_dtype=meta["param_dtype"])
    cde = CdeConfig.from_dict(config_json,
                              instruction_end_token_id=meta["instruction_end_token_id"])
    shapes = flat_shapes(abstract_model(backbone, cde,
                                        has_null_embedding=meta["has_null_embedding"]))
    shardings = {} if mesh is None else sharding.param_shardings(shapes, mesh)
    target = unflatten({p: jax.ShapeDtypeStruct(s, np.dtype(meta["param_dtype"]),
                                                sharding=shardings.get(p))
                        for p, s in shapes.items()})
    with settled_event_loops(), ocp.StandardCheckpointer() as checkpointer:
        try:
            restored = checkpointer.restore(path / PARAMS_DIR, target)
        except Exception as e:
            raise restore_error(path / PARAMS_DIR, e, "convert it again") from e
    flat = flatten(restored)
    tok_dir = path if (path / "tokenizer.json").exists() else None
    return Checkpoint(flat, backbone, cde, config_json, meta["fingerprint"], tok_dir)


class _SettlingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first lets the tasks still on it finish."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [task for task in asyncio.all_tasks(self) if not task.done()]
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _SettlingEventLoop()


@contextlib.contextmanager
def settled_event_loops():
    """Event loops created in the block finish their pending tasks before they close.

    Orbax runs a restore on a fresh loop and closes it as soon as one array fails, with the
    other arrays' reads still pending: tensorstore then calls back into the closed loop
    ("RuntimeError: Event loop is closed", printed from its threads) and the abandoned
    coroutines fail again at interpreter exit. Settling the loop ends them properly.
    """
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_SettlingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


# tensorstore's errors start with an absl status code; a stored shape that is not the
# model's comes from orbax.
_ORBAX_READ_ERROR = re.compile(r"[A-Z_]+: |Requested shape: .* is not compatible")


def restore_error(path: Path, error: Exception, hint: str = "") -> Exception:
    """A failed orbax restore of `path`: unreadable files (missing, truncated, not what
    orbax wrote) become one `CheckpointError` naming the first file at fault; anything
    else is returned as it is (a bug)."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if not (isinstance(cause, (OSError, json.JSONDecodeError))
            or isinstance(cause, ValueError) and _ORBAX_READ_ERROR.match(str(cause))):
        return error
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    detail = detail.split(" [tensorstore_spec=")[0]
    return released.CheckpointError(f"{path}: corrupt or incomplete checkpoint ({detail})"
                                    + (f"; {hint}" if hint else ""))


def convert(source_name: str | Path, out: str | Path, *, param_dtype: str = "float32",
            backbone_config: str | Path | None = None, overwrite: bool = False,
            revision: str | None = None) -> Path:
    """Released checkpoint (dir, or hub id at `revision`) -> converted dir, written
    atomically by this process (`outputs.claim`, before the download and the reading)."""
    with claim(out, overwrite=overwrite, alone=True):
        ckpt_dir = source.local_checkpoint(source_name, revision)
        ckpt = read_released(ckpt_dir, backbone_config=backbone_config,
                             param_dtype=param_dtype)
        if ckpt.tokenizer_dir is None:  # released cde checkpoints may lack the tokenizer
            ckpt.tokenizer_dir = source.embedder_tokenizer(ckpt.cde.embedder)
            if ckpt.tokenizer_dir is not None:
                ckpt.cde, _ = _with_tokenizer(ckpt.tokenizer_dir, ckpt.cde)
        name = str(source_name) if revision is None else f"{source_name}@{revision}"
        return write_converted(ckpt, out, source_name=name, overwrite=overwrite)
