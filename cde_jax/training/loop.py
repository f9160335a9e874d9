"""`train(cfg)`: the fine-tuning run behind `cde-jax train`.

OUT holds `train_config.json` (the resolved settings), `metrics.jsonl` (one line per step:
loss, accuracy, gradient norm, the pairs false-negative filtering counted as positives, the
learning rate, step time and throughput, and at evaluated steps nDCG@10 and Recall@100),
`logs/` (the same as TensorBoard event files, `logs.py`), `checkpoints/` (orbax, every
`checkpoint_every` steps and at the end), with `keep_best` `best_model/` and `best.json`
(`evaluate.py`) and, once the last step is done, `model/` (the released layout). One run
at a time writes OUT (`outputs.claim`).
Everything the run reads is validated before OUT is touched; an existing OUT is only reused
with `resume`, and only with the same settings, or when it holds a run that never reached a
checkpoint (nothing to resume: a new run starts over). A resumed run replays from its latest
checkpoint and ends with exactly the parameters of an uninterrupted one (same programs, same
inputs, same keys).

With several processes (`cde_jax.distributed`), every process must have process 0's settings,
data and model (`distributed.agree`, before OUT is touched); every process builds the same
batches (they are a pure function of the data position) and feeds only its devices' rows;
the step is one program over every device, so loss and gradients are those of one process.
Orbax writes the checkpoints from all processes; process 0 alone writes the logs and the
exported model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from tqdm.auto import tqdm

from .. import attention as attention_lib
from .. import convert, distributed, loading, outputs, sharding
from ..config import ACTIVATIONS, DTYPES, ModernBertConfig, setting
from ..corpus.source import file_sha256
from ..loading import read_checkpoint
from ..outputs import atomic_file
from ..runner import StageRunner
from ..text_api import load, model_of
from ..tokenization import TextTokenizer, load_tokenizer, quiet_truncation
from ..validation import UserError, int_in_range
from . import data as data_lib
from .checkpoint import Checkpoints, TrainState, checkpoint_steps, export_released
from .evaluate import BEST_FILE, BEST_MODEL_DIR, EvalConfig, Evaluator, read_dataset
from .filtering import FalseNegativeFilter, FilterConfig, build_filter
from .logs import LOGS_DIR, METRICS_FILE, RunLogs, check_wandb
from .step import StepConfig, init_opt_state, learning_rate, make_optimizer, make_train_step

log = logging.getLogger(__name__)

CONFIG_FILE, CHECKPOINTS_DIR = "train_config.json", "checkpoints"
# What a run writes before its first checkpoint (a run killed then left nothing to resume).
BEFORE_CHECKPOINT = {CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR, LOGS_DIR, BEST_MODEL_DIR,
                     BEST_FILE}
# Settings that do not change the result: a resumed run may use other values.
RESUMABLE_CHANGES = ("out", "checkpoint_every", "keep_checkpoints", "wandb_project")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = setting(help="converted or released-layout checkpoint dir")
    data: str = setting(help="training JSONL (see `training.data`)")
    out: str = setting(help="output dir (must be new unless resuming)")
    batch: data_lib.BatchConfig = setting(help="how batches are made")
    step: StepConfig = setting(help="the optimizer step")
    filter: FilterConfig = setting(FilterConfig(), help="false-negative filtering")
    eval: EvalConfig = setting(EvalConfig(), help="retrieval evaluation during training")
    accum_steps: int = setting(1, help="contrastive batches whose gradients are averaged per "
                                       "step")
    seed: int = setting(0, help="data order, negatives, minicorpus and the model's random keys")
    checkpoint_every: int = setting(100, help="steps between orbax checkpoints (and at the end)")
    keep_checkpoints: int = setting(2, help="checkpoints kept on disk (the newest)")
    model_parallel: int = setting(1, help="devices that split heads and MLP units (tensor "
                                          "parallelism)")
    dtype: str | None = setting(None, choices=DTYPES,
                                help="compute dtype (default: bfloat16 on GPU/TPU, float32 "
                                     "on CPU)")
    activations: str = setting("compute", choices=ACTIVATIONS,
                               help="with a half dtype, activations between ops in it "
                                    "(compute) or in float32")
    attention: str = setting("auto", choices=attention_lib.names(),
                             help="attention kernel (auto: the best for the device)")
    wandb_project: str | None = setting(None, help="also log to this Weights & Biases "
                                                   "project (needs the wandb package)")

    def __post_init__(self):
        for name in ("accum_steps", "checkpoint_every", "keep_checkpoints", "model_parallel"):
            int_in_range(getattr(self, name), name)

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


class TrainResult(NamedTuple):
    step: int
    history: list[dict]       # this call's metrics, one dict per step
    model_dir: Path           # the trained model in the released layout
    resumed_from: int | None  # the checkpoint's step, when `resume` found one
    best: dict | None         # with keep_best: best.json's content (step, metric, value, ...)


def _has_checkpoint(out: Path) -> bool:
    return bool(checkpoint_steps(out / CHECKPOINTS_DIR))


def _check_resumable(out: Path) -> None:
    """`resume` needs a checkpoint in OUT (checked before anything is read)."""
    if not ((out / CONFIG_FILE).exists() and _has_checkpoint(out)):
        raise UserError(f"nothing to resume in {out}; run without --resume to start")


def _stale_run(out: Path) -> bool:
    """OUT holds a run that never reached a checkpoint: nothing to resume, a new run
    replaces its files."""
    names = {p.name for p in out.iterdir()}
    return CONFIG_FILE in names and names <= BEFORE_CHECKPOINT and not _has_checkpoint(out)


def _occupied(out: str) -> bool:
    """What a new run may not write into: a non-empty OUT that is not a stale run."""
    path = Path(out)
    return path.exists() and any(path.iterdir()) and not _stale_run(path)


OCCUPIED = "not empty: pass --resume to continue a run in it, or choose another --out"


def _prepare_out(out: Path, cfg: TrainConfig, resume: bool) -> None:
    """A resumed run must have the same settings; a new one clears a stale run."""
    saved = out / CONFIG_FILE
    if resume:
        old, new = (traverse_util.flatten_dict(c, sep=".")
                    for c in (json.loads(saved.read_text()), cfg.to_json()))
        diff = sorted(k for k in set(old) | set(new)
                      if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
        if diff:
            raise UserError(f"--resume: settings differ from {saved}: " + ", ".join(
                f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in diff))
    elif out.exists() and any(out.iterdir()) and distributed.is_main():
        log.warning("%s holds a run that never reached a checkpoint: starting over", out)
        for path in out.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drops the lines of steps after the checkpoint a run resumes from (they are replayed)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line)["step"] <= step]
    with atomic_file(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def resolve(cfg: TrainConfig, ckpt: convert.Checkpoint, examples, mesh,
            false_negatives: FalseNegativeFilter | None = None
            ) -> tuple[TrainConfig, data_lib.TrainData, ModernBertConfig]:
    """Fills the settings that default to the checkpoint's config, the data or the machine
    (the dtype and kernel it runs, recorded so that a resume elsewhere that would compute
    differently is refused as a changed setting), and checks that the shapes fit together,
    before anything is written."""
    batch = cfg.batch
    if batch.corpus_size is None:
        batch = dataclasses.replace(batch, corpus_size=ckpt.cde.transductive_corpus_size)
    step = cfg.step
    if step.sequence_dropout is None:
        step = dataclasses.replace(
            step, sequence_dropout=ckpt.cde.transductive_sequence_dropout_prob)
    if step.sequence_dropout > 0 and not ckpt.has_null_embedding:
        raise UserError("sequence dropout needs `sequence_dropout_null_embedding`, which this "
                        "checkpoint lacks (set the dropout to 0)")
    data = data_lib.TrainData(examples, batch, cfg.seed, false_negatives)
    if step.grad_cache_rows is not None:
        for what, rows in (("batch size", batch.batch_size), ("documents per batch",
                           data.documents_per_batch), ("minicorpus rows", data.corpus_rows)):
            if rows % step.grad_cache_rows:
                raise UserError(f"grad_cache_rows {step.grad_cache_rows} does not divide the "
                                f"{what} ({rows})")
    backbone = loading.runtime_backbone(ckpt.backbone, mesh, dtype=cfg.dtype,
                                        attention_name=cfg.attention,
                                        activations=cfg.activations)
    evaluation = cfg.eval
    if evaluation.eval_data is not None:
        evaluation = dataclasses.replace(evaluation,
                                         eval_data=str(Path(evaluation.eval_data).absolute()))
    return dataclasses.replace(cfg, batch=data.cfg, step=step, eval=evaluation,
                               dtype=backbone.dtype,
                               attention=backbone.attention,
                               model=str(Path(cfg.model).absolute()),
                               data=str(Path(cfg.data).absolute()),
                               out=str(Path(cfg.out).absolute())), data, backbone


class _Session:
    """What one run builds from its settings: the model on the mesh, the optimizer, the
    compiled step and the batch feed."""

    def __init__(self, cfg: TrainConfig, ckpt: convert.Checkpoint, data: data_lib.TrainData,
                 mesh, backbone: ModernBertConfig):
        self.cfg, self.data, self.mesh = cfg, data, mesh
        self.ckpt, self.backbone = ckpt, backbone
        self.graphdef, params = loading.place_checkpoint(ckpt, backbone, self.mesh)
        self.tokenize = data_lib.BatchTokenizer(
            TextTokenizer(load_tokenizer(ckpt.tokenizer_dir), pad_id=backbone.pad_token_id),
            cfg.batch)
        optimizer = make_optimizer(cfg.step, params)
        self.initial = TrainState(0, params, init_opt_state(optimizer, params, self.mesh), 0,
                                  np.asarray(jax.random.PRNGKey(cfg.seed)))
        self.step_fn = make_train_step(self.graphdef, cfg.step, optimizer, params,
                                       self.initial.opt_state, logit_scale=ckpt.cde.logit_scale,
                                       mesh=self.mesh)
        self.learning_rate = learning_rate(cfg.step)

    def step(self, state: TrainState) -> tuple[TrainState, dict, int]:
        """Dispatches one optimizer step (asynchronously: the metrics are device arrays);
        also gives the step's tokens (queries, documents and minicorpus, padding left out)."""
        accum = self.cfg.accum_steps
        host = data_lib.stack([self.tokenize(self.data.batch(state.data_position + i))
                               for i in range(accum)])
        tokens = sum(int(v.sum()) for k, v in host.items() if k.endswith("_mask"))
        batches = {k: sharding.place(v, sharding.stacked_batch_sharding(self.mesh, v.shape))
                   for k, v in host.items()}
        params, opt_state, metrics = self.step_fn(state.params, state.opt_state, batches,
                                                  jnp.asarray(state.rng_key), state.step)
        return TrainState(state.step + 1, params, opt_state, state.data_position + accum,
                          state.rng_key), metrics, tokens

    def model(self, params):
        """A `CdeModel` of these parameters where they are (for evaluation)."""
        return model_of(self.ckpt, self.backbone,
                        StageRunner(self.graphdef, params, self.mesh, self.backbone.dtype))

    def export(self, params, out: Path) -> None:
        """The model of these parameters, released layout, into `out` (every process calls
        it; process 0 writes)."""
        trained = nnx.merge(self.graphdef, jax.tree.map(distributed.to_host, params))
        if distributed.is_main():
            export_released(trained, self.ckpt, out, overwrite=True, config_json={
                **self.ckpt.config_json, "transductive_corpus_size": self.cfg.batch.corpus_size})
        distributed.barrier(f"exported {out.name}")

    def report_truncation(self) -> None:
        queries, docs = self.tokenize.truncated
        if queries or docs:
            log.warning("truncated %d queries to %d tokens and %d documents to %d tokens",
                        queries, self.cfg.batch.query_length, docs,
                        self.cfg.batch.document_length)


