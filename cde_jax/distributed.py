"""Several processes (one per host), one mesh: joining `jax.distributed` from the command line,
and the few things the processes must agree on.

A command runs unchanged under N processes: `--coordinator HOST:PORT --num-processes N
--process-id I`, or no flags where `jax.distributed.initialize()` finds the cluster itself
(Cloud TPU pod slices, SLURM with several tasks). Every process then sees every device
(`jax.devices()`), reads its own share of the input and joins every collective; process 0
writes what only one process may write.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from .io_utils import output_lock
from .validation import UserError

T = TypeVar("T")


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several processes", "one process per host; without these flags a TPU pod slice or a "
        "SLURM job with several tasks is detected by jax.distributed")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0's coordination service")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")


def cluster_detected() -> bool:
    """A multi-process launch that `jax.distributed.initialize()` configures by itself."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return slurm_tasks > 1 or len(tpu_hosts) > 1


def initialize(args: argparse.Namespace) -> None:
    """Joins the run described by the flags (or detected); one process: nothing to do."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given):
        if cluster_detected():
            jax.distributed.initialize()
        return
    if any(v is None for v in given):
        raise UserError("--coordinator, --num-processes and --process-id go together")
    if not 0 <= args.process_id < args.num_processes:
        raise UserError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
    if args.num_processes > 1:
        # Collectives between CPU devices of different processes (no effect on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_succeed(step: Callable[[], T], what: str) -> T:
    """Runs `step` on every process; if it fails on any, it fails on all (the failing ones
    with their own error, the others naming them), so no process goes on alone."""
    error = None
    try:
        result = step()
    except UserError as e:
        error = e
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.asarray(error is not None))
        bad = np.flatnonzero(failed).tolist()
        if bad and error is None:
            raise UserError(f"{what} failed in process(es) {bad}: see their messages")
    if error is not None:
        raise error
    return result


def sum_all(values: np.ndarray) -> np.ndarray:
    """Elementwise sum of an array over the processes."""
    if jax.process_count() == 1:
        return values
    return multihost_utils.process_allgather(values).sum(axis=0)


def max_all(values: np.ndarray) -> np.ndarray:
    """Elementwise maximum of an array over the processes."""
    if jax.process_count() == 1:
        return values
    return multihost_utils.process_allgather(values).max(axis=0)


@contextlib.contextmanager
def main_writes(out: str | Path):
    """For the block, process 0 holds `output_lock(out)` (one run per output; a remote
    path has no local lock). If it cannot, every process fails, naming the holder."""
    with contextlib.ExitStack() as stack:
        def claim():
            if is_main() and "://" not in str(out):
                stack.enter_context(output_lock(out))
        all_succeed(claim, "claiming the output")
        yield
