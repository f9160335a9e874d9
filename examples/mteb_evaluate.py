#!/usr/bin/env python
"""Evaluate a cde model with MTEB through cde_jax's MTEB wrapper (per-task minicorpora and
task prompts, exact search for retrieval).

    python examples/mteb_evaluate.py MODEL [--tasks NAME,NAME] [--batch-size B] [--json OUT]

MODEL: a hub id (jxm/cde-small-v2; --revision), a converted dir or a released-layout dir.
Without --tasks it runs MTEB's own offline mock tasks (retrieval, classification, STS:
nothing is downloaded), which shows the plumbing; name real tasks (e.g. NFCorpus,SciFact,
downloaded by MTEB) for real numbers. Needs `pip install "cde-jax[mteb]"`.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import mteb
from mteb.mocks.mock_tasks import MockClassificationTask, MockRetrievalTask, MockSTSTask

from cde_jax.convert.synthetic import is_synthetic
from cde_jax.evaluation.mteb import CdeMtebModel


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    ap.add_argument("--tasks", help="comma-separated MTEB task names (default: offline mocks)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--json", help="write {task: {split: main score}} here")
    args = ap.parse_args(argv)

    if args.tasks:
        tasks = list(mteb.get_tasks(tasks=args.tasks.split(",")))
    else:
        tasks = [MockRetrievalTask(), MockClassificationTask(), MockSTSTask()]
    model = CdeMtebModel(args.model, args.revision, tasks=tasks, batch_size=args.batch_size)
    with warnings.catch_warnings():
        if not args.tasks:  # the mock tasks' 2-document minicorpora are oversampled to 512
            warnings.simplefilter("ignore")
        results = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False)

    scores = {r.task_name: {split: float(subsets[0]["main_score"])
                            for split, subsets in sorted(r.scores.items())}
              for r in results.task_results}
    print(f"{model.name} (revision {model.mteb_model_meta.revision})")
    for task, splits in scores.items():
        for split, score in splits.items():
            print(f"  {task:<28} {split:<6} main score {score:.4f}")
    if is_synthetic(model.model.config_json):
        print("NOTE: random weights (a synthetic checkpoint): these scores mean nothing")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")
    return scores


if __name__ == "__main__":
    main()
