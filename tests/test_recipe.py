"""scripts/train_recipe.sh end to end on the tiny synthetic checkpoint: pairs -> cluster ->
train (packed batches, false-negative filtering, evaluation, best model) -> eval -> export
-> load, each stage timed; the recipe's eval.json is the evaluation logged for the best step."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from test_train_eval import pairs, read_jsonl, write_beir

REPO = Path(__file__).resolve().parents[1]
STAGES = ["pairs", "cluster", "train", "eval", "export", "load"]


def test_recipe_runs_every_stage_and_times_it(tiny_checkpoint, random_docs, tmp_path):
    rows = pairs(random_docs, 32)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    beir = write_beir(tmp_path / "beir", rows[:16])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "BATCH_SIZE": "8", "STEPS": "4",
           "EVAL_EVERY": "2", "LEARNING_RATE": "1e-3", "THRESHOLD": "positive"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "train_recipe.sh"), str(tiny_checkpoint[0]),
         str(tmp_path / "pairs.jsonl"), str(beir), str(tmp_path / "work"), "--query-length",
         "24", "--document-length", "48", "--corpus-size", "8"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    work = tmp_path / "work"
    stages = [line.split("\t") for line in (work / "stages.tsv").read_text().splitlines()]
    assert [name for name, _ in stages] == STAGES
    assert all(float(seconds) >= 0 for _, seconds in stages)
    assert [f"== stage {name}:" in proc.stdout for name in STAGES] == [True] * len(STAGES)
    logged = read_jsonl(work / "run" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert [r["batch"] is None for r in read_jsonl(work / "clustered.jsonl")] == [False] * 32
    best = json.loads((work / "run" / "best.json").read_text())
    evaluated = json.loads((work / "eval.json").read_text())["metrics"]
    assert abs(evaluated["ndcg@10"] - best["value"]) <= 1e-6
    assert "loaded" in proc.stdout and (work / "exported").is_dir()
