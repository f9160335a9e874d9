"""Cluster-packed batches: every batch is cut from one neighbourhood of the data.

Clusters are put in the order of a greedy nearest-centroid tour (upstream's "tsp_greedy":
start at a random cluster, always step to the most similar unvisited one), each cluster's
members shuffled, and the whole sequence cut into batches of exactly `batch_size`. A
cluster larger than a batch fills whole batches; its remainder shares a batch with the
start of the next cluster along the tour, its nearest neighbour, so mixed batches are
still local. Every example is in one batch, except the last `n mod batch_size` of the
sequence, which are in none (upstream drops the incomplete batch too).

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py): n examples, k
clusters, d the centroid width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NO_BATCH = -1


class Packing(NamedTuple):
    cluster_n: np.ndarray  # int64: each example's cluster, numbered along the tour from 0
    batch_n: np.ndarray    # int64: each example's batch in epoch order, NO_BATCH if none
    clusters: int          # clusters with at least one example


@jax.jit
def _tour(centroids_ud, start):
    """The greedy tour from `start`: (k,) cluster indices. Ties go to the lower index."""
    k = centroids_ud.shape[0]

    def step(i, state):
        order_u, visited_u, current = state
        sims_u = jnp.where(visited_u, -jnp.inf, centroids_ud @ centroids_ud[current])
        following = jnp.argmax(sims_u)
        return order_u.at[i].set(following), visited_u.at[following].set(True), following

    order_u = jnp.zeros(k, jnp.int32).at[0].set(start)
    visited_u = jnp.zeros(k, bool).at[start].set(True)
    return jax.lax.fori_loop(1, k, step, (order_u, visited_u, start))[0]


def greedy_tour(centroids_ud: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every row of `centroids_ud` once, from a random one, each next the most similar
    (largest inner product) of those not yet visited."""
    start = jnp.int32(rng.integers(len(centroids_ud)))
    return np.asarray(_tour(jnp.asarray(centroids_ud, jnp.float32), start))


def pack_batches(cluster_n: np.ndarray, centroids_ud: np.ndarray, batch_size: int,
                 seed: int) -> Packing:
    """Batches along the tour of the clusters that have examples (module docstring);
    deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    cluster_n = np.asarray(cluster_n, np.int64)
    used_u = np.unique(cluster_n)
    tour = used_u[greedy_tour(centroids_ud[used_u], rng)]
    rank_u = np.zeros(len(centroids_ud), np.int64)
    rank_u[tour] = np.arange(len(tour))
    by_cluster = np.argsort(rank_u[cluster_n], kind="stable")
    bounds = np.cumsum(np.bincount(rank_u[cluster_n], minlength=len(tour)))[:-1]
    sequence = np.concatenate([rng.permutation(m) for m in np.split(by_cluster, bounds)])
    full = len(sequence) // batch_size * batch_size
    batch_n = np.full(len(cluster_n), NO_BATCH, np.int64)
    batch_n[sequence[:full]] = np.arange(full) // batch_size
    return Packing(rank_u[cluster_n], batch_n, len(tour))
