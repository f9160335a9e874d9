"""Frozen configs: the ModernBERT backbone and the contextual (two-stage) settings.

Backbone settings are not in cde-small-v2's `config.json`; they come from a preset keyed by
the `embedder` name, a `modernbert_config.json`, or an explicit file (see `convert.resolve`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from .validation import UserError

GLOBAL, LOCAL = "global", "local"


def setting(default=dataclasses.MISSING, *, help: str, choices=None):
    """A config field with what its command-line flag shows (`commands.flags` makes one flag
    per field): the help text and, optionally, the choices."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})
# Compute and parameter dtypes, by their numpy names. In "bfloat16"/"float16" the matmuls
# take half-precision inputs and accumulate in float32; what they write and keep between ops
# is the activations setting's.
DTYPES = ("float32", "bfloat16", "float16")
# What the encoder keeps between its ops with a half compute dtype: "compute" (the default)
# that dtype, float32 only inside norms, softmax, RoPE and GELU; "float32" float32 between
# ops too, rounding only at matmul inputs (twice the memory traffic, the last 1e-4 of
# fidelity). With float32 compute both are the same program.
ACTIVATIONS = ("compute", "float32")


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    intermediate_size: int = 1152
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    global_attn_every_n_layers: int = 3
    local_attention: int = 128
    global_rope_theta: float = 160000.0
    local_rope_theta: float = 10000.0
    hidden_activation: str = "gelu"
    pad_token_id: int = 50283
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    max_position_embeddings: int = 8192
    # Runtime choices, not part of the checkpoint.
    param_dtype: str = "float32"
    dtype: str = "float32"
    # A kernel name from `attention.names()` ("auto": per platform), checked where the model's
    # `attention.Plan` is made: a config does not import the kernels.
    attention: str = "xla"
    activations: str = "compute"  # one of ACTIVATIONS

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}")
        for field, names in (("dtype", DTYPES), ("param_dtype", DTYPES),
                             ("activations", ACTIVATIONS)):
            if getattr(self, field) not in names:
                raise UserError(f"unknown {field} {getattr(self, field)!r}: choose one of "
                                 f"{', '.join(names)}")
        if self.hidden_activation not in ("gelu", "gelu_python"):
            raise UserError(f"unsupported hidden_activation {self.hidden_activation!r} "
                            "(ModernBERT uses exact 'gelu')")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def layer_types(self) -> tuple[str, ...]:
        n = self.global_attn_every_n_layers
        return tuple(GLOBAL if i % n == 0 else LOCAL for i in range(self.num_hidden_layers))

    @property
    def window_radius(self) -> int:
        """A local-layer query at i sees keys j with |i - j| <= window_radius."""
        return self.local_attention // 2

    def rope_theta(self, layer_type: str) -> float:
        return self.global_rope_theta if layer_type == GLOBAL else self.local_rope_theta

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_activation_dtype(self):
        """The dtype the encoder's activations have between ops (`ACTIVATIONS`)."""
        return jnp.dtype(jnp.float32 if self.activations == "float32" else self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModernBertConfig:
        return dataclasses.replace(self, **changes)

    # --- (de)serialization -------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The backbone's settings in Hugging Face's `config.json` vocabulary."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in _RUNTIME_FIELDS}
        d["model_type"] = "modernbert"
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime) -> ModernBertConfig:
        """Reads a HF ModernBERT config (old flat keys or transformers-5 `rope_parameters`)."""
        if d.get("model_type", "modernbert") != "modernbert":
            raise UserError(f"backbone model_type is {d.get('model_type')!r}, "
                            "expected 'modernbert'")
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls)
              if f.name in d and f.name not in _RUNTIME_FIELDS}
        rope = d.get("rope_parameters") or {}
        if "full_attention" in rope and "rope_theta" in rope["full_attention"]:
            kw["global_rope_theta"] = rope["full_attention"]["rope_theta"]
        if "sliding_attention" in rope and "rope_theta" in rope["sliding_attention"]:
            kw["local_rope_theta"] = rope["sliding_attention"]["rope_theta"]
        if d.get("layer_types"):
            expected = ModernBertConfig(**{**kw, "num_hidden_layers": len(d["layer_types"])})
            names = {"full_attention": GLOBAL, "sliding_attention": LOCAL}
            got = tuple(names.get(t, t) for t in d["layer_types"])
            if got != expected.layer_types:
                raise UserError(f"layer_types {d['layer_types']} is not the every-"
                                f"{expected.global_attn_every_n_layers} global pattern")
        return cls(**kw, **runtime)


_RUNTIME_FIELDS = ("param_dtype", "dtype", "attention", "activations")


def modernbert_base(**runtime) -> ModernBertConfig:
    """answerdotai/ModernBERT-base, the backbone of both cde-small-v2 stages."""
    return ModernBertConfig(**runtime)


def modernbert_tiny(**runtime) -> ModernBertConfig:
    """A 4-layer, 64-wide ModernBERT with the real vocabulary: for tests and smoke runs."""
    return ModernBertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=96, local_attention=32, **runtime)


PRESETS = {"base": modernbert_base, "tiny": modernbert_tiny}

# Backbone presets keyed by the `embedder` name found in a cde checkpoint's config.json.
EMBEDDER_PRESETS = {"answerdotai/ModernBERT-base": modernbert_base}


@dataclasses.dataclass(frozen=True)
class CdeConfig:
    """The contextual settings from cde-small-v2's `config.json` (docs/model.md §2)."""

    transductive_corpus_size: int = 512
    transductive_tokens_per_document: int = 1
    pool_ignore_instruction_tokens: bool = True
    pool_ignore_contextual_tokens: bool = True
    embedder: str = "answerdotai/ModernBERT-base"
    logit_scale: float = 50.0
    transductive_sequence_dropout_prob: float = 0.0
    num_soft_prompt_tokens: int = 8
    instruction_end_token_id: int = 27  # first id of the tokenizer's encoding of ": "

    def __post_init__(self):
        if self.transductive_tokens_per_document != 1:
            raise UserError("transductive_tokens_per_document="
                            f"{self.transductive_tokens_per_document} is not supported (only 1)")

    @property
    def num_context_tokens(self) -> int:
        return self.transductive_corpus_size * self.transductive_tokens_per_document

    def replace(self, **changes) -> CdeConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> CdeConfig:
        """Reads upstream's `config.json`, refusing settings that change the computation."""
        for key, ok in _UNSUPPORTED_UPSTREAM.items():
            if key in d and not ok(d[key]):
                raise UserError(f"config.json: {key}={d[key]!r} is not supported by cde_jax")
        if d.get("dataset_backbone") not in (None, d.get("embedder")):
            raise UserError("config.json: a second-stage backbone different from `embedder` "
                            f"({d['dataset_backbone']!r}) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        # Upstream's default when the key is absent is False (ours follows the v2 release).
        kw.setdefault("pool_ignore_instruction_tokens", False)
        return cls(**{**kw, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Upstream config keys that would change the computation; each maps to "value is fine".
_UNSUPPORTED_UPSTREAM = {
    "autoregressive_backbone": lambda v: not v,
    "pooling_strategy": lambda v: v in (None, "mean"),
    "transductive_tie_token_embeddings": lambda v: not v,
    "limit_layers": lambda v: not v,
    "limit_layers_first_stage": lambda v: not v,
}
