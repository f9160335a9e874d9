"""Pure functions shared by the encoder, both stages and the text API: RoPE, attention masks,
pooling, L2 normalization and cosine similarity.
Shapes are suffixed with the package's dimension key (cde_jax/__init__.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .validation import UserError


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """`theta^(-2i/head_dim)` in float32, computed on the host as transformers does."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_cos_sin(positions_s: jax.Array, head_dim: int, theta: float):
    """Non-interleaved RoPE tables (s, e) in float32: `emb = [pos*inv_freq, pos*inv_freq]`."""
    freqs = positions_s.astype(jnp.float32)[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    emb_se = jnp.concatenate([freqs, freqs], axis=-1)  # freqs: (s, e / 2)
    return jnp.cos(emb_se), jnp.sin(emb_se)


def apply_rope(x_bshe: jax.Array, cos_se: jax.Array, sin_se: jax.Array) -> jax.Array:
    """`x*cos + rotate_half(x)*sin` with `rotate_half([x1, x2]) = [-x2, x1]`, computed in
    float32 half by half (`[x1*cos - x2*sin, x2*cos + x1*sin]`, the same products and sums):
    one concatenate at the end, so XLA fuses it with its input and output instead of
    materializing the rotated copy. Returns x's dtype."""
    half = x_bshe.shape[-1] // 2
    x = x_bshe.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    cos_1s1e, sin_1s1e = (t[None, :, None, :half] for t in (cos_se, sin_se))
    out = jnp.concatenate([x1 * cos_1s1e - x2 * sin_1s1e, x2 * cos_1s1e + x1 * sin_1s1e], -1)
    return out.astype(x_bshe.dtype)


# Finite "minus infinity" for masked logits, the value jax.nn.dot_product_attention uses: a
# query that sees nothing softmaxes to a uniform row instead of NaN. Every kernel masks with it.
MASKED_LOGIT = -0.7 * float(np.finfo(np.float32).max)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("key_mask_bs", "q_pos_t", "k_pos_s"),
                   meta_fields=("window_radius",))
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which keys each query sees, as every attention kernel takes it (one small pytree, the
    window radius static): key j is visible to query i when `key_mask_bs[:, j]` and, in a
    local layer (`window_radius` not None), `|q_pos_t[i] - k_pos_s[j]| <= window_radius`."""

    key_mask_bs: jax.Array  # (b, s), True/1 for real keys
    q_pos_t: jax.Array      # (t,) positions of the queries
    k_pos_s: jax.Array      # (s,) positions of the keys
    window_radius: int | None = None

    @property
    def offset(self) -> int:
        """s - t: queries are the last t of the s keys."""
        return self.k_pos_s.shape[0] - self.q_pos_t.shape[0]

    def window_ts(self) -> jax.Array | None:
        """(t, s) boolean: within the local window (None in a global layer)."""
        if self.window_radius is None:
            return None
        return jnp.abs(self.q_pos_t[:, None] - self.k_pos_s[None, :]) <= self.window_radius


def attention_mask(spec: MaskSpec) -> jax.Array:
    """Boolean (b, 1, t, s) of `spec`. A query that sees nothing gets a uniform softmax over
    finite large negatives in `jax.nn.dot_product_attention` (never NaN)."""
    mask_b1ts = spec.key_mask_bs.astype(bool)[:, None, None, :]
    window_ts = spec.window_ts()
    if window_ts is not None:
        mask_b1ts = mask_b1ts & window_ts[None, None]
    return mask_b1ts


# Scoped VMEM a Pallas TPU kernel may use: Mosaic's default is 16 MiB on v4/v5e (32 on v6e);
# v4 has 32 MiB of VMEM in all, later chips more. Kernels ask for twice what they count
# (`vmem_limit_bytes`), within those.
VMEM_DEFAULT_BYTES, VMEM_MAX_BYTES = 16 * 2 ** 20, 32 * 2 ** 20


def vmem_limit_bytes(resident: int) -> int:
    """The scoped VMEM limit for a kernel that holds `resident` bytes (its blocks, buffers
    and temporaries, as counted by the kernel): twice that, for what Mosaic adds, at least
    the default and at most what every TPU has."""
    return int(min(max(2 * resident, VMEM_DEFAULT_BYTES), VMEM_MAX_BYTES))


def right_padded(input_ids_bs: jax.Array, mask_bs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows whose kept tokens are one run moved to start at 0 (left padding becomes right
    padding); other rows (holes) as they are. RoPE and the local window see only distances,
    so a text's result does not depend on the side it was padded on, and after the second
    stage's prefix the text follows it directly, as when right-padded. A gather: no loop."""
    kept_bs = mask_bs.astype(bool)
    s = kept_bs.shape[1]
    first_b = jnp.argmax(kept_bs, axis=1)
    last_b = s - jnp.argmax(kept_bs[:, ::-1], axis=1)  # one past the last kept token
    one_run_b = (last_b - first_b) == kept_bs.sum(axis=1)
    shift_b = jnp.where(one_run_b & kept_bs.any(axis=1), first_b, 0)
    index_bs = (jnp.arange(s)[None, :] + shift_b[:, None]) % s
    return (jnp.take_along_axis(input_ids_bs, index_bs, axis=1),
            jnp.take_along_axis(mask_bs, index_bs, axis=1))


