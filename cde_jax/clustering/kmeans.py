"""Spherical k-means in JAX, sharded over the mesh's data axis (every device of every process).

Points are unit vectors; a point belongs to the centroid of highest cosine similarity and a
centroid is the normalized sum of its points: Lloyd iterations on the sphere, as faiss's
`Kmeans(spherical=True)` runs them. Each device holds a slice of the points and assigns it
tile by tile (`tile_rows` points against all k centroids: the memory of one tile x k scores,
never n x k); the per-cluster sums and counts of its slice (segment sums) are added up over
the mesh with `psum`, which spans processes, so every device ends each iteration with the
same centroids.

The same clusters on 1 or 8 devices, 1 or 2 processes: every random choice is keyed by a
point's global id, never by its place in a slice, and ties go to the lowest cluster; only
float summation order differs (which can flip a point that is exactly between two
centroids).

The default start is k-means|| (Bahmani et al. 2012, "Scalable k-means++"; Spark MLlib's
default): from one random point, `init_rounds` rounds each draw about `oversampling` x k
candidates with probability proportional to their distance to the nearest candidate so far
(without replacement, in one pass over the points), each point remembering its nearest
candidate; the candidates, weighted by the points nearest to them, then get greedy
k-means++ (as scikit-learn's) and weighted Lloyd iterations (as Spark's LocalKMeans), on
the mesh. It costs about `init_rounds` x `oversampling` + 1 Lloyd iterations' worth of
matmul instead of greedy k-means++'s k passes over the points, and starts better. A round
draws a fixed number of candidates (the Gumbel top-k trick), where the paper keeps each
point independently with the same expected total: static shapes for XLA.

An empty cluster is refilled as faiss does: a populated cluster, chosen with probability
proportional to its size minus one, is split in two, its centroid copied and both copies
nudged apart by +-1/1024 per coordinate.

Shapes are suffixed with the package's dimension key (cde_jax/__init__.py): n points, d their
width, k clusters, r a device's slice, b a tile, l candidates of one draw, m k-means||
candidates, p a device's share of them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from .. import distributed, sharding
from ..config import setting
from ..ops import l2_normalize
from ..validation import UserError, int_in_range

INITS = ("kmeans||", "random", "kmeans++")
PAD_ID = np.iinfo(np.int32).max  # the id of padding rows: after every real id
SPLIT_EPS = 1.0 / 1024
HIGHEST = jax.lax.Precision.HIGHEST
# k-means||: weighted Lloyd iterations on the candidates after k-means++ (Spark's LocalKMeans
# allows 30; on random data 10 and 30 gave the same objective).
CANDIDATE_ITERATIONS = 20
ROWS, ROW_VECTORS, WHOLE = P(sharding.DATA), P(sharding.DATA, None), P()


@dataclasses.dataclass(frozen=True)
class KMeansConfig:
    iterations: int = setting(100, help="Lloyd iterations per run, at most (a run stops "
                                        "earlier at --tol)")
    tol: float = setting(1e-4, help="a run stops once an iteration moves at most this "
                                    "fraction of the points to another cluster (0: only "
                                    "when none moves); the last moves change the "
                                    "objective by far less than a start does")
    nredo: int = setting(3, help="runs from different initial centroids; the one with the "
                                 "highest objective is kept")
    init: str = setting("kmeans||", choices=INITS,
                        help="initial centroids: k-means|| (as Spark MLlib: k-means++ "
                             "starts in init_rounds passes), k random points (as faiss), or "
                             "greedy k-means++ (as scikit-learn: one pass over the points "
                             "per centroid)")
    init_rounds: int = setting(2, help="k-means||: candidate-drawing passes over the points "
                                       "(Spark's default)")
    oversampling: float = setting(2.0, help="k-means||: candidates drawn per pass, per "
                                            "cluster")
    tile_rows: int = setting(4096, help="points per device scored against all centroids at "
                                        "once (memory: tile_rows x k float32)")

    def __post_init__(self):
        for name in ("iterations", "nredo", "init_rounds", "tile_rows"):
            int_in_range(getattr(self, name), name)
        if not 0 <= self.tol < 1:
            raise UserError(f"tol must be in [0, 1), got {self.tol!r}")
        if not self.oversampling > 0:
            raise UserError(f"oversampling must be positive, got {self.oversampling!r}")
        if self.init not in INITS:
            raise UserError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


class Points(NamedTuple):
    """Unit vectors on the mesh: each process's rows first in its block, then zero padding
    (id `PAD_ID`), the block split over its devices."""

    points_nd: jax.Array  # (N, d) float32, rows split over "data"
    ids_n: jax.Array      # (N,) int32: global ids, ascending within every device's slice
    count: int            # real points over all processes: their ids are 0..count-1
    local: int            # this process's real points
    tile: int             # rows of a tile


class KMeansResult(NamedTuple):
    centroids_ud: np.ndarray  # float32 unit rows
    cluster_n: np.ndarray     # int32: this process's points' clusters, in the order given
    objective: float          # mean cosine similarity of the points to their centroids
    history: list[dict]       # per iteration: run, iteration, objective, moved, empty


def place_points(local_nd: np.ndarray, local_ids_n: np.ndarray, mesh, tile_rows: int
                 ) -> Points:
    """This process's points (ascending global ids; all processes' ids together are
    0..count-1) laid out on the mesh in tiles of at most `tile_rows` rows per device."""
    local_nd = np.asarray(local_nd, np.float32)
    count = int(distributed.sum_all(np.asarray(len(local_nd))))
    devices = len(mesh.local_devices)
    per_device = -(-int(distributed.max_all(np.asarray(len(local_nd)))) // devices)
    tile = max(1, min(tile_rows, per_device))
    rows = -(-per_device // tile) * tile * devices
    padded_nd = np.zeros((rows, local_nd.shape[1]), np.float32)
    padded_nd[:len(local_nd)] = local_nd
    ids_n = np.full(rows, PAD_ID, np.int32)
    ids_n[:len(local_nd)] = local_ids_n
    rows = sharding.batch_sharding(mesh)
    return Points(distributed.put_rows(padded_nd, rows), distributed.put_rows(ids_n, rows),
                  count, len(local_nd), tile)


# --- on one device's slice (inside shard_map) ----------------------------------------------
def _assign(points_rd, ids_r, centroids_ud, tile: int):
    """Each point's best centroid, and the mesh's per-cluster sums, counts and similarity
    total, tile by tile."""
    k, d = centroids_ud.shape
    clusters_u = jnp.arange(k, dtype=jnp.int32)

    def one(carry, xs):
        sums_ud, counts_u, total = carry
        x_bd, valid_b = xs
        sims_bu = jnp.matmul(x_bd, centroids_ud.T, precision=HIGHEST)
        best_sim_b = sims_bu.max(axis=1)
        # argmax's answer (the lowest of equal maxima) from two plain reductions: XLA:CPU
        # runs argmax's paired reduction at half the speed of the matmul itself.
        best_b = jnp.where(sims_bu == best_sim_b[:, None], clusters_u, k).min(axis=1)
        weight_b = valid_b.astype(jnp.float32)
        return (sums_ud.at[best_b].add(x_bd * weight_b[:, None]),
                counts_u.at[best_b].add(weight_b), total + (best_sim_b * weight_b).sum()), best_b

    zeros = jax.lax.pcast((jnp.zeros((k, d), jnp.float32), jnp.zeros(k, jnp.float32),
                           jnp.zeros(())), (sharding.DATA,), to="varying")
    tiles = (points_rd.reshape(-1, tile, d), (ids_r != PAD_ID).reshape(-1, tile))
    carry, best = jax.lax.scan(one, zeros, tiles)
    return (best.reshape(-1), *jax.lax.psum(carry, sharding.DATA))


def _rows_by_id(points_rd, ids_r, want_u):
    """The points with these global ids, from whichever slices hold them."""
    at_u = jnp.clip(jnp.searchsorted(ids_r, want_u), 0, ids_r.shape[0] - 1)
    found_u = ids_r[at_u] == want_u
    return jax.lax.psum(jnp.where(found_u[:, None], points_rd[at_u], 0.0), sharding.DATA)


def _gather(x_l, devices: int):
    """Every device's x_l, concatenated in device order, the same on all of them (a psum
    of each device's slot, which shard_map knows to be replicated, unlike all_gather)."""
    slots = jnp.zeros((devices,) + x_l.shape, x_l.dtype)
    return jax.lax.psum(slots.at[jax.lax.axis_index(sharding.DATA)].set(x_l),
                        sharding.DATA).reshape(-1)


