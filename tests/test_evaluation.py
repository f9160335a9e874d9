"""Retrieval evaluation: trec_eval metrics against hand-worked rankings, exact search against
numpy's argsort (1 and 8 devices), the BEIR loader's errors, `cde-jax eval` end to end on a
BEIR fixture made from random_docs.txt, and the MTEB model run by `mteb.evaluate` on
in-memory tasks (nothing downloaded). Random tiny weights: scores are not meaningful, so the
pipeline is checked against an independent numpy recomputation instead."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import mteb
import numpy as np
import pytest
from mteb.mocks.mock_tasks import (
    LegacyMockClusteringFastTask,
    MockClassificationTask,
    MockRerankingTask,
    MockRetrievalTask,
    MockSTSTask,
)
from mteb.models.models_protocols import EncoderProtocol, SearchProtocol

import cde_jax
from cde_jax import cli
from cde_jax.evaluation import SearchTiles, exact_top_k, load_beir, rank_corpus, ranking_metrics
from cde_jax.evaluation.mteb import CdeMtebModel
from cde_jax.evaluation.retrieval import embed_dataset_split, search_embedded
from cde_jax.evaluation.search import run_dict
from cde_jax.minicorpus import sample_minicorpus
from cde_jax.profiling import count_compiles

BATCH = 8  # fixed small batches: the default plan pads 2 texts to 128 rows

# --- metrics ------------------------------------------------------------------------------


def test_metrics_hand_worked():
    qrels = {"q1": {"d1": 1, "d3": 2}, "q2": {"d4": 1}, "q3": {"x": 1}}
    ranked = {"q1": ["d2", "d1", "d3", "d4"],          # relevant at ranks 2 (gain 1), 3 (gain 2)
              "q2": ["d4", "d1"],                      # relevant at rank 1
              "q3": [f"n{i}" for i in range(10)] + ["x"]}  # relevant at rank 11
    got = ranking_metrics(qrels, ranked, [1, 3, 100])
    l2, l3, l12 = math.log2(2), math.log2(3), math.log2(12)
    # nDCG (trec_eval: gain = judged score, discount log2(rank + 1)):
    #   q1@3: DCG = 0/l2 + 1/l3 + 2/log2(4) = 0.63093 + 1 = 1.63093;
    #         ideal = 2/l2 + 1/l3 = 2.63093 -> 0.61991.   q2@3 = 1.   q3@3 = 0.
    q1_ndcg3 = (1 / l3 + 2 / 2) / (2 / l2 + 1 / l3)
    assert got["ndcg@3"] == pytest.approx((q1_ndcg3 + 1 + 0) / 3, abs=1e-12)
    #   @1: only q2 has a relevant first hit.           @100: q3 adds 1/log2(12) = 0.27894.
    assert got["ndcg@1"] == pytest.approx(1 / 3, abs=1e-12)
    assert got["ndcg@100"] == pytest.approx((q1_ndcg3 + 1 + 1 / l12) / 3, abs=1e-12)
    # Recall: q1 finds 0 of 2 at 1 and 2 of 2 at 3; q2 1 of 1; q3 0 until rank 11.
    assert got["recall@1"] == pytest.approx((0 + 1 + 0) / 3, abs=1e-12)
    assert got["recall@3"] == pytest.approx((1 + 1 + 0) / 3, abs=1e-12)
    assert got["recall@100"] == pytest.approx(1.0, abs=1e-12)
    # AP@k = sum of precision at each relevant hit within k / number of relevant:
    #   q1@3 = (1/2 + 2/3) / 2 = 0.58333; q2 = 1/1; q3@3 = 0, q3@100 = (1/11) / 1.
    assert got["map@1"] == pytest.approx((0 + 1 + 0) / 3, abs=1e-12)
    assert got["map@3"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 + 0) / 3, abs=1e-12)
    assert got["map@100"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + 1 + 1 / 11) / 3, abs=1e-12)
    # MRR@10: 1/2, 1/1, and 0 for q3 (its hit at rank 11 is past the cut).
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1 + 0) / 3, abs=1e-12)
    assert set(got) == {f"{m}@{k}" for m in ("ndcg", "recall", "map") for k in (1, 3, 100)} \
        | {"mrr@10"}


def test_metrics_follow_the_given_order():
    """trec_eval breaks score ties by doc id (descending): "b" would come first if ties were
    passed through. Our order is kept: the relevant "b" is at rank 2."""
    got = ranking_metrics({"q": {"b": 1}}, {"q": ["a", "b"]}, [1, 2])
    assert got["mrr@10"] == 0.5
    assert got["ndcg@1"] == 0.0
    assert got["ndcg@2"] == pytest.approx(1 / math.log2(3), abs=1e-12)  # 0.63093


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="1 judged queries have no ranking .*'q2'"):
        ranking_metrics({"q1": {"a": 1}, "q2": {"a": 1}}, {"q1": ["a"]}, [1])
    with pytest.raises(ValueError, match="query 'q1' lists a document twice"):
        ranking_metrics({"q1": {"a": 1}}, {"q1": ["a", "a"]}, [1])
    with pytest.raises(ValueError, match="positive integers"):
        ranking_metrics({"q1": {"a": 1}}, {"q1": ["a"]}, [0])


# --- exact search -------------------------------------------------------------------------


def _integer_problem(seed, q=37, n=203, d=16):
    """Small-integer embeddings: every dot product is exact in float32 and ties abound."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-2, 3, (q, d)).astype(np.float32),
            rng.integers(-2, 3, (n, d)).astype(np.float32))


