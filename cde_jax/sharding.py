"""The sharding rules: the one place that maps the model and its batches onto devices.

Parameters get logical axis names from `PARAM_AXES` (path regex -> names, first match wins);
`LOGICAL_RULES` maps logical names onto the mesh axes ("data", "model"). Model code never
names a device: batches split on "data", attention heads and the MLP's hidden units split on
"model" (tensor parallelism) when that axis is larger than 1. Every parameter of two or more
dimensions has its own row; the catch-all row is for vectors (a test walks the model).
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .validation import UserError

DATA, MODEL = "data", "model"
CATCH_ALL = r".*"

LOGICAL_RULES: dict[str, str | None] = {
    "batch": DATA,
    "heads": MODEL,
    "mlp": MODEL,
    "vocab": None,
    "embed": None,
    "head_dim": None,
}

PARAM_AXES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"attn/wqkv/kernel$", ("embed", None, "heads", "head_dim")),
    (r"attn/wqkv/bias$", (None, "heads", "head_dim")),
    (r"attn/wo/kernel$", ("heads", "head_dim", "embed")),
    (r"mlp/wi/kernel$", ("embed", None, "mlp")),
    (r"mlp/wi/bias$", (None, "mlp")),
    (r"mlp/wo/kernel$", ("mlp", "embed")),
    (r"tok_embeddings/embedding$", ("vocab", "embed")),
    # The small MLP heads (d x d, d x 8d): a few MB, cheaper whole than split.
    (r"(mlp|prompt_projection|output_projection)/fc[12]/kernel$", (None, None)),
    (CATCH_ALL, ()),  # vectors: norms, biases, the null embedding
)


def make_mesh(model_parallel: int = 1, devices=None) -> Mesh:
    """All devices (every host's) as a (data, model) mesh."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % model_parallel:
        raise UserError(f"{len(devices)} devices do not split into model_parallel="
                        f"{model_parallel}")
    grid = np.array(devices).reshape(len(devices) // model_parallel, model_parallel)
    return Mesh(grid, (DATA, MODEL))


def traced_on(mesh: Mesh, fn):
    """`fn`, traced with `mesh` as JAX's abstract mesh: every jitted stage and training step
    is traced so, so that sharding constraints and `shard_map`s inside name its axes. No
    decision is read back from it: the kernels get theirs from `attention.Plan`."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced


def device_axes(mesh: Mesh | None) -> dict[str, int]:
    """{axis: size} of `mesh` when it splits devices (empty for no mesh or one device): the
    axes a Mosaic call, which XLA cannot partition, is run per device over, size-1 axes
    included (none may stay automatic around it)."""
    if mesh is None or mesh.size == 1:
        return {}
    return dict(mesh.shape)


def split_on(axes: dict[str, int], axis: str, size: int) -> str | None:
    """`axis` where it is one of `axes` (`device_axes`) and divides `size`: what a dimension
    of that size is split on per device; else None (whole on every device)."""
    return axis if axis in axes and size % axes[axis] == 0 else None


def per_device(fn, mesh: Mesh | None, specs, out_specs):
    """`fn` run on each device's own blocks: `jax.shard_map` over `mesh`'s axes
    (`device_axes`), operands split by `specs(axes)` and results by `out_specs(axes)`.
    Without axes, `fn` itself. Axes that a user's own `shard_map` around the stage has made
    manual are split already: they are left out, the one thing read from the trace (a
    nested map over them would fail)."""
    axes = device_axes(mesh)
    context = jax.sharding.get_abstract_mesh()
    manual = set() if context.empty else set(context.manual_axes)
    axes = {a: n for a, n in axes.items() if a not in manual}
    if not any(n > 1 for n in axes.values()):
        return fn

    def run(*operands):
        in_specs, out = specs(axes, *operands), out_specs(axes, *operands)
        return jax.shard_map(fn, mesh=context if manual else mesh, in_specs=in_specs,
                             out_specs=out, axis_names=set(axes), check_vma=False)(*operands)
    return run


def logical_axes(path: str) -> tuple[str | None, ...]:
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, path):
            return axes
    raise AssertionError("PARAM_AXES ends with the catch-all")


def spec(axes: tuple[str | None, ...], mesh: Mesh, shape: tuple[int, ...] | None = None) -> P:
    """Logical axes -> PartitionSpec. A dimension stays whole when its mesh axis has size 1
    or does not divide it (e.g. 3 heads on 2 devices)."""
    out = []
    for i, name in enumerate(axes):
        mesh_axis = LOGICAL_RULES.get(name) if name else None
        size = mesh.shape[mesh_axis] if mesh_axis else 1
        if size == 1 or (shape is not None and shape[i] % size):
            mesh_axis = None
        out.append(mesh_axis)
    return P(*out)


def param_sharding(path: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(logical_axes(path), mesh, shape))


def param_shardings(shapes: dict[str, tuple[int, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    """{parameter path: sharding} for a flat `{path: shape}` dict."""
    return {path: param_sharding(path, shape, mesh) for path, shape in shapes.items()}


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Axis `axis` (the rows) split over "data", every other axis whole."""
    return NamedSharding(mesh, P(*[None] * axis, LOGICAL_RULES["batch"]))


def stacked_batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """(micro-batches, rows, ...) arrays: rows split over "data" when they divide evenly,
    else whole (a batch of 3 rows on 2 devices still runs)."""
    if shape[1] % data_shards(mesh):
        return replicated(mesh)
    return batch_sharding(mesh, axis=1)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place(value, shard: NamedSharding) -> jax.Array:
    """A value, the same on every process, laid out on a (possibly multi-host) mesh; an
    array already laid out so is returned as it is."""
    if isinstance(value, jax.Array) and value.sharding == shard:
        return value
    value = value if isinstance(value, jax.Array) else np.asarray(value)
    return jax.make_array_from_callback(value.shape, shard, lambda idx: value[idx])


def data_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA]
