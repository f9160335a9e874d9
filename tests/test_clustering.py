"""The contextual training recipe: paired spherical k-means in JAX (cde_jax.clustering), the
packed batches of `cde-jax cluster`, and false-negative filtering in `cde-jax train`.

- planted clusters recovered (adjusted Rand index); the objective within 1% of faiss-cpu's;
- 1 vs 8 devices and 1 vs 2 processes (subprocesses) give the same clusters and batches;
- packing invariants, the greedy tour against a reference written here;
- the filter masks planted duplicates and nothing else; the filtered loss equals a
  multi-positive cross-entropy computed here in numpy;
- `cluster --model` through the corpus job (its vectors reused by the next run); batches it
  packs are harder than random ones for the model (first-step loss);
- `train --packed-batches` with filtering logs the masked pairs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score
from test_corpus import ok, run_processes

import cde_jax
from cde_jax import sharding
from cde_jax.clustering import KMeansConfig, place_points, spherical_kmeans
from cde_jax.clustering.job import ClusterConfig, cluster
from cde_jax.clustering.packing import NO_BATCH, greedy_tour, pack_batches
from cde_jax.training import BatchConfig, Stages, StepConfig, TrainData, data, step
from cde_jax.training.filtering import FalseNegativeFilter, FilterConfig, build_filter
from cde_jax.training.loss import contrastive_loss


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted(clusters: int, per: int, d: int, noise: float, seed: int = 0):
    """(points (clusters * per, d), labels): unit vectors around random centers."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(clusters), per))
    return unit(rng.standard_normal((clusters, d))[labels]
                + noise * rng.standard_normal((len(labels), d))), labels


def mean_best_similarity(points, centroids) -> float:
    return float((points @ unit(centroids).T).max(axis=1).mean())


# Every k-means here runs 4000 points of width 32 into 40 clusters (the runs of `cluster` on
# 2000 pairs reduced to 16 dimensions too): one set of compiled programs.
POINTS, WIDTH, K = 4000, 32, 40


def kmeans(points, **settings):
    mesh = sharding.make_mesh()
    placed = place_points(points, np.arange(len(points)), mesh, KMeansConfig().tile_rows)
    return spherical_kmeans(placed, K, KMeansConfig(**settings), seed=0, mesh=mesh)


