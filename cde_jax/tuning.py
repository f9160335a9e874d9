"""Kernels that prove themselves on the user's device: checked against `xla` and timed at first
use, the decision cached.

Why: the accelerator kernels (`splash`, `rope_fused` with `fused_layer`, `cudnn`) cannot run in
CI; their evidence there is interpret mode and deviceless compiles. So the proof travels
with the package and runs where they do. The first time a (device kind, runtime versions,
compute dtype, kernel set, bucket) is met, each candidate runs the second stage on one fixed
probe batch of the bucket's shape (right padding, a full row, a one-token row, left padding, a
hole: every mask the array API accepts); a candidate whose embeddings differ from `xla`'s on
the same device beyond `BOUNDS` is rejected with what it measured, the others are timed
(medians of alternating runs) and the fastest is taken. The second stage is the probe because
it runs everything the first does (self-attention over whole rows) and more (the prefix, the
last layer's text-only queries).

Cheap next to the job it guards: one bucket (`PROBE_LENGTH`, batch size from the run's plan),
the second stage only, and the candidates' runners share the loaded parameters; the chosen
kernel's runner is the one the run keeps, so its compiled programs for that bucket are the
run's. Once per host: the decision goes to one JSON file (`cache_file`); every process of a
multi-process run probes together if any misses, and all take process 0's choice.

The platform is an input, decided once by the caller (`load`: the mesh's devices), so the
first-use path runs with CPU devices standing in for an accelerator (`cde-jax tune` and the
tests). Kernels join the candidates through `register`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from . import attention, distributed, fused_layer, loading, outputs
from .config import CdeConfig, ModernBertConfig
from .resources import cache_dir
from .runner import StageRunner
from .validation import UserError

log = logging.getLogger(__name__)

INTERPRETED = ("splash", "rope_fused")  # the Pallas kernels, in interpret mode off TPUs
REFERENCE = "xla"
PROBE_LENGTH = 256  # the bucket `load` probes: texts of up to 256 tokens
REPEATS = 5  # timed runs per candidate, alternating
# The check: float32 embeddings within 1e-5 of xla's, relative to the largest value;
# half dtypes within a cosine of 0.9999 of xla's, row by row.
FLOAT32_BOUND = 1e-5
HALF_COSINE = 0.9999
TUNE_ENV = "CDE_JAX_TUNE_DIR"
CACHE_NAME = "kernels.json"
CACHE_FORMAT = 1

_registered: dict[str, tuple[str, ...]] = {}  # kernel name -> platforms it is a candidate on


def register(name: str, attend, *, platforms: tuple[str, ...]) -> None:
    """Adds `attend(q_bthe, k_bshe, v_bshe, mask) -> o_bthe` to the attention registry under
    `name` and makes it a candidate of "auto" on `platforms` ("tpu", "gpu", "cpu"): a new
    kernel is then checked and timed against the others wherever it may run."""
    attention.register(name, attention.Kernel(name, attention.plain(attend)))
    _registered[name] = tuple(platforms)


def unregister(name: str) -> None:
    """Removes a kernel added by `register`."""
    if name not in _registered:
        raise UserError(f"attention {name!r} was not added by tuning.register")
    del _registered[name]
    attention.unregister(name)


def candidates(platform: str, *, interpret: bool = False) -> tuple[str, ...]:
    """The kernels "auto" chooses among on `platform`; `interpret` adds the Pallas kernels
    (interpret mode off TPUs: slow, for checking them on CPU)."""
    names = list(attention.candidates(platform))
    names += [n for n in INTERPRETED if interpret and n not in names]
    return tuple(names + [n for n, on in _registered.items() if platform in on])


def label(name: str, backbone: ModernBertConfig) -> str:
    """How a kernel is named to users: rope_fused brings fused_layer where the layers allow."""
    fused = name == "rope_fused" and fused_layer.supports(backbone.replace(attention=name))
    return f"{name}+fused_layer" if fused else name


def cache_file() -> Path:
    """$CDE_JAX_TUNE_DIR/kernels.json, else $XDG_CACHE_HOME/cde-jax/tune/kernels.json."""
    return cache_dir("tune", TUNE_ENV) / CACHE_NAME


# --- what a decision depends on -----------------------------------------------------------
def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass(frozen=True)
class Target:
    """The cache key: the device and its runtime (libtpu's or CUDA's version, as the device's
    client reports it, and cuDNN's), the software, the compute dtype, the kernels compared
    and the probe bucket (global rows x tokens per text)."""

    platform: str
    device_kind: str
    runtime: str
    dtype: str
    kernels: tuple[str, ...]
    rows: int
    length: int
    versions: tuple[tuple[str, str | None], ...]

    @classmethod
    def of(cls, device, dtype: str, kernels, rows: int, length: int,
           platform: str | None = None) -> Target:
        from . import __version__  # set after the package's modules are imported

        platform = platform or device.platform
        versions = {"jax": jax.__version__, "jaxlib": _version("jaxlib"), "cde-jax": __version__}
        if platform == "tpu":
            versions["libtpu"] = _version("libtpu")
        if platform == "gpu":
            versions["cudnn"] = _version("nvidia-cudnn-cu12") or _version("nvidia-cudnn-cu13")
        return cls(platform, device.device_kind, str(device.client.platform_version), dtype,
                   tuple(kernels), rows, length, tuple(sorted(versions.items())))

    @property
    def bucket(self) -> str:
        return f"{self.rows}x{self.length}"

    def key(self) -> str:
        versions = " ".join(f"{k} {v}" for k, v in self.versions)
        return (f"{self.device_kind} | {self.runtime} | {self.dtype} | "
                f"{','.join(self.kernels)} | {self.bucket} | {versions}")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One candidate on the probe: its error against `xla` (None for xla itself) and speed,
    or why it was rejected."""

    kernel: str
    label: str
    max_rel_err: float | None = None
    min_cosine: float | None = None
    texts_per_s: float | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class Decision:
    target: Target
    trials: tuple[Trial, ...]
    chosen: str
    seconds: float  # what the probe cost, compiles included

    def trial(self, kernel: str) -> Trial:
        return next(t for t in self.trials if t.kernel == kernel)

    def line(self) -> str:
        """`attention on TPU v5 lite (bfloat16): rope_fused+fused_layer 2,310 texts/s, ...`"""
        ran = sorted((t for t in self.trials if t.error is None and t.texts_per_s),
                     key=lambda t: -t.texts_per_s)
        parts = [f"{t.label} {t.texts_per_s:,.0f}" + (" texts/s" if i == 0 else "")
                 for i, t in enumerate(ran)]
        parts += [f"{t.label} rejected ({t.error})" for t in self.trials if t.error]
        return (f"attention on {self.target.device_kind} ({self.target.dtype}): "
                f"{', '.join(parts)} (bucket {self.target.bucket}; chosen {self.chosen})")

    def to_json(self) -> dict:
        target = dataclasses.asdict(self.target)
        target["versions"] = dict(self.target.versions)
        return {"key": self.target.key(), "target": target,
                "trials": [dataclasses.asdict(t) for t in self.trials],
                "chosen": self.chosen, "seconds": self.seconds}

    @classmethod
    def from_json(cls, entry: dict) -> Decision:
        target = dict(entry["target"])
        target["kernels"] = tuple(target["kernels"])
        target["versions"] = tuple(target["versions"].items())
        return cls(Target(**target), tuple(Trial(**t) for t in entry["trials"]),
                   entry["chosen"], entry["seconds"])


# --- the cache ----------------------------------------------------------------------------
def read_cache(path: Path) -> dict[str, dict]:
    """{key: decision JSON}; a missing file is empty, an unreadable one is warned about and
    replaced on the next write."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") == CACHE_FORMAT:
            return data["decisions"]
        log.warning("%s: format %s, not %s: probing again", path, data.get("format"),
                    CACHE_FORMAT)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError, KeyError) as e:
        log.warning("%s is unreadable (%s): probing again", path, e)
    return {}


def cached(path: Path, target: Target) -> Decision | None:
    entry = read_cache(path).get(target.key())
    return None if entry is None else Decision.from_json(entry)


def remember(path: Path, decision: Decision) -> None:
    """Adds `decision` to the cache file: read, updated, written to a temp name and renamed."""
    decisions = read_cache(path)
    decisions[decision.target.key()] = decision.to_json()
    with outputs.atomic_file(path, "w") as f:
        json.dump({"format": CACHE_FORMAT, "decisions": decisions}, f, indent=1, sort_keys=True)


# --- the probe ----------------------------------------------------------------------------
def probe_batch(rows: int, length: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's rows of the fixed probe batch (global `rows` x `length`), each row a
    function of its global index alone: random ids, and in turn every kind of mask the array
    API accepts (a full row, right padding, one token, left padding, a hole inside)."""
    share = rows // distributed.process_count()
    ids_bs = np.zeros((share, length), np.int32)
    mask_bs = np.zeros((share, length), np.int32)
    for i, row in enumerate(range(distributed.process_index() * share,
                                  (distributed.process_index() + 1) * share)):
        rng = np.random.default_rng([7, row])
        ids_bs[i] = rng.integers(5, vocab_size, length)
        kind, n = row % 5, int(rng.integers(1, length))
        mask_bs[i] = [np.ones(length), np.arange(length) < n, np.arange(length) < 1,
                      np.arange(length) >= length - n,
                      (np.arange(length) < length // 4) | (np.arange(length) >= length // 2)
                      ][kind]
    return ids_bs, mask_bs


def compare(out_bd: np.ndarray, ref_bd: np.ndarray) -> tuple[float, float]:
    """(max |out - ref| / max |ref|, the lowest cosine of a row with its reference row),
    over every process's rows."""
    out, ref = out_bd.astype(np.float64), ref_bd.astype(np.float64)
    cosine = (out * ref).sum(-1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    worst = distributed.max_all(np.array([np.abs(out - ref).max(), np.abs(ref).max(),
                                          np.nan_to_num(1.0 - cosine, nan=2.0).max()]))
    return float(worst[0] / worst[1]), float(1.0 - worst[2])


def within_bound(dtype: str, max_rel_err: float, min_cosine: float) -> str | None:
    """Why a candidate's error against xla is too large for `dtype` (None: it is not)."""
    if dtype == "float32" and not max_rel_err <= FLOAT32_BOUND:
        return f"differs from xla by {max_rel_err:.2g} relative (bound {FLOAT32_BOUND:g})"
    if dtype != "float32" and not min_cosine >= HALF_COSINE:
        return f"a row's cosine with xla is {min_cosine:.6f} (bound {HALF_COSINE})"
    return None


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:200]}"


def probe(build: Callable[[str], StageRunner], target: Target, labels: dict[str, str],
          cde: CdeConfig, backbone: ModernBertConfig, *, timed: bool = True,
          repeats: int = REPEATS) -> tuple[Decision, dict[str, StageRunner]]:
    """Runs `target.kernels` (xla first) on the probe batch: checks each against xla, times
    those that pass (`repeats` runs each, alternating) and takes the fastest (without
    `timed`: the last that passes, for checking one kernel). Returns the decision and the
    runners of the kernels that passed."""
    start = time.perf_counter()
    ids_bs, mask_bs = probe_batch(target.rows, target.length, backbone.vocab_size)
    dataset_md = np.random.default_rng(0).standard_normal(
        (cde.transductive_corpus_size, backbone.hidden_size)).astype(np.float32)
    runs, trials, reference = {}, {}, None
    for name in target.kernels:
        try:
            runner = build(name)
            stage = runner.second(runner.prefix(dataset_md))
            placed = runner.place(ids_bs, mask_bs)
            out_bd = runner.local_rows(stage(*placed))
            failed = None
        except Exception as e:  # a candidate that cannot compile or run is rejected, not fatal
            if name == REFERENCE:
                raise
            failed = _first_line(e)
        if distributed.max_all(np.array([int(failed is not None)]))[0]:
            trials[name] = Trial(name, labels[name], error=failed or "failed on another process")
            continue
        if name == REFERENCE:
            reference, trials[name] = out_bd, Trial(name, labels[name])
        else:
            err, cosine = compare(out_bd, reference)
            trials[name] = Trial(name, labels[name], err, cosine,
                                 error=within_bound(target.dtype, err, cosine))
        if trials[name].error is None:
            runs[name] = (runner, stage, placed)
    seconds = {name: [] for name in runs}
    for _ in range(repeats if timed else 0):
        for name, (_, stage, placed) in runs.items():
            begin = time.perf_counter()
            jax.block_until_ready(stage(*placed))
            seconds[name].append(time.perf_counter() - begin)
    for name, times in seconds.items():
        if times:  # every process takes the slowest host's median
            median = float(distributed.max_all(np.array([np.median(times)]))[0])
            trials[name] = dataclasses.replace(trials[name], texts_per_s=target.rows / median)
    # Untimed, the last kernel that passed: the one being checked if it did, else xla.
    chosen = max(runs, key=lambda n: trials[n].texts_per_s) if timed else list(runs)[-1]
    decision = Decision(target, tuple(trials[n] for n in target.kernels), chosen,
                        time.perf_counter() - start)
    return decision, {name: run[0] for name, run in runs.items()}


# --- where it is used -------------------------------------------------------------------
def builder(runner: StageRunner, backbone: ModernBertConfig, cde: CdeConfig
            ) -> Callable[[str], StageRunner]:
    """Runners of other kernels on `runner`'s parameters (`loading.with_kernel`)."""
    return lambda name: loading.with_kernel(runner, backbone, cde, name)


def probe_rows(plan, mesh, cde: CdeConfig, length: int) -> int:
    """The global batch rows of the run's plan for second-stage texts of bucket `length`."""
    from .sharding import data_shards

    prefix = cde.num_context_tokens + cde.num_soft_prompt_tokens
    return plan.batch_size(length, data_shards(mesh), prefix)


def decide(runner: StageRunner, backbone: ModernBertConfig, cde: CdeConfig, kernels, *,
           rows: int, length: int, platform: str, timed: bool = True, cache: Path | None = None,
           fresh: bool = False, repeats: int = REPEATS
           ) -> tuple[Decision, Callable[[str], StageRunner], dict[str, StageRunner]]:
    """The decision for `kernels` at bucket rows x length: from `cache` (unless `fresh`)
    when every process has it, else probed now (and remembered). The choice is process 0's.
    Returns it, a builder of runners and the runners the probe kept."""
    build = builder(runner, backbone, cde)
    target = Target.of(runner.mesh.devices.flat[0], backbone.dtype, kernels, rows, length,
                       platform)
    decision = None if fresh or cache is None else cached(cache, target)
    kept: dict[str, StageRunner] = {}
    if fresh or distributed.max_all(np.array([int(decision is None)]))[0]:
        labels = {name: label(name, backbone) for name in kernels}
        decision, kept = probe(build, target, labels, cde, backbone, timed=timed,
                               repeats=repeats)
        if cache is not None:
            remember(cache, decision)
    index = kernels.index(decision.chosen) if distributed.is_main() else -1
    chosen = kernels[int(distributed.max_all(np.array([index]))[0])]
    return dataclasses.replace(decision, chosen=chosen), build, kept


def settle(runner: StageRunner, backbone: ModernBertConfig, cde: CdeConfig, plan, *,
           requested: str, platform: str, check: bool = True, cache: Path | None = None
           ) -> tuple[ModernBertConfig, StageRunner]:
    """`load`'s first-use check on a GPU or TPU: for "auto", the fastest kernel of
    `candidates(platform)` that passes; for a named kernel, that kernel once it passes (a
    `UserError` if it does not, unless `check` is False). Returns the backbone with the
    kernel and the runner to keep."""
    if requested == REFERENCE or (requested != "auto" and not check):
        return backbone, runner
    kernels = candidates(platform) if requested == "auto" else (REFERENCE, requested)
    length = plan.bucket_of(min(PROBE_LENGTH, plan.lengths[-1]))
    cache = cache_file() if cache is None else cache
    decision, build, kept = decide(
        runner, backbone, cde, kernels, rows=probe_rows(plan, runner.mesh, cde, length),
        length=length, platform=platform, timed=requested == "auto", cache=cache)
    rejected = [t for t in decision.trials if t.error]
    (log.warning if rejected else log.info)(
        "%s%s", decision.line(), "" if kept else f" (measured before: {cache})")
    if requested != "auto" and decision.chosen != requested:
        raise UserError(f"attention {requested!r} fails its check on "
                        f"{decision.target.device_kind} ({backbone.dtype}): "
                        f"{decision.trial(requested).error}; use attention='auto', or pass "
                        f"check_kernel=False (--no-kernel-check) to run it anyway")
    chosen = decision.chosen
    return backbone.replace(attention=chosen), kept.get(chosen) or build(chosen)


def probes(platform: str, tune: bool | None) -> bool:
    """Whether `load` checks kernels at first use: on GPUs and TPUs unless `tune` is False,
    elsewhere only when `tune` is True ("auto" on CPU keeps its static choice, free)."""
    return tune if tune is not None else platform in ("gpu", "tpu")
