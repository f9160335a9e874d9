"""Several processes (one per host), one mesh: the only module that talks across processes.

A command runs unchanged under N processes: `--coordinator HOST:PORT --num-processes N
--process-id I`, or no flags where `jax.distributed.initialize()` finds the cluster itself
(Cloud TPU pod slices, SLURM with several tasks). Every process then sees every device
(`jax.devices()`), reads its own share of the input and joins every collective; process 0
writes what only one process may write.

Everything that crosses processes goes through here, so that the rest of the package reads
as single-process code: who this process is (`process_index`, `is_main`, `process_share`),
agreeing (`agree`, `barrier`, `all_succeed`, `main_first`, `sum_all`, `max_all`), gathering
(`concat_all`, `gather_rows`, `to_host`) and the two moves of a batch between this host and
the devices (`put_rows`, `get_rows`). A test fails if another module imports
`multihost_utils` or asks JAX for the process index itself.

Joining a run (`initialize`) is `jax.distributed.initialize` with JAX's own timeouts set
past ours, so that JAX never gets to abort: a run whose processes do not all join within
`--peer-timeout` ends with one line, and a peer lost later ends the others with one line
(`stopping.PeerWatch`). Process 0's coordination service runs in a child process that
outlives it (`_jax_compat.Coordinator`), so that a killed process 0 is such a lost peer, not
a C++ abort of every other process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from . import _jax_compat, stopping
from .validation import UserError

T = TypeVar("T")

PEER_TIMEOUT_ENV = "CDE_JAX_PEER_TIMEOUT"
PEER_TIMEOUT = 60.0
JAX_MARGIN = 10  # seconds JAX's own timeouts run past ours (at least)
RESUME = "run the same command again on every process"


def add_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "several processes", "one process per host; without these flags a TPU pod slice or a "
        "SLURM job with several tasks is detected by jax.distributed")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0's coordination service")
    group.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    group.add_argument("--peer-timeout", type=float, metavar="SECONDS",
                       help=f"how long the processes wait for one that is missing or stopped "
                            f"answering before they all stop (default: ${PEER_TIMEOUT_ENV}, "
                            f"else {PEER_TIMEOUT:g})")


def cluster_detected() -> bool:
    """A multi-process launch that `jax.distributed.initialize()` configures by itself."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return slurm_tasks > 1 or len(tpu_hosts) > 1


def peer_timeout(args: argparse.Namespace) -> float:
    """--peer-timeout, else $CDE_JAX_PEER_TIMEOUT, else 60 seconds (at least 2)."""
    value = getattr(args, "peer_timeout", None)
    what = "--peer-timeout"
    if value is None:
        value, what = os.environ.get(PEER_TIMEOUT_ENV) or PEER_TIMEOUT, f"${PEER_TIMEOUT_ENV}"
    try:
        seconds = float(value)
    except ValueError:
        raise UserError(f"{what} must be a number of seconds, got {value!r}") from None
    if not seconds >= 2:
        raise UserError(f"{what} must be at least 2 seconds, got {value}")
    return seconds


