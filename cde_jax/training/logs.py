"""A training run's logs, written by process 0 alone: `metrics.jsonl` (one JSON object per
step, the record the run resumes from), TensorBoard event files in OUT/logs (tensorboardX)
and, when asked for, a Weights & Biases run (`wandb`, an optional dependency).

A row's keys are grouped into TensorBoard tags: eval_* under eval/, the throughput and step
time under perf/, the rest under train/. A resumed run opens its event file with
`purge_step`, so TensorBoard drops the replayed steps of the killed run's file.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..validation import UserError

METRICS_FILE, LOGS_DIR = "metrics.jsonl", "logs"
PERF = ("step_seconds", "examples_per_second", "tokens_per_second")


def check_wandb(project: str | None) -> None:
    """`--wandb-project` needs the wandb package (checked before OUT is touched)."""
    if project is not None and importlib.util.find_spec("wandb") is None:
        raise UserError("--wandb-project needs the wandb package: pip install wandb")


def tag(key: str) -> str:
    """A row key's TensorBoard tag: "eval_ndcg@10" -> "eval/ndcg_at_10" (TensorBoard
    allows only -/._ and word characters: tensorboardX would make it "ndcg_10")."""
    if key.startswith("eval_"):
        return "eval/" + key.removeprefix("eval_").replace("@", "_at_")
    return ("perf/" if key in PERF else "train/") + key


class RunLogs:
    """Appends rows to every log; a no-op on processes other than 0."""

    def __init__(self, out: Path, *, first_step: int, config: dict,
                 wandb_project: str | None, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(out / METRICS_FILE, "a")  # noqa: SIM115 (open for the run: close())
        self.board = SummaryWriter(str(out / LOGS_DIR), purge_step=first_step + 1,
                                   flush_secs=30)
        self.wandb = None
        if wandb_project is not None:
            import wandb

            self.wandb = wandb.init(project=wandb_project, dir=str(out / LOGS_DIR),
                                    config=config, resume="allow")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        step = row["step"]
        for key, value in row.items():
            if key != "step":
                self.board.add_scalar(tag(key), value, step)
        if self.wandb is not None:
            self.wandb.log({tag(k): v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        self.board.close()
        if self.wandb is not None:
            self.wandb.finish()
