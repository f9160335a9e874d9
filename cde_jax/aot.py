"""Ahead-of-time compiles for accelerators from any host: what XLA makes of a stage for a TPU
slice or an H100, and what that predicts, without the device.

    from cde_jax import aot
    report = aot.compile_stage("v5e:2x2", "second", 64, 256)   # 64 texts of 256 tokens
    report.compiled            # the jax.stages.Compiled
    report.roof_fraction, report.roofline_texts_per_s, report.peak_memory, ...

A target names compile-only devices (`jax.experimental.topologies.get_topology_desc`): a TPU
topology (`"v4:2x2x1"`, `"v5e:2x2"`, `"v5p:2x2x1"`, `"v6e:2x2"`, or any other topology of
those generations that libtpu knows) or `"h100"` (one H100 SXM; `"h100:1x1x8"` for eight,
slices x hosts x devices), described by `data/h100_sxm.txtpb`, XLA's GpuTargetConfig of that
GPU. The stage is the runner's own jitted function (`runner.stage_functions`), lowered from
`jax.ShapeDtypeStruct`s laid out on a (data, model) mesh of the target's first
`data_parallel * model_parallel` devices, so the program is the one `load` would run there.

Needs the `aot` extra (`pip install 'cde-jax[aot]'`: libtpu for TPU targets; the CUDA plugin,
cuDNN and the CUDA runtime wheels for "h100"). On a host without a GPU start JAX with
`JAX_PLATFORMS=cpu`: otherwise the CUDA plugin fails its version check, is not registered,
and "h100" is an error (and libtpu logs its search for a TPU).

The prediction (`StageReport`) is a static roofline per device: compute-only time = FLOPs /
peak FLOP/s, memory time = bytes accessed / HBM bandwidth; the roofline time is the larger,
the roof fraction = compute-only time / roofline time (1.0: compute-bound). FLOPs and bytes
are XLA's cost analysis on TPUs, plus the model's attention FLOPs and the Mosaic calls'
operand and result bytes, since the Mosaic kernels are opaque to it (it counts their bytes
as nothing: a `pl.CostEstimate` of 1 byte leaves its total unchanged); on GPUs, whose cost
analysis is empty for a compile-only device, both are tallied from the optimized HLO
(`hlo.Module`: each kernel's operand and result bytes; the cuBLAS and cuDNN calls' FLOPs).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections import Counter

import jax
import jax.numpy as jnp

from . import flops, fused_layer, hlo, loading, params, resources, runner, sharding
from .attention import KERNELS as ATTENTION_KERNELS
from .attention import plan as attention_plan
from .config import PRESETS, CdeConfig, ModernBertConfig
from .validation import UserError

GiB = 2 ** 30
STAGES = ("first", "prefix", "second")
TARGETS = ("v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2", "h100")
H100_SPEC = "h100_sxm.txtpb"
# XLA:GPU's Triton GEMM emitter finds no tile sizes for the base model's largest matmuls
# ("Couldn't find output tile sizes ... f32[49664,2304]"); cuBLAS takes them all.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


@dataclasses.dataclass(frozen=True)
class Chip:
    """The peaks of one compile device (what a target's topology calls a device)."""

    name: str
    bf16_flops: float       # dense bfloat16 FLOP/s
    hbm_bandwidth: float    # bytes/s
    hbm_bytes: int
    source: str


def _h100() -> Chip:
    spec = resources.packaged_data(H100_SPEC).read_text()
    number = lambda key: float(re.search(rf"\b{key}: (\d+)", spec).group(1))  # noqa: E731
    return Chip("NVIDIA H100 SXM 80GB", 989.4e12, number("memory_bandwidth"),
                int(number("device_memory_size")),
                "NVIDIA H100 datasheet (989.4 TFLOP/s dense bf16); HBM bandwidth and size from "
                f"cde_jax/data/{H100_SPEC} (XLA's GpuTargetConfig)")


# By target generation (the part of the name before ":").
CHIPS = {
    # A v4 topology's devices are TensorCores, two per chip (v4:2x2x1 has 8): half a chip's
    # 275 TFLOP/s, 1200 GB/s and 32 GiB each.
    "v4": Chip("TPU v4 TensorCore (half a chip)", 137.5e12, 600e9, 16 * GiB,
               "cloud.google.com/tpu/docs/v4 (per chip: 275 TFLOP/s bf16, 1200 GB/s, 32 GiB)"),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * GiB, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 * GiB, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e (Trillium)", 918e12, 1640e9, 32 * GiB,
                "cloud.google.com/tpu/docs/v6e"),
    "h100": _h100(),
}


