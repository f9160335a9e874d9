"""Parameter trees as flat `{"a/b/0/kernel": array}` dicts: the form the converter, the
checkpoints and the sharding rules all speak."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import CdeConfig, ModernBertConfig
from .model import ContextualEmbedder


def abstract_model(backbone: ModernBertConfig, cde: CdeConfig, *,
                   has_null_embedding: bool) -> ContextualEmbedder:
    """The model with shape-only parameters: no memory, no random init."""
    return nnx.eval_shape(lambda: ContextualEmbedder(
        backbone, cde, has_null_embedding=has_null_embedding, rngs=nnx.Rngs(0)))


def _key(path) -> str:
    return "/".join(str(p) for p in path)


def map_params(state: nnx.State, fn) -> nnx.State:
    """`fn("a/b/0/kernel", array) -> array` over every parameter of a split state."""
    def key(tree_path):
        return "/".join(str(k.key) for k in tree_path if isinstance(k, jax.tree_util.DictKey))
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(key(p), x), state)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    return {_key(path): var.get_value()
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def flat_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_params(model).items()}


def with_params(model: nnx.Module, flat: Mapping[str, jax.Array | np.ndarray],
                dtype=None) -> nnx.Module:
    """A copy of `model` (abstract or not) holding `flat`'s values, cast to `dtype`."""
    graphdef, state = nnx.split(model)
    flat_state = nnx.to_flat_state(state)
    missing = {_key(p) for p, _ in flat_state} ^ set(flat)
    if missing:
        raise KeyError(f"parameter names differ from the model's: {sorted(missing)[:10]}")
    for path, var in flat_state:
        value = flat[_key(path)]
        var.set_value(jnp.asarray(value, dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat_state))
