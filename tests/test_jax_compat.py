"""`cde_jax._jax_compat`, the one module past JAX's public API: these tests fail on a jax
release it was not checked against, and on any change in what it relies on, before a
multi-process run meets it (the runs themselves: tests/test_faults.py)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

import jax
import jaxlib
import pytest
from test_corpus import free_port

from cde_jax import _jax_compat

# A one-process run joined through a `Coordinator`: the public `initialize` with process 0's
# own service on the spare address, the store both ways, the shutdown, the release. The
# module is loaded from its file: the package's import (the model's libraries) is not needed.
ONE_PROCESS_RUN = """
import importlib.util, sys, jax
spec = importlib.util.spec_from_file_location("_jax_compat", sys.argv[2])
_jax_compat = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_jax_compat)
port = int(sys.argv[1])
coordinator = _jax_compat.Coordinator(port, 1, heartbeat=20, shutdown=10, linger=10)
jax.distributed.initialize(f"127.0.0.1:{port}", 1, 0, initialization_timeout=10,
                           coordinator_bind_address=_jax_compat.SPARE_BIND_ADDRESS)
store = _jax_compat.key_value_store()
store.key_value_set("cde_jax/beat/0", "7", allow_overwrite=True)
print(dict(store.key_value_dir_get("cde_jax/")), flush=True)
jax.distributed.shutdown()
coordinator.release()
print("exit", coordinator.proc.wait(timeout=10))
"""


def test_jax_is_a_release_the_module_was_checked_against():
    """On another jax or jaxlib: check each internal below, then extend JAX_VERSIONS."""
    assert jax.__version__.startswith(_jax_compat.JAX_VERSIONS), jax.__version__
    assert jaxlib.__version__.startswith(_jax_compat.JAX_VERSIONS), jaxlib.__version__


def test_the_internals_it_relies_on_are_there():
    from jax._src import clusters, distributed
    from jaxlib import _jax

    public = inspect.signature(jax.distributed.initialize).parameters
    assert {"coordinator_bind_address", "initialization_timeout", "heartbeat_timeout_seconds",
            "shutdown_timeout_seconds"} <= set(public)
    assert "client" in vars(distributed.State) and hasattr(distributed.global_state, "client")
    detect = inspect.signature(clusters.ClusterEnv.auto_detect_unset_distributed_params)
    assert list(detect.parameters) == ["coordinator_address", "num_processes", "process_id",
                                       "local_device_ids", "cluster_detection_method",
                                       "initialization_timeout"]
    service = _jax.get_distributed_runtime_service.__doc__
    assert service.startswith("get_distributed_runtime_service(address: str, num_nodes: int, "
                              "heartbeat_timeout: int | None = None,"), service
    assert "shutdown_timeout: int | None = None" in service


def test_a_run_joins_through_the_coordinator_and_frees_its_port():
    port = free_port()
    done = subprocess.run([sys.executable, "-c", ONE_PROCESS_RUN, str(port), _jax_compat.__file__],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["{'cde_jax/beat/0': '7'}", "exit 0"], done.stdout
    _jax_compat.Coordinator(port, 1, 20, 10, 1).release()  # the port is free again


def test_the_coordinator_outlives_its_process_for_linger_seconds():
    """Process 0 gone (its end of the pipe closed, nothing said): the service stays `linger`
    seconds, and its port is refused meanwhile, by name."""
    port = free_port()
    coordinator = _jax_compat.Coordinator(port, 2, 20, 10, linger=3)
    begin = time.monotonic()
    coordinator.proc.stdin.close()
    with pytest.raises(_jax_compat.CoordinatorError,
                       match=rf"port {port} of --coordinator is in use on this host .* for 3 s"):
        _jax_compat.Coordinator(port, 2, 20, 10, linger=3)
    assert coordinator.proc.wait(timeout=30) == 0
    assert 3 <= time.monotonic() - begin <= 3 + 10