# The generation of an attached device, by `jax.Device.device_kind`.
KIND_GENERATIONS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
                    "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e",
                    "NVIDIA H100 80GB HBM3": "h100"}


def target_for(device_kind: str) -> str | None:
    """The target of `TARGETS` that compiles for a device of this kind (None: not known),
    to put a measured rate beside the static prediction (scripts/accel_benchmark.py)."""
    generation = KIND_GENERATIONS.get(device_kind)
    return next((t for t in TARGETS if t.split(":")[0] == generation), None)


def chip(target: str) -> Chip:
    generation = target.split(":")[0]
    if generation not in CHIPS:
        raise UserError(f"unknown target {target!r}: a TPU topology of "
                        f"{', '.join(g for g in CHIPS if g != 'h100')} (e.g. {TARGETS[1]!r}) "
                        "or 'h100'")
    return CHIPS[generation]


# What libtpu reads when it loads: on a host whose JAX runs without TPUs it is loaded only to
# compile, so several processes may load it at once (it otherwise takes /tmp/libtpu_lockfile)
# and there is no TPU VM metadata server to ask for the host's TPUs (it otherwise logs its
# search at length).
COMPILE_ONLY_LIBTPU_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1",
                           "TPU_WORKER_HOSTNAMES": "localhost"}


@functools.cache
def devices(target: str) -> tuple:
    """The compile-only devices of `target`."""
    from jax.experimental import topologies

    chip(target)
    name, _, topology = target.partition(":")
    platforms = jax.config.jax_platforms or ""
    if platforms and "tpu" not in platforms:  # never on a host that may run a TPU
        for key, value in COMPILE_ONLY_LIBTPU_ENV.items():
            os.environ.setdefault(key, value)
    try:
        if name == "h100":
            spec = resources.packaged_data(H100_SPEC).read_text()
            return tuple(topologies.get_topology_desc(
                "h100", "cuda", target_config=spec, topology=topology or "1x1x1").devices)
        return tuple(topologies.get_topology_desc(topology_name=target, platform="tpu").devices)
    except (RuntimeError, NotImplementedError) as e:
        hint = ("install the aot extra and start JAX with JAX_PLATFORMS=cpu on a host without "
                "a GPU" if name == "h100" else "install the aot extra (libtpu)")
        raise UserError(f"target {target!r}: {e} ({hint})") from e


def target_mesh(target: str, data_parallel: int = 1, model_parallel: int = 1):
    """A (data, model) mesh of the target's first data_parallel x model_parallel devices."""
    found = devices(target)
    if data_parallel * model_parallel > len(found):
        raise UserError(f"target {target!r} has {len(found)} devices, not data_parallel x "
                        f"model_parallel = {data_parallel * model_parallel}")
    return sharding.make_mesh(model_parallel, found[:data_parallel * model_parallel])


def _configs(model) -> tuple[ModernBertConfig, CdeConfig, bool]:
    """(backbone, contextual config, has a null embedding) of a loaded model, a checkpoint
    path, or a preset name ("tiny", "base"; None: "base") with random weights."""
    if model is None or model in PRESETS:
        return PRESETS[model or "base"](), CdeConfig(), False
    if hasattr(model, "runner"):  # a loaded CdeModel
        module = model.module.second_stage_model
        return model.backbone_config, model.config, \
            module.sequence_dropout_null_embedding is not None
    ckpt = loading.read_checkpoint(model)
    return ckpt.backbone, ckpt.cde, ckpt.has_null_embedding


def _abstract(tree, shard):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shard), tree)


