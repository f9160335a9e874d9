"""One process of a two-process `load(attention="auto", tune=True)` on CPU, for test_tune.py
(jax.distributed must start before anything else uses JAX):

    python tune_worker.py CKPT PROCESS_ID PORT TUNE_DIR

Prints the kernel chosen; the tuner's line goes to stderr."""

import logging
import os
import sys


def main():
    ckpt, process_id, port, tune_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ["CDE_JAX_TUNE_DIR"] = tune_dir
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import cde_jax
    from cde_jax.buckets import BucketPlan

    model = cde_jax.load(ckpt, attention="auto", tune=True, plan=BucketPlan(lengths=(16, 32)))
    print("chosen", model.backbone_config.attention, flush=True)


if __name__ == "__main__":
    main()