def initialize(args: argparse.Namespace, resume: str = RESUME) -> None:
    """Joins the run described by the flags (or detected); one process: nothing to do.
    `resume` completes the line printed when a peer is lost (what is kept, what to run)."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(v is None for v in given):
        if cluster_detected():
            _join(args, resume, None)
        return
    if any(v is None for v in given):
        raise UserError("--coordinator, --num-processes and --process-id go together")
    if not 0 <= args.process_id < args.num_processes:
        raise UserError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
    if args.num_processes > 1:
        # Collectives between CPU devices of different processes (no effect on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _join(args, resume, (args.coordinator, args.num_processes, args.process_id, None))


def _join(args: argparse.Namespace, resume: str, where: tuple | None) -> None:
    """`jax.distributed.initialize` with process 0's service in a child process, JAX's
    timeouts past ours, SIGTERM left to the CLI (not to JAX's preemption notifier), and a
    deadline: a run that does not assemble in time ends with one line, not JAX's abort.
    `where`: (coordinator address, processes, this process, local device ids), else
    detected."""
    timeout = peer_timeout(args)
    program = f"cde-jax {getattr(args, 'command', '')}".rstrip()
    # JAX's clients beat every half of its heartbeat timeout, so its service may call a
    # peer dead half that time after its death: twice ours, plus a margin.
    jax_timeout = int(timeout) + JAX_MARGIN
    jax.config.update("jax_enable_preemption_service", False)
    address, n, me, local_devices = where or _jax_compat.detect_cluster(jax_timeout)
    deadline = threading.Timer(timeout, _not_joined, (program, address, n, timeout))
    deadline.daemon = True
    deadline.start()
    coordinator = None
    try:
        if me == 0:
            coordinator = _jax_compat.Coordinator(
                int(address.rsplit(":", 1)[1]), n, heartbeat=2 * jax_timeout,
                shutdown=jax_timeout, linger=timeout + JAX_MARGIN)
        jax.distributed.initialize(
            address, n, me, local_devices, initialization_timeout=jax_timeout,
            heartbeat_timeout_seconds=2 * jax_timeout, shutdown_timeout_seconds=jax_timeout,
            coordinator_bind_address=_jax_compat.SPARE_BIND_ADDRESS if me == 0 else None)
    except _jax_compat.CoordinatorError as e:
        raise UserError(str(e)) from None
    finally:
        deadline.cancel()
    stopping.watch_peers(stopping.PeerWatch(_jax_compat.key_value_store(), me, n, timeout,
                                            program, resume, coordinator))


def _not_joined(program: str, address: str, n: int, timeout: float) -> None:
    stopping.say(program, f"error: not all {n} processes joined the run at {address} within "
                          f"{timeout:g} s; start the same command on every process "
                          f"(--peer-timeout sets the wait)")
    _jax_compat.exit_now(stopping.PEER_LOST)


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


def main_first(step: Callable[[], T], what: str) -> T:
    """`step` on process 0, then, once it succeeded there, on the others: process 0 creates
    what the others then read and check (an output's run record)."""
    first = all_succeed(lambda: step() if is_main() else None, what)
    later = all_succeed(lambda: None if is_main() else step(), what)
    return first if is_main() else later


def agree(record: dict, what: str) -> None:
    """Every process's `record` (JSON values) must equal process 0's. The digests are
    compared first (one fixed shape), the records themselves only when they differ (padded
    to one length), so that the collectives never see mismatched shapes. Any difference is
    the same `UserError` on every process, naming the first process that differs and how."""
    if jax.process_count() == 1:
        return
    blob = json.dumps(record, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(blob).digest(), np.uint8)
    digests = multihost_utils.process_allgather(digest)
    if (digests == digests[0]).all():
        return
    records = [json.loads(part.tobytes()) for part in _gather(np.frombuffer(blob, np.uint8))]
    first = records[0]
    differ = [p for p, r in enumerate(records) if r != first]
    keys = sorted(k for k in first.keys() | records[differ[0]].keys()
                  if first.get(k) != records[differ[0]].get(k))
    shown = "; ".join(f"{k} {_short(records[differ[0]].get(k))} where process 0 has "
                      f"{_short(first.get(k))}" for k in keys[:3])
    more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    others = f" (as do processes {differ[1:]})" if len(differ) > 1 else ""
    raise UserError(f"the processes disagree on {what}: process {differ[0]} has {shown}{more}"
                    f"{others}; start every process with the same command and files")


def _short(value) -> str:
    """At most 48 characters, the end kept: a path's file name says more than its folders."""
    text = json.dumps(value, default=str)
    if len(text) <= 48:
        return text
    quote = '"' if text.startswith('"') else ""  # a string stays visibly one
    return f"{quote}...{text[-44:]}"


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
def _gather(values: np.ndarray) -> list[np.ndarray]:
    """Every process's 1-D array (of any length), in process order: the lengths first,
    then the arrays padded to the longest."""
    sizes = multihost_utils.process_allgather(np.asarray(len(values)))
    padded = np.zeros(int(sizes.max()), values.dtype)
    padded[:len(values)] = values
    rows = multihost_utils.process_allgather(padded)
    return [row[:size] for row, size in zip(rows, sizes)]


def concat_all(values: np.ndarray) -> np.ndarray:
    """Every process's 1-D array (of any length), concatenated in process order."""
    if jax.process_count() == 1:
        return values
    return np.concatenate(_gather(values))


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
