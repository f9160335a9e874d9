"""The contrastive loss of upstream cde training.

Queries and documents are L2-normalized; scores are cosine similarities times the config's
`logit_scale`; each query's loss is the cross-entropy over every document of the (global)
batch, positives and hard negatives alike, against its positive. When the positive's text
appears several times among the documents, the label mass is spread evenly over the copies.

Dimension key: b queries, c documents, d hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x_nd: jax.Array) -> jax.Array:
    return x_nd / jnp.linalg.norm(x_nd, axis=-1, keepdims=True)


def contrastive_loss(queries_bd: jax.Array, documents_cd: jax.Array, query_label_b: jax.Array,
                     doc_label_c: jax.Array, logit_scale: float):
    """(mean cross-entropy, in-batch accuracy): a query is right when its best-scoring
    document is one of its positives."""
    scores_bc = logit_scale * (l2_normalize(queries_bd) @ l2_normalize(documents_cd).T)
    positive_bc = query_label_b[:, None] == doc_label_c[None, :]
    target_bc = positive_bc / positive_bc.sum(axis=1, keepdims=True)
    loss_b = -(target_bc * jax.nn.log_softmax(scores_bc, axis=1)).sum(axis=1)
    best_b = jnp.argmax(scores_bc, axis=1)
    accuracy = jnp.take_along_axis(positive_bc, best_b[:, None], axis=1).mean()
    return loss_b.mean(), accuracy