def _run_steps(session: _Session, state: TrainState, checkpoints: Checkpoints, logs: RunLogs,
               evaluator: Evaluator | None, show: bool) -> tuple[TrainState, list[dict]]:
    """Steps until the last one, logging each step's metrics; a step's numbers are read
    while the next one runs, and always before an evaluation or a checkpoint. Step time and
    throughput are the means since the last pause (the start, the first step and its
    compilation, an evaluation, a checkpoint): one step's own time is not observable when
    the next one is already queued."""
    cfg, history = session.cfg, []
    total = cfg.step.total_steps
    examples = cfg.batch.batch_size * cfg.accum_steps
    window = {"start": time.perf_counter(), "steps": 0, "tokens": 0}
    with tqdm(total=total, initial=state.step, desc="train", unit="step",
              disable=not show or not distributed.is_main()) as bar:
        def measured(step, metrics, tokens) -> dict:
            row = {"step": step, **{k: float(v.addressable_data(0)) for k, v in metrics.items()},
                   "learning_rate": float(session.learning_rate(step - 1))}
            window["steps"] += 1
            window["tokens"] += tokens
            elapsed = time.perf_counter() - window["start"]
            return {**row, "step_seconds": elapsed / window["steps"],
                    "examples_per_second": examples * window["steps"] / elapsed,
                    "tokens_per_second": window["tokens"] / elapsed}

        def pause() -> None:
            window.update(start=time.perf_counter(), steps=0, tokens=0)

        def write(row: dict) -> None:
            logs.write(row)
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}")

        pending = None
        while state.step < total:
            state, metrics, tokens = session.step(state)
            if pending is not None:
                write(measured(*pending))
            pending = (state.step, metrics, tokens)
            evaluate = evaluator is not None and evaluator.due(state.step)
            save = state.step % cfg.checkpoint_every == 0 or state.step == total
            if not (evaluate or save or history == []):
                continue
            row, pending = measured(*pending), None
            if evaluate:
                row.update(evaluator(session.model(state.params)))
            write(row)
            if evaluate:
                evaluator.keep(state.step, row,
                               lambda out, params=state.params: session.export(params, out))
            if save:
                checkpoints.save(state)
            pause()
    return state, history


