"""Training checkpoints (orbax-checkpoint) and the export of a trained model.

A checkpoint holds everything the next step depends on: parameters, optimizer state, the
step, the data position and the base RNG key (step keys are `fold_in(key, step)`). Orbax
writes each one to a temporary name and renames it, so a killed run leaves the previous
checkpoint intact; restoring onto the live arrays' shardings puts it straight on the mesh.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from .. import convert
from ..convert import released
from ..convert.checkpoint import restore_error, settled_event_loops
from ..params import flat_params


class TrainState(NamedTuple):
    step: int
    params: dict
    opt_state: object
    data_position: int
    rng_key: np.ndarray  # uint32 (2,), `jax.random.PRNGKey`


def checkpoint_steps(directory: str | Path) -> list[int]:
    """The steps of the finished checkpoints in `directory` (none if it does not exist)."""
    return sorted(ocp.path.step.checkpoint_steps(Path(directory).absolute()))


class Checkpoints:
    """Saves are synchronous: a save that fails (a full disk) raises here, in the training
    loop, where an asynchronous one would fail later, in orbax's threads. The threads that
    write a synchronous save still log their failure with its traceback, some after the save
    has raised it: `_RaisedElsewhere` drops those records during a save, and for good after
    one that failed (the error is the caller's to report)."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def save(self, state: TrainState) -> None:
        meta = {"step": state.step, "data_position": state.data_position,
                "rng_key": np.asarray(state.rng_key).tolist()}
        absl = logging.getLogger("absl")  # orbax logs through absl
        quiet = _RaisedElsewhere()
        absl.addFilter(quiet)
        with settled_event_loops():
            self.manager.save(state.step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                meta=ocp.args.JsonSave(meta)))
        absl.removeFilter(quiet)

    def restore_latest(self, like: TrainState) -> TrainState | None:
        """The newest checkpoint laid out like `like`'s arrays, or None if there is none."""
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            (like.params, like.opt_state))
        args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract[0]),
                                  opt_state=ocp.args.StandardRestore(abstract[1]),
                                  meta=ocp.args.JsonRestore())
        with settled_event_loops():
            try:
                got = self.manager.restore(step, args=args)
            except Exception as e:
                raise restore_error(Path(str(self.manager.directory)) / str(step), e) from e
        meta = got.meta
        return TrainState(meta["step"], got.params, got.opt_state, meta["data_position"],
                          np.asarray(meta["rng_key"], np.uint32))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _RaisedElsewhere(logging.Filter):
    """Drops the records of errors that other threads log with their traceback: orbax's
    writers, whose failure the save raises in the thread that called it."""

    def __init__(self):
        super().__init__()
        self.caller = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.thread != self.caller)


def export_released(model: nnx.Module, base: convert.Checkpoint, out: str | Path, *,
                    config_json: dict, overwrite: bool = False) -> Path:
    """A trained model -> the released layout (`model.safetensors` + configs + tokenizer),
    loadable by `cde_jax.load` and the PyTorch reference; written atomically."""
    flat = {path: np.asarray(x) for path, x in flat_params(model).items()}
    tensors = convert.released_tensors(flat)
    trained = convert.Checkpoint(flat, base.backbone, base.cde, config_json,
                                 released.fingerprint(sorted(tensors.items())),
                                 base.tokenizer_dir)
    return convert.write_released(trained, out, overwrite=overwrite)
