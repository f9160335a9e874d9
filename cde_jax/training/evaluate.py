"""Evaluation during training: the project's retrieval evaluation (`cde_jax.evaluation`) of
the current parameters, where they are (the training mesh: no copy, no second model), on
one split of a BEIR-layout dataset, with the dataset embeddings of a minicorpus sampled
from its corpus (`evaluate_retrieval`, seed 42 as `cde-jax eval`).

With `keep_best`, the model of the step with the best value so far is exported beside the
last one (OUT/best_model, released layout) and OUT/best.json says which step and values it
holds; written after the model, so a resumed run takes best.json's step as the best so far
(a model newer than best.json is a replayed step's: deterministic, the same parameters).
Every process evaluates (each embeds its share); process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from .. import distributed
from ..config import setting
from ..evaluation.beir import BeirDataset, load_beir
from ..evaluation.retrieval import evaluate_retrieval
from ..outputs import atomic_file
from ..validation import UserError, int_in_range

METRICS = ("ndcg@10", "recall@100")  # what goes to the logs, as eval_<name>
K_VALUES = (10, 100)
BEST_MODEL_DIR, BEST_FILE = "best_model", "best.json"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    eval_data: str | None = setting(
        None, help="a BEIR-layout dir (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv): "
                   "nDCG@10 and Recall@100 of the current parameters go to the metrics "
                   "(default: no evaluation)")
    eval_every: int | None = setting(None, help="steps between evaluations (default: with "
                                                "each checkpoint); the last step always")
    eval_split: str = setting("dev", help="the eval qrels file (qrels/SPLIT.tsv)")
    keep_best: str | None = setting(None, choices=METRICS,
                                    help="also export the model of the step with the best "
                                         "value of this metric (OUT/best_model)")

    def __post_init__(self):
        if self.eval_every is not None:
            int_in_range(self.eval_every, "eval_every")
        if self.eval_data is None and (self.eval_every is not None or self.keep_best):
            raise UserError("--eval-every and --keep-best need --eval-data")
        if self.keep_best is not None and self.keep_best not in METRICS:
            raise UserError(f"keep_best must be one of {', '.join(METRICS)}, got "
                            f"{self.keep_best!r}")


def read_dataset(cfg: EvalConfig) -> BeirDataset | None:
    """The eval split, read and checked on every process (before OUT is touched)."""
    if cfg.eval_data is None:
        return None

    def read():
        try:
            return load_beir(cfg.eval_data, cfg.eval_split)
        except FileNotFoundError as e:
            raise UserError(f"--eval-data: {e}") from None

    return distributed.all_succeed(read, "reading --eval-data")


class Evaluator:
    """Evaluates at its steps and keeps the best model (module docstring)."""

    def __init__(self, cfg: EvalConfig, dataset: BeirDataset, *, every: int, total: int,
                 out: Path, resume: bool):
        self.cfg, self.dataset, self.every, self.total, self.out = cfg, dataset, every, total, out
        best = out / BEST_FILE
        self.best = json.loads(best.read_text()) if resume and best.exists() else None

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total

    def __call__(self, model) -> dict[str, float]:
        """{eval_<metric>: value} of `model` (a `CdeModel` of the current parameters)."""
        got = evaluate_retrieval(model, self.dataset, K_VALUES, show_progress_bar=False)
        return {f"eval_{name}": got[name] for name in METRICS}

    def keep(self, step: int, metrics: dict[str, float],
             export: Callable[[Path], object]) -> bool:
        """Exports the step's model if it is the best so far by `keep_best` (ties: the
        earlier step stays); True if it did. `metrics`: the step's row (eval_* in it)."""
        if self.cfg.keep_best is None:
            return False
        value = metrics[f"eval_{self.cfg.keep_best}"]
        if self.best is not None and value <= self.best["value"]:
            return False
        export(self.out / BEST_MODEL_DIR)  # every process (the parameters come to host)
        self.best = {"step": step, "metric": self.cfg.keep_best, "value": value,
                     **{k: v for k, v in metrics.items() if k.startswith("eval_")}}
        if distributed.is_main():
            with atomic_file(self.out / BEST_FILE, "w") as f:
                json.dump(self.best, f, indent=2)
        return True
