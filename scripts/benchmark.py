#!/usr/bin/env python
"""Speed and memory of cde_jax against the PyTorch reference, all measured in one run.

    python scripts/benchmark.py [--quick] [--json OUT]

(a) encoder tokens/s: `cde_jax.encoder.ModernBert` (jitted, float32) vs
    `transformers.ModernBertModel` (SDPA, eval, no_grad), same weights, all tokens real.
(b) second-stage texts/s with a 512-document context: `CdeModel.second_stage` vs
    `TorchCde.second_stage`, the same token batches for both.
(c) minicorpus docs/s end to end (tokenize + first stage): `CdeModel.embed_dataset` (length
    buckets) vs the model card's recipe (pad all to the longest, batches of 32; its batches
    all have one shape, so only `recipe_batches_timed` of them run, the rest at their mean).
(d) the encoder's model FLOP/s over a jitted float32 matmul's, measured in the same rounds.
(e) peak RSS of `scripts/convert_weights.py` vs the safetensors size, and of the streaming
    `cde-jax embed` at two input sizes.
(f) attention kernels per call at the model's head shapes: every kernel that runs here
    against "xla" ("auto" takes the winner on CPU: `attention.AUTO`).
(g) the second stage in bfloat16 compute (float32 accumulation) against PyTorch float32,
    with the worst per-row cosine (b) is also reported against.
(h) host/device overlap of `run_buckets`: the device-idle fraction, 1 - (the batches'
    device time alone, inputs already placed) / (wall time), for 0, 2 (the default) and
    unbounded batches in flight.
(i) where one second-stage step's time goes (jax.profiler trace): matmul / attention /
    elementwise / copies.

Contenders alternate (A, B, A, B, ...) after warm-up; every number is a median of the
rounds. The base synthetic checkpoint that (a)-(c) use is the output of the conversion that
(e) measures. --quick runs the same shapes and keys on the tiny preset with a 64-document
minicorpus; "sizes" in the JSON says what was run. `accel_benchmark.py` (GPU, TPU) imports
the harness from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

import cde_jax
from cde_jax import attention, buckets, flops, ops
from cde_jax.commands.runtime import CACHE_ENV
from cde_jax.config import PRESETS
from cde_jax.convert import convert, read_converted, released
from cde_jax.convert.synthetic import make_synthetic_checkpoint
from cde_jax.minicorpus import DatasetEmbeddings, fallback_minicorpus, sample_minicorpus
from cde_jax.outputs import atomic_file
from cde_jax.profiling import count_compiles
from cde_jax.prompts import DOCUMENT as DOCUMENT_PREFIX
from cde_jax.prompts import PROMPTS
from cde_jax.resources import packaged_data
from cde_jax.sharding import data_shards
from cde_jax.tokenization import pad_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when imported by the tests
sys.path.insert(1, str(REPO / "tests"))  # the PyTorch reference lives with the tests
from measure import cores, max_rel_err  # noqa: E402
from torch_reference import TorchCde  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Sizes:
    preset: str                      # synthetic checkpoint of (a)-(c) and of the conversion
    warmup: int                      # untimed rounds before the timed ones
    repeats: int                     # timed rounds (medians over these)
    minicorpus_repeats: int
    recipe_batches_timed: int | None  # of the recipe's equal-shape batches; None: all
    stream_texts: tuple[int, int]    # input sizes of the two `cde-jax embed` runs
    corpus_size: int = 512           # the minicorpus of (a)-(c): the second stage's context
    encoder_shapes: tuple[tuple[int, int], ...] = ((32, 128), (4, 552))
    second_stage: tuple[tuple[str, int, int], ...] = (("query", 8, 16), ("document", 4, 256))
    recipe_batch: int = 32
    stream_preset: str = "tiny"
    stream_corpus_size: int = 32     # the stream test's context: memory, not compute
    peak_n: int = 2048
    peak_calls: int = 5              # back-to-back matmuls per round
    # (f): (tag, batch, queries, keys); each shape global and local. t < s: the last layer.
    attention_shapes: tuple[tuple[str, int, int, int], ...] = (
        ("32x128", 32, 128, 128), ("4x552", 4, 552, 552), ("8x536", 8, 536, 536),
        ("8x16of536", 8, 16, 536))
    overlap_texts: int = 48          # (h): short texts, several batches
    overlap_tokens_per_batch: int = 512


FULL = Sizes(preset="base", warmup=1, repeats=3, minicorpus_repeats=1, recipe_batches_timed=4,
             stream_texts=(10_000, 100_000))
QUICK = Sizes(preset="tiny", warmup=1, repeats=1, minicorpus_repeats=1, recipe_batches_timed=4,
              stream_texts=(200, 1_000), corpus_size=64)


# --- harness -----------------------------------------------------------------------------
def alternate(contenders: dict[str, Callable[[], object]], *, warmup: int, repeats: int):
    """Calls the contenders in turn (A, B, A, B, ...): `warmup` untimed rounds, then `repeats`
    timed ones. Returns ({name: median seconds}, {name: last output}). Each callable must
    return only when its work is done (numpy out, or `block_until_ready`)."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    seconds = {name: [] for name in contenders}
    last = {}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            last[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}, last


