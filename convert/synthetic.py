"""Random-weight checkpoints in the released layout, for tests and benchmarks.

The tensor names and shapes are written out here from docs/model.md §2, independently of
`keymap.KEY_MAP`, so a wrong row in the key map fails conversion instead of agreeing with
itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from cde_jax.config import PRESETS, ModernBertConfig
from cde_jax.outputs import atomic_dir

from . import released, source

MODERNBERT_BASE = "answerdotai/ModernBERT-base"
# The config.json key that marks a synthetic checkpoint (kept through conversion, save and
# fine-tuning, which copy config.json), so that anything printing scores can say that they
# come from random weights.
SYNTHETIC_KEY = "cde_jax_synthetic"


def is_synthetic(config_json: dict) -> bool:
    """Whether a checkpoint's config.json marks it as random-weight synthetic."""
    return bool(config_json.get(SYNTHETIC_KEY))


def released_shapes(cfg: ModernBertConfig, *, null_embedding: bool,
                    soft_tokens: int = 8) -> dict[str, tuple[int, ...]]:
    d, f, h3 = cfg.hidden_size, cfg.intermediate_size, 3 * cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}

    def norm(name):
        shapes[f"{name}.weight"] = (d,)
        if cfg.norm_bias:
            shapes[f"{name}.bias"] = (d,)

    def linear(name, out, inp, bias):
        shapes[f"{name}.weight"] = (out, inp)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    for enc in ("first_stage_model.embedder", "second_stage_model.backbone"):
        shapes[f"{enc}.embeddings.tok_embeddings.weight"] = (cfg.vocab_size, d)
        norm(f"{enc}.embeddings.norm")
        for i in range(cfg.num_hidden_layers):
            layer = f"{enc}.layers.{i}"
            if i:
                norm(f"{layer}.attn_norm")
            linear(f"{layer}.attn.Wqkv", h3, d, cfg.attention_bias)
            linear(f"{layer}.attn.Wo", d, d, cfg.attention_bias)
            norm(f"{layer}.mlp_norm")
            linear(f"{layer}.mlp.Wi", 2 * f, d, cfg.mlp_bias)
            linear(f"{layer}.mlp.Wo", d, f, cfg.mlp_bias)
        norm(f"{enc}.final_norm")
    for head, out in (("first_stage_model.mlp", d), ("second_stage_model.prompt_projection",
                                                      d * soft_tokens),
                      ("second_stage_model.output_projection", d)):
        linear(f"{head}.0", d, d, True)
        linear(f"{head}.2", out, d, True)
    if null_embedding:
        shapes["second_stage_model.sequence_dropout_null_embedding"] = (d,)
    return shapes


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Weights ~ N(0, 0.02), norm scales ~ 1 + N(0, 0.1), biases ~ N(0, 0.02): non-trivial
    everywhere, so a swapped or transposed tensor changes the outputs. Wqkv is larger
    (attention logits of std ~2.5, peaked as in a trained model) so that RoPE, window and
    padding masks matter to the outputs."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        x = rng.standard_normal(shape, dtype=np.float32)
        if "norm" in name and name.endswith(".weight"):
            out[name] = 1.0 + 0.1 * x
        elif name.endswith("attn.Wqkv.weight"):
            out[name] = np.float32((2.5 / shape[1]) ** 0.5) * x
        else:
            out[name] = 0.02 * x
    return out


def cde_config_json(*, corpus_size: int, ignore_instruction_tokens: bool,
                    null_embedding: bool) -> dict:
    """A config.json like the released one: contextual keys plus training-only keys."""
    return {
        "architectures": ["ContextualDocumentEmbeddingTransformer"],
        "model_type": "cde",
        "embedder": MODERNBERT_BASE,
        "transductive_corpus_size": corpus_size,
        "transductive_tokens_per_document": 1,
        "pool_ignore_instruction_tokens": ignore_instruction_tokens,
        "pool_ignore_contextual_tokens": True,
        "logit_scale": 50.0,
        "transductive_sequence_dropout_prob": 0.1 if null_embedding else 0.0,
        "autoregressive_backbone": False,
        "disable_dropout": True,
        "limit_layers": None,
        "max_seq_length": 512,
    }


def make_synthetic_checkpoint(out: str | Path, *, preset: str = "tiny", seed: int = 0,
                              ignore_instruction_tokens: bool = True, corpus_size: int = 512,
                              null_embedding: bool = False, tokenizer_dir: str | Path | None = None,
                              backbone: ModernBertConfig | None = None,
                              overwrite: bool = False) -> Path:
    cfg = backbone or PRESETS[preset]()
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else source.embedder_tokenizer(
        MODERNBERT_BASE)
    tensors = random_tensors(released_shapes(cfg, null_embedding=null_embedding), seed)
    config = cde_config_json(corpus_size=corpus_size, null_embedding=null_embedding,
                             ignore_instruction_tokens=ignore_instruction_tokens)
    config[SYNTHETIC_KEY] = {"weights": "random", "preset": None if backbone else preset,
                             "seed": seed}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        released.write_weights(tmp / released.WEIGHTS, tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / source.BACKBONE_FILE).write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
        for name in source.TOKENIZER_FILES:
            if tokenizer_dir and (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
    return Path(out)
