"""Several processes (one per host), one mesh: the only module that talks across processes.

A command runs unchanged under N processes: `--coordinator HOST:PORT --num-processes N
--process-id I`, or no flags where `jax.distributed.initialize()` finds the cluster itself
(Cloud TPU pod slices, SLURM with several tasks). Every process then sees every device
(`jax.devices()`), reads its own share of the input and joins every collective; process 0
writes what only one process may write.

Everything that crosses processes goes through here, so that the rest of the package reads
as single-process code: who this process is (`process_index`, `is_main`, `process_share`),
agreeing (`barrier`, `all_succeed`, `sum_all`, `max_all`), gathering (`concat_all`,
`gather_rows`, `to_host`) and the two moves of a batch between this host and the devices
(`put_rows`, `get_rows`). A test fails if another module imports `multihost_utils` or asks
JAX for the process index itself.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

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


# --- who this process is -------------------------------------------------------------------
def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main() -> bool:
    """Process 0: the one that writes what only one process may write."""
    return jax.process_index() == 0


def process_share(n: int) -> slice:
    """This process's contiguous share of `n` items (the last shares may be short or empty)."""
    per = -(-n // jax.process_count())
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


# --- agreeing ------------------------------------------------------------------------------
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


# --- gathering -----------------------------------------------------------------------------
def concat_all(values: np.ndarray) -> np.ndarray:
    """Every process's 1-D array (of any length), concatenated in process order."""
    if jax.process_count() == 1:
        return values
    sizes = multihost_utils.process_allgather(np.asarray(len(values)))
    padded = np.zeros(int(sizes.max()), values.dtype)
    padded[:len(values)] = values
    rows = multihost_utils.process_allgather(padded)
    return np.concatenate([row[:size] for row, size in zip(rows, sizes)])


def gather_rows(rows_nd: np.ndarray, total: int) -> np.ndarray:
    """Every process's rows, each a `process_share` of `total`, in process order, on every
    process."""
    if jax.process_count() == 1:
        return rows_nd
    per = -(-total // jax.process_count())
    padded = np.zeros((per,) + rows_nd.shape[1:], rows_nd.dtype)
    padded[:len(rows_nd)] = rows_nd
    gathered = multihost_utils.process_allgather(padded)
    return gathered.reshape((-1,) + rows_nd.shape[1:])[:total]


def to_host(array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array on this host; every process calls it
    for an array spread over several."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)


# --- a batch between this host and the devices ---------------------------------------------
def put_rows(local_rows: np.ndarray, rows: NamedSharding) -> jax.Array:
    """This process's rows of a batch -> the global array split by `rows` (every process
    passes the same number of rows)."""
    return jax.make_array_from_process_local_data(rows, local_rows)


def get_rows(out: jax.Array, mesh: Mesh, rows: NamedSharding) -> np.ndarray:
    """This process's rows of a row-split global array, in the order it put them."""
    if out.is_fully_addressable:
        return np.asarray(out)
    return np.asarray(multihost_utils.global_array_to_host_local_array(out, mesh, rows.spec))