# Runs argv[2:] with its output in the file argv[1]; prints the child's peak RSS in KiB and
# exits with its status. A child's ru_maxrss starts at the RSS of the process that spawned it
# (the kernel keeps the pre-exec high-water mark), so the spawner must be this small process,
# not the benchmark with its models loaded.
_RSS_WRAPPER = """
import resource, subprocess, sys
with open(sys.argv[1], "wb") as log:
    status = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(status)
"""


def peak_rss(cmd: list[str], env: dict | None = None) -> int:
    """Runs `cmd` and returns its peak resident set size in bytes (`getrusage(RUSAGE_CHILDREN)`
    in a small wrapper process). Raises with the output's tail on failure."""
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        proc = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, log.name, *map(str, cmd)],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            tail = Path(log.name).read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n"
                               f"{tail}{proc.stderr[-1000:]}")
    return int(proc.stdout.split()[-1]) * 1024  # Linux reports KiB


def fixed_length_batch(tokenizer, texts: list[str], prefix: str, rows: int, length: int,
                       sep_id: int):
    """(ids, mask) int32 (rows, length) of real text, every position a real token: texts of at
    least `length` tokens cut to `length - 1` plus [SEP], cycled if there are too few."""
    encoded = [e.ids for e in tokenizer.encode_batch([prefix + t for t in texts])]
    long_enough = [ids[:length - 1] + [sep_id] for ids in encoded if len(ids) >= length]
    if not long_enough:
        raise ValueError(f"no text has {length} tokens")
    ids = np.array([long_enough[i % len(long_enough)] for i in range(rows)], np.int32)
    return ids, np.ones_like(ids)


