"""The released (PyTorch) tensor names <-> cde_jax parameter paths, as one table of data.

Each row is (released template, JAX path template, transform). `{stage}` stands for a
ModernBERT inside the checkpoint, `{i}` for a layer index. Templates compile to regexes in
both directions, so one table serves conversion, validation and the reverse export.
Every transform is a transpose and/or reshape: exact, and exactly invertible.
"""

from __future__ import annotations

import enum
import math
import re

import numpy as np


class Transform(enum.Enum):
    IDENTITY = "identity"        # same array
    RESHAPE = "reshape"          # a flat bias -> the output dims: (3*h*k,) -> (3, h, k)
    LINEAR = "linear"            # torch (out, in) -> kernel (in, *out_dims)
    LINEAR_HEADS_IN = "linear_heads_in"  # torch (d, h*k) -> kernel (h, k, d)

    def to_jax(self, tensor: np.ndarray, jax_shape: tuple[int, ...]) -> np.ndarray:
        if self in (Transform.LINEAR, Transform.LINEAR_HEADS_IN):
            tensor = tensor.T
        return tensor.reshape(jax_shape)

    def to_torch(self, array: np.ndarray, torch_shape: tuple[int, ...]) -> np.ndarray:
        if self in (Transform.LINEAR, Transform.LINEAR_HEADS_IN):
            return np.ascontiguousarray(array.reshape(torch_shape[::-1]).T)
        return array.reshape(torch_shape)

    def torch_shape(self, jax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self is Transform.RESHAPE:
            return (math.prod(jax_shape),)
        if self is Transform.LINEAR:
            return (math.prod(jax_shape[1:]), jax_shape[0])
        if self is Transform.LINEAR_HEADS_IN:
            return (jax_shape[-1], math.prod(jax_shape[:-1]))
        return tuple(jax_shape)


T = Transform

# The ModernBERT encoders of the checkpoint: released prefix -> JAX prefix.
ENCODERS = {
    "first_stage_model.embedder": "first_stage_model/embedder",
    "second_stage_model.backbone": "second_stage_model/backbone",
}

KEY_MAP: tuple[tuple[str, str, Transform], ...] = (
    ("{stage}.embeddings.tok_embeddings.weight", "{stage}/embeddings/tok_embeddings/embedding",
     T.IDENTITY),
    ("{stage}.embeddings.norm.weight", "{stage}/embeddings/norm/scale", T.IDENTITY),
    ("{stage}.embeddings.norm.bias", "{stage}/embeddings/norm/bias", T.IDENTITY),
    ("{stage}.layers.{i}.attn_norm.weight", "{stage}/layers/{i}/attn_norm/scale", T.IDENTITY),
    ("{stage}.layers.{i}.attn_norm.bias", "{stage}/layers/{i}/attn_norm/bias", T.IDENTITY),
    ("{stage}.layers.{i}.attn.Wqkv.weight", "{stage}/layers/{i}/attn/wqkv/kernel", T.LINEAR),
    ("{stage}.layers.{i}.attn.Wqkv.bias", "{stage}/layers/{i}/attn/wqkv/bias", T.RESHAPE),
    ("{stage}.layers.{i}.attn.Wo.weight", "{stage}/layers/{i}/attn/wo/kernel", T.LINEAR_HEADS_IN),
    ("{stage}.layers.{i}.attn.Wo.bias", "{stage}/layers/{i}/attn/wo/bias", T.IDENTITY),
    ("{stage}.layers.{i}.mlp_norm.weight", "{stage}/layers/{i}/mlp_norm/scale", T.IDENTITY),
    ("{stage}.layers.{i}.mlp_norm.bias", "{stage}/layers/{i}/mlp_norm/bias", T.IDENTITY),
    ("{stage}.layers.{i}.mlp.Wi.weight", "{stage}/layers/{i}/mlp/wi/kernel", T.LINEAR),
    ("{stage}.layers.{i}.mlp.Wi.bias", "{stage}/layers/{i}/mlp/wi/bias", T.RESHAPE),
    ("{stage}.layers.{i}.mlp.Wo.weight", "{stage}/layers/{i}/mlp/wo/kernel", T.LINEAR),
    ("{stage}.layers.{i}.mlp.Wo.bias", "{stage}/layers/{i}/mlp/wo/bias", T.IDENTITY),
    ("{stage}.final_norm.weight", "{stage}/final_norm/scale", T.IDENTITY),
    ("{stage}.final_norm.bias", "{stage}/final_norm/bias", T.IDENTITY),
    ("first_stage_model.mlp.0.weight", "first_stage_model/mlp/fc1/kernel", T.LINEAR),
    ("first_stage_model.mlp.0.bias", "first_stage_model/mlp/fc1/bias", T.IDENTITY),
    ("first_stage_model.mlp.2.weight", "first_stage_model/mlp/fc2/kernel", T.LINEAR),
    ("first_stage_model.mlp.2.bias", "first_stage_model/mlp/fc2/bias", T.IDENTITY),
    ("second_stage_model.{head}.0.weight", "second_stage_model/{head}/fc1/kernel", T.LINEAR),
    ("second_stage_model.{head}.0.bias", "second_stage_model/{head}/fc1/bias", T.IDENTITY),
    ("second_stage_model.{head}.2.weight", "second_stage_model/{head}/fc2/kernel", T.LINEAR),
    ("second_stage_model.{head}.2.bias", "second_stage_model/{head}/fc2/bias", T.IDENTITY),
    ("second_stage_model.sequence_dropout_null_embedding",
     "second_stage_model/sequence_dropout_null_embedding", T.IDENTITY),
)

_HEADS = ("prompt_projection", "output_projection")


def _compile(template: str, encoder_names) -> re.Pattern:
    pattern = re.escape(template)
    for name, alternatives in (("stage", encoder_names), ("head", _HEADS)):
        alt = "|".join(re.escape(a) for a in alternatives)
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alt})")
    pattern = pattern.replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile(pattern + r"\Z")


_TO_JAX = [(_compile(hf, ENCODERS), jx, tf) for hf, jx, tf in KEY_MAP]
_TO_HF = [(_compile(jx, ENCODERS.values()), hf, tf) for hf, jx, tf in KEY_MAP]
_ENCODER_TO_HF = {v: k for k, v in ENCODERS.items()}


def _lookup(table, name: str, encoders: dict[str, str]) -> tuple[str, Transform] | None:
    for pattern, template, transform in table:
        m = pattern.match(name)
        if m:
            groups = m.groupdict()
            if "stage" in groups:
                groups["stage"] = encoders[groups["stage"]]
            return template.format(**groups), transform
    return None


def to_jax_path(hf_key: str) -> tuple[str, Transform] | None:
    """Released name -> ('a/b/0/kernel', transform), or None for a name not in the table."""
    return _lookup(_TO_JAX, hf_key, ENCODERS)


def to_hf_key(jax_path: str) -> tuple[str, Transform]:
    found = _lookup(_TO_HF, jax_path, _ENCODER_TO_HF)
    if found is None:
        raise KeyError(f"no released name for parameter {jax_path!r}: add a row to KEY_MAP")
    return found
