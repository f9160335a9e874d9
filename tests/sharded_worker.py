"""Runs the text pipeline under a device layout chosen by the parent test (a subprocess,
because XLA_FLAGS and jax.distributed must be set before jax starts).

    python sharded_worker.py CKPT OUT.npz --devices 8 --model-parallel 2
    python sharded_worker.py CKPT OUT.npz --process-id 0 --num-processes 2 --port 12345
"""

import argparse
import os
import sys


def corpus() -> list[str]:
    """Mixed lengths so several buckets are used; empty text included."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import RANDOM_DOCS
    docs = [line.rstrip("\n") for line in RANDOM_DOCS.open(encoding="utf-8")]
    return [d[: (i * 37) % 900] for i, d in enumerate(docs[:90])] + ["", "a: b"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--model-parallel", type=int, default=1)
    ap.add_argument("--process-id", type=int)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--port", type=int)
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import numpy as np

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id)
    import cde_jax
    from cde_jax.minicorpus import fallback_minicorpus
    from cde_jax.sharding import make_mesh

    mesh = make_mesh(args.model_parallel)
    model = cde_jax.load(args.ckpt, mesh=mesh)
    # The first 300 characters of each document: the minicorpus's lengths do not change what
    # is sharded, and 512 full documents (up to 512 tokens) cost a fifth of this run.
    ctx = model.embed_dataset([d[:300] for d in fallback_minicorpus()], seed=3)
    texts = corpus()
    # Each process embeds its own contiguous share of the corpus.
    per = -(-len(texts) // jax.process_count())
    start = jax.process_index() * per
    mine = texts[start:start + per]
    emb = model.encode(mine, prompt_name="document", dataset_embeddings=ctx)
    raw = model.second_stage(*model.tokenizer(["search_query: " + t for t in mine[:6]]), ctx)
    from cde_jax.params import flat_params
    wqkv = flat_params(model.module)["second_stage_model/backbone/layers/0/attn/wqkv/kernel"]
    np.savez(args.out, context=ctx, embeddings=emb, raw=raw, start=start,
             devices=len(jax.devices()), wqkv_spec=str(tuple(wqkv.sharding.spec)),
             **fused(args.ckpt, mesh, model, ctx, texts) if args.devices > 1 else {},
             **users_shard_map(model, mesh, ctx, texts)
             if args.devices > 1 and args.model_parallel == 1 else {})


def fused(ckpt, mesh, model, ctx, texts) -> dict:
    """The second stage with rope_fused (interpret mode), whose kernels run per device
    (`shard_map`) on a data mesh and beside XLA's split matmuls with model parallelism, and
    with this run's kernel: 8 short texts against a short context (interpret mode is slow).
    `kernels_*`: how many Pallas calls of each name the traced stage holds."""
    import jax

    import cde_jax

    fused_model = cde_jax.load(ckpt, mesh=mesh, attention="rope_fused")
    ids, mask = model.tokenizer([t[:150] for t in texts if t][:8])
    traced = jax.make_jaxpr(fused_model.module.second_stage)(ids, mask, ctx[:24])
    return {"fused": fused_model.second_stage(ids, mask, ctx[:24]),
            "unfused": model.second_stage(ids, mask, ctx[:24]),
            **{f"kernels_{name}": n for name, n in pallas_calls(traced.jaxpr).items()}}


def pallas_calls(jaxpr) -> dict:
    """{name: count} of the `pallas_call`s in `jaxpr` and every jaxpr inside it (shard_map,
    custom VJPs, conditionals)."""
    counts = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            name = eqn.params.get("name") or "unnamed"
            counts[name] = counts.get(name, 0) + 1
        for value in eqn.params.values():
            for inner in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    for name, n in pallas_calls(inner).items():
                        counts[name] = counts.get(name, 0) + n
    return counts


def users_shard_map(model, mesh, ctx, texts) -> dict:
    """The second stage inside a user's own `shard_map` over the data axis (README: "Inside
    your JAX code"), and the runner's result for the same rows."""
    import jax
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    graphdef = model.graphdef
    ids, mask = model.tokenizer(["search_query: " + t for t in texts[:16]])

    def user_fn(params, ids, mask, dataset):
        return nnx.merge(graphdef, params).second_stage(ids, mask, dataset)

    sharded = jax.jit(jax.shard_map(user_fn, mesh=mesh, in_specs=(P(), P("data"), P("data"), P()),
                                    out_specs=P("data")))
    return {"shard_map": sharded(model.params, ids, mask, ctx),
            "shard_map_runner": model.second_stage(ids, mask, ctx)}


if __name__ == "__main__":
    main()