# --- (a) + (d): encoder ------------------------------------------------------------------
def bench_encoder(ours: cde_jax.CdeModel, ref: TorchCde, sizes: Sizes) -> dict:
    cfg = ours.backbone_config
    graphdef, params = nnx.split(ours.runner.model.first_stage_model.embedder)
    encode = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p)(ids, mask))
    matmul = jax.jit(jnp.matmul)
    a_nn = jax.random.normal(jax.random.key(0), (sizes.peak_n, sizes.peak_n), jnp.float32)

    def peak():
        for _ in range(sizes.peak_calls):
            matmul(a_nn, a_nn).block_until_ready()

    contenders = {"peak": peak}
    rng = np.random.default_rng(0)
    for b, s in sizes.encoder_shapes:
        ids = rng.integers(0, cfg.vocab_size, (b, s), dtype=np.int32)
        ids_j, mask_j = jnp.asarray(ids), jnp.ones((b, s), jnp.int32)
        ids_t, mask_t = torch.from_numpy(ids).long(), torch.ones(b, s, dtype=torch.long)
        contenders[f"ours_{b}x{s}"] = lambda i=ids_j, m=mask_j: np.asarray(encode(params, i, m))
        contenders[f"torch_{b}x{s}"] = lambda i=ids_t, m=mask_t: _torch_encoder(ref, i, m)
    seconds, last = alternate(contenders, warmup=sizes.warmup, repeats=sizes.repeats)

    peak_flops = 2 * sizes.peak_n ** 3 * sizes.peak_calls / seconds["peak"]
    out = {"peak_flops_matmul_f32": peak_flops, "peak_seconds_matmul_f32": seconds["peak"]}
    for b, s in sizes.encoder_shapes:
        shape = f"{b}x{s}"
        t_ours, t_torch = seconds[f"ours_{shape}"], seconds[f"torch_{shape}"]
        out |= {f"encoder_seconds_ours_{shape}": t_ours,
                f"encoder_seconds_torch_{shape}": t_torch,
                f"encoder_tokens_per_s_ours_{shape}": b * s / t_ours,
                f"encoder_tokens_per_s_torch_{shape}": b * s / t_torch,
                f"encoder_ratio_torch_{shape}": t_torch / t_ours,
                f"encoder_max_rel_err_{shape}": max_rel_err(last[f"ours_{shape}"],
                                                            last[f"torch_{shape}"])}
        for count in flops.ATTENTION_COUNTS:
            suffix = "" if count == "windowed" else "_dense"
            model_flops = flops.encoder_flops(cfg, b, s, attention=count)
            out[f"encoder_flops{suffix}_{shape}"] = model_flops
            out[f"encoder_flops_per_s{suffix}_{shape}"] = model_flops / t_ours
            out[f"peak_fraction{suffix}_{shape}"] = model_flops / t_ours / peak_flops
    shapes = [f"{b}x{s}" for b, s in sizes.encoder_shapes]
    out["encoder_ratio_torch"] = min(out[f"encoder_ratio_torch_{s}"] for s in shapes)
    out["peak_fraction"] = min(out[f"peak_fraction_{s}"] for s in shapes)
    return out


@torch.no_grad()
def _torch_encoder(ref: TorchCde, ids, mask) -> np.ndarray:
    return ref.embedder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()


# --- (b): second stage -------------------------------------------------------------------
def bench_second_stage(ours: dict[str, cde_jax.CdeModel], refs: dict[str, object], dataset_nd,
                       texts: list[str], kinds, *, warmup: int, repeats: int,
                       attention: str = "windowed", peak: float | None = None) -> dict:
    """texts/s of every model in `ours` and every reference in `refs` (objects with
    TorchCde's `second_stage`) for each (kind, batch, tokens) in `kinds`; with `peak`, also
    model FLOP/s over it (MFU). Ours are compared with the first reference: max relative
    error and the worst per-row cosine. Keys name the contender, kind and batch."""
    first = next(iter(ours.values()))
    cfg, tok = first.backbone_config, first.tokenizer.tokenizer
    prefix_len = min(len(dataset_nd), first.config.num_context_tokens) + \
        first.config.num_soft_prompt_tokens
    prefixes = {name: m.context(dataset_nd) for name, m in ours.items()}
    reference = next(iter(refs))
    out = {}
    for kind, batch, length in kinds:
        ids, mask = fixed_length_batch(tok, texts, PROMPTS[kind], batch, length,
                                       cfg.sep_token_id)
        contenders = {name: (lambda m=m, c=prefixes[name], i=ids, k=mask: m.second_stage(i, k, c))
                      for name, m in ours.items()}
        contenders |= {name: (lambda r=r, i=ids, k=mask: r.second_stage(i, k, dataset_nd))
                       for name, r in refs.items()}
        seconds, last = alternate(contenders, warmup=warmup, repeats=repeats)
        model_flops = flops.second_stage_flops(cfg, batch, length, prefix_len,
                                               attention=attention)
        tag = f"{kind}_b{batch}"
        for name, t in seconds.items():
            out[f"second_stage_seconds_{name}_{tag}"] = t
            out[f"second_stage_texts_per_s_{name}_{tag}"] = batch / t
            if peak:
                out[f"second_stage_mfu_{name}_{tag}"] = model_flops / t / peak
            if name in ours:
                out[f"second_stage_max_rel_err_{name}_{tag}"] = max_rel_err(last[name],
                                                                            last[reference])
                out[f"second_stage_min_cosine_{name}_{tag}"] = min_cosine(last[name],
                                                                          last[reference])
        out[f"second_stage_flops_{tag}"] = model_flops
    return out


def min_cosine(actual, expected) -> float:
    """The worst per-row cosine similarity, in float64."""
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


