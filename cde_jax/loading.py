"""Checkpoints onto the mesh: a converted dir is restored by orbax straight onto the
parameters' shardings (no host copy); a released dir or hub id is read to host memory
(safetensors) and laid out by the sharding rules."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from . import attention, convert, params, sharding
from .config import CdeConfig, ModernBertConfig
from .runner import StageRunner
from .validation import UserError


def read_checkpoint(path: str | Path, *, backbone_config: str | Path | None = None,
                    mesh=None) -> convert.Checkpoint:
    """A converted dir (its arrays on `mesh` when given), or a released-layout dir or hub id
    (host arrays), as a `Checkpoint`."""
    path = Path(path)
    if convert.is_converted(path):
        return convert.read_converted(path, mesh=mesh)
    return convert.read_released(convert.source.local_checkpoint(path),
                                 backbone_config=backbone_config)


def default_dtype(platform: str) -> str:
    """The compute dtype when none is asked for: bfloat16 on accelerators, where it doubles
    matmul throughput and halves activation memory (float32 accumulation keeps embeddings
    within cosine 0.9995 of float32, docs/performance.md); float32 on CPU, where results
    stay bit-comparable to the PyTorch reference."""
    return "float32" if platform == "cpu" else "bfloat16"


def runtime_backbone(stored: ModernBertConfig, mesh, *, dtype: str | None = None,
                     param_dtype: str | None = None, attention_name: str = "auto",
                     activations: str = "compute") -> ModernBertConfig:
    """The checkpoint's backbone with the run's choices: compute dtype (default per
    platform, `default_dtype`), parameter dtype (default: the stored one), what the
    activations are kept in between ops (`config.ACTIVATIONS`) and the attention kernel
    ("auto" resolved for the mesh's devices and the compute dtype; a kernel that cannot run
    there is an error). Names are validated by `ModernBertConfig`."""
    device = mesh.devices.flat[0]
    backbone = stored.replace(dtype=dtype or default_dtype(device.platform),
                              param_dtype=param_dtype or stored.param_dtype,
                              activations=activations)
    return backbone.replace(attention=attention.resolve(attention_name, device, backbone.dtype))


def place_checkpoint(ckpt: convert.Checkpoint, backbone: ModernBertConfig, mesh
                     ) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, nested parameters on the mesh, in `backbone.param_dtype`). Attention's
    decisions (kernel, platform, per-device mesh) are made here, once: `attention.plan`."""
    graphdef, abstract = params.split(abstract_model(backbone, ckpt.cde, mesh,
                                                     has_null_embedding=ckpt.has_null_embedding))
    dtype = backbone.jnp_param_dtype

    def put(path, value, like):
        value = value.astype(dtype) if isinstance(value, jax.Array) else np.asarray(value, dtype)
        return sharding.place(value, sharding.param_sharding(path, like.shape, mesh))

    return graphdef, params.fill(abstract, ckpt.flat, put)


def abstract_model(backbone: ModernBertConfig, cde: CdeConfig, mesh, *,
                   has_null_embedding: bool):
    """The shape-only model whose attention plan (`attention.plan`) is made for `mesh`."""
    plan = attention.plan(backbone.attention, mesh=mesh, dtype=backbone.dtype)
    return params.abstract_model(backbone, cde, has_null_embedding=has_null_embedding,
                                 plan=plan)


def with_kernel(runner: StageRunner, backbone: ModernBertConfig, cde: CdeConfig,
                kernel: str) -> StageRunner:
    """A runner of attention `kernel` on `runner`'s parameters and mesh (no copy of the
    weights beyond the compute-dtype cast each runner holds): what the tuner probes, and
    where a model sends masks its own kernel cannot take. A kernel the device or dtype
    cannot run raises why (`attention.unsupported`)."""
    if kernel == backbone.attention:
        return runner
    device = runner.mesh.devices.flat[0]
    problem = attention.unsupported(kernel, device, backbone.dtype)
    if problem:
        raise UserError(problem)
    has_null = runner.model.second_stage_model.sequence_dropout_null_embedding is not None
    config = backbone.replace(attention=kernel)
    graphdef, _ = params.split(abstract_model(config, cde, runner.mesh,
                                              has_null_embedding=has_null))
    return StageRunner(graphdef, runner.params, runner.mesh, config.dtype)
