"""One train step (2 accumulated micro-batches) on a 1-device and an 8-device mesh of
simulated CPU devices; prints both steps' metrics (loss, accuracy, gradient norm) and how far
the updated parameters differ, as JSON. Run as a subprocess: XLA_FLAGS must be set before jax
is imported.

Parameter differences are measured against the largest parameter of the model: AdamW's first
step divides each gradient by its own magnitude, so an element whose gradient is near Adam's
eps turns float32 summation-order noise into a visible share of the learning rate, which a
per-tensor measure on a small-valued tensor would magnify further.

    python tests/multidevice_step.py CHECKPOINT_DIR DATA.jsonl
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import cde_jax  # noqa: E402
from cde_jax import loading, sharding  # noqa: E402
from cde_jax.training import data, step  # noqa: E402

CFG = step.StepConfig(total_steps=10, learning_rate=2e-5, permute=True, sequence_dropout=0.0)


def run(mesh, ckpt, batches):
    backbone = loading.runtime_backbone(ckpt.backbone, mesh)
    graphdef, params = loading.place_checkpoint(ckpt, backbone, mesh)
    before = jax.tree.map(np.array, params)  # a copy: the step donates `params`
    optimizer = step.make_optimizer(CFG, params)
    opt_state = step.init_opt_state(optimizer, params, mesh)
    fn = step.make_train_step(graphdef, CFG, optimizer, params, opt_state,
                              logit_scale=ckpt.cde.logit_scale, mesh=mesh)
    placed = {k: jax.device_put(v, sharding.stacked_batch_sharding(mesh, v.shape))
              for k, v in batches.items()}
    params, _, metrics = fn(params, opt_state, placed, jax.random.PRNGKey(0), 0)
    shardings = {str(x.sharding.spec) for x in jax.tree.leaves(placed)}
    return metrics, jax.tree.map(np.asarray, params), before, shardings


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    ckpt = loading.read_checkpoint(sys.argv[1])
    cfg = data.BatchConfig(batch_size=16, negatives=1, corpus_size=512, query_length=24,
                          document_length=48)
    train_data = data.TrainData(data.read_examples(sys.argv[2]), cfg, seed=0)
    tokenize = data.BatchTokenizer(cde_jax.load(sys.argv[1]).tokenizer, train_data.cfg)
    batches = data.stack([tokenize(train_data.batch(i)) for i in range(2)])
    one_metrics, one, before, _ = run(sharding.make_mesh(devices=jax.devices()[:1]), ckpt,
                                      batches)
    eight_metrics, eight, _, eight_specs = run(sharding.make_mesh(), ckpt, batches)
    leaves = lambda f, *trees: jax.tree.leaves(jax.tree.map(f, *trees))
    scale = max(leaves(lambda b: float(np.abs(b).max()), one))
    worst_abs = max(leaves(lambda a, b: float(np.abs(a - b).max()), eight, one))
    worst_tensor = max(leaves(lambda a, b: float(np.abs(a - b).max() / np.abs(b).max()),
                              eight, one))
    moved = max(leaves(lambda a, b: float(np.abs(a - b).max()), one, before))
    print(json.dumps({"metrics_1": {k: float(v) for k, v in one_metrics.items()},
                      "metrics_8": {k: float(v) for k, v in eight_metrics.items()},
                      "params_rel_err": worst_abs / scale, "params_rel_err_per_tensor":
                      worst_tensor, "max_update": moved,
                      "batch_specs_8": sorted(eight_specs)}))


if __name__ == "__main__":
    main()
