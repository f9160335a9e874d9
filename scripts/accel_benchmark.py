#!/usr/bin/env python
"""The second stage on one accelerator, bfloat16: our attention kernels against each other
and against PyTorch, MFU, the bucketed runner's device-idle fraction and where one step's time goes.

    python scripts/accel_benchmark.py gpu|tpu [--cpu-smoke]   (gpu_benchmark.sh, tpu_benchmark.sh)

gpu: ours with "cudnn" and "xla" attention; PyTorch with HF's SDPA and with PyTorch's best
     available attention (HF "flash_attention_2" when flash-attn is installed, else SDPA with
     its cuDNN, flash and memory-efficient backends preferred, in that order).
tpu: ours with "rope_fused", "splash" and "xla" (no PyTorch: torch_xla is not assumed).
--cpu-smoke: the same code on CPU, tiny preset, small batches (cuDNN is then recorded as
     unavailable; splash and rope_fused run in interpret mode).

Beside each measured rate goes the static prediction of the same program (`cde_jax.aot`:
roofline texts/s of the stage compiled for this device's kind, the same checkpoint, batch and
kernel); on a device, the table of both replaces the block `measured-gpu` / `measured-tpu`
of docs/performance.md.

Everything runs bfloat16 (compute and parameters; ours accumulate in float32). Each case
alternates all contenders (the harness of scripts/benchmark.py: warm-up, then medians). Ours
are compared with the first PyTorch contender (GPU) or with "xla" (TPU) by the worst per-row
cosine. After ACCEL_BENCH_DEADLINE_S (default 300) the remaining cases are skipped and
listed. Writes $OUT/<gpu|tpu>_benchmark.json when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402  (the harness)
from docs_blocks import PERFORMANCE, write_section  # noqa: E402

import cde_jax  # noqa: E402
from cde_jax import aot  # noqa: E402
from cde_jax.convert import convert  # noqa: E402
from cde_jax.convert.synthetic import make_synthetic_checkpoint  # noqa: E402
from cde_jax.minicorpus import fallback_minicorpus  # noqa: E402
from cde_jax.outputs import atomic_file  # noqa: E402
from cde_jax.prompts import DOCUMENT as DOCUMENT_PREFIX  # noqa: E402

KERNELS = {"gpu": ("cudnn", "xla"), "tpu": ("rope_fused", "splash", "xla")}
KINDS = [("query", 128, 16), ("query", 512, 16), ("document", 128, 256)]
SMOKE_KINDS = [("query", 4, 16), ("document", 2, 256)]
BF16 = dict(dtype="bfloat16", param_dtype="bfloat16")
# Dense bf16 peak FLOP/s by device name (first match).
GPU_PEAKS = (("H100 PCIe", 756e12), ("H100", 989.5e12), ("H200", 989.5e12), ("A100", 312e12),
             ("L4", 121e12))
TPU_PEAKS = (("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12),
             ("v4", 275e12))


def peak_flops(kind: str) -> float | None:
    table = GPU_PEAKS if "tpu" not in kind.lower() else TPU_PEAKS
    return next((peak for name, peak in table if name.lower() in kind.lower()), None)


class SdpaPreferring:
    """A TorchCde whose SDPA calls try these backends first (torch.nn.attention.sdpa_kernel
    with priority; the math backend stays the last resort)."""

    def __init__(self, ref: bench.TorchCde, backends):
        self.ref, self.backends = ref, backends

    def second_stage(self, *args):
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(self.backends, set_priority=True):
            return self.ref.second_stage(*args)


def torch_contenders(released: Path, device: str, probe) -> tuple[dict, dict]:
    """{"torch_sdpa": HF SDPA, "torch_best": the best attention PyTorch has here}, and notes.
    `probe(ref)` runs one small batch; a candidate that fails it is skipped (noted)."""
    from torch.nn.attention import SDPBackend

    refs = {"torch_sdpa": bench.TorchCde(released, "sdpa").to(device, torch.bfloat16)}
    notes = {}
    candidates = []
    if device == "cuda" and importlib.util.find_spec("flash_attn"):
        candidates.append(("HF flash_attention_2", lambda: bench.TorchCde(
            released, "flash_attention_2").to(device, torch.bfloat16)))
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    candidates.append(("SDPA preferring cuDNN > flash > memory-efficient",
                       lambda: SdpaPreferring(refs["torch_sdpa"], order)))
    for label, make in candidates:
        try:
            ref = make()
            probe(ref)
        except Exception as e:  # noted; the next candidate is tried
            notes[f"torch_best_failed_{label}"] = f"{type(e).__name__}: {e}"[:400]
            continue
        refs["torch_best"], notes["torch_best"] = ref, label
        break
    return refs, notes


def predictions(target: str, converted: Path, ours: dict, kinds, results: dict) -> list[str]:
    """Markdown rows: each of our kernels' measured texts/s beside the static roofline of the
    same program compiled for `target` (`cde_jax.aot`), and their ratio."""
    rows = [f"Measured on {target} against the static prediction (`cde_jax.aot`, bfloat16 "
            "parameters and compute):", "",
            "| case | kernel | measured texts/s | roofline texts/s | measured / roofline |",
            "|---|---|---|---|---|"]
    for kind, batch, length in kinds:
        for name in ours:
            report = aot.compile_stage(target, "second", batch, length, model=converted,
                                       attention=name.removeprefix("ours_"), **BF16)
            rate = results[f"second_stage_texts_per_s_{name}_{kind}_b{batch}"]
            results[f"second_stage_roofline_texts_per_s_{name}_{kind}_b{batch}"] = \
                report.roofline_texts_per_s
            rows.append(f"| {kind} {batch} x {length} | {name} | {rate:,.1f} | "
                        f"{report.roofline_texts_per_s:,.1f} | "
                        f"{rate / report.roofline_texts_per_s:.2f} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=sorted(KERNELS))
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    begin = time.perf_counter()
    deadline = float(os.environ.get("ACCEL_BENCH_DEADLINE_S", 300))
    smoke = args.cpu_smoke
    backend = jax.default_backend()
    if not smoke and backend != args.target:
        sys.exit(f"no {args.target.upper()}: jax's backend is {backend!r}")
    if args.target == "gpu" and not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA in torch")
    device = jax.devices()[0]
    torch_device = "cuda" if args.target == "gpu" and not smoke else "cpu"
    preset, warmup, repeats = ("tiny", 1, 2) if smoke else ("base", 2, 5)
    kinds = SMOKE_KINDS if smoke else KINDS
    if os.environ.get("ACCEL_BENCH_KINDS"):
        kinds = [(k, int(b), int(n)) for k, b, n in
                 (item.split(":") for item in os.environ["ACCEL_BENCH_KINDS"].split(","))]
    kind_name = torch.cuda.get_device_name() if torch_device == "cuda" else device.device_kind
    peak = None if smoke else peak_flops(kind_name)
    notes = {"device": kind_name, "platform": platform.machine(), "peak_flops_bf16": peak,
             "jax": jax.__version__, "torch": torch.__version__, "preset": preset,
             "warmup": warmup, "repeats": repeats, "attention_flops": "windowed",
             "dtype": "bfloat16 compute and parameters"}
    print(f"device: {kind_name} | peak {peak and peak / 1e12} TFLOP/s bf16 | jax "
          f"{jax.__version__} | torch {torch.__version__}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="cde-accel-"))
    released = make_synthetic_checkpoint(work / "released", preset=preset)
    converted = convert(released, work / "converted")
    texts = fallback_minicorpus()
    ours = {}
    for name in KERNELS[args.target]:
        try:
            ours[f"ours_{name}"] = cde_jax.load(converted, attention=name, **BF16)
        except ValueError as e:  # e.g. cuDNN missing: reported, the other kernels go on
            notes[f"ours_{name}_error"] = str(e)
            print(f"{name} attention unavailable: {e}", flush=True)
    first = next(iter(ours.values()))
    tok, cfg = first.tokenizer.tokenizer, first.backbone_config
    n_ctx = first.config.transductive_corpus_size
    ids, mask = bench.fixed_length_batch(tok, texts, DOCUMENT_PREFIX, n_ctx, 128,
                                         cfg.sep_token_id)
    dataset_nd = first.first_stage(ids, mask)
    probe_ids, probe_mask = bench.fixed_length_batch(tok, texts, "", 2, 16, cfg.sep_token_id)

    def probe(ref):
        ref.second_stage(probe_ids, probe_mask, dataset_nd)

    if args.target == "gpu":
        refs, torch_notes = torch_contenders(released, torch_device, probe)
        notes |= torch_notes
    else:  # ours against our own XLA path (CdeModel.second_stage takes what TorchCde's does)
        refs = {"ours_xla": ours.pop("ours_xla")}

    results, skipped = {}, []
    for kind in kinds:
        if time.perf_counter() - begin > deadline:
            skipped.append("{}_b{}".format(*kind))
            continue
        results |= bench.bench_second_stage(ours, refs, dataset_nd, texts, [kind],
                                            warmup=warmup, repeats=repeats, peak=peak)
        print(f"  done {kind} at {time.perf_counter() - begin:.0f} s", flush=True)
    if skipped:
        print(f"SKIPPED (time budget): {skipped}", flush=True)
        notes["skipped"] = skipped
    target = aot.target_for(kind_name) if not smoke else None
    measured = [k for k in kinds if "{}_b{}".format(*k) not in skipped]
    if target is not None:
        rows = predictions(target, converted, ours, measured, results)
        write_section(PERFORMANCE, f"measured-{args.target}", "\n".join(rows))
        print("\n".join(rows))
    else:
        notes["prediction"] = f"no aot target for device kind {kind_name!r}"

    # Where a step's time goes, for each of our kernels, on the last case run.
    kind, batch, length = next(k for k in reversed(kinds) if "{}_b{}".format(*k) not in skipped)
    ids, mask = bench.fixed_length_batch(tok, texts, "", batch, length, cfg.sep_token_id)
    profiles = {}
    for name, model in ours.items():
        prefix = model.context(dataset_nd)
        try:
            profiles[name] = bench.profile_split(lambda m=model, p=prefix: m.second_stage(
                ids, mask, p), work / f"profile-{name}") | {"case": f"{kind} {batch}x{length}"}
        except Exception as e:  # reported, the rest goes on
            profiles[name] = {"error": f"{type(e).__name__}: {e}"[:400]}
    # The bucketed runner's device-idle fraction, with the platform's default plan.
    overlap_sizes = dataclasses.replace(
        bench.QUICK, warmup=1, repeats=3, overlap_texts=64 if smoke else 8192,
        overlap_tokens_per_batch=512 if smoke else first.plan.tokens_per_batch)
    results |= bench.bench_overlap(first, overlap_sizes)

    names = list(ours) + list(refs)
    lines = ["| kind | batch x tokens | " + " | ".join(f"{n} texts/s (MFU)" for n in names) +
             " | " + " | ".join(f"{n} / {r}" for n in ours for r in refs) + " |",
             "|---|---|" + "---|" * (len(names) + len(ours) * len(refs))]
    for kind, batch, length in kinds:
        tag = f"{kind}_b{batch}"
        if tag in skipped:
            continue
        rate = {n: results[f"second_stage_texts_per_s_{n}_{tag}"] for n in names}
        mfu = {n: results.get(f"second_stage_mfu_{n}_{tag}") for n in names}
        for n in ours:
            for r in refs:
                results[f"second_stage_ratio_{r}_{n}_{tag}"] = rate[n] / rate[r]
        lines.append(f"| {kind} | {batch} x {length} | " + " | ".join(
            f"{rate[n]:.1f}" + (f" ({mfu[n]:.3f})" if mfu[n] else "") for n in names) +
            " | " + " | ".join(f"{rate[n] / rate[r]:.2f}" for n in ours for r in refs) + " |")
    print("\n".join(lines))
    for name, profile in profiles.items():
        split = profile.get("split")
        print(f"{name} step split (matmul / attention / elementwise / copies): " + (
            " / ".join(f"{v:.2f}" for v in split.values()) if split else profile["error"]))
    print("device-idle fraction (0 / 2 / all in flight): " + " / ".join(
        f"{results[f'device_idle_fraction_{n}']:.3f}" for n in bench.IN_FLIGHT_CASES))
    cosines = {k: v for k, v in results.items() if "min_cosine" in k}
    print(f"worst per-row cosine vs {next(iter(refs))}: {min(cosines.values()):.6f}")
    notes["wall_seconds"] = round(time.perf_counter() - begin, 1)
    print(f"wall: {notes['wall_seconds']} s")
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / f"{args.target}_benchmark.json"
        with atomic_file(out, "w") as f:
            json.dump({**results, "profiles": profiles, "notes": notes}, f, indent=2,
                      default=float)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