def _draw(key, weight_r, ids_r, count: int, devices: int):
    """`count` global ids drawn without replacement with probability proportional to
    `weight_r` over the mesh (the Gumbel top-k trick, one key per point id), best first;
    PAD_ID where fewer points have weight. The same ids on every device and layout."""
    gumbel_r = jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(ids_r)
    score_r = jnp.where((ids_r != PAD_ID) & (weight_r > 0), jnp.log(weight_r) + gumbel_r,
                        -jnp.inf)
    top_l, at_l = jax.lax.top_k(score_r, min(count, ids_r.shape[0]))
    scores, ids = (_gather(x, devices) for x in
                   (top_l, jnp.where(top_l > -jnp.inf, ids_r[at_l], PAD_ID)))
    _, chosen = jax.lax.sort((-scores, ids), num_keys=2)  # ties: the lower id
    return jnp.full(count, PAD_ID, jnp.int32).at[:min(count, chosen.shape[0])].set(
        chosen[:count])


def _kmeans_plus_plus(points_rd, weight_r, ids_r, key, k: int, devices: int):
    """Greedy k-means++ on the sphere (scikit-learn's default) of weighted points: each next
    centroid is the best, by the resulting weighted sum of distances, of 2 + ln k
    candidates drawn with probability proportional to weight x (1 - similarity to the
    nearest centroid so far), i.e. to the squared distance."""
    trials = min(2 + int(np.log(k)), ids_r.shape[0])

    def add(j, state, chosen_l):
        centroids_ud, best_sim_r = state
        candidates_ld = _rows_by_id(points_rd, ids_r, chosen_l)
        sims_rl = jnp.maximum(best_sim_r[:, None],
                              jnp.matmul(points_rd, candidates_ld.T, precision=HIGHEST))
        spread_l = jax.lax.psum((weight_r[:, None] * (1.0 - sims_rl)).sum(axis=0),
                                sharding.DATA)
        pick = jnp.argmin(jnp.where(chosen_l == PAD_ID, jnp.inf, spread_l))
        return centroids_ud.at[j].set(candidates_ld[pick]), sims_rl[:, pick]

    def next_centroid(j, state):
        spread_r = weight_r * jnp.maximum(1.0 - state[1], 0.0)
        return add(j, state, _draw(jax.random.fold_in(key, j), spread_r, ids_r, trials,
                                   devices))

    start = (jnp.zeros((k, points_rd.shape[1]), jnp.float32),
             jax.lax.pcast(jnp.full(ids_r.shape, -jnp.inf), (sharding.DATA,), to="varying"))
    first = add(0, start, _draw(jax.random.fold_in(key, 0), weight_r, ids_r, 1, devices))
    return jax.lax.fori_loop(1, k, next_centroid, first)[0]