@dataclasses.dataclass(frozen=True)
class StageReport:
    """A stage compiled for a target, and its static roofline. Figures are per device (a
    chip; on v4 a TensorCore, half a chip); texts/s are per device too."""

    target: str
    stage: str
    batch: int
    length: int
    mesh: tuple[int, int]                # (data, model) devices
    dtype: str
    attention: str                       # the kernel, resolved for the target
    chip: Chip
    flops: float                         # what the roofline counts (see `flops_source`)
    flops_source: str
    xla_flops: float | None              # XLA's cost analysis; None where it is empty
    model_flops: float                   # flops.py's count (windowed attention)
    model_flops_linear: float            # flops.py's count of the linear layers alone
    bytes_accessed: float
    bytes_source: str
    mosaic_bytes: float                  # of that, the Mosaic calls' operands and results
    peak_memory: int                     # arguments + outputs + temporaries - aliased
    temp_memory: int
    tokens: int                          # positions one device computes (prefix included)
    attention_calls: dict[str, int]      # Mosaic / cuDNN fused-attention custom calls
    layer_calls: dict[str, int]          # fused_layer's Mosaic kernels, by name
    custom_calls: dict[str, int]
    collectives: dict[str, int]
    while_loops: int
    compiled: jax.stages.Compiled = dataclasses.field(repr=False, compare=False)

    @property
    def devices(self) -> int:
        return self.mesh[0] * self.mesh[1]

    @property
    def texts(self) -> int:
        """Texts one run embeds: the batch (one context for the prefix)."""
        return 1 if self.stage == "prefix" else self.batch

    @property
    def compute_seconds(self) -> float:
        return self.flops / self.chip.bf16_flops

    @property
    def memory_seconds(self) -> float:
        return self.bytes_accessed / self.chip.hbm_bandwidth

    @property
    def roof_fraction(self) -> float:
        """Compute-only time / roofline time: 1.0 is compute-bound."""
        return self.compute_seconds / max(self.compute_seconds, self.memory_seconds)

    @property
    def compute_texts_per_s(self) -> float:
        return self.texts / self.compute_seconds / self.devices

    @property
    def roofline_texts_per_s(self) -> float:
        return self.texts / max(self.compute_seconds, self.memory_seconds) / self.devices

    @property
    def temp_bytes_per_token(self) -> float:
        return self.temp_memory / self.tokens

    def to_dict(self) -> dict:
        """Every figure, JSON-ready (the compiled program left out)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "compiled"}
        derived = ("devices", "compute_seconds", "memory_seconds", "roof_fraction",
                   "compute_texts_per_s", "roofline_texts_per_s", "temp_bytes_per_token")
        return fields | {"chip": dataclasses.asdict(self.chip)} | {
            name: getattr(self, name) for name in derived}

    @classmethod
    def of(cls, compiled, *, target: str, stage: str, batch: int, length: int, mesh,
           backbone: ModernBertConfig, cde: CdeConfig) -> StageReport:
        module = hlo.Module(compiled.as_text())
        cost = compiled.cost_analysis() or {}
        memory = compiled.memory_analysis()
        devices, data = mesh.devices.size, sharding.data_shards(mesh)
        prefix_len = cde.num_context_tokens + cde.num_soft_prompt_tokens
        counts = {kind: _model_flops(stage, backbone, cde, batch, length, kind) / devices
                  for kind in ("windowed", flops.LINEAR_ONLY)}
        if "flops" in cost:  # attention inside Mosaic calls is invisible to it
            opaque = ATTENTION_KERNELS[backbone.attention].per_device  # Mosaic: opaque
            total = cost["flops"] + (counts["windowed"] - counts[flops.LINEAR_ONLY]) * opaque
            flops_source = "XLA cost analysis" + " + model attention FLOPs" * opaque
        else:
            total, flops_source = module.matmul_flops(), "optimized HLO (matmuls, attention)"
        calls = module.custom_calls()
        layer_calls = {name: n for name, n in module.pallas_kernels().items()
                       if name in fused_layer.KERNELS}
        attention = Counter({k: v for k, v in calls.items()
                             if k == hlo.MOSAIC or k.startswith(hlo.CUDNN_ATTENTION)})
        attention[hlo.MOSAIC] -= sum(layer_calls.values())
        mosaic = module.bytes_accessed(hlo.MOSAIC)
        per_row = length + (prefix_len if stage == "second" else 0)
        return cls(
            target=target, stage=stage, batch=batch, length=length,
            mesh=(data, devices // data), dtype=backbone.dtype, attention=backbone.attention,
            chip=chip(target), flops=total, flops_source=flops_source,
            xla_flops=cost.get("flops"), model_flops=counts["windowed"],
            model_flops_linear=counts[flops.LINEAR_ONLY],
            bytes_accessed=(cost["bytes accessed"] + mosaic if cost
                            else module.bytes_accessed()),
            bytes_source=("XLA cost analysis + Mosaic calls' operands and results" if cost
                          else "optimized HLO (kernel operands and results)"),
            mosaic_bytes=mosaic,
            peak_memory=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes),
            temp_memory=memory.temp_size_in_bytes,
            tokens=batch * (1 if stage == "prefix" else per_row) // data,
            attention_calls=dict(+attention), layer_calls=layer_calls,
            custom_calls=dict(calls), collectives=dict(module.collectives()),
            while_loops=module.while_loops(), compiled=compiled)


def _model_flops(stage: str, backbone: ModernBertConfig, cde: CdeConfig, batch: int,
                 length: int, attention: str) -> int:
    """flops.py's count of one run of the stage, every device together."""
    if stage == "first":
        return flops.encoder_flops(backbone, batch, length, attention=attention)
    if stage == "prefix":
        return flops.prefix_flops(backbone, batch + cde.num_soft_prompt_tokens)
    return flops.second_stage_flops(backbone, batch, length, cde.num_context_tokens
                                    + cde.num_soft_prompt_tokens, attention=attention)


