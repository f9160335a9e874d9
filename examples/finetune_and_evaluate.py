#!/usr/bin/env python
"""Fine-tune a cde model for a few steps, then evaluate it against the model it started
from on a held-out retrieval set (nDCG@10, Recall@10, MRR@10).

    python examples/finetune_and_evaluate.py MODEL OUT [--total-steps N] [--batch-size B]
        [--examples N] [--json FILE]

MODEL: a hub id (jxm/cde-small-v2; --revision), a converted dir or a released-layout dir.
The data is made from the documents cde_jax ships (cde_jax/data/random_docs.txt): each
document's last sentence is a query for the rest of it. The first --examples documents train
(OUT/train.jsonl), the next ones form a BEIR-layout test set (OUT/heldout/). OUT also gets
`cde-jax train`'s outputs; the fine-tuned model is OUT/model (the released layout). A few
steps on this data demonstrate the loop; they do not make a better model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cde_jax
from cde_jax import hub
from cde_jax.convert.synthetic import is_synthetic
from cde_jax.evaluation import evaluate_retrieval, load_beir
from cde_jax.resources import packaged_data
from cde_jax.training import BatchConfig, StepConfig, TrainConfig, train

K_VALUES = [1, 10]


def query_and_passage(doc: str) -> tuple[str, str] | None:
    """(last sentence, the rest) of a document with at least three sentences."""
    parts = doc.strip().rsplit(". ", 1)
    if len(parts) < 2 or parts[0].count(". ") < 1 or len(doc) > 400:
        return None
    return parts[1], parts[0] + "."


def write_data(out: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    docs = packaged_data("random_docs.txt").read_text(encoding="utf-8").splitlines()
    pairs = [p for p in map(query_and_passage, docs) if p is not None]
    train_pairs, test_pairs = pairs[:n_train], pairs[n_train:n_train + n_test]
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train.jsonl"
    train_file.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n"
                                  for q, p in train_pairs))
    beir = out / "heldout"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "text": p}) + "\n" for i, (_, p) in enumerate(test_pairs)))
    (beir / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": q}) + "\n" for i, (q, _) in enumerate(test_pairs)))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(test_pairs))))
    return train_file, beir


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    ap.add_argument("--total-steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--examples", type=int, default=64, help="training examples")
    ap.add_argument("--test", type=int, default=64, help="held-out queries (and documents)")
    ap.add_argument("--json", help="write the metrics and losses here")
    args = ap.parse_args(argv)

    base_dir = hub.local_path(args.model, args.revision)  # a hub id: converted once, cached
    train_file, beir_dir = write_data(args.out, args.examples, args.test)
    heldout = load_beir(beir_dir)

    # Fine-tune: both stages, contrastive, the batch's own documents as its minicorpus.
    result = train(TrainConfig(
        model=str(base_dir), data=str(train_file), out=str(args.out / "run"),
        batch=BatchConfig(batch_size=args.batch_size, query_length=32, document_length=96),
        step=StepConfig(total_steps=args.total_steps, learning_rate=args.learning_rate)),
        show_progress=False)
    losses = [round(m["loss"], 6) for m in result.history]
    print(f"trained {result.step} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}: "
          f"{result.model_dir}")

    # Evaluate both: minicorpus from the held-out corpus (seed 42), exact search.
    base, tuned = cde_jax.load(base_dir), cde_jax.load(result.model_dir)
    report = {"losses": losses, "model_dir": str(result.model_dir), "metrics": {}}
    for name, model in (("base", base), ("fine-tuned", tuned)):
        report["metrics"][name] = evaluate_retrieval(model, heldout, K_VALUES,
                                                     show_progress_bar=False)
    keys = ["ndcg@10", "recall@10", "mrr@10"]
    print(f"\n{len(heldout.query_ids)} held-out queries")
    print(f"{'':>10}" + "".join(f"{k:>11}" for k in keys))
    for name, metrics in report["metrics"].items():
        print(f"{name:>10}" + "".join(f"{metrics[k]:11.4f}" for k in keys))
    if is_synthetic(base.config_json):
        print("NOTE: random weights (a synthetic checkpoint): these metrics mean nothing")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
