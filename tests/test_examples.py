"""examples/: each script run as a user runs it (a subprocess) on the tiny synthetic
checkpoint, its output checked against the same computation through the library, and the
random-weights note on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import cde_jax
from cde_jax.convert.synthetic import SYNTHETIC_KEY, is_synthetic
from cde_jax.evaluation import evaluate_retrieval, load_beir
from cde_jax.resources import packaged_data

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTE = "NOTE: random weights (a synthetic checkpoint)"


def example(name: str, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def converted(tiny_checkpoint):
    return tiny_checkpoint[1]


QUERIES = ["who is Jason Voorhees?", "macdonald polynomials"]


@pytest.fixture(scope="module")
def search_run(tiny_checkpoint, tmp_path_factory):
    """(stdout, hits)"""
    tmp = tmp_path_factory.mktemp("search_run")
    done = example("search.py", tiny_checkpoint[1], "--limit", 24, "--top-k", 3, "--json",
                   tmp / "hits.json", *(a for q in QUERIES for a in ("--query", q)))
    return done.stdout, json.loads((tmp / "hits.json").read_text())


def test_search(converted, search_run):
    stdout, hits = search_run
    assert NOTE in stdout and "24 documents, 64-dimensional embeddings" in stdout
    model = cde_jax.load(converted)
    lines = packaged_data("random_docs.txt").read_text(encoding="utf-8").splitlines()
    corpus = [line for line in lines if line.strip()][:24]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 24 texts for a minicorpus of 512: oversampled
        dataset = model.embed_dataset(corpus, seed=0)
    docs = model.encode_document(corpus, dataset_embeddings=dataset)
    for query in QUERIES:
        scores = docs @ model.encode_query(query, dataset_embeddings=dataset)
        best = np.argsort(-scores)[:3]
        assert [h["doc"] for h in hits[query]] == best.tolist()
        np.testing.assert_allclose([h["score"] for h in hits[query]], scores[best], atol=1e-5)
        assert [h["text"] for h in hits[query]] == [corpus[i] for i in best]
        assert f"  {scores[best[0]]:.3f}  [{best[0]}] {corpus[best[0]][:90]}" in stdout


def test_only_a_marked_checkpoint_is_called_random(synthetic):
    """The examples print the note when `is_synthetic(config)`: true only for the mark that
    make_synthetic_checkpoint writes into config.json (test_search: the note is printed)."""
    config = json.loads((synthetic()[0] / "config.json").read_text())
    assert is_synthetic(config) and config[SYNTHETIC_KEY]
    del config[SYNTHETIC_KEY]
    assert not is_synthetic(config)


@pytest.fixture(scope="module")
def finetune_run(tiny_checkpoint, tmp_path_factory):
    """(stdout, output dir, report)"""
    tmp = tmp_path_factory.mktemp("finetune_run")
    done = example("finetune_and_evaluate.py", tiny_checkpoint[1], tmp / "ft", "--total-steps", 2,
                   "--examples", 16, "--test", 16, "--batch-size", 8, "--json",
                   tmp / "report.json")
    return done.stdout, tmp / "ft", json.loads((tmp / "report.json").read_text())


def test_finetune_and_evaluate(converted, finetune_run):
    stdout, out, report = finetune_run
    assert NOTE in stdout
    logged = [json.loads(line)["loss"] for line in
              (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(report["losses"]) == 2 and np.allclose(report["losses"], logged, atol=1e-6)
    assert f"trained 2 steps, loss {logged[0]:.4f} -> {logged[-1]:.4f}" in stdout

    heldout = load_beir(out / "heldout")
    assert len(heldout.query_ids) == 16 and len(heldout.doc_ids) == 16
    base, tuned = cde_jax.load(converted), cde_jax.load(report["model_dir"])
    assert tuned.fingerprint != base.fingerprint  # the weights moved
    assert tuned.config_json[SYNTHETIC_KEY]  # still marked: still random weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in (("base", base), ("fine-tuned", tuned)):
            want = evaluate_retrieval(model, heldout, [1, 10], show_progress_bar=False)
            assert report["metrics"][name] == pytest.approx(want, abs=1e-6)
            assert f"{report['metrics'][name]['ndcg@10']:11.4f}" in stdout


@pytest.fixture(scope="module")
def mteb_run(tiny_checkpoint, tmp_path_factory):
    """(stdout, scores)"""
    tmp = tmp_path_factory.mktemp("mteb_run")
    done = example("mteb_evaluate.py", tiny_checkpoint[1], "--batch-size", 8, "--json",
                   tmp / "scores.json")
    return done.stdout, json.loads((tmp / "scores.json").read_text())


def test_mteb_evaluate(converted, mteb_run):
    import mteb
    from mteb.mocks.mock_tasks import MockRetrievalTask

    from cde_jax.evaluation.mteb import CdeMtebModel

    stdout, scores = mteb_run
    assert NOTE in stdout
    assert {task: sorted(splits) for task, splits in scores.items()} == {
        "MockRetrievalTask": ["test", "val"], "MockClassificationTask": ["test"],
        "MockSTSTask": ["test"]}

    task = MockRetrievalTask()
    wrapper = CdeMtebModel(cde_jax.load(converted), tasks=[task], batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (result,) = mteb.evaluate(wrapper, [task], cache=None,
                                  show_progress_bar=False).task_results
    for split, subsets in result.scores.items():
        assert scores["MockRetrievalTask"][split] == pytest.approx(subsets[0]["main_score"],
                                                                   abs=1e-9)
    assert f"MockRetrievalTask            test   main score " \
           f"{scores['MockRetrievalTask']['test']:.4f}" in stdout
