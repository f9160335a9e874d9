"""`cde_jax.load(path)` and the loaded model's stable array API.

`first_stage` / `second_stage` take numpy token arrays and return float32 numpy embeddings
(unnormalized, as upstream). Both are jit-compiled once per input shape; the second stage's
prefix (`Context`) is prepared once per set of dataset embeddings and reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import convert
from .config import CdeConfig, ModernBertConfig
from .model import Context, ContextualEmbedder
from .params import abstract_model, with_params
from .tokenization import load_tokenizer


def load(path: str | Path, *, dtype: str | None = None, param_dtype: str | None = None,
         backbone_config: str | Path | None = None) -> "CdeModel":
    """Loads a converted dir or a released-layout dir (config.json + model.safetensors).

    dtype: compute dtype ("float32" default, "bfloat16" for accelerators); param_dtype
    defaults to the stored one (float32 for released checkpoints).
    """
    path = Path(path)
    if convert.is_converted(path):
        ckpt = convert.read_converted(path)
    else:
        ckpt = convert.read_released(convert.source.local_checkpoint(path),
                                     backbone_config=backbone_config)
    return CdeModel.from_checkpoint(ckpt, dtype=dtype, param_dtype=param_dtype)


def _int_tokens(name: str, array, shape=None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise ValueError(f"{name} must be a 2-D integer array, got {array.dtype} {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, input_ids has {shape}")
    return array.astype(np.int32)


class CdeModel:
    """A loaded cde checkpoint: parameters, configs, tokenizer and compiled stages."""

    def __init__(self, model: ContextualEmbedder, backbone: ModernBertConfig, cde: CdeConfig, *,
                 fingerprint: str, tokenizer=None, config_json: dict | None = None):
        self.backbone_config, self.config = backbone, cde
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer
        self.config_json = config_json or {}
        self.graphdef, self.params = nnx.split(model)
        self._first = jax.jit(self._first_fn)
        self._context = jax.jit(self._context_fn)
        self._second = jax.jit(self._second_fn)
        self._cached_context: tuple[str, Context] | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: "convert.Checkpoint", *, dtype: str | None = None,
                        param_dtype: str | None = None) -> "CdeModel":
        param_dtype = param_dtype or ckpt.backbone.param_dtype
        backbone = ckpt.backbone.replace(param_dtype=param_dtype, dtype=dtype or "float32")
        model = with_params(abstract_model(backbone, ckpt.cde,
                                           has_null_embedding=ckpt.has_null_embedding),
                            ckpt.flat, dtype=param_dtype)
        tokenizer = load_tokenizer(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else None
        return cls(model, backbone, ckpt.cde, fingerprint=ckpt.fingerprint, tokenizer=tokenizer,
                   config_json=ckpt.config_json)

    @property
    def model(self) -> ContextualEmbedder:
        return nnx.merge(self.graphdef, self.params)

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    # --- compiled pure functions of (params, arrays) ---------------------------------
    def _first_fn(self, params, input_ids, attention_mask):
        return nnx.merge(self.graphdef, params).first_stage_model(input_ids, attention_mask)

    def _context_fn(self, params, dataset_embeddings):
        return nnx.merge(self.graphdef, params).second_stage_model.context(dataset_embeddings)

    def _second_fn(self, params, input_ids, attention_mask, context):
        return nnx.merge(self.graphdef, params).second_stage_model(input_ids, attention_mask,
                                                                     context)

    # --- public array API --------------------------------------------------------------
    def first_stage(self, input_ids, attention_mask) -> np.ndarray:
        """Dataset embeddings (n, d) float32 for tokenized minicorpus documents."""
        ids = _int_tokens("input_ids", input_ids)
        mask = _int_tokens("attention_mask", attention_mask, ids.shape)
        return np.asarray(self._first(self.params, ids, mask), dtype=np.float32)

    def check_dataset_embeddings(self, dataset_embeddings) -> np.ndarray:
        emb = np.asarray(dataset_embeddings, dtype=np.float32)
        if emb.ndim == 3 and emb.shape[0] == 1:
            emb = emb[0]
        if emb.ndim != 2 or emb.shape[1] != self.hidden_size:
            raise ValueError(f"dataset embeddings must be (n, {self.hidden_size}), got "
                             f"{np.shape(dataset_embeddings)}")
        if emb.shape[0] == 0:
            raise ValueError("dataset embeddings are empty (0 rows)")
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad.size:
            raise ValueError(f"dataset embeddings have non-finite values in row(s) "
                             f"{bad[:10].tolist()}")
        return emb

    def context(self, dataset_embeddings=None) -> Context:
        """The second stage's prefix for these dataset embeddings (None: null-dataset mode),
        computed once and cached for the last embeddings seen."""
        if dataset_embeddings is None:
            key, emb = "null", None
        else:
            emb = self.check_dataset_embeddings(dataset_embeddings)
            key = hashlib.sha256(emb.tobytes() + str(emb.shape).encode()).hexdigest()
        if self._cached_context is None or self._cached_context[0] != key:
            self._cached_context = (key, self._context(self.params, emb))
        return self._cached_context[1]

    def second_stage(self, input_ids, attention_mask, dataset_embeddings) -> np.ndarray:
        """Query/document embeddings (b, d) float32 given dataset embeddings (n, d), a
        prepared `Context`, or None for null-dataset mode."""
        ids = _int_tokens("input_ids", input_ids)
        mask = _int_tokens("attention_mask", attention_mask, ids.shape)
        ctx = dataset_embeddings if isinstance(dataset_embeddings, Context) else \
            self.context(dataset_embeddings)
        return np.asarray(self._second(self.params, ids, mask, ctx), dtype=np.float32)