def _assert_matches_argsort(queries, corpus, scores, ids, k):
    ref = np.argsort(-(queries.astype(np.float64) @ corpus.T), axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(scores, np.take_along_axis(queries @ corpus.T, ref, axis=1))


@pytest.mark.parametrize("tiles", [SearchTiles(), SearchTiles(query_block=8, rows_per_device=5),
                                   SearchTiles(query_block=16, rows_per_device=40)])
@pytest.mark.parametrize("k", [1, 10, 500])
def test_exact_top_k_equals_argsort(tiles, k):
    queries, corpus = _integer_problem(0)
    # Each query's 203 scores take under 60 values: tie order is checked too.
    assert max(len(np.unique(row)) for row in queries @ corpus.T) < 60
    scores, ids = exact_top_k(queries, corpus, k, tiles=tiles)
    assert ids.shape == (37, min(k, 203)) and ids.dtype == np.int64
    _assert_matches_argsort(queries, corpus, scores, ids, min(k, 203))


def test_exact_top_k_compiles_once_over_many_tiles():
    queries, corpus = _integer_problem(1, n=1000)
    with count_compiles() as compiles:
        scores, ids = exact_top_k(queries, corpus, 7, tiles=SearchTiles(rows_per_device=64))
    _assert_matches_argsort(queries, corpus, scores, ids, 7)
    assert compiles.count == 1  # 16 tiles (the last one padded), one program


@pytest.fixture(scope="module")
def top_k_on_8_devices():
    """Corpus rows split over 8 fake devices, in tiles: a script that checks the result
    against argsort (its CompletedProcess)."""
    script = textwrap.dedent("""
        import numpy as np, jax, test_evaluation as t
        from cde_jax.evaluation import SearchTiles, exact_top_k
        assert jax.device_count() == 8
        rng = np.random.default_rng(3)
        problems = [t._integer_problem(2), (rng.standard_normal((50, 32), np.float32),
                                            rng.standard_normal((1001, 32), np.float32))]
        for queries, corpus in problems:
            for tiles in (SearchTiles(), SearchTiles(query_block=7, rows_per_device=3)):
                for k in (10, 2000):
                    scores, ids = exact_top_k(queries, corpus, k, tiles=tiles)
                    kk = min(k, len(corpus))
                    if queries[0, 0] == int(queries[0, 0]):
                        t._assert_matches_argsort(queries, corpus, scores, ids, kk)
                    else:  # floats: float32 rounding may swap near-ties, nothing else
                        exact = queries.astype(np.float64) @ corpus.T
                        best = -np.sort(-exact, axis=1)[:, :kk]
                        got = np.take_along_axis(exact, ids, axis=1)
                        np.testing.assert_allclose(got, best, rtol=0, atol=1e-5)
                        np.testing.assert_allclose(scores, best, rtol=0, atol=1e-5)
                        assert all(len(set(row)) == kk for row in ids.tolist())
                        ref = np.argsort(-exact, axis=1, kind="stable")[:, :min(kk, 10)]
                        np.testing.assert_array_equal(ids[:, :10], ref)  # clear gaps here
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")
           + " --xla_force_host_platform_device_count=8"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parent, timeout=300)


def test_exact_top_k_sharded_over_8_devices(top_k_on_8_devices):
    proc = top_k_on_8_devices
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_exact_top_k_rejects_bad_input():
    queries, corpus = _integer_problem(0)
    corpus[[5, 6]] = np.nan  # in the second tile of 4 rows: row numbers are global
    with pytest.raises(ValueError, match=r"corpus have non-finite values in row\(s\) \[5, 6\]"):
        exact_top_k(queries, corpus, 3, tiles=SearchTiles(rows_per_device=4))
    with pytest.raises(ValueError, match=r"queries have non-finite values in row\(s\) \[0, 1\]"):
        exact_top_k(corpus[5:], queries, 3)
    with pytest.raises(ValueError, match="queries have width 16, corpus 8"):
        exact_top_k(queries, np.ones((4, 8), np.float32), 3)
    with pytest.raises(ValueError, match="k must be positive"):
        exact_top_k(queries, queries, 0)


# --- BEIR fixture and loader ----------------------------------------------------------------


def write_beir(root: Path, lines: list[str], n_docs: int = 24, n_queries: int = 8) -> dict:
    """A BEIR dataset from random_docs: documents of 2+ sentences; odd ones split into title
    (first sentence) and text (the rest), so title + " " + text is the original line. Query
    i is the last sentence of document i, judged relevant (1) to it alone."""
    docs = [d.strip() for d in lines if d.count(". ") >= 2 and len(d) < 200][:n_docs]
    corpus, queries = [], []
    for i, doc in enumerate(docs):
        head, rest = doc.split(". ", 1)
        title, text = (head + ".", rest) if i % 2 else ("", doc)
        corpus.append({"_id": f"doc{i}", "title": title, "text": text})
    for i in range(n_queries):
        queries.append({"_id": f"q{i}", "text": docs[i].rsplit(". ", 1)[1]})
    queries.append({"_id": "unjudged", "text": "a query without judgements is dropped"})
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tdoc{i}\t1\n" for i in range(n_queries)))
    return {"docs": docs, "queries": [q["text"] for q in queries[:n_queries]]}


@pytest.fixture(scope="module")
def beir(tmp_path_factory, random_docs):
    root = tmp_path_factory.mktemp("beir") / "tiny-beir"
    return root, write_beir(root, random_docs)


def test_beir_loader(beir):
    root, raw = beir
    ds = load_beir(root)
    assert ds.doc_ids == [f"doc{i}" for i in range(24)]
    assert ds.doc_texts == raw["docs"]   # MTEB's join: (title + " " + text).strip()
    assert ds.query_ids == [f"q{i}" for i in range(8)]  # "unjudged" is dropped
    assert ds.query_texts == raw["queries"]
    assert ds.qrels == {f"q{i}": {f"doc{i}": 1} for i in range(8)}


def test_known_rankings_of_the_fixture(beir):
    """Through the metric code: source document first -> every metric 1; source document
    second -> nDCG@5 = 1/log2(3) = 0.63093, Recall@1 = 0, Recall@5 = 1, MAP@5 = 1/2 (one
    relevant, precision 1/2 at its rank), MRR@10 = 1/2."""
    ds = load_beir(beir[0])
    others = lambda q: [d for d in ds.doc_ids if d != "doc" + q[1:]]
    perfect = {q: ["doc" + q[1:]] + others(q) for q in ds.query_ids}
    assert set(ranking_metrics(ds.qrels, perfect, [1, 5]).values()) == {1.0}
    second = {q: others(q)[:1] + ["doc" + q[1:]] + others(q)[1:] for q in ds.query_ids}
    got = ranking_metrics(ds.qrels, second, [1, 5])
    expected = {"ndcg@1": 0, "recall@1": 0, "map@1": 0, "ndcg@5": 1 / math.log2(3),
                "recall@5": 1, "map@5": 0.5, "mrr@10": 0.5}
    assert got == pytest.approx(expected, abs=1e-12)


def _replace_line(path: Path, number: int, text: str):
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = text + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize("file,line,text,message", [
    ("corpus.jsonl", 3, '{"_id": "doc2", "text": "x"', r"corpus.jsonl: line 3: invalid JSON"),
    ("corpus.jsonl", 4, '{"_id": "doc3"}', r"corpus.jsonl: line 4: 'text' must be a string, got "
                                           r"missing"),
    ("corpus.jsonl", 5, '{"_id": "doc0", "text": "x"}', r"corpus.jsonl: line 5: duplicate _id "
                                                        r"'doc0' \(first on line 1\)"),
    ("corpus.jsonl", 2, '["doc1"]', r"corpus.jsonl: line 2: expected a JSON object, got an array"),
    ("queries.jsonl", 2, '{"_id": "q1", "text": 7}', r"queries.jsonl: line 2: 'text' must be a "
                                                     r"string, got int 7"),
    ("qrels/test.tsv", 1, "qid\tdid\tscore", r"test.tsv: line 1: expected the header"),
    ("qrels/test.tsv", 3, "q1\tdoc1", r"test.tsv: line 3: expected 3 tab-separated fields, got 2"),
    ("qrels/test.tsv", 4, "q2\tdoc2\thigh", r"test.tsv: line 4: score 'high' is not an integer"),
    ("qrels/test.tsv", 5, "nope\tdoc2\t1", r"test.tsv: line 5: query-id 'nope' is not in "
                                           r"queries.jsonl"),
])
def test_beir_errors_name_file_and_line(beir, tmp_path, random_docs, file, line, text, message):
    root = tmp_path / "bad"
    write_beir(root, random_docs)
    _replace_line(root / file, line, text)
    with pytest.raises(ValueError, match=message):
        load_beir(root)


def test_beir_missing_split_and_unknown_documents(tmp_path, random_docs):
    root = tmp_path / "ds"
    write_beir(root, random_docs)
    with pytest.raises(FileNotFoundError, match=r"no qrels for split 'dev' \(found: test\)"):
        load_beir(root, "dev")
    with (root / "qrels" / "test.tsv").open("a") as f:
        f.write("q0\tgone\t1\n")
    with pytest.warns(UserWarning, match="1 judged corpus-id.*not in corpus.jsonl .*'gone'"):
        ds = load_beir(root)
    assert ds.qrels["q0"] == {"doc0": 1, "gone": 1}  # kept: it lowers recall, as in BEIR


# --- cde-jax eval end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def model(synthetic):
    return cde_jax.load(synthetic()[1])


def test_cli_eval_end_to_end(beir, synthetic, model, tmp_path):
    """A subprocess, as a user runs it (the command turns on the persistent XLA cache, which
    must not leak into this test process)."""
    root, raw = beir
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cde_jax.cli", "eval", "--model", str(synthetic()[1]),
         "--dataset", str(root), "--out", str(out), "--k", "5,1", "--batch-size", str(BATCH)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "only 24 texts for a minicorpus of 512: oversampling" in proc.stderr
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result["metrics"]
    assert result["model"] == {"path": str(synthetic()[1]), "fingerprint": model.fingerprint}
    assert result["dataset"] == {"path": str(root.resolve()), "name": "tiny-beir",
                                 "split": "test", "documents": 24, "queries": 8}
    assert (result["seed"], result["k"], result["minicorpus_size"]) == (42, [1, 5], 512)
    metrics = result["metrics"]
    assert set(metrics) == {f"{m}@{k}" for m in ("ndcg", "recall", "map") for k in (1, 5)} \
        | {"mrr@10"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())

    # Independent recomputation: docs/model.md §7 minicorpus, prefixes, cosine, numpy argsort.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = model.embed_dataset(raw["docs"], seed=42, batch_size=BATCH)
        assert sample_minicorpus(raw["docs"], 512, 42) == list(  # docs/model.md §7's draw
            np.random.default_rng(42).choice(raw["docs"], 512, replace=True))
    docs = model.encode(raw["docs"], prompt="search_document: ", dataset_embeddings=context,
                        batch_size=BATCH)
    queries = model.encode(raw["queries"], prompt="search_query: ",
                           dataset_embeddings=context, batch_size=BATCH)
    sims = queries.astype(np.float64) @ docs.T.astype(np.float64)
    order = np.argsort(-sims, axis=1, kind="stable")
    gaps = np.diff(-np.sort(sims, axis=1)[:, ::-1][:, :11], axis=1)
    assert gaps.min() > 1e-6  # no near-ties: float32 and float64 rank alike
    ranked = {f"q{i}": [f"doc{j}" for j in order[i, :10]] for i in range(8)}
    expected = ranking_metrics({f"q{i}": {f"doc{i}": 1} for i in range(8)}, ranked, [1, 5])
    assert metrics == pytest.approx(expected, abs=1e-12)
    with warnings.catch_warnings():  # the run behind the metrics: ranks and cosines
        warnings.simplefilter("ignore")
        run = rank_corpus(model, load_beir(root), 10, batch_size=BATCH)
    assert {q: list(docs) for q, docs in run.items()} == ranked
    np.testing.assert_allclose([list(run[f"q{i}"].values()) for i in range(8)],
                               np.take_along_axis(sims, order[:, :10], 1), rtol=0, atol=1e-6)


def test_cli_eval_errors_leave_nothing(synthetic, random_docs, tmp_path, capsys):
    bad, out = tmp_path / "ds", tmp_path / "results.json"
    write_beir(bad, random_docs)
    _replace_line(bad / "queries.jsonl", 2, "{not json")
    args = ["eval", "--model", str(synthetic()[1]), "--dataset", str(bad), "--out", str(out)]
    assert cli.main(args) == 2
    assert "queries.jsonl: line 2: invalid JSON" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no output, no temp file
    out.write_text("keep")
    assert cli.main(args) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep"
    with pytest.raises(SystemExit):
        cli.main(args[:-1] + [str(tmp_path / "r.json"), "--k", "10,zero"])
    assert "expected comma-separated integers, got '10,zero'" in capsys.readouterr().err


# --- a quantized corpus --------------------------------------------------------------------
@pytest.fixture(scope="module")
def larger_beir(tmp_path_factory, random_docs):
    """Every random_docs document the fixture's rule admits (59), each queried: (its dir, the
    dataset)."""
    root = tmp_path_factory.mktemp("beir59") / "beir"
    write_beir(root, random_docs, n_docs=59, n_queries=59)
    return root, load_beir(root)


@pytest.fixture(scope="module")
def larger_embedded(model, larger_beir):
    """(first row, document embeddings, query embeddings), as `rank_corpus` makes them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 59 documents for a minicorpus of 512: oversampled
        return embed_dataset_split(model, larger_beir[1], batch_size=BATCH,
                                   show_progress_bar=False)


def quantized_ndcg(model, dataset, embedded, **kw) -> float:
    first_row, docs_nd, queries_qd = embedded
    scores_qk, rows_qk = search_embedded(queries_qd, docs_nd, 10, first_row=first_row,
                                         mesh=model.mesh, **kw)
    run = run_dict(dataset.query_ids, dataset.doc_ids, scores_qk, rows_qk)
    return ranking_metrics(dataset.qrels, run, [10])["ndcg@10"]


def test_quantized_corpus_ndcg(model, larger_beir, larger_embedded):
    """nDCG@10 of the 59-document set stored in each precision, as `cde-jax eval` scores it.
    Measured (random tiny weights, 64 dimensions): float32 0.8774; float16 the same; int8
    0.8485, uint8 0.8386, x4 rescored 0.8774; binary 0.6374, x4 rescored against the
    dequantized (sign) documents 0.7317, against the float32 documents 0.8776."""
    ndcg = lambda **kw: quantized_ndcg(model, larger_beir[1], larger_embedded, **kw)
    full = ndcg()
    got = {(p, m, d): ndcg(precision=p, rescore_multiplier=m, rescore_documents=d)
           for p, m, d in [("float16", None, "dequantized"), ("int8", None, "dequantized"),
                           ("uint8", None, "dequantized"), ("int8", 4, "dequantized"),
                           ("binary", None, "dequantized"), ("binary", 4, "dequantized"),
                           ("binary", 4, "float32")]}
    print(f"nDCG@10 float32 {full:.4f};", {k: round(v, 4) for k, v in got.items()})
    assert 0.8 <= full <= 0.95
    assert abs(got["float16", None, "dequantized"] - full) <= 1e-3
    assert abs(got["int8", None, "dequantized"] - full) <= 0.05  # measured 0.029
    assert abs(got["uint8", None, "dequantized"] - full) <= 0.06  # measured 0.039
    assert abs(got["int8", 4, "dequantized"] - full) <= 0.005  # measured 0
    loss = full - got["binary", None, "dequantized"]
    assert loss >= 0.15  # measured 0.24: sign bits of 64 dimensions lose much
    recovered = lambda documents: (got["binary", 4, documents] - got["binary", None,
                                                                     "dequantized"]) / loss
    assert recovered("float32") >= 0.9  # measured 1.0
    assert recovered("dequantized") >= 0.25  # measured 0.39


def test_cli_eval_scores_a_quantized_corpus(model, larger_beir, larger_embedded, tmp_path,
                                            monkeypatch, capsys):
    """`cde-jax eval --precision binary --rescore-multiplier 4 --rescore-documents float32`
    in this process, the model loaded and the embeddings made (test_cli_eval_end_to_end runs
    those steps): the metrics of that search, and the options in the result."""
    from cde_jax.commands import runtime
    from cde_jax.evaluation import retrieval

    monkeypatch.setattr(runtime, "start", lambda args: None)  # no compilation cache here
    monkeypatch.setattr(runtime, "load_model", lambda args: model)
    monkeypatch.setattr(retrieval, "embed_dataset_split", lambda *a, **kw: larger_embedded)
    root, dataset = larger_beir
    args = ["eval", "--model", "m", "--dataset", str(root), "--out", str(tmp_path / "r.json"),
            "--k", "10", "--batch-size", str(BATCH), "--precision", "binary", "-q"]
    assert cli.main(args + ["--rescore-multiplier", "4", "--rescore-documents",
                            "float32"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["precision"], result["rescore_multiplier"], result["rescore_documents"]) \
        == ("binary", 4, "float32")
    assert result["metrics"]["ndcg@10"] == quantized_ndcg(
        model, dataset, larger_embedded, precision="binary", rescore_multiplier=4,
        rescore_documents="float32")
    capsys.readouterr()
    args[args.index("binary")] = "float32"
    assert cli.main(args + ["--rescore-multiplier", "4", "--overwrite"]) == 2
    assert "rescoring needs a quantized corpus" in capsys.readouterr().err


# --- MTEB ---------------------------------------------------------------------------------

class RecordingMteb(CdeMtebModel):
    """Notes which task each model call served: (task, "context" | prompt, texts, seed)."""

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.task, self.calls = None, []
        inner_context = model.context

        def context(texts, **kw):
            self.calls.append((self.task, "context", list(texts), kw["seed"]))
            made = inner_context(texts, **kw)
            inner_encode = made.encode

            def encode(texts, **kw):
                self.calls.append((self.task, kw["prompt"], list(texts), None))
                return inner_encode(texts, **kw)

            return _Proxy(made, encode=encode)

        self.model = _Proxy(model, context=context)

    def encode(self, inputs, *, task_metadata, **kw):
        self.task = task_metadata.name
        return super().encode(inputs, task_metadata=task_metadata, **kw)

    def index(self, corpus, *, task_metadata, **kw):
        self.task = task_metadata.name
        return super().index(corpus, task_metadata=task_metadata, **kw)


class _Proxy:
    def __init__(self, target, **overrides):
        self.__dict__.update(overrides, _target=target)

    def __getattr__(self, name):
        return getattr(self._target, name)


@pytest.fixture(scope="module")
def mteb_run(model):
    """One offline `mteb.evaluate` over MTEB's in-memory mock tasks of five types."""
    tasks = [MockRetrievalTask(), MockClassificationTask(), MockRerankingTask(), MockSTSTask(),
             LegacyMockClusteringFastTask()]
    wrapper = RecordingMteb(model, tasks=tasks, batch_size=BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2-text minicorpora are oversampled, as documented
        results = mteb.evaluate(wrapper, tasks, cache=None, show_progress_bar=False)
    return wrapper, {r.task_name: r for r in results.task_results}


def test_mteb_protocols_and_metadata(mteb_run, model):
    wrapper, _ = mteb_run
    assert isinstance(wrapper, EncoderProtocol) and isinstance(wrapper, SearchProtocol)
    meta = wrapper.mteb_model_meta
    assert (meta.revision, meta.embed_dim, meta.max_tokens) == (model.fingerprint, 64, 512)
    assert meta.framework == ["JAX"] and meta.similarity_fn_name == "cosine"


def test_mteb_evaluate_runs_every_task_type(mteb_run):
    _, results = mteb_run
    splits = {name: sorted(r.scores) for name, r in results.items()}
    assert splits == {"MockRetrievalTask": ["test", "val"], "MockClassificationTask": ["test"],
                      "MockRerankingTask": ["test"], "MockSTSTask": ["test"],
                      "LegacyMockClusteringFastTask": ["test"]}
    for r in results.values():
        for scores in r.scores.values():
            assert -1.0 <= scores[0]["main_score"] <= 1.0  # STS reports a Spearman rho


def test_mteb_scores_equal_an_independent_computation(mteb_run, model):
    """Each task's main score, recomputed here from the model's own API (the contexts and
    prompts of docs/model.md §7, which the next test checks the wrapper uses) with numpy,
    scipy and scikit-learn: retrieval nDCG@10 and reranking MAP by hand, STS Spearman,
    classification accuracy of MTEB's logistic regression. Clustering's v-measure comes from
    MiniBatchKMeans over bootstrap samples, which this does not reimplement: its range above."""
    from scipy.stats import spearmanr
    from sklearn.linear_model import LogisticRegression

    wrapper, results = mteb_run
    main = {name: {split: s[0]["main_score"] for split, s in r.scores.items()}
            for name, r in results.items()}

    def encode(texts, prompt, context_texts):
        context = model.context(context_texts, seed=42, batch_size=BATCH)
        return context.encode(list(texts), prompt=prompt, batch_size=BATCH).astype(np.float64)

    def ranked(queries, docs, candidates):  # {query id: [doc ids, best first]}
        return {q: sorted(candidates[q], key=lambda d: -queries[q] @ docs[d]) for q in queries}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2-text minicorpora are oversampled
        for task, prompts in ((MockRetrievalTask(), ("search_query: ", "search_document: ")),
                              (MockRerankingTask(), ("classification: ",) * 2)):
            task.load_data()
            for split, data in task.dataset["default"].items():
                corpus = [f"{d['title']} {d['text']}" for d in data["corpus"]]
                docs = dict(zip(data["corpus"]["id"], encode(corpus, prompts[1], corpus)))
                queries = dict(zip(data["queries"]["id"],
                                   encode(data["queries"]["text"], prompts[0], corpus)))
                qrels = data["relevant_docs"]
                order = ranked(queries, docs, data["top_ranked"] or {q: list(docs)
                                                                      for q in queries})
                if isinstance(task, MockRetrievalTask):  # nDCG@10, one relevant doc each
                    want = np.mean([sum(qrels[q].get(d, 0) / math.log2(i + 2)
                                        for i, d in enumerate(order[q][:10]))
                                    for q in queries])
                else:  # MAP: precision at each relevant document's rank
                    want = np.mean([np.mean([sum(qrels[q].get(e, 0) > 0 for e in ds[:i + 1])
                                             / (i + 1) for i, d in enumerate(ds)
                                             if qrels[q].get(d, 0) > 0])
                                    for q, ds in order.items()])
                assert main[task.metadata.name][split] == pytest.approx(want, abs=1e-6)

        sts = MockSTSTask()
        sts.load_data()
        test = sts.dataset["test"]
        context = next(texts for task, kind, texts, _ in wrapper.calls
                       if task == "MockSTSTask" and kind != "context")
        a, b = (encode(test[c], "classification: ", context) for c in ("sentence1", "sentence2"))
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        want = spearmanr(cosine, test["score"]).statistic
        assert main["MockSTSTask"]["test"] == pytest.approx(want, abs=1e-6)

        cls = MockClassificationTask()
        cls.load_data()
        train, test = cls.dataset["train"], cls.dataset["test"]
        fitted = LogisticRegression(max_iter=100).fit(
            encode(train["text"], "classification: ", train["text"]), train["label"])
        want = fitted.score(encode(test["text"], "classification: ", train["text"]),
                            test["label"])
        assert main["MockClassificationTask"]["test"] == pytest.approx(want, abs=1e-9)


def test_mteb_minicorpus_sources_and_prompts(mteb_run):
    wrapper, _ = mteb_run
    contexts = [(task, texts, seed) for task, kind, texts, seed in wrapper.calls
                if kind == "context"]
    first_encoded = {}
    for task, kind, texts, _ in wrapper.calls:
        if kind != "context":
            first_encoded.setdefault(task, texts)
    corpus = ["Title of d1 This is a positive sentence",       # MTEB's title + " " + text
              "Title of d2 This is another positive sentence"]
    assert contexts == [  # once per (task, subset), though retrieval ran val and test
        ("MockRetrievalTask", corpus, 42),
        ("MockClassificationTask", ["This is a test sentence",  # the train split
                                    "This is another train sentence"], 42),
        ("MockRerankingTask", corpus, 42),
        ("MockSTSTask", first_encoded["MockSTSTask"], 42),  # other types: the texts given
        ("LegacyMockClusteringFastTask", first_encoded["LegacyMockClusteringFastTask"], 42),
    ]
    assert first_encoded["MockRetrievalTask"] == corpus  # index() runs before the queries
    prompts = {}
    for task, kind, _, _ in wrapper.calls:
        if kind != "context":
            prompts.setdefault(task, set()).add(kind)
    assert prompts == {"MockRetrievalTask": {"search_query: ", "search_document: "},
                       "MockClassificationTask": {"classification: "},
                       "MockRerankingTask": {"classification: "},
                       "MockSTSTask": {"classification: "},
                       "LegacyMockClusteringFastTask": {"clustering: "}}


def test_mteb_search_and_rerank_match_numpy(model, random_docs):
    from datasets import Dataset

    docs = [d for d in random_docs if 40 < len(d) < 120][:16]
    queries = [" ".join(d.split()[:5]) for d in docs[:3]]
    meta = MockRetrievalTask.metadata.model_copy(update={"name": "FakeRetrieval"})
    where = dict(task_metadata=meta, hf_split="test", hf_subset="default", encode_kwargs={})
    wrapper = CdeMtebModel(model, batch_size=BATCH)
    with pytest.raises(ValueError, match=r"search\(\) before index\(\)"):
        wrapper.search(Dataset.from_dict({"id": ["q0"], "text": ["x"]}), top_k=1, **where)
    with pytest.warns(UserWarning, match="only 16 texts for a minicorpus of 512"):
        wrapper.index(Dataset.from_list([{"id": f"d{i}", "title": "", "text": t}
                                         for i, t in enumerate(docs)]), **where)
    query_ds = Dataset.from_list([{"id": f"q{i}", "text": t} for i, t in enumerate(queries)])
    got = wrapper.search(query_ds, top_k=5, **where)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        context = model.embed_dataset(docs, seed=42, batch_size=BATCH)
    d = model.encode(docs, prompt="search_document: ", dataset_embeddings=context,
                     batch_size=BATCH)
    q = model.encode(queries, prompt="search_query: ", dataset_embeddings=context,
                     batch_size=BATCH)
    sims = q.astype(np.float64) @ d.T
    for i, row in enumerate(sims):
        best = np.argsort(-row, kind="stable")[:5]
        assert list(got[f"q{i}"]) == [f"d{j}" for j in best]
        np.testing.assert_allclose(list(got[f"q{i}"].values()), row[best], atol=1e-5)

    candidates = {f"q{i}": [f"d{j}" for j in (3, 11, 7 + i, 15)] for i in range(3)}
    reranked = wrapper.search(query_ds, top_k=3, top_ranked=candidates, **where)
    for i, row in enumerate(sims):
        ids = [int(c[1:]) for c in candidates[f"q{i}"]]
        order = sorted(ids, key=lambda j: -row[j])[:3]
        assert list(reranked[f"q{i}"]) == [f"d{j}" for j in order]
    with pytest.raises(ValueError, match="query 'q0' names 1 document.*'nope'"):
        wrapper.search(query_ds, top_k=3, top_ranked={"q0": ["d1", "nope"]}, **where)


def test_mteb_classification_minicorpus_is_the_train_split_per_subset(model):
    """A fake multilingual task (dataset[subset][split][column]), looked up by name."""
    train = {"en": ["good film", "bad film", "a fine day"], "fr": ["bon film", "mauvais"]}
    task = type("FakeTask", (), dict(
        metadata=MockClassificationTask.metadata.model_copy(update={"name": "FakeCls"}),
        train_split="train", input_column_name="text", data_loaded=True,
        dataset={s: {"train": {"text": t}, "test": {"text": ["x"]}} for s, t in train.items()}))
    wrapper = CdeMtebModel(model, tasks=[task], batch_size=BATCH)
    texts = ["the test text", "another: with a colon"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for subset in ("en", "fr", "en"):
            got = wrapper.encode([{"text": texts}], task_metadata=task.metadata,
                                 hf_split="test", hf_subset=subset)
            context = model.embed_dataset(train[subset], seed=42, batch_size=BATCH)
            want = model.encode(texts, prompt="classification: ", dataset_embeddings=context,
                                batch_size=BATCH)
            np.testing.assert_array_equal(
                wrapper.contexts[("FakeCls", subset)].dataset_embeddings, context)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert sorted(wrapper.contexts) == [("FakeCls", "en"), ("FakeCls", "fr")]
    assert np.abs(wrapper.contexts[("FakeCls", "en")].dataset_embeddings
                  - wrapper.contexts[("FakeCls", "fr")].dataset_embeddings).max() > 1e-3


def test_mteb_similarity_and_bad_arguments(model):
    wrapper = CdeMtebModel(model)
    # cos([3,4],[4,3]) = 24/25; cos([3,4],[0,1]) = 4/5; cos([1,0],[0,1]) = 0.
    np.testing.assert_allclose(wrapper.similarity([[3, 4]], [[4, 3], [0, 1]]),
                               [[24 / 25, 4 / 5]], atol=1e-7)
    np.testing.assert_allclose(wrapper.similarity_pairwise([[3, 4], [1, 0]], [[4, 3], [0, 1]]),
                               [24 / 25, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="revision applies to a hub id"):  # tests/test_hub.py
        CdeMtebModel(model, "abc123")
    with pytest.raises(TypeError, match="got one str"):
        wrapper.encode("one text", task_metadata=MockSTSTask.metadata, hf_split="test",
                       hf_subset="default")
