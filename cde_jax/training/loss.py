"""The contrastive loss of upstream cde training.

Queries and documents are L2-normalized; scores are cosine similarities times the config's
`logit_scale`; each query's loss is the cross-entropy over every document of the (global)
batch, positives and hard negatives alike, against its positive. When the positive's text
appears several times among the documents, the label mass is spread evenly over the copies.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..ops import l2_normalize


def contrastive_loss(queries_qd: jax.Array, documents_cd: jax.Array, query_label_q: jax.Array,
                     doc_label_c: jax.Array, logit_scale: float):
    """(mean cross-entropy, in-batch accuracy): a query is right when its best-scoring
    document is one of its positives."""
    scores_qc = logit_scale * (l2_normalize(queries_qd) @ l2_normalize(documents_cd).T)
    positive_qc = query_label_q[:, None] == doc_label_c[None, :]
    target_qc = positive_qc / positive_qc.sum(axis=1, keepdims=True)
    loss_q = -(target_qc * jax.nn.log_softmax(scores_qc, axis=1)).sum(axis=1)
    best_q = jnp.argmax(scores_qc, axis=1)
    accuracy = jnp.take_along_axis(positive_qc, best_q[:, None], axis=1).mean()
    return loss_q.mean(), accuracy