# --- (c): minicorpus end to end ----------------------------------------------------------
def bench_minicorpus(ours: cde_jax.CdeModel, ref: TorchCde, sizes: Sizes):
    """Returns (results, our dataset embeddings). Our bucket programs are compiled first, on
    one batch of each bucket shape; the timed runs must compile nothing."""
    docs_all = fallback_minicorpus()
    n = ours.config.transductive_corpus_size
    docs = sample_minicorpus(docs_all, n, seed=0)  # what embed_context(docs_all) embeds
    pad = ours.backbone_config.pad_token_id
    for length in ours.plan.lengths:
        rows = ours.plan.batch_size(length, data_shards(ours.mesh))
        ours.first_stage(np.full((rows, length), pad, np.int32), np.ones((rows, length), np.int32))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(packaged_data("modernbert-tokenizer"))
    starts = list(range(0, n, sizes.recipe_batch))
    timed = starts[:sizes.recipe_batches_timed or len(starts)]

    def recipe():
        """The model card's loop; the batches all have one shape, so when only some are timed
        the rest are counted at their mean."""
        begin = time.perf_counter()
        enc = hf_tokenizer([DOCUMENT_PREFIX + d for d in docs], truncation=True, padding=True,
                           max_length=512, return_tensors="pt")
        tokenize_s = time.perf_counter() - begin
        batch_s, outs = [], []
        for i in timed:
            begin = time.perf_counter()
            outs.append(ref.first_stage(enc.input_ids[i:i + sizes.recipe_batch],
                                        enc.attention_mask[i:i + sizes.recipe_batch]))
            batch_s.append(time.perf_counter() - begin)
        return tokenize_s + len(starts) * statistics.mean(batch_s), np.concatenate(outs), \
            enc.input_ids.shape[1]

    ours_s, recipe_s, compiles = [], [], 0
    for _ in range(sizes.minicorpus_repeats):
        with count_compiles() as counter:
            begin = time.perf_counter()
            dataset_nd = ours.embed_dataset(docs_all, seed=0, show_progress_bar=False)
            ours_s.append(time.perf_counter() - begin)
        compiles += counter.count
        seconds, recipe_nd, padded_len = recipe()
        recipe_s.append(seconds)
    t_ours, t_recipe = statistics.median(ours_s), statistics.median(recipe_s)
    return {"minicorpus_docs": n,
            "minicorpus_seconds_ours": t_ours, "minicorpus_seconds_recipe": t_recipe,
            "minicorpus_docs_per_s_ours": n / t_ours, "minicorpus_docs_per_s_recipe": n / t_recipe,
            "minicorpus_ratio_recipe": t_recipe / t_ours,
            "minicorpus_ours_compiles_timed": compiles,
            "minicorpus_recipe_padded_length": padded_len,
            "minicorpus_recipe_batches_timed": f"{len(timed)} of {len(starts)}",
            "minicorpus_max_rel_err": max_rel_err(dataset_nd[:len(recipe_nd)], recipe_nd),
            }, dataset_nd


