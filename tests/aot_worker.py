"""Deviceless compiles of the tiny preset for every accelerator target, run by test_aot.py in a
process of its own (started with JAX_PLATFORMS=cpu: the CUDA plugin and libtpu stay out of
the test process). Writes one JSON list of `aot.StageReport.to_dict()` rows, each with its
case's name, to argv[1].

Cases: the second stage on one device of every target (at the largest default batch on v5e
and the H100, `LARGEST`); every stage on one v5e chip, on 4 data-parallel v5e chips and on
8 v4 devices at a small batch; the second stage on a 2 x 2 (data, model) v5e mesh."""

from __future__ import annotations

import json
import re
import sys
import time

from cde_jax import aot, attention, buckets
from cde_jax.config import CdeConfig, modernbert_tiny

BATCH, LENGTH = 8, 128
REFERENCE = "v5e:2x2"  # every stage on one device at the small batch
MANY_CHIPS = (("v5e:2x2", 4, 1), ("v4:2x2x1", 8, 1), ("v5e:2x2", 2, 2))
# Compiled at their largest default batch: the TPU with the least memory per device and the
# H100. A large TPU batch takes 3.5x the compile time of the small one (23 s of CPU), which
# the suite's budget allows once; the other TPUs compile the small batch.
LARGEST = ("v5e:2x2", "h100")


def largest_default_batch(target: str) -> tuple[int, int]:
    """(rows, length) of the default plan's batch with the most tokens for the second stage
    on one device of `target` (its chip's memory, its "auto" kernel)."""
    device, chip = aot.devices(target)[0], aot.chip(target)
    kernel = attention.resolve("auto", device, "bfloat16")
    plan = buckets.default_plan(device.platform, chip.hbm_bytes, device_kind=device.device_kind,
                                kernel=kernel)
    cde = CdeConfig()
    extra = cde.num_context_tokens + cde.num_soft_prompt_tokens
    return max(((plan.batch_size(length, 1, extra), length) for length in plan.lengths),
               key=lambda rows_length: rows_length[0] * (rows_length[1] + extra))


def shape(stage: str) -> tuple[int, int]:
    """(batch, length) of the small cases; the prefix's batch is its dataset embeddings."""
    return (CdeConfig().num_context_tokens, 0) if stage == "prefix" else (BATCH, LENGTH)


def cases():
    for target in LARGEST:
        yield f"{target} largest", target, "second", *largest_default_batch(target), 1, 1
    for target in aot.TARGETS:
        if target not in LARGEST or target == REFERENCE:
            yield f"{target} second", target, "second", *shape("second"), 1, 1
    for stage in ("first", "prefix"):
        yield f"{REFERENCE} {stage}", REFERENCE, stage, *shape(stage), 1, 1
    for target, data, model in MANY_CHIPS:
        for stage in aot.STAGES if model == 1 else ("second",):
            yield f"{target} {stage} {data}x{model}", target, stage, *shape(stage), data, model


KERNEL_TARGETS = ("v5e:2x2", "v6e:2x2")


def layer_kernels(out: str) -> None:
    """The Mosaic kernels alone at base shapes, bfloat16, one chip of each `KERNEL_TARGETS`:
    fused_layer's two around rope_attention, 2 rows of 776 keys (prefix 520 + 256 tokens),
    for a global and a local layer. Writes {target layer: {kernels, while_loops, scoped_vmem
    (the scoped VMEM sizes the compiled program's configs name)}}."""
    import jax
    import jax.numpy as jnp

    from cde_jax import fused_layer, hlo, rope_attention
    from cde_jax.attention import Plan
    from cde_jax.config import modernbert_base
    from cde_jax.ops import MaskSpec

    cfg = modernbert_base(dtype="bfloat16")
    d, f, e, s = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, 776
    numerics = fused_layer.Numerics(cfg.norm_eps, cfg.jnp_dtype, cfg.jnp_activation_dtype)
    plan = Plan("rope_fused", "tpu")
    shapes = [((2, s, d), jnp.bfloat16), ((2, s), jnp.bool_), ((d,), jnp.float32),
              ((d, 3 * d), jnp.bfloat16), ((d, d), jnp.bfloat16), ((d,), jnp.float32),
              ((d, 2 * f), jnp.bfloat16), ((f, d), jnp.bfloat16)]
    rows = {}
    for target in KERNEL_TARGETS:
        device = jax.sharding.SingleDeviceSharding(aot.devices(target)[0])
        for layer, radius, theta in (("global", None, cfg.global_rope_theta),
                                     ("local", cfg.window_radius, cfg.local_rope_theta)):
            def layer_fn(h, mask, attn_scale, wqkv, wo, mlp_scale, wi, wf, radius=radius,
                         theta=theta):
                q, k, v = fused_layer.norm_qkv(h, attn_scale, wqkv, numerics, plan)
                pos = jnp.arange(s)
                o = rope_attention.rope_attention(q, k, v, MaskSpec(mask, pos, pos, radius),
                                                  theta, e, interpret=False)
                return fused_layer.out_mlp(o, h, wo, mlp_scale, wi, wf, numerics, plan)

            begin = time.perf_counter()
            compiled = jax.jit(layer_fn, in_shardings=device, out_shardings=device).lower(
                *(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes)).compile()
            text = compiled.as_text()
            module = hlo.Module(text)
            scoped = re.findall(r'scoped_memory_configs":\[\{"memory_space":"1","offset":"0",'
                                r'"size":"(\d+)"', text)
            rows[f"{target} {layer}"] = {"kernels": dict(module.pallas_kernels()),
                                         "while_loops": module.while_loops(),
                                         "scoped_vmem": sorted(set(map(int, scoped))),
                                         "seconds": time.perf_counter() - begin}
    with open(out, "w") as f:
        json.dump(rows, f)


def main(out: str) -> None:
    rows = []
    for name, target, stage, batch, length, data, model in cases():
        begin = time.perf_counter()
        report = aot.compile_stage(target, stage, batch, length, model="tiny",
                                   data_parallel=data, model_parallel=model)
        rows.append(report.to_dict() | {"case": name, "seconds": time.perf_counter() - begin,
                                        "device_kind": aot.devices(target)[0].device_kind,
                                        "layers": modernbert_tiny().num_hidden_layers})
    with open(out, "w") as f:
        json.dump(rows, f, default=str)


if __name__ == "__main__":
    if sys.argv[2:] == ["--kernels"]:
        layer_kernels(sys.argv[1])
    else:
        main(sys.argv[1])