def train(cfg: TrainConfig, *, resume: bool = False,
          show_progress: bool | None = None) -> TrainResult:
    """Runs (or with `resume` continues) the fine-tuning described by `cfg`, with OUT
    claimed for the whole run (`outputs.claim`)."""
    with outputs.claim(cfg.out, overwrite=resume, exists=_occupied, remedy=OCCUPIED):
        return _train(cfg, resume=resume, show_progress=show_progress)


def _train(cfg: TrainConfig, *, resume: bool, show_progress: bool | None) -> TrainResult:
    if resume:
        distributed.all_succeed(lambda: _check_resumable(Path(cfg.out).absolute()),
                                "checking --resume")
    check_wandb(cfg.wandb_project)
    examples = data_lib.read_examples(cfg.data)
    eval_dataset = read_dataset(cfg.eval)
    ckpt = read_checkpoint(cfg.model)
    if ckpt.tokenizer_dir is None:
        raise UserError(f"{cfg.model} has no tokenizer files (tokenizer.json)")
    mesh = sharding.make_mesh(cfg.model_parallel)
    false_negatives = build_filter(cfg.filter, examples, lambda path: load(path, mesh=mesh))
    cfg, data, backbone = resolve(cfg, ckpt, examples, mesh, false_negatives)
    ckpt.cde = ckpt.cde.replace(transductive_corpus_size=cfg.batch.corpus_size)
    eval_files = {} if eval_dataset is None else {
        f"eval {f.relative_to(eval_dataset.path)} sha256": file_sha256(f)
        for f in eval_dataset.files}
    distributed.agree({**traverse_util.flatten_dict(cfg.to_json(), sep="."), "resume": resume,
                       "data sha256": file_sha256(cfg.data), "model": ckpt.fingerprint,
                       "processes": distributed.process_count(), **eval_files},
                      "the training run")
    out = Path(cfg.out)
    distributed.all_succeed(lambda: _prepare_out(out, cfg, resume), "checking --out")
    distributed.barrier("out checked")  # before process 0 writes into OUT
    session = _Session(cfg, ckpt, data, mesh, backbone)
    if distributed.is_main():
        with atomic_file(out / CONFIG_FILE, "w") as f:
            json.dump(cfg.to_json(), f, indent=2)
    state, resumed_from = session.initial, None
    evaluator = eval_dataset and Evaluator(
        cfg.eval, eval_dataset, every=cfg.eval.eval_every or cfg.checkpoint_every,
        total=cfg.step.total_steps, out=out, resume=resume)
    checkpoints = Checkpoints(out / CHECKPOINTS_DIR, keep=cfg.keep_checkpoints)
    logs = None
    try:
        restored = checkpoints.restore_latest(state) if resume else None
        if restored is not None:
            state, resumed_from = restored, restored.step
        if distributed.is_main():
            _keep_metrics_until(out / METRICS_FILE, state.step)
        logs = RunLogs(out, first_step=state.step, config=cfg.to_json(),
                       wandb_project=cfg.wandb_project, enabled=distributed.is_main())
        show = sys.stderr.isatty() if show_progress is None else show_progress
        with quiet_truncation():  # per batch they would break the bar: totals at the end
            state, history = _run_steps(session, state, checkpoints, logs, evaluator, show)
    finally:
        checkpoints.close()
        if logs is not None:
            logs.close()
    session.report_truncation()
    model_dir = out / "model"
    session.export(state.params, model_dir)
    return TrainResult(state.step, history, model_dir, resumed_from,
                       evaluator.best if evaluator else None)