# --- (f): attention kernels --------------------------------------------------------------
def bench_attention(cfg, sizes: Sizes) -> dict:
    """ms per call of each kernel that runs on this device in float32 (splash only in
    interpret mode off TPU: not timed), at the model's heads, each shape as a global and a
    local layer, rows right-padded from full to half. `attention_speedup_{name}_{tag}`:
    xla's time over the kernel's."""
    device = jax.devices()[0]
    names = [n for n in attention.candidates(device.platform)
             if attention.unsupported(n, device, "float32") is None
             and not attention.KERNELS[n].rotates]  # (b, s, h, e) operands: not rope_fused
    h, e = cfg.num_attention_heads, cfg.head_dim
    out = {"attention_kernels_timed": names, "attention_auto": attention.resolve("auto", device)}
    for tag, b, t, s in sizes.attention_shapes:
        keys = jax.random.split(jax.random.key(s), 3)
        q_bthe, k_bshe, v_bshe = (jax.random.normal(k, (b, n, h, e), jnp.float32)
                                  for k, n in zip(keys, (t, s, s)))
        lengths_b = np.linspace(s, s // 2, b).astype(np.int32)
        key_mask_bs = jnp.arange(s)[None, :] < lengths_b[:, None]
        for radius, layer in ((None, "global"), (cfg.window_radius, "local")):
            args = (q_bthe, k_bshe, v_bshe,
                    ops.MaskSpec(key_mask_bs, jnp.arange(s - t, s), jnp.arange(s), radius))
            fns = {n: jax.jit(functools.partial(attention.Plan(n, device.platform).attend,
                                                rope=attention.Rope(10_000.0, e)))
                   for n in names}
            contenders = {n: (lambda f=f, a=args: f(*a).block_until_ready())
                          for n, f in fns.items()}
            seconds, _ = alternate(contenders, warmup=sizes.warmup, repeats=sizes.repeats)
            for n, sec in seconds.items():
                out[f"attention_ms_{n}_{layer}_{tag}"] = sec * 1e3
                out[f"attention_speedup_{n}_{layer}_{tag}"] = seconds["xla"] / sec
    for n in names:
        speedups = [v for k, v in out.items() if k.startswith(f"attention_speedup_{n}_")]
        out[f"attention_speedup_{n}_median"] = statistics.median(speedups)
    return out


# --- (h): host/device overlap ------------------------------------------------------------
IN_FLIGHT_CASES = {"in_flight_0": 0, "in_flight_2": 2, "in_flight_all": None}


def bench_overlap(ours: cde_jax.CdeModel, sizes: Sizes) -> dict:
    """The first stage over `overlap_texts` short texts in batches of about
    `overlap_tokens_per_batch` tokens (several batches), through `run_buckets` with 0, 2
    and unbounded batches in flight, alternating with the same batches' device time alone
    (each batch's stage call on inputs already placed, waited for). Device-idle fraction:
    1 - device time / wall time. On CPU "device" and host share the cores, so this measures
    the host work left on the critical path."""
    runner, stage = ours.runner, ours.runner.first()
    texts = [DOCUMENT_PREFIX + t for t in short_texts(sizes.overlap_texts)]
    token_ids = ours.tokenizer.encode(texts)
    plan = dataclasses.replace(ours.plan, tokens_per_batch=sizes.overlap_tokens_per_batch)
    pad, width = ours.backbone_config.pad_token_id, ours.hidden_size
    size = lambda length: plan.batch_size(length, data_shards(ours.mesh))
    batches = buckets.plan_batches([len(t) for t in token_ids], plan, size)
    placed = [runner.place(*pad_batch(token_ids, rows, length, pad)) for length, rows in batches]

    def device_only():
        for arrays in placed:
            stage(*arrays).block_until_ready()

    contenders = {"device_only": device_only} | {
        name: (lambda n=n: runner.run_buckets(token_ids, stage, plan=plan, pad_id=pad,
                                              width=width, in_flight=n))
        for name, n in IN_FLIGHT_CASES.items()}
    seconds, _ = alternate(contenders, warmup=sizes.warmup, repeats=sizes.repeats)
    out = {"overlap_batches": len(batches), "overlap_seconds_device_only": seconds["device_only"]}
    for name in IN_FLIGHT_CASES:
        out[f"overlap_seconds_{name}"] = seconds[name]
        out[f"device_idle_fraction_{name}"] = max(0.0, 1 - seconds["device_only"] / seconds[name])
    return out


# --- (i): where a step's time goes -------------------------------------------------------
# Op categories by HLO op / kernel name, first match wins. "attention" is a fused attention
# kernel (cuDNN, splash); XLA's own attention shows up as matmul + elementwise.
OP_CATEGORIES = (
    ("attention", ("fmha", "flash", "splash", "attention", "pallas")),
    ("matmul", ("dot", "gemm", "matmul", "cublas", "xmma", "cutlass", "nvjet", "convolution",
                "ynn", "xnn", "onednn")),
    ("copies", ("copy", "transpose", "memcpy", "memset", "concatenate", "slice")),
)


def op_category(name: str) -> str:
    name = name.lower()
    for category, words in OP_CATEGORIES:
        if any(w in name for w in words):
            return category
    return "elementwise"  # fusions of elementwise ops and reductions, converts


def op_times(events: list[dict]) -> tuple[dict[str, float], list[str]]:
    """({op: ms}, lanes used) from a perfetto trace's events. On an accelerator: the events of
    its device lanes (the "XLA Ops" line where the trace has one, else the "Stream" lines,
    else all), named by their `hlo_op`, else the kernel name; on CPU: the host events that
    carry an `hlo_op`."""
    names = {(e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None):
             e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    devices = {pid for (pid, tid), name in names.items() if tid is None and "/device:" in name}
    device_lanes = {key: name for key, name in names.items()
                    if key[0] in devices and key[1] is not None}
    lanes = next((chosen for word in ("XLA Ops", "Stream", "") if (chosen := {
        key for key, name in device_lanes.items() if word in name})), set())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        op = (e.get("args") or {}).get("hlo_op")
        if devices:
            op = (op or e.get("name")) if (e.get("pid"), e.get("tid")) in lanes else None
        if op:
            per_op[op] = per_op.get(op, 0.0) + float(e.get("dur", 0.0)) / 1e3  # us -> ms
    return per_op, sorted({device_lanes[k] for k in lanes}) if devices else ["host"]


def profile_split(fn: Callable[[], object], log_dir: Path) -> dict:
    """Runs `fn` (already compiled and warm) once under `jax.profiler.trace` and splits the
    time of its XLA ops (`op_times`) by `op_category`. Returns the fraction of op time per
    category, op time and wall time in ms, the lanes read and the 8 costliest ops."""
    begin = time.perf_counter()
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        fn()
    wall_ms = (time.perf_counter() - begin) * 1e3
    trace = json.loads(gzip.decompress(next(Path(log_dir).rglob("perfetto_trace.json.gz"))
                                       .read_bytes()))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    per_op, lanes = op_times(events)
    total = sum(per_op.values())
    if not total:
        raise RuntimeError(f"no XLA op events in the trace ({len(events)} events)")
    split = dict.fromkeys(["matmul", "attention", "elementwise", "copies"], 0.0)
    for op, ms in per_op.items():
        split[op_category(op)] += ms / total
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
    return {"split": split, "op_ms": total, "wall_ms": wall_ms, "lanes": lanes,
            "top_ops": [{"op": op, "ms": ms, "category": op_category(op)} for op, ms in top]}


# --- (e): memory -------------------------------------------------------------------------
# A conversion may peak at 1.5x the safetensors file: one copy of the weights, the runtime
# and what writing them costs (README: Performance).
CONVERT_RSS_BOUND = 1.5


def measure_convert(released_dir: Path, out: Path) -> dict:
    rss = peak_rss([sys.executable, str(REPO / "scripts" / "convert_weights.py"),
                    str(released_dir), str(out)])
    size = (released_dir / released.WEIGHTS).stat().st_size
    return {"convert_peak_rss_bytes": rss, "checkpoint_file_bytes": size,
            "convert_rss_over_file": rss / size,
            "convert_rss_within_bound": rss / size <= CONVERT_RSS_BOUND}


def short_texts(n: int) -> list[str]:
    """n short query-like texts (the first 8 words of the fallback documents, cycled)."""
    heads = [" ".join(d.split()[:8]) for d in fallback_minicorpus()]
    return [f"{heads[i % len(heads)]} {i}" for i in range(n)]


def measure_stream(work: Path, sizes: Sizes) -> dict:
    """Peak RSS of `cde-jax embed` on two input sizes, after one small run that fills the
    compilation cache (both measured runs load the same programs). The dataset embeddings
    are a file of random values: what streaming holds does not depend on them, and each run
    would otherwise spend most of its time embedding the fallback minicorpus."""
    ckpt = convert(make_synthetic_checkpoint(work / "stream-released", preset=sizes.stream_preset,
                                             corpus_size=sizes.stream_corpus_size),
                   work / "stream-converted")
    env = {**os.environ, CACHE_ENV: str(work / "xla-cache")}
    width = PRESETS[sizes.stream_preset]().hidden_size
    random_nd = np.random.default_rng(0).standard_normal((sizes.stream_corpus_size, width))
    dataset = DatasetEmbeddings(random_nd.astype(np.float32), read_converted(ckpt).fingerprint,
                                DOCUMENT_PREFIX, 0).save(work / "stream-dataset.npz")
    rss = {}
    for n in (min(sizes.stream_texts) // 10,) + sizes.stream_texts:
        texts, out = work / f"texts-{n}.txt", work / f"emb-{n}.npy"
        texts.write_text("\n".join(short_texts(n)) + "\n", encoding="utf-8")
        rss[n] = peak_rss([sys.executable, "-m", "cde_jax.cli", "embed", "--model", str(ckpt),
                           "--input", str(texts), "--role", "query",
                           "--dataset-embeddings", str(dataset), "--out", str(out)], env=env)
        emb = np.load(out)
        if emb.shape != (n, width) or not np.isfinite(emb).all():
            raise RuntimeError(f"cde-jax embed wrote {emb.shape} (finite: "
                               f"{np.isfinite(emb).all()}), expected ({n}, {width})")
    small, large = sizes.stream_texts
    return {"stream_rss_small_bytes": rss[small], "stream_rss_large_bytes": rss[large],
            "stream_rss_growth": rss[large] / rss[small] - 1}


# --- report ------------------------------------------------------------------------------
def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"


def markdown(r: dict, sizes: Sizes) -> str:
    mib = 2 ** 20
    rows = ["| measure | case | ours | reference | ours / reference |", "|---|---|---|---|---|"]
    for b, s in sizes.encoder_shapes:
        sh = f"{b}x{s}"
        rows.append(f"| encoder tokens/s | {sh} | {_fmt(r[f'encoder_tokens_per_s_ours_{sh}'])} "
                    f"| {_fmt(r[f'encoder_tokens_per_s_torch_{sh}'])} (HF SDPA) "
                    f"| {r[f'encoder_ratio_torch_{sh}']:.2f} |")
    for kind, batch, length in sizes.second_stage:
        tag = f"{kind}_b{batch}"
        ours, bf16, ref = (r[f"second_stage_texts_per_s_{n}_{tag}"]
                           for n in ("ours", "ours_bf16", "torch"))
        rows.append(f"| second stage texts/s | {kind} {batch}x{length} | {_fmt(ours)} "
                    f"| {_fmt(ref)} (TorchCde) | {r[f'second_stage_ratio_torch_{kind}']:.2f} |")
        rows.append(f"| second stage texts/s, bf16 (cosine >= "
                    f"{r[f'second_stage_min_cosine_ours_bf16_{tag}']:.6f}) | {kind} {batch}x"
                    f"{length} | {_fmt(bf16)} | {_fmt(ref)} (TorchCde f32) "
                    f"| {r[f'second_stage_ratio_torch_bf16_{kind}']:.2f} |")
    for name in r["attention_kernels_timed"]:
        if name != "xla":
            rows.append(f"| attention speedup, median of {2 * len(sizes.attention_shapes)} "
                        f"shapes | {name} | | xla | "
                        f"{r[f'attention_speedup_{name}_median']:.2f} |")
    for name in IN_FLIGHT_CASES:
        rows.append(f"| device-idle fraction | {name}, {r['overlap_batches']} batches "
                    f"| {r[f'device_idle_fraction_{name}']:.3f} | | |")
    split = r["second_stage_profile"]["split"]
    rows.append("| second stage step time split | matmul / attention / elementwise / copies | "
                + " / ".join(f"{split[k]:.2f}" for k in split) + " | | |")
    rows.append(f"| minicorpus docs/s | {r['minicorpus_docs']} docs | "
                f"{_fmt(r['minicorpus_docs_per_s_ours'])} | "
                f"{_fmt(r['minicorpus_docs_per_s_recipe'])} (card recipe) | "
                f"{r['minicorpus_ratio_recipe']:.2f} |")
    for b, s in sizes.encoder_shapes:
        sh = f"{b}x{s}"
        rows.append(f"| model FLOP/s (windowed) | {sh} | {_fmt(r[f'encoder_flops_per_s_{sh}'])} "
                    f"| {_fmt(r['peak_flops_matmul_f32'])} (f32 matmul) "
                    f"| {r[f'peak_fraction_{sh}']:.3f} |")
    rows.append(f"| convert peak RSS | {sizes.preset} | "
                f"{r['convert_peak_rss_bytes'] / mib:.0f} MiB | "
                f"{r['checkpoint_file_bytes'] / mib:.0f} MiB (safetensors) | "
                f"{r['convert_rss_over_file']:.2f} (bound {CONVERT_RSS_BOUND}) |")
    small, large = sizes.stream_texts
    rows.append(f"| `cde-jax embed` peak RSS | {large} vs {small} texts | "
                f"{r['stream_rss_large_bytes'] / mib:.0f} MiB | "
                f"{r['stream_rss_small_bytes'] / mib:.0f} MiB | "
                f"{r['stream_rss_growth'] + 1:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny preset, smaller stream inputs (about 2 minutes)")
    ap.add_argument("--json", type=Path, help="write every number here")
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    torch.set_num_threads(cores())
    begin, section_s = time.perf_counter(), {}

    def section(name: str, fn, *args, **kw):
        start = time.perf_counter()
        out = fn(*args, **kw)
        section_s[name] = round(time.perf_counter() - start, 1)
        return out

    with tempfile.TemporaryDirectory(prefix="cde-bench-") as tmp:
        work = Path(tmp)
        released_dir = section("make_checkpoint", make_synthetic_checkpoint, work / "released",
                               preset=sizes.preset, corpus_size=sizes.corpus_size)
        results = section("convert_rss", measure_convert, released_dir, work / "converted")
        ours = section("load_ours", cde_jax.load, work / "converted")
        ours_bf16 = section("load_ours_bf16", cde_jax.load, work / "converted",
                            dtype="bfloat16")
        ref = section("load_torch", TorchCde, released_dir, "sdpa")
        results |= section("attention", bench_attention, ours.backbone_config, sizes)
        results |= section("encoder", bench_encoder, ours, ref, sizes)
        minicorpus, dataset_nd = section("minicorpus", bench_minicorpus, ours, ref, sizes)
        results |= minicorpus
        results |= section("second_stage", bench_second_stage,
                           {"ours": ours, "ours_bf16": ours_bf16}, {"torch": ref}, dataset_nd,
                           fallback_minicorpus(), sizes.second_stage, warmup=sizes.warmup,
                           repeats=sizes.repeats)
        for kind, batch, _ in sizes.second_stage:
            for name, suffix in (("ours", ""), ("ours_bf16", "_bf16")):
                results[f"second_stage_ratio_torch{suffix}_{kind}"] = (
                    results[f"second_stage_seconds_torch_{kind}_b{batch}"] /
                    results[f"second_stage_seconds_{name}_{kind}_b{batch}"])
        for suffix in ("", "_bf16"):
            results[f"second_stage_ratio_torch{suffix}"] = min(
                results[f"second_stage_ratio_torch{suffix}_{kind}"]
                for kind, _, _ in sizes.second_stage)
        results |= section("overlap", bench_overlap, ours, sizes)
        kind, batch, length = sizes.second_stage[0]
        ids, mask = fixed_length_batch(ours.tokenizer.tokenizer, fallback_minicorpus(),
                                       PROMPTS[kind], batch, length,
                                       ours.backbone_config.sep_token_id)
        prefix = ours.context(dataset_nd)
        results["second_stage_profile"] = section(
            "profile", profile_split, functools.partial(ours.second_stage, ids, mask, prefix),
            work / "profile") | {"case": f"{kind} {batch}x{length}, float32"}
        del ours, ours_bf16, ref
        results |= section("stream_rss", measure_stream, work, sizes)
    results["sizes"] = {**dataclasses.asdict(sizes), "mode": "quick" if args.quick else "full",
                        "local_attention_flops": "windowed (keys |i-j| <= radius); *_dense "
                                                 "keys count every pair"}
    results["machine"] = {"cores": cores(), "cpu": platform.processor() or platform.machine(),
                          "jax": jax.__version__, "jax_device": str(jax.devices()[0]),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "torch_threads": torch.get_num_threads(),
                          "wall_seconds": round(time.perf_counter() - begin, 1),
                          "section_seconds": section_s}
    print(markdown(results, sizes))
    if args.json:
        with atomic_file(args.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
            f.write("\n")
    bad = [k for k, v in results.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        print(f"non-finite results: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