def _nearer(points_rd, tile: int, candidates_ld, ids_l, offset, best_sim_r, best_at_r):
    """Each point's nearest candidate so far, given new candidates numbered from `offset`
    (rows of PAD_ID ignored), tile by tile; ties go to the lower number."""
    count, d = candidates_ld.shape
    numbers_l = jnp.arange(count, dtype=jnp.int32)

    def one(_, xs):
        x_bd, sim_b, at_b = xs
        sims_bl = jnp.where(ids_l != PAD_ID,
                            jnp.matmul(x_bd, candidates_ld.T, precision=HIGHEST), -jnp.inf)
        top_b = sims_bl.max(axis=1)
        arg_b = jnp.where(sims_bl == top_b[:, None], numbers_l, count).min(axis=1)
        better_b = top_b > sim_b
        return None, (jnp.where(better_b, top_b, sim_b),
                      jnp.where(better_b, offset + arg_b, at_b))

    _, (sim, at) = jax.lax.scan(one, None, (points_rd.reshape(-1, tile, d),
                                            best_sim_r.reshape(-1, tile),
                                            best_at_r.reshape(-1, tile)))
    return sim.reshape(-1), at.reshape(-1)


def _kmeans_parallel(points_rd, ids_r, key, k: int, devices: int, tile: int, rounds: int,
                     per_round: int):
    """k-means|| (module docstring): 1 + rounds x per_round candidates, weighted by the
    points nearest to them, then weighted greedy k-means++ and Lloyd on them, split over
    the mesh."""
    valid_r = (ids_r != PAD_ID).astype(jnp.float32)
    d = points_rd.shape[1]
    share = -(-(1 + rounds * per_round) // devices)
    candidates_md = jnp.zeros((share * devices, d), jnp.float32)
    taken_m = jnp.full(share * devices, PAD_ID, jnp.int32)

    def add(state, chosen_l, offset):
        candidates_md, taken_m, best_sim_r, best_at_r = state
        rows_ld = _rows_by_id(points_rd, ids_r, chosen_l)
        best_sim_r, best_at_r = _nearer(points_rd, tile, rows_ld, chosen_l, offset,
                                        best_sim_r, best_at_r)
        return (jax.lax.dynamic_update_slice(candidates_md, rows_ld, (offset, 0)),
                jax.lax.dynamic_update_slice(taken_m, chosen_l, (offset,)), best_sim_r,
                best_at_r)

    def one_round(j, state):
        spread_r = valid_r * jnp.maximum(1.0 - state[2], 0.0)
        chosen_l = _draw(jax.random.fold_in(key, j), spread_r, ids_r, per_round, devices)
        return add(state, chosen_l, 1 + (j - 1) * per_round)

    varying = functools.partial(jax.lax.pcast, axis_name=(sharding.DATA,), to="varying")
    start = (candidates_md, taken_m, varying(jnp.full(ids_r.shape, -jnp.inf)),
             varying(jnp.zeros(ids_r.shape, jnp.int32)))
    first = add(start, _draw(jax.random.fold_in(key, 0), valid_r, ids_r, 1, devices), 0)
    candidates_md, taken_m, _, best_at_r = jax.lax.fori_loop(1, rounds + 1, one_round, first)
    weight_m = jax.lax.psum(jax.ops.segment_sum(valid_r, best_at_r, share * devices),
                            sharding.DATA)
    weight_m = jnp.where(taken_m != PAD_ID, weight_m, 0.0)
    mine = jax.lax.axis_index(sharding.DATA) * share
    mine_pd, weight_p = (jax.lax.dynamic_slice_in_dim(x, mine, share)
                         for x in (candidates_md, weight_m))
    centroids_ud = _kmeans_plus_plus(mine_pd, weight_p,
                                     mine + jnp.arange(share, dtype=jnp.int32),
                                     jax.random.fold_in(key, rounds + 1), k, devices)
    return jax.lax.fori_loop(0, CANDIDATE_ITERATIONS,
                             lambda _, c: _weighted_lloyd(mine_pd, weight_p, c), centroids_ud)


def _weighted_lloyd(points_pd, weight_p, centroids_ud):
    """One Lloyd iteration of weighted points (k-means||'s candidates); a cluster without
    weight keeps its centroid."""
    k = centroids_ud.shape[0]
    sims_pu = jnp.matmul(points_pd, centroids_ud.T, precision=HIGHEST)
    best_p = jnp.where(sims_pu == sims_pu.max(axis=1, keepdims=True),
                       jnp.arange(k, dtype=jnp.int32), k).min(axis=1)
    sums_ud, counts_u = jax.lax.psum(
        (jax.ops.segment_sum(points_pd * weight_p[:, None], best_p, k),
         jax.ops.segment_sum(weight_p, best_p, k)), sharding.DATA)
    return jnp.where(counts_u[:, None] > 0, l2_normalize(sums_ud), centroids_ud)


# --- replicated: the centroid update -------------------------------------------------------
def _split_empty(centroids_ud, counts_u, key):
    """Refills each empty cluster by splitting a populated one (module docstring)."""
    nudge_d = jnp.where(jnp.arange(centroids_ud.shape[1]) % 2 == 0, SPLIT_EPS, -SPLIT_EPS)

    def refill(j, state):
        centroids_ud, counts_u = state
        spare_u = jnp.maximum(counts_u - 1, 0)

        def split(state):
            centroids_ud, counts_u = state
            source = jax.random.categorical(jax.random.fold_in(key, j), jnp.log(spare_u))
            base_d = centroids_ud[source]
            half = jnp.floor(counts_u[source] / 2)
            return (centroids_ud.at[j].set(base_d * (1 + nudge_d))
                    .at[source].set(base_d * (1 - nudge_d)),
                    counts_u.at[j].set(half).at[source].add(-half))

        return jax.lax.cond((counts_u[j] == 0) & (spare_u.sum() > 0), split, lambda s: s,
                            state)

    centroids_ud, _ = jax.lax.cond(
        (counts_u == 0).any(),
        lambda: jax.lax.fori_loop(0, counts_u.shape[0], refill, (centroids_ud, counts_u)),
        lambda: (centroids_ud, counts_u))
    return l2_normalize(centroids_ud)


@functools.lru_cache(maxsize=8)
def _programs(mesh, tile: int) -> tuple[Callable, Callable, Callable]:
    """(assign, iterate, init) compiled for one mesh and tile size."""
    def local_step(points_rd, ids_r, centroids_ud, previous_r):
        best_r, sums_ud, counts_u, total = _assign(points_rd, ids_r, centroids_ud, tile)
        moved = jax.lax.psum(((best_r != previous_r) & (ids_r != PAD_ID)).sum(), sharding.DATA)
        return best_r, sums_ud, counts_u, total, moved

    step = jax.shard_map(local_step, mesh=mesh,
                         in_specs=(ROW_VECTORS, ROWS, WHOLE, ROWS),
                         out_specs=(ROWS, WHOLE, WHOLE, WHOLE, WHOLE))

    def iterate(points_nd, ids_n, centroids_ud, previous_n, key):
        best_n, sums_ud, counts_u, total, moved = step(points_nd, ids_n, centroids_ud,
                                                          previous_n)
        return (_split_empty(l2_normalize(sums_ud), counts_u, key), best_n, total, moved,
                (counts_u == 0).sum())

    def init(points_nd, ids_n, key, k: int, count: int, method: str, rounds: int,
             per_round: int):
        devices = sharding.data_shards(mesh)
        if method == "kmeans++":
            local = lambda points_rd, ids_r: _kmeans_plus_plus(
                points_rd, (ids_r != PAD_ID).astype(jnp.float32), ids_r, key, k, devices)
        elif method == "kmeans||":
            local = functools.partial(_kmeans_parallel, key=key, k=k, devices=devices,
                                      tile=tile, rounds=rounds, per_round=per_round)
        if method != "random":
            return jax.shard_map(local, mesh=mesh, in_specs=(ROW_VECTORS, ROWS),
                                 out_specs=WHOLE)(points_nd, ids_n)
        want_u = jax.random.choice(key, count, (k,), replace=False).astype(jnp.int32)
        return jax.shard_map(_rows_by_id, mesh=mesh, in_specs=(ROW_VECTORS, ROWS, WHOLE),
                             out_specs=WHOLE)(points_nd, ids_n, want_u)

    return (jax.jit(step), jax.jit(iterate),
            jax.jit(init, static_argnames=("k", "count", "method", "rounds", "per_round")))


def spherical_kmeans(points: Points, k: int, cfg: KMeansConfig, *, seed: int, mesh,
                     progress: Callable[[dict], object] | None = None) -> KMeansResult:
    """`cfg.nredo` runs of at most `cfg.iterations` iterations from `cfg.init` centroids
    (keys from `seed`); the run whose final centroids have the highest objective wins.
    Every process calls it with its own `Points`; each gets its own points' clusters.
    `progress(entry)` is called after each iteration with its `history` entry."""
    int_in_range(k, "k", 1, points.count)
    assign, iterate, init = _programs(mesh, points.tile)
    rows = sharding.batch_sharding(mesh)
    history, best = [], None
    for run in range(cfg.nredo):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), run)
        centroids_ud = init(points.points_nd, points.ids_n, jax.random.fold_in(key, 0), k=k,
                            count=points.count, method=cfg.init, rounds=cfg.init_rounds,
                            per_round=max(1, round(cfg.oversampling * k)))
        previous_n = jnp.full_like(points.ids_n, -1)
        for iteration in range(cfg.iterations):
            centroids_ud, previous_n, total, moved, empty = iterate(
                points.points_nd, points.ids_n, centroids_ud, previous_n,
                jax.random.fold_in(key, iteration + 1))
            entry = {"run": run, "iteration": iteration,
                     "objective": float(total) / points.count, "moved": int(moved),
                     "empty": int(empty)}
            history.append(entry)
            if progress is not None:
                progress(entry)
            if entry["moved"] <= cfg.tol * points.count:
                break
        cluster_n, _, _, total, _ = assign(points.points_nd, points.ids_n, centroids_ud,
                                              previous_n)
        if best is None or float(total) > best[0]:
            best = (float(total), centroids_ud, cluster_n)
    total, centroids_ud, cluster_n = best
    local_n = distributed.get_rows(cluster_n, mesh, rows)[:points.local]
    return KMeansResult(np.asarray(centroids_ud.addressable_data(0)), local_n,
                        total / points.count, history)