def _inputs(stage: str, model, backbone: ModernBertConfig, cde: CdeConfig, batch: int,
            length: int, mesh) -> tuple:
    """The stage's arguments as `jax.ShapeDtypeStruct`s laid out as the runner lays them
    (`model`: the abstract model)."""
    graphdef, _ = params.split(model)
    flat = params.flat_params(model)
    weights = params.unflatten({path: jax.ShapeDtypeStruct(
        leaf.shape, params.stage_dtype(path, backbone.jnp_param_dtype, backbone.jnp_dtype),
        sharding=sharding.param_sharding(path, leaf.shape, mesh)) for path, leaf in flat.items()})
    rows, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    if stage == "prefix":
        return weights, jax.ShapeDtypeStruct((batch, backbone.hidden_size), jnp.float32,
                                             sharding=replicated)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
    if stage == "first":
        return weights, ids, ids
    dataset = jax.ShapeDtypeStruct((cde.num_context_tokens, backbone.hidden_size), jnp.float32,
                                   sharding=replicated)
    prefix_fn = runner.stage_functions(graphdef, mesh)[1]
    return weights, ids, ids, _abstract(jax.eval_shape(prefix_fn, weights, dataset), replicated)


def compile_stage(target: str, stage: str, batch: int, length: int, *, model=None,
                  dtype: str = "bfloat16", param_dtype: str | None = None,
                  activations: str = "compute", attention: str = "auto", data_parallel: int = 1,
                  model_parallel: int = 1) -> StageReport:
    """Compiles `stage` ("first": `batch` documents of `length` tokens -> dataset
    embeddings; "prefix": `batch` dataset embeddings -> the second stage's prefix, `length`
    unused; "second": `batch` texts of `length` tokens after the prefix of the model's
    corpus size + soft tokens) for `target` (see the module docstring) on a
    (data_parallel, model_parallel) mesh of its devices, and reports it.

    model: a loaded `CdeModel`, a checkpoint path, or a preset name ("tiny", "base"; None:
    "base") with random weights, which need not exist: the program is lowered from shapes.
    dtype, param_dtype, activations, attention: as `load` takes them ("auto" resolved for
    the target's devices; param_dtype defaults to the checkpoint's, float32 for a preset). A
    kernel that cannot run on the target is an error, never a silent fallback."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    mesh = target_mesh(target, data_parallel, model_parallel)
    stored, cde, has_null = _configs(model)
    backbone = loading.runtime_backbone(stored, mesh, dtype=dtype, param_dtype=param_dtype,
                                        attention_name=attention, activations=activations)
    plan = attention_plan(backbone.attention, mesh=mesh, dtype=backbone.dtype)
    abstract = params.abstract_model(backbone, cde, has_null_embedding=has_null, plan=plan)
    fn = runner.stage_functions(params.split(abstract)[0], mesh)[STAGES.index(stage)]
    lowered = fn.lower(*_inputs(stage, abstract, backbone, cde, batch, length, mesh))
    gpu = mesh.devices.flat[0].platform == "gpu"
    compiled = lowered.compile(GPU_COMPILER_OPTIONS if gpu else None)
    return StageReport.of(compiled, target=target, stage=stage, batch=batch, length=length,
                          mesh=mesh, backbone=backbone, cde=cde)
