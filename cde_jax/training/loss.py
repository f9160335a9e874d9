"""The contrastive loss of upstream cde training.

Queries and documents are L2-normalized; scores are cosine similarities times the config's
`logit_scale`; each query's loss is the cross-entropy over every document of the (global)
batch, positives and hard negatives alike, against its positives: the documents with its
positive's text (the label mass spread evenly over the copies) and, with false-negative
filtering, the documents the filter counts as positives (`false_negative_qc`), which share
the label mass the same way (upstream's multi-positive "smart labels").

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..ops import l2_normalize


def contrastive_loss(queries_qd: jax.Array, documents_cd: jax.Array, query_label_q: jax.Array,
                     doc_label_c: jax.Array, logit_scale: float,
                     false_negative_qc: jax.Array | None = None):
    """(mean cross-entropy, in-batch accuracy): a query is right when its best-scoring
    document is one of its positives."""
    scores_qc = logit_scale * (l2_normalize(queries_qd) @ l2_normalize(documents_cd).T)
    positive_qc = query_label_q[:, None] == doc_label_c[None, :]
    if false_negative_qc is not None:
        positive_qc = positive_qc | false_negative_qc
    target_qc = positive_qc / positive_qc.sum(axis=1, keepdims=True)
    loss_q = -(target_qc * jax.nn.log_softmax(scores_qc, axis=1)).sum(axis=1)
    best_q = jnp.argmax(scores_qc, axis=1)
    accuracy = jnp.take_along_axis(positive_qc, best_q[:, None], axis=1).mean()
    return loss_q.mean(), accuracy
