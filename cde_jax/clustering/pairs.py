"""Paired vectors: one training pair (query q, positive document d) as two points, [q; d] and
[d; q], so that k-means groups pairs whose query and document both look alike, whichever
side is which (upstream's `paired_kmeans_faiss`).

Each side is L2-normalized first (so that neither dominates), optionally reduced to its
top `svd_dims` directions of one shared truncated SVD (no centering, as scikit-learn's
TruncatedSVD that upstream uses; here from the Gram matrix of every process's queries and
documents, summed over processes) and normalized again; a pair vector is the two unit
halves side by side, divided by sqrt(2) to unit length.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py): n pairs, d the
embedding width, j the reduced width.
"""

from __future__ import annotations

import numpy as np

from .. import distributed
from ..ops import l2_normalize
from ..validation import UserError

GRAM_ROWS = 1 << 16  # rows per float32 product added into the float64 Gram matrix


def svd_basis(queries_nd: np.ndarray, documents_nd: np.ndarray, dims: int) -> np.ndarray:
    """(d, j) orthonormal columns: the top right singular vectors of every process's rows
    of [queries; documents], each column's sign fixed (largest entry positive) so that every
    process, and every run, gets the same basis."""
    gram_dd = np.zeros((queries_nd.shape[1],) * 2)
    for rows_nd in (queries_nd, documents_nd):
        for start in range(0, len(rows_nd), GRAM_ROWS):
            part_nd = rows_nd[start:start + GRAM_ROWS]
            gram_dd += part_nd.T @ part_nd
    values_d, vectors_dd = np.linalg.eigh(distributed.sum_all(gram_dd))
    basis_dj = vectors_dd[:, np.argsort(values_d)[::-1][:dims]]
    signs_j = np.sign(basis_dj[np.abs(basis_dj).argmax(axis=0), np.arange(basis_dj.shape[1])])
    return (basis_dj * signs_j).astype(np.float32)


def paired_points(queries_nd: np.ndarray, documents_nd: np.ndarray, svd_dims: int
                  ) -> np.ndarray:
    """(2n, 2j) unit rows: this process's [q; d] rows, then its [d; q] rows. `svd_dims` 0 (or
    not below the width) keeps every dimension."""
    if queries_nd.shape != documents_nd.shape:
        raise UserError(f"query embeddings {queries_nd.shape} and document embeddings "
                        f"{documents_nd.shape} differ in shape")
    queries_nd, documents_nd = (l2_normalize(np.asarray(x, np.float32))
                                for x in (queries_nd, documents_nd))
    if 0 < svd_dims < queries_nd.shape[1]:
        basis_dj = svd_basis(queries_nd, documents_nd, svd_dims)
        queries_nd, documents_nd = (l2_normalize(x @ basis_dj)
                                    for x in (queries_nd, documents_nd))
    halves = np.sqrt(np.float32(0.5))
    return np.concatenate([np.hstack([queries_nd, documents_nd]),
                           np.hstack([documents_nd, queries_nd])]) * halves
