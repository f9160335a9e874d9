"""Parameters as nested dicts (`nnx.split` + `nnx.to_pure_dict`: what optax, orbax and the
sharding rules see) and as flat `{"a/b/0/kernel": array}` dicts (what the converter and the
key map speak), through Flax's `traverse_util`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax.numpy as jnp
from flax import nnx, traverse_util

from .config import CdeConfig, ModernBertConfig
from .model import ContextualEmbedder


def abstract_model(backbone: ModernBertConfig, cde: CdeConfig, *, has_null_embedding: bool,
                   plan=None) -> ContextualEmbedder:
    """The model with shape-only parameters: no memory, no random init. `plan`: its
    `attention.Plan` (None: the backbone's attention on JAX's first device)."""
    return nnx.eval_shape(lambda: ContextualEmbedder(
        backbone, cde, has_null_embedding=has_null_embedding, plan=plan, rngs=nnx.Rngs(0)))


def path(keys: tuple) -> str:
    return "/".join(str(k) for k in keys)


def flatten(tree: Mapping) -> dict:
    """{"a/b/0/kernel": leaf} of a nested dict."""
    return {path(keys): leaf for keys, leaf in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: Mapping) -> dict:
    """The nested dict (string keys) of a flat `{"a/b/0/kernel": leaf}` dict."""
    return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in flat.items()})


def map_params(tree: Mapping, fn: Callable) -> dict:
    """`fn("a/b/0/kernel", leaf) -> leaf` over a nested dict, keeping its keys."""
    return traverse_util.unflatten_dict({keys: fn(path(keys), leaf) for keys, leaf
                                         in traverse_util.flatten_dict(tree).items()})


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, nested parameter dict); `nnx.merge(graphdef, params)` rebuilds the model."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def flat_params(model: nnx.Module) -> dict:
    return flatten(split(model)[1])


def flat_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in flat_params(model).items()}


def fill(params: Mapping, flat: Mapping, fn: Callable = lambda path, value, like: value) -> dict:
    """`params`'s tree holding `fn(path, flat[path], params leaf)` (same names required)."""
    names = set(flatten(params))
    if names != set(flat):
        raise KeyError(f"parameter names differ from the model's: "
                       f"{sorted(names ^ set(flat))[:10]}")
    return map_params(params, lambda p, like: fn(p, flat[p], like))


# The encoders' matmul weights (`encoder.dense`): every call casts them to the compute dtype.
MATMUL_WEIGHTS = re.compile(r"layers/\d+/(attn/(wqkv|wo)|mlp/(wi|wo))/kernel$")


def stage_dtype(path: str, dtype, compute_dtype) -> jnp.dtype:
    """The dtype the compiled stages read parameter `path` (held in `dtype`) in: its own,
    except the encoders' matmul weights where the compute dtype is narrower, which the stages
    read in the compute dtype. Every matmul casts them so anyway, so the results are the
    same bits; cast once at load, no call reads float32 weights and writes their cast (on a
    TPU, ~30 MB per layer and call at base size, docs/performance.md)."""
    dtype, compute = jnp.dtype(dtype), jnp.dtype(compute_dtype)
    return compute if MATMUL_WEIGHTS.search(path) and compute.itemsize < dtype.itemsize \
        else dtype


def for_stages(tree: Mapping, compute_dtype) -> dict:
    """The parameters as the stages read them (`stage_dtype`): the matmul weights cast, the
    rest the same arrays. The held parameters stay as loaded: what `save_pretrained` writes
    and training updates."""
    def cast(path, leaf):
        dtype = stage_dtype(path, leaf.dtype, compute_dtype)
        return leaf if dtype == leaf.dtype else leaf.astype(dtype)
    return map_params(tree, cast)
