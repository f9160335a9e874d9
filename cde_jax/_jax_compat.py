"""The one module that reaches past JAX's public API, for what no public API does in jax
0.10. tests/test_jax_compat.py checks the version and each thing relied on here, so that
an upgrade fails there, loudly, rather than in a run.

JAX ends a process with a C++ fatal log and stack dump when its coordination service goes
away, and that service lives in process 0: a killed process 0 would take every other process
down that way (no Python callback can replace the abort). The project's answer, whose other
half (the watch over the peers, one line each) is `stopping`:
- process 0's service runs in a child process (`Coordinator`) that outlives process 0 long
  enough for the others to notice; process 0 joins with the public
  `jax.distributed.initialize`, its own in-process service bound to a spare port nobody
  calls. The child serves through jaxlib's service constructor, not exported by `jax`;
- the processes watch each other through the service's key-value store
  (`key_value_store`), which JAX does not expose;
- on a cluster JAX detects (TPU pod slice, SLURM), who is process 0 comes from JAX's own
  detection (`detect_cluster`): the child must start before `initialize`;
- `exit_now` leaves past JAX's exit handler, whose shutdown barrier would wait for peers that
  are gone, then abort.

The child runs this file as a script (`python -I`: not the package, whose import is slow),
so the module imports only the standard library at its top.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from typing import NoReturn

JAX_VERSIONS = ("0.10.",)  # the releases whose internals this module was checked against
SPARE_BIND_ADDRESS = "127.0.0.1:0"  # process 0's own JAX service: any free port, never called


class CoordinatorError(Exception):
    """Process 0's coordination service cannot start (its port is taken, most often)."""


class Coordinator:
    """Process 0's coordination service, in a child process of its own session (a Ctrl-C or
    SIGTERM to process 0's group does not reach it). It serves until `release` (every
    process has left the run), or, when process 0 dies, for `linger` seconds: long enough
    for the other processes to notice and leave with one line instead of JAX's abort."""

    def __init__(self, port: int, n: int, heartbeat: int, shutdown: int, linger: float):
        _check_port_free(port, linger)
        self.proc = subprocess.Popen(
            [sys.executable, "-I", __file__, f"[::]:{port}", str(n), str(heartbeat),
             str(shutdown), str(linger)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            raise CoordinatorError(f"cannot start the coordination service on port {port}: "
                                   f"{first or 'it exited'}")

    def release(self) -> None:
        """The run is over on every process (or they are gone): the service can stop."""
        try:
            self.proc.stdin.write("done\n")
            self.proc.stdin.close()
        except (OSError, ValueError):  # already released, or the child is gone
            pass


def _check_port_free(port: int, linger: float) -> None:
    """gRPC listens with SO_REUSEPORT: a second service on the same port would start and
    share the connections with the first. A bind tells whether one listens there (with
    SO_REUSEADDR, as gRPC's: the closed connections of a finished run do not count)."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
            return
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise CoordinatorError(
                    f"port {port} of --coordinator is in use on this host (by another run, or "
                    f"by the coordinator of a run whose process 0 was killed, for {linger:g} "
                    f"s); choose another port") from None
            # No IPv6 here: try IPv4.


def _serve(address: str, n: str, heartbeat: str, shutdown: str, linger: str) -> NoReturn:
    """The child: ignores the signals meant for the processes, serves until process 0 says
    "done", or, if process 0 dies (its end of the pipe closes), for `linger` seconds."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    from jaxlib import _jax

    try:
        service = _jax.get_distributed_runtime_service(
            address, int(n), heartbeat_timeout=int(heartbeat), shutdown_timeout=int(shutdown))
    except Exception as e:
        print((str(e).strip() or type(e).__name__).splitlines()[0], flush=True)
        os._exit(1)
    print("ready", flush=True)
    if sys.stdin.readline() == "done\n":
        service.shutdown()
    else:
        time.sleep(float(linger))
    os._exit(0)


def key_value_store():
    """JAX's client of the coordination service, whose key-value store is the channel
    between the processes that needs no device (no public accessor)."""
    from jax._src import distributed

    return distributed.global_state.client


def detect_cluster(timeout: int) -> tuple[str, int, int, list[int] | None]:
    """(coordinator address, processes, this process, its local device ids) of the cluster
    `jax.distributed.initialize()` would detect by itself."""
    from jax._src import clusters

    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, timeout)


def exit_now(code: int) -> NoReturn:
    """Ends the process at once, from any thread, past JAX's exit handler
    (`jax.distributed.shutdown`), whose barrier would wait for peers that are gone."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _serve(*sys.argv[1:])
