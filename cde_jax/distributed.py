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

How a multi-process run of the CLI ends when something goes wrong. JAX aborts a process
with a C++ stack dump when its coordination service is gone, reports a dead task or does
not see every process join; a Python callback cannot replace that abort in jaxlib 0.10
(its status argument has no Python type). So:
- process 0 runs the coordination service in a child process (`_CoordinatorProcess`) that
  outlives it long enough for the others to notice, and JAX's own timeouts are set past
  ours, so that JAX never gets to abort;
- every process watches its peers through the service's key-value store (`_Run`): a peer
  that stops answering for `--peer-timeout` seconds, or that stops on an error or a signal,
  ends every other process with one line (`end`); so does a run whose processes do not all
  join within that time;
- the processes compare their run records before any work (`agree`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from .validation import UserError

T = TypeVar("T")

PEER_TIMEOUT_ENV = "CDE_JAX_PEER_TIMEOUT"
PEER_TIMEOUT = 60.0
PEER_LOST = 3  # exit status of the processes that outlive a peer that stopped answering
JAX_MARGIN = 10  # seconds JAX's own timeouts run past ours (at least)
STOP_GRACE = 5.0  # seconds a process has to stop by itself after a peer stopped on an error
INTERRUPTED = "interrupted: run the same command again to resume"
TERMINATED = "terminated: run the same command again to resume"
RESUME = "run the same command again on every process"
_KEYS = "cde_jax/"  # this package's keys in the coordination service's store


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
            _join(args, resume)
        return
    if any(v is None for v in given):
        raise UserError("--coordinator, --num-processes and --process-id go together")
    if not 0 <= args.process_id < args.num_processes:
        raise UserError(f"--process-id {args.process_id} is not in [0, {args.num_processes})")
    if args.num_processes > 1:
        # Collectives between CPU devices of different processes (no effect on GPU/TPU).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _join(args, resume, args.coordinator, args.num_processes, args.process_id)


def _join(args: argparse.Namespace, resume: str, *where) -> None:
    """`jax.distributed.initialize` with process 0's service in a child process, JAX's
    timeouts past ours, SIGTERM left to the CLI (not to JAX's preemption notifier), and a
    deadline: a run that does not assemble in time ends with one line, not JAX's abort."""
    global _run
    timeout = peer_timeout(args)
    program = f"cde-jax {getattr(args, 'command', '')}".rstrip()
    jax.config.update("jax_enable_preemption_service", False)
    deadline = threading.Timer(timeout, _not_joined, (program, timeout))
    deadline.daemon = True
    deadline.start()
    try:
        # `initialize` makes process 0's service through its module's `_jax`: swapped for
        # the call only (jax is pinned to 0.10.x, whose `_jax` this wraps).
        jax_distributed._jax = _ServiceElsewhere(timeout)
        # JAX's clients beat every half of its heartbeat timeout, so its service may call
        # a peer dead half that time after its death: twice ours, plus a margin.
        jax.distributed.initialize(*where, initialization_timeout=int(timeout) + JAX_MARGIN,
                                   heartbeat_timeout_seconds=2 * (int(timeout) + JAX_MARGIN),
                                   shutdown_timeout_seconds=int(timeout) + JAX_MARGIN)
    finally:
        if isinstance(jax_distributed._jax, _ServiceElsewhere):
            jax_distributed._jax = jax_distributed._jax.jaxlib
        deadline.cancel()
    state = jax_distributed.global_state
    _run = _Run(state.client, state.process_id, state.num_processes, timeout, program, resume)


def _not_joined(program: str, timeout: float) -> None:
    state = jax_distributed.global_state
    _say(program, f"error: not all {state.num_processes} processes joined the run at "
                  f"{state.coordinator_address} within {timeout:g} s; start the same command "
                  f"on every process (--peer-timeout sets the wait)")
    os._exit(PEER_LOST)


def _say(program: str, line: str, *, from_thread: bool = False) -> None:
    """`program: line` on stderr. From the watching thread, a progress bar may be half
    drawn on the current line: a terminal's line is cleared first, a file's ended."""
    start = ("\r\x1b[K" if sys.stderr.isatty() else "\n") if from_thread else ""
    print(f"{start}{program}: {line}", file=sys.stderr, flush=True)


class _ServiceElsewhere:
    """jaxlib's `_jax` as `jax.distributed.initialize` sees it, except that process 0's
    coordination service is a `_CoordinatorProcess`."""

    def __init__(self, timeout: float):
        self.jaxlib, self._timeout = jax_distributed._jax, timeout

    def __getattr__(self, name: str):
        return getattr(self.jaxlib, name)

    def get_distributed_runtime_service(self, address: str, num_nodes: int, *,
                                        heartbeat_timeout: int, shutdown_timeout: int, **_):
        return _CoordinatorProcess(address, num_nodes, heartbeat_timeout, shutdown_timeout,
                                   linger=self._timeout + JAX_MARGIN)


# The child: ignores the signals meant for the processes, serves until process 0 says
# "done" (after every process left the run), or, if process 0 dies, long enough for the
# others to notice (`linger`).
_SERVE = """\
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
from jaxlib import _jax
address, n, heartbeat, shutdown, linger = sys.argv[1:]
try:
    service = _jax.get_distributed_runtime_service(
        address, int(n), heartbeat_timeout=int(heartbeat), shutdown_timeout=int(shutdown))
except Exception as e:
    print((str(e).strip() or type(e).__name__).splitlines()[0], flush=True)
    os._exit(1)
print("ready", flush=True)
if sys.stdin.readline() == "done\\n":
    service.shutdown()
else:
    time.sleep(float(linger))
os._exit(0)
"""


class _CoordinatorProcess:
    """Process 0's coordination service, in a child process of its own session (a Ctrl-C or
    SIGTERM to process 0's group does not reach it): when process 0 dies the service stays
    up for `linger` seconds, so the other processes' JAX runtime does not abort before they
    notice and leave with one line."""

    def __init__(self, address: str, num_nodes: int, heartbeat: int, shutdown: int,
                 linger: float):
        port = int(address.rsplit(":", 1)[1])
        _check_port_free(port, linger)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, address, str(num_nodes), str(heartbeat),
             str(shutdown), str(linger)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            raise UserError(f"cannot start the coordination service on port {port}: "
                            f"{first or 'it exited'}")

    def shutdown(self) -> None:
        """Every process has left the run (JAX calls this after its shutdown barrier), or
        process 0 leaves after the others: the service can go."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()


def _check_port_free(port: int, linger: float) -> None:
    """gRPC listens with SO_REUSEPORT: a second service on the same port would start and
    share the connections with the first. A plain bind tells whether one is there."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UserError(f"port {port} of --coordinator is in use on this host (by "
                                f"another run, or by the coordinator of a run whose process 0 "
                                f"was killed, for {linger:g} s); choose another port") from None
            # No IPv6 here: try IPv4.


@dataclasses.dataclass(frozen=True)
class Stop:
    """How a process leaves the run: its exit status and its line."""

    code: int
    line: str | None


class _Run(threading.Thread):
    """This process in a multi-process CLI run, and the thread that watches its peers.

    Every `interval` it writes its heartbeat into the coordination service's store and reads
    the others': a peer whose heartbeat has not moved for `timeout` seconds (killed, hung, its
    host gone) or that left with an error or a signal (its stop record) is a verdict. The
    main thread, when the command fails on its own, takes the verdict (a failed collective
    means a peer is gone); otherwise this thread ends the process with the verdict's line
    (a peer that stopped on an error or a signal gets `STOP_GRACE` seconds first, in which
    this process may stop the same way by itself). Whoever takes `_leaving` first speaks."""

    def __init__(self, client, me: int, n: int, timeout: float, program: str, resume: str):
        super().__init__(name="cde-jax-peers", daemon=True)
        self.client, self.me, self.n, self.timeout = client, me, n, timeout
        self.program, self.resume = program, resume
        self.interval = min(1.0, timeout / 10)
        self.verdict: Stop | None = None
        self.decided, self.quit, self._leaving = threading.Event(), threading.Event(), \
            threading.Lock()
        self.gone: dict[int, Stop] = {}  # peers that left or stopped answering
        self._beats: dict[int, tuple[str | None, float]] = {}
        self._count, self._contact = 0, time.monotonic()
        self.start()

    def run(self) -> None:
        while not self.quit.wait(self.interval):
            self.poll()
            if self.verdict is not None and self.verdict.code != PEER_LOST:
                time.sleep(STOP_GRACE)
            if self.verdict is not None and self._leaving.acquire(blocking=False):
                _say(self.program, self.verdict.line, from_thread=True)
                self.leave(self.verdict.code, self.verdict.line)

    def poll(self) -> None:
        """One heartbeat out, everyone's in; updates `gone` and the verdict."""
        now = time.monotonic()
        self._count += 1
        try:
            self.client.key_value_set(f"{_KEYS}beat/{self.me}", str(self._count),
                                      allow_overwrite=True)
            found = dict(self.client.key_value_dir_get(_KEYS))
        except Exception:  # the service does not answer: process 0's host is gone
            if now - self._contact > self.timeout:
                self._decide(0, self._lost(0))
            return
        self._contact = now
        for peer in set(range(self.n)) - {self.me} - set(self.gone):
            stop = found.get(f"{_KEYS}stop/{peer}")
            beat = found.get(f"{_KEYS}beat/{peer}")
            if stop is not None:
                self._decide(peer, self._stopped(peer, Stop(**json.loads(stop))))
            elif peer not in self._beats or self._beats[peer][0] != beat:
                self._beats[peer] = (beat, now)
            elif now - self._beats[peer][1] > self.timeout:
                self._decide(peer, self._lost(peer))

    def _decide(self, peer: int, stop: Stop) -> None:
        self.gone[peer] = stop
        if self.verdict is None and stop.code != 0:
            self.verdict = stop
            self.decided.set()

    def _lost(self, peer: int) -> Stop:
        who = "process 0 (the coordinator)" if peer == 0 and self.me != 0 else f"process {peer}"
        return Stop(PEER_LOST, f"error: {who} stopped answering (nothing from it for "
                               f"{self.timeout:g} s); {self.resume}")

    def _stopped(self, peer: int, stop: Stop) -> Stop:
        """What this process says when `peer` stopped: a signal, the same; an error, that."""
        if stop.line in (INTERRUPTED, TERMINATED) or stop.code == 0:
            return stop
        return Stop(stop.code, f"error: process {peer} stopped with an error (see its "
                               f"messages); {self.resume}")

    def end(self, code: int, line: str | None, error: BaseException | None) -> int:
        """The main thread's end of the run: says `line` (an `error` the command did not
        expect is explained by a peer's verdict when one comes, else it is a bug and shows
        its traceback), then leaves."""
        self._leaving.acquire()  # if this thread's verdict won, the process is exiting
        if error is not None:
            if self.decided.wait(self.timeout + 3 * self.interval):
                code, line = self.verdict.code, self.verdict.line
            elif _signalled is not None:  # the collective failed as the run was stopping
                code, line = dataclasses.astuple(signal_stop(_signalled))
            else:
                traceback.print_exception(error)
        if line:
            _say(self.program, line)
        return self.leave(code, line)

    def leave(self, code: int, line: str | None = None) -> int:
        """Records this process's stop for the others. Success: returns (JAX's shutdown
        barrier follows at exit). Failure: exits at once, past JAX's shutdown barrier, which
        would wait for peers that may be gone; process 0 first waits until the others have
        stopped or are silent, then lets its coordination service go."""
        with contextlib.suppress(Exception):
            said = line if line in (INTERRUPTED, TERMINATED) else None
            self.client.key_value_set(f"{_KEYS}stop/{self.me}", json.dumps(
                dataclasses.asdict(Stop(code, said))), allow_overwrite=True)
        self.quit.set()
        if threading.current_thread() is not self:
            self.join()
        if code == 0:
            return 0
        if self.me == 0:
            give_up = time.monotonic() + self.timeout + 3 * self.interval
            while len(self.gone) < self.n - 1 and time.monotonic() < give_up:
                time.sleep(self.interval)
                self.poll()
            jax_distributed.global_state.service.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_run: _Run | None = None


def end(program: str, code: int, line: str | None = None,
        error: BaseException | None = None) -> int:
    """The end of a CLI command: prints `program: line` and returns `code`. In a
    multi-process run this process also tells the others (`_Run.end`); an unexpected
    `error` there is first explained by what happened to a peer, if anything did."""
    global _ending
    _ending = True
    try:
        if _run is not None:
            return _run.end(code, line, error)
        if error is not None:
            raise error
        if line:
            _say(program, line)
        return code
    finally:
        _ending = False


@contextlib.contextmanager
def stop_signals():
    """SIGTERM and SIGHUP (what a scheduler or a preemption sends) raise `Terminated` in the
    main thread, as SIGINT raises KeyboardInterrupt. The first of the three ignores the next
    ones, so that a second signal does not break the stop it started; one that comes while
    the command is already ending (`end`) is only noted: it explains a failed collective."""
    global _signalled
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def stop(signum, frame):
        global _signalled
        for s in stops:
            signal.signal(s, signal.SIG_IGN)
        _signalled = signum
        if not _ending:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _signalled = None
    saved = {s: signal.signal(s, stop) for s in stops}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


_signalled: int | None = None  # the stop signal this process received
_ending = False  # the command has returned or failed: signals are only noted


def signal_stop(signum: int) -> Stop:
    """How a process stops on a signal: Ctrl-C 130, SIGTERM 143, SIGHUP 129."""
    return Stop(128 + signum, INTERRUPTED if signum == signal.SIGINT else TERMINATED)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived. Not an `Exception`, as KeyboardInterrupt is not: no
    `except Exception` on the way out swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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
    text = json.dumps(value, default=str)
    return text if len(text) <= 48 else text[:45] + "..."


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