# --- k-means ------------------------------------------------------------------------------
def test_planted_clusters_are_recovered():
    points, labels = planted(K, POINTS // K, WIDTH, noise=0.02)
    result = kmeans(points, iterations=30, nredo=2, init="kmeans++")
    ari = adjusted_rand_score(labels, result.cluster_n)
    print(f"adjusted Rand index {ari:.4f}, {len(result.history)} iterations")
    assert ari >= 0.99
    assert abs(result.objective - mean_best_similarity(points, result.centroids_ud)) <= 1e-5
    assert result.history[-1]["moved"] == 0


def test_objective_within_one_percent_of_faiss():
    rng = np.random.default_rng(0)
    points = unit(rng.standard_normal((K, WIDTH))[rng.integers(K, size=POINTS)]
                  + 0.5 * rng.standard_normal((POINTS, WIDTH)))
    ours = kmeans(points, iterations=25, nredo=3, init="random")  # faiss's start
    index = faiss.Kmeans(WIDTH, K, niter=25, nredo=3, spherical=True, seed=0,
                         max_points_per_centroid=10**6)  # no subsampling, as upstream
    index.train(points)
    mine, theirs = (mean_best_similarity(points, c) for c in (ours.centroids_ud,
                                                                 index.centroids))
    print(f"mean similarity to the nearest centroid: jax {mine:.5f}, faiss {theirs:.5f} "
          f"({mine / theirs - 1:+.2%})")
    assert abs(mine / theirs - 1) <= 0.01
    assert ours.history[0]["moved"] == POINTS and ours.history[-1]["objective"] <= ours.objective


# --- packing ------------------------------------------------------------------------------
def reference_tour(centroids, start):
    order, left = [start], set(range(len(centroids))) - {start}
    while left:
        sims = {j: float(np.dot(centroids[order[-1]], centroids[j])) for j in left}
        order.append(max(sorted(left), key=sims.__getitem__))
        left.remove(order[-1])
    return order


def test_packing_invariants():
    rng = np.random.default_rng(0)
    centroids = unit(rng.standard_normal((40, 8)))
    cluster_n = rng.choice(40, size=1003, p=rng.dirichlet(np.ones(40)))
    packed = pack_batches(cluster_n, centroids, 16, seed=3)
    sizes = np.bincount(packed.batch_n[packed.batch_n != NO_BATCH])
    assert len(sizes) == 1003 // 16 and (sizes == 16).all()  # every batch exact
    assert (packed.batch_n == NO_BATCH).sum() == 1003 % 16  # the rest in none, once each
    assert packed.clusters == len(np.unique(cluster_n))
    assert adjusted_rand_score(cluster_n, packed.cluster_n) == 1.0  # renumbered, not changed
    assert sorted(set(packed.cluster_n.tolist())) == list(range(packed.clusters))
    for b in range(len(sizes)):  # a batch holds consecutive clusters along the tour
        held = np.unique(packed.cluster_n[packed.batch_n == b])
        assert held[-1] - held[0] == len(held) - 1
    again, other = (pack_batches(cluster_n, centroids, 16, seed=s) for s in (3, 4))
    assert all((a == b).all() for a, b in zip(packed[:2], again[:2]))
    assert not (other.batch_n == packed.batch_n).all()
    start_rng = np.random.default_rng(7)
    assert greedy_tour(centroids, np.random.default_rng(7)).tolist() == reference_tour(
        centroids, int(start_rng.integers(40)))


# --- 1 vs 8 devices, 1 vs 2 processes: the runs start with the session ----------------------
PAIRS = POINTS // 2


@pytest.fixture(scope="module")
def vectors(tmp_path_factory):
    """2000 pairs with string ids, query vectors as .npy (+ ids) in line order, document
    vectors as .parquet in another order: no planted structure; 40 clusters."""
    tmp = tmp_path_factory.mktemp("vectors")
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((PAIRS, 24)).astype(np.float32)
    documents = (queries + rng.standard_normal((PAIRS, 24))).astype(np.float32)
    ids = [f"pair-{i}" for i in range(PAIRS)]
    (tmp / "train.jsonl").write_text("".join(
        json.dumps({"pid": p, "query": f"q {i}", "positive": f"d {i}"}) + "\n"
        for i, p in enumerate(ids)))
    np.save(tmp / "q.npy", queries)
    (tmp / "q.npy.ids.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ids))
    order = rng.permutation(PAIRS)
    pq.write_table(pa.table({"id": [ids[i] for i in order], "embedding": pa.array(
        documents[order].tolist(), pa.list_(pa.float32(), 24))}), tmp / "d.parquet")
    return tmp


def vector_args(files, out):
    return ["cluster", "--data", files / "train.jsonl", "--id-field", "pid", "--out", out,
            "--query-embeddings", files / "q.npy", "--document-embeddings",
            files / "d.parquet", "--batch-size", 50, "--svd-dims", WIDTH // 2, "--init",
            "kmeans++", "--nredo", 2, "--seed", 5, "-q"]


@pytest.fixture(scope="module")
def eight_devices(vectors, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eight_devices")
    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "cde_jax.cli",
                           *map(str, vector_args(vectors, tmp / "eight.jsonl"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "eight.jsonl"


@pytest.fixture(scope="module")
def two_processes(vectors, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_processes")
    ok(run_processes(2, *vector_args(vectors, tmp / "two.jsonl")))
    return tmp / "two.jsonl"


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_eight_devices_and_two_processes_match_one(vectors, eight_devices, two_processes,
                                                   tmp_path):
    cfg = ClusterConfig(data=str(vectors / "train.jsonl"), out=str(tmp_path / "one.jsonl"),
                        batch_size=50, id_field="pid", query_embeddings=str(vectors / "q.npy"),
                        document_embeddings=str(vectors / "d.parquet"), svd_dims=WIDTH // 2,
                        seed=5,
                        kmeans=KMeansConfig(init="kmeans++", nredo=2))
    result = cluster(cfg, show_progress=False)
    one = read_jsonl(result.out)
    assert [r["pid"] for r in one] == [f"pair-{i}" for i in range(PAIRS)]
    assert result.clusters == K and result.batches == PAIRS // 50 and result.unbatched == 0
    for name, path in (("8 devices", eight_devices), ("2 processes", two_processes)):
        other = read_jsonl(path)
        same = sum(a == b for a, b in zip(one, other))
        print(f"{name}: {same}/{PAIRS} lines identical (cluster and batch) to 1 device")
        assert other == one


@pytest.mark.parametrize("change, message", [
    ({"k": 2001}, "k 2001 is more than the 2000 pairs"),
    ({"batch_size": 2001}, "2000 pairs do not fill one batch of 2001"),
    ({"id_field": None}, "q.npy: no vector with id 1"),  # the files' ids are strings
    ({"model": "m"}, "give --model, or both"),
    ({"document_embeddings": None}, "give --model, or both"),
    ({"k": 10, "cluster_size": 10}, "k or cluster_size, not both"),
])
def test_bad_settings_are_one_line_and_write_nothing(vectors, tmp_path, change, message):
    settings = dict(data=str(vectors / "train.jsonl"), out=str(tmp_path / "out.jsonl"),
                    batch_size=50, id_field="pid", query_embeddings=str(vectors / "q.npy"),
                    document_embeddings=str(vectors / "d.parquet"))
    with pytest.raises(ValueError, match=message):
        cluster(ClusterConfig(**{**settings, **change}))
    assert not any(tmp_path.iterdir())


def test_packed_batches_must_match_the_batch_size():
    examples = [data.Example(f"q{i}", f"d{i}", (), None, i + 1, i // 3) for i in range(6)]
    with pytest.raises(ValueError, match="batch 0 has 3 lines .* not the batch size 4"):
        TrainData(examples, BatchConfig(batch_size=4, corpus_size=4, packed_batches=True), 0)


# --- the filter and the loss --------------------------------------------------------------
def test_filter_masks_planted_duplicates_and_nothing_else():
    """4 queries, one hard negative each; basis vectors except where planted: queries 1
    and 3 are one question, with p3 and n0 in its direction (pairs (1, p3), (1, n0), (3, p1),
    (3, n0)); n2 equals query 2 (its own negative: never promoted); query 0's positive
    scores 0.8 and n3 0.85 (above the positive, below 0.9)."""
    e = np.eye(8, dtype=np.float32)
    queries = {"q0": 0.8 * e[0] + 0.6 * e[5], "q1": e[1], "q2": e[2], "q3": e[1]}
    documents = {"p0": e[0], "p1": e[1], "p2": e[2], "p3": e[1], "n0": e[1], "n1": e[6],
                 "n2": e[2], "n3": 0.85 * queries["q0"] + np.sqrt(1 - 0.85**2) * e[7]}
    texts = (list(queries), list(documents))
    positive_qc = np.eye(4, 8, dtype=bool)
    duplicates = {(1, 3), (1, 4), (3, 1), (3, 4)}
    for threshold, extra in ((0.9, set()), (None, {(0, 7)})):
        mask = FalseNegativeFilter(threshold, queries, documents)(*texts, 1, positive_qc)
        assert {tuple(map(int, p)) for p in np.argwhere(mask)} == duplicates | extra, threshold


def test_packed_batches_carry_the_filter_mask(tmp_path):
    """Two packed batches, the filter's vectors from files: pair 5 planted as a copy of
    pair 1 (in the same batch)."""
    batch_of = [0, 0, 1, 0, 1, 0, 1, 1]
    rows = [{"query": f"q{i}", "positive": f"d{i}", "batch": b} for i, b in enumerate(batch_of)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    vectors = np.eye(8, dtype=np.float32)
    vectors[5] = vectors[1]
    for name in ("q", "d"):
        np.save(tmp_path / f"{name}.npy", vectors)
        (tmp_path / f"{name}.npy.ids.jsonl").write_text("".join(f"{i}\n" for i in range(1, 9)))
    examples = data.read_examples(path)
    cfg = FilterConfig("0.9", filter_query_embeddings=str(tmp_path / "q.npy"),
                       filter_document_embeddings=str(tmp_path / "d.npy"))
    train_data = TrainData(examples, BatchConfig(batch_size=4, corpus_size=4,
                                                 packed_batches=True), 0,
                           build_filter(cfg, examples, load_model=None))
    batches = [train_data.batch(i) for i in range(train_data.batches_per_epoch)]
    assert sorted(sorted(b.queries) for b in batches) == [
        [f"search_query: q{i}" for i in s] for s in ([0, 1, 3, 5], [2, 4, 6, 7])]
    for b in batches:
        got = {(b.queries[i][-2:], b.documents[j][-2:]) for i, j in np.argwhere(
            b.false_negative_qc)}
        assert got == ({("q1", "d5"), ("q5", "d1")} if "search_query: q1" in b.queries
                       else set())


def test_filtered_loss_is_the_multi_positive_cross_entropy():
    rng = np.random.default_rng(0)
    q, d = rng.standard_normal((3, 6)), rng.standard_normal((5, 6))
    query_label, doc_label = np.array([0, 1, 2]), np.array([0, 1, 2, 1, 9])
    false_negative = np.zeros((3, 5), bool)
    false_negative[0, [2, 4]] = True  # query 0: its positive, doc 2 and doc 4
    loss, accuracy = jax.jit(contrastive_loss, static_argnums=4)(
        *map(jnp.asarray, (q, d, query_label, doc_label)), 20.0, jnp.asarray(false_negative))
    cos = unit(q) @ unit(d).T
    logp = 20.0 * cos - np.log(np.exp(20.0 * cos).sum(axis=1, keepdims=True))
    positives = [[0, 2, 4], [1, 3], [2]]
    expected = -np.mean([logp[i, p].mean() for i, p in enumerate(positives)])
    print(f"loss {float(loss):.6f}, numpy {expected:.6f}")
    assert abs(float(loss) - expected) <= 1e-5 * abs(expected)
    right = [cos[i].argmax() in p for i, p in enumerate(positives)]
    assert float(accuracy) == pytest.approx(np.mean(right), abs=1e-7)


# --- with the tiny model: cluster --model, harder batches, train --------------------------
def topic_pairs(docs: list[str]) -> list[dict]:
    """128 pairs on 16 planted topics, each with its own 30 words: a document is 30 of its
    topic's words, its query 6 of the document's."""
    rng = np.random.default_rng(0)
    words = rng.permutation(sorted({w.lower() for d in docs for w in d.split()
                                    if w.isalpha() and len(w) > 3}))
    rows = []
    for topic in range(16):
        for _ in range(8):
            doc = rng.choice(words[topic * 30:(topic + 1) * 30], 30)
            rows.append({"query": " ".join(rng.choice(doc, 6, replace=False)),
                         "positive": " ".join(doc)})
    return [rows[i] for i in rng.permutation(len(rows))]


@pytest.fixture(scope="module")
def model_clustered(tiny_checkpoint, random_docs, tmp_path_factory):
    """`cluster --model` (the corpus job) on 128 topic pairs, batches of 8; then the same
    command again with --overwrite: (output, its bytes and the vector files' completion
    times after each run)."""
    tmp = tmp_path_factory.mktemp("model_clustered")
    path = tmp / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in topic_pairs(random_docs)))
    out = tmp / "clustered.jsonl"
    vector_files = [Path(f"{out}.{side}.zarr") for side in ("queries", "documents")]
    runs = []
    for again in ((), ("--overwrite",)):
        ok(run_processes(1, "cluster", "--model", tiny_checkpoint[1], "--data", path, "--out",
                         out, "--batch-size", 8, "--init", "kmeans++", "--nredo", 2, "-q",
                         *again))
        runs.append((out.read_bytes(), [(f / "complete").stat().st_mtime_ns
                                        for f in vector_files]))
    return out, runs


def test_cluster_embeds_through_the_corpus_job_and_reuses_its_vectors(model_clustered):
    out, (first, second) = model_clustered
    assert second == first  # the same bytes, the vectors not written again
    ids, queries = cde_jax.read_embeddings(f"{out}.queries.zarr")
    assert ids.tolist() == list(range(1, 129))  # line numbers
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    rows = read_jsonl(out)
    assert sorted(r["batch"] for r in rows) == sorted(list(range(16)) * 8)


def test_clustered_batches_are_harder(tiny_checkpoint, model_clustered):
    """The mean first-step loss over an epoch's batches, packed by `cluster` vs shuffled:
    in-batch negatives from the same neighbourhood are harder to tell from the positive."""
    model = cde_jax.load(tiny_checkpoint[1])
    examples = data.read_examples(model_clustered[0])
    stages = Stages(model.graphdef, StepConfig(total_steps=1, permute=False,
                                               sequence_dropout=0.0))
    loss_fn = jax.jit(lambda p, b: step.batch_loss(stages, p, b, jax.random.PRNGKey(0),
                                                   model.config.logit_scale)[0])
    losses = {}
    for packed in (True, False):
        cfg = BatchConfig(batch_size=8, negatives=0, corpus_size=8, packed_batches=packed,
                          query_length=16, document_length=64)
        train_data = TrainData(examples, cfg, seed=0)
        tokenize = data.BatchTokenizer(model.tokenizer, train_data.cfg)
        losses[packed] = np.mean([float(loss_fn(model.params, tokenize(train_data.batch(i))))
                                  for i in range(train_data.batches_per_epoch)])
    print(f"mean first-step loss: clustered {losses[True]:.4f}, random {losses[False]:.4f}")
    assert losses[True] >= 1.5 * losses[False]


@pytest.fixture(scope="module")
def filtered_training(tiny_checkpoint, tmp_path_factory):
    """One step of `train --packed-batches` with the filter's vectors from files: 4
    planted topics of 8 pairs, each a batch; every other pair of a batch is a false
    negative (56 a batch) at threshold 0.9, none across topics."""
    tmp = tmp_path_factory.mktemp("filtered_training")
    topic_vectors, topics = planted(4, 8, 16, noise=0.01, seed=2)
    rows = [{"query": f"question {i} about topic {t}", "positive": f"answer {i} on {t}",
             "batch": int(t)} for i, t in enumerate(topics)]
    (tmp / "packed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.save(tmp / "v.npy", topic_vectors)
    (tmp / "v.npy.ids.jsonl").write_text("".join(f"{i}\n" for i in range(1, 33)))
    ok(run_processes(1, "train", "--model", tiny_checkpoint[0], "--data", tmp / "packed.jsonl",
                     "--out", tmp / "run", "--total-steps", 1, "--batch-size", 8,
                     "--packed-batches", "--false-negative-threshold", 0.9,
                     "--filter-query-embeddings", tmp / "v.npy", "--filter-document-embeddings",
                     tmp / "v.npy", "--query-length", 16, "--document-length", 16, "-q"))
    return tmp / "run"


def test_train_logs_the_masked_pairs(filtered_training):
    logged = read_jsonl(filtered_training / "metrics.jsonl")
    assert [r["false_negatives"] for r in logged] == [56.0]
    config = json.loads((filtered_training / "train_config.json").read_text())
    assert config["filter"]["false_negative_threshold"] == "0.9"
    assert config["batch"]["packed_batches"] is True


@pytest.mark.parametrize("settings, message", [
    ({"false_negative_threshold": "0.9"}, "needs --filter-model"),
    ({"false_negative_threshold": "high", "filter_model": "m"}, "must be a cosine"),
    ({"filter_model": "m"}, "need --false-negative-threshold"),
])
def test_filter_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        FilterConfig(**settings)
