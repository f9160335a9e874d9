"""Analytic FLOP counts of the encoder and the second stage, for model-FLOP utilization.

Matmuls only, a multiply-add counted as 2 FLOPs: per token and layer the four linear layers
(Wqkv, Wo, Wi, Wo_mlp: 2 x their weights), and per visible (query, key) pair and layer
attention's QK^T and PV (2 x 2 x hidden). Norms, softmax, RoPE, GELU, the embedding lookup
and the small MLP heads are left out (well under 1% at ModernBERT-base sizes).

`attention="windowed"` (the default, model FLOPs) counts in a local layer only the pairs with
`|i - j| <= window_radius`, as the model defines it, whatever a kernel executes;
`attention="dense"` counts every pair, which is what a dense masked kernel (XLA's
`dot_product_attention` with a mask, torch SDPA, cuDNN) executes; `attention="none"` counts
the linear layers only, which is what XLA's cost analysis sees of a program whose attention
runs in a custom call it cannot look into (the Mosaic kernels: splash, rope_fused).
"""

from __future__ import annotations

import numpy as np

from .config import GLOBAL, ModernBertConfig

ATTENTION_COUNTS = ("windowed", "dense")
LINEAR_ONLY = "none"


def linear_flops_per_token(cfg: ModernBertConfig) -> int:
    """One layer's four linear layers for one token (biases left out)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    return 2 * (d * 3 * d + d * d + d * 2 * f + f * d)


def visible_pairs(q_start: int, seq: int, radius: int | None) -> int:
    """(query, key) pairs with queries at q_start..seq-1 and keys at 0..seq-1 such that
    `|i - j| <= radius` (None: every pair)."""
    if radius is None:
        return (seq - q_start) * seq
    i = np.arange(q_start, seq)
    return int((np.minimum(seq - 1, i + radius) - np.maximum(0, i - radius) + 1).sum())


def _pairs(cfg: ModernBertConfig, layer_type: str, attention: str, q_start: int,
           seq: int) -> int:
    """The (query, key) pairs of one layer that `attention` counts."""
    if attention not in (*ATTENTION_COUNTS, LINEAR_ONLY):
        raise ValueError(f"attention must be one of {(*ATTENTION_COUNTS, LINEAR_ONLY)}, "
                         f"got {attention!r}")
    if attention == LINEAR_ONLY:
        return 0
    radius = None if layer_type == GLOBAL or attention == "dense" else cfg.window_radius
    return visible_pairs(q_start, seq, radius)


def encoder_flops(cfg: ModernBertConfig, batch: int, seq: int, *,
                  attention: str = "windowed") -> int:
    """`ModernBert` on a (batch, seq) batch of real tokens."""
    per_row = 0
    for layer_type in cfg.layer_types:
        per_row += (seq * linear_flops_per_token(cfg)
                    + 4 * cfg.hidden_size * _pairs(cfg, layer_type, attention, 0, seq))
    return batch * per_row


def second_stage_flops(cfg: ModernBertConfig, batch: int, text_len: int, prefix_len: int, *,
                       attention: str = "windowed") -> int:
    """The second stage's backbone on (batch, text_len) texts after a shared prefix, counted
    as `encoder.run_layers` computes it: layer 0 projects q/k/v for the text tokens only
    (the prefix's are computed once per context), the last layer attends and runs Wo and the
    MLP for the text positions only (the prefix outputs are never pooled)."""
    d = cfg.hidden_size
    seq = prefix_len + text_len
    qkv, rest = 2 * d * 3 * d, linear_flops_per_token(cfg) - 2 * d * 3 * d
    last = cfg.num_hidden_layers - 1
    per_row = 0
    for i, layer_type in enumerate(cfg.layer_types):
        q_start = prefix_len if i == last else 0
        per_row += (text_len if i == 0 else seq) * qkv + (seq - q_start) * rest
        per_row += 4 * d * _pairs(cfg, layer_type, attention, q_start, seq)
    return batch * per_row


def prefix_flops(cfg: ModernBertConfig, prefix_len: int) -> int:
    """The second stage's prefix, computed once per context: layer 0's q/k/v projection of
    its `prefix_len` positions."""
    return prefix_len * 2 * cfg.hidden_size * 3 * cfg.hidden_size
