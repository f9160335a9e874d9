"""Evaluation during training and the run's logs (cde_jax.training.evaluate, .logs), tiny
synthetic checkpoint, CPU.

One 8-step `train --eval-data --eval-every 4 --keep-best ndcg@10` run three ways:
uninterrupted on 1 process, on 2 processes (jax.distributed on localhost), and SIGKILLed
after its step-4 checkpoint then resumed. The eval set is the training pairs' own (queries
against their positives), so retrieval is what the run learns.

- the metrics' nDCG@10 and Recall@100 equal `evaluate_retrieval` (`cde-jax eval`'s) of the
  exported models; best.json names the best step and best_model holds its model;
- the TensorBoard event files hold the logged values under their tags;
- 2 processes and the killed-and-resumed run log the same evaluations and keep the same best.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from test_corpus import ok, run_processes

import cde_jax
from cde_jax import cli
from cde_jax.evaluation import evaluate_retrieval, load_beir
from cde_jax.training.evaluate import EvalConfig

TESTS = Path(__file__).resolve().parent
STEPS, EVERY, KILL_AT = 8, 4, 6
METRICS = ("eval_ndcg@10", "eval_recall@100")


def pairs(docs: list[str], n: int) -> list[dict]:
    """query = one sentence of a document, positive = the document."""
    rng = np.random.default_rng(0)
    long_docs = [d for d in docs if d.count(". ") >= 2 and len(d) > 150][:n]
    rows = []
    for doc in long_docs:
        sentences = [s for s in doc.split(". ") if len(s) > 30] or [doc[:100]]
        rows.append({"query": sentences[rng.integers(len(sentences))], "positive": doc})
    return rows


def write_beir(root: Path, rows: list[dict], split: str = "dev") -> Path:
    (root / "qrels").mkdir(parents=True)
    for name, key in (("corpus", "positive"), ("queries", "query")):
        (root / f"{name}.jsonl").write_text("".join(
            json.dumps({"_id": f"{name}-{i}", "text": r[key]}) + "\n" for i, r in enumerate(rows)))
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"queries-{i}\tcorpus-{i}\t1\n" for i in range(len(rows))))
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every scalar in the TFRecord event files of `logdir`
    (records: u64 length, u32 crc, the Event proto, u32 crc)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 16 + length
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, random_docs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-eval")
    rows = pairs(random_docs, 64)
    train = tmp / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    beir = write_beir(tmp / "beir", rows[:32])

    def args(out):
        return ["train", "--model", tiny_checkpoint[0], "--data", train, "--out", out,
                "--total-steps", STEPS, "--batch-size", 8, "--learning-rate", "1e-3",
                "--query-length", 24, "--document-length", 48, "--corpus-size", 16,
                "--checkpoint-every", EVERY, "--eval-data", beir, "--eval-every", EVERY,
                "--keep-best", "ndcg@10", "-q"]

    ok(run_processes(1, *args(tmp / "one")))
    ok(run_processes(2, *args(tmp / "two")))
    killed = subprocess.run([sys.executable, str(TESTS / "train_killed.py"), str(KILL_AT),
                             *map(str, args(tmp / "resumed"))], capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-3000:]
    best_before = json.loads((tmp / "resumed" / "best.json").read_text())
    ok(run_processes(1, *args(tmp / "resumed"), "--resume"))
    return tmp, beir, best_before


def evaluated(rows: list[dict]) -> dict[int, tuple[float, float]]:
    return {r["step"]: tuple(r[m] for m in METRICS) for r in rows if METRICS[0] in r}


def test_metrics_are_the_projects_evaluation_of_the_models(runs):
    tmp, beir, _ = runs
    rows = read_jsonl(tmp / "one" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    scores = evaluated(rows)
    print("eval during training (step: nDCG@10, Recall@100):", scores)
    assert sorted(scores) == [4, 8]
    best = json.loads((tmp / "one" / "best.json").read_text())
    best_step = max(scores, key=lambda s: (scores[s][0], -s))
    assert best["step"] == best_step and best["value"] == scores[best_step][0]
    dataset = load_beir(beir, "dev")
    for model_dir, step in (("model", STEPS), ("best_model", best_step)):
        got = evaluate_retrieval(cde_jax.load(tmp / "one" / model_dir), dataset, (10, 100))
        print(f"{model_dir}: cde-jax eval {got['ndcg@10']:.6f} {got['recall@100']:.6f}")
        assert abs(got["ndcg@10"] - scores[step][0]) <= 1e-6
        assert abs(got["recall@100"] - scores[step][1]) <= 1e-6
    for r in rows:
        assert r["examples_per_second"] == pytest.approx(8 / r["step_seconds"])
        assert r["tokens_per_second"] > r["examples_per_second"] > 0


def test_tensorboard_events_hold_the_logged_values(runs):
    tmp, _, _ = runs
    rows = read_jsonl(tmp / "one" / "metrics.jsonl")
    logged = events(tmp / "one" / "logs")
    for tag, key in (("train/loss", "loss"), ("train/learning_rate", "learning_rate"),
                     ("train/false_negatives", "false_negatives"),
                     ("perf/examples_per_second", "examples_per_second"),
                     ("perf/tokens_per_second", "tokens_per_second"),
                     ("perf/step_seconds", "step_seconds"),
                     ("eval/ndcg_at_10", "eval_ndcg@10"),
                     ("eval/recall_at_100", "eval_recall@100")):
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in logged[tag]] == [s for s, _ in want], tag
        np.testing.assert_allclose([v for _, v in logged[tag]], [v for _, v in want],
                                   rtol=1e-6, err_msg=tag)


def test_two_processes_and_a_resumed_run_evaluate_and_keep_the_same(runs):
    tmp, _, best_before = runs
    one = evaluated(read_jsonl(tmp / "one" / "metrics.jsonl"))
    best = json.loads((tmp / "one" / "best.json").read_text())
    assert best_before["step"] == 4  # killed at step 7: the best so far was step 4's
    for name in ("two", "resumed"):
        other = evaluated(read_jsonl(tmp / name / "metrics.jsonl"))
        assert sorted(other) == sorted(one)
        np.testing.assert_allclose([other[s] for s in sorted(one)],
                                   [one[s] for s in sorted(one)], atol=1e-5, err_msg=name)
        assert json.loads((tmp / name / "best.json").read_text())["step"] == best["step"]
        assert (tmp / name / "best_model" / "model.safetensors").exists()


def test_wandb_without_the_package_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    code = cli.main(["train", "--model", "m", "--data", "d.jsonl", "--out",
                     str(tmp_path / "out"), "--total-steps", "1", "--batch-size", "8",
                     "--wandb-project", "p"])
    assert code != 0
    assert "--wandb-project needs the wandb package" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("settings, message", [
    ({"eval_every": 10}, "need --eval-data"),
    ({"keep_best": "ndcg@10"}, "need --eval-data"),
    ({"eval_data": "d", "keep_best": "map@10"}, "keep_best must be one of"),
    ({"eval_data": "d", "eval_every": 0}, "eval_every"),
])
def test_eval_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**settings)