def has_hole(mask_bs: np.ndarray) -> bool:
    """Whether a host mask has a row whose kept tokens are not one run (a hole inside a text;
    padding on either side is not one): what `right_padded` cannot make into lengths."""
    kept_bs = np.asarray(mask_bs).astype(bool)
    s = kept_bs.shape[1]
    first_b, last_b = kept_bs.argmax(axis=1), s - kept_bs[:, ::-1].argmax(axis=1)
    return bool((kept_bs.any(axis=1) & (last_b - first_b != kept_bs.sum(axis=1))).any())


def mean_pool(hidden_bsd: jax.Array, mask_bs: jax.Array) -> jax.Array:
    """Masked mean in float32 with upstream's `+ 1e-20` denominator. `where`, not a product,
    so a non-finite value at a masked position cannot leak into the mean."""
    mask = mask_bs.astype(bool)
    hidden = jnp.where(mask[..., None], hidden_bsd.astype(jnp.float32), 0.0)
    count_b1 = mask.sum(axis=1, keepdims=True).astype(jnp.float32)
    return hidden.sum(axis=1) / (count_b1 + 1e-20)


def instruction_pool_mask(input_ids_bs: jax.Array, mask_bs: jax.Array,
                          end_token_id: int) -> jax.Array:
    """Pooling mask without the instruction prefix (docs/model.md §6, a quirk kept on purpose).

    `end` is the first position > 0 holding `end_token_id` (the ":" of "search_query: ") with
    mask 1; positions 0..end are dropped. Rows without such a token keep their whole mask.
    """
    s = input_ids_bs.shape[1]
    pos_s = jnp.arange(s)
    mask = mask_bs.astype(bool)
    is_end_bs = (input_ids_bs == end_token_id) & mask & (pos_s > 0)[None, :]
    end_b = jnp.argmax(is_end_bs, axis=1)  # first hit; 0 when there is none
    instruction_bs = (pos_s[None, :] <= end_b[:, None]) & (end_b > 0)[:, None]
    return mask & ~instruction_bs


def l2_normalize(x_nd, epsilon: float = 1e-12):
    """Rows (the last axis) scaled to unit L2 norm; a row of norm below `epsilon` is divided
    by `epsilon` instead (a zero row stays zero, never NaN). numpy in, numpy out; jax in
    (also under `jit` / `grad`), jax out."""
    xp = jnp if isinstance(x_nd, jax.Array) else np
    norm = xp.linalg.norm(x_nd, axis=-1, keepdims=True)
    return x_nd / xp.maximum(norm, epsilon)


def cosine_similarity(a, b) -> np.ndarray:
    """Cosine similarity matrix (n, m) of embeddings a (n, d) and b (m, d), float32 numpy; a
    single (d,) vector counts as one row."""
    a_nd, b_md = (np.atleast_2d(np.asarray(x, np.float32)) for x in (a, b))
    if a_nd.ndim != 2 or a_nd.shape[1:] != b_md.shape[1:]:
        raise UserError(f"similarity needs (n, d) and (m, d) embeddings, got shapes "
                        f"{np.shape(a)} and {np.shape(b)}")
    return l2_normalize(a_nd) @ l2_normalize(b_md).T
