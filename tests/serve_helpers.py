"""Test helpers for `cde-jax serve` run as a real process on 127.0.0.1: start it, wait for
it, read its /metrics, stop it."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

START_SECONDS = 600  # start-up compiles every bucket: long on a loaded machine


def start(argv: list[str], log: Path, env: dict | None = None, *, scheme: str = "http"
          ) -> tuple[subprocess.Popen, str]:
    """`cde-jax serve ARGV` (argv without `cde-jax`), once it listens: (process, url)."""
    with log.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "cde_jax.cli", *argv],
                                   stdout=err, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    atexit.register(stop, process)  # whatever happens to the session
    deadline = time.monotonic() + START_SECONDS
    while not (found := re.search(rf"listening on ({scheme}://\S+)", log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.2)
    host, port = found.group(1).split("://")[1].split(":")
    # the socket is bound before the line is printed, listening once uvicorn has started
    wait_until(lambda: socket.create_connection((host, int(port))).close() or True,
               what="the server to accept connections")
    return process, found.group(1)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(60)


def wait_until(check, *, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError, ConnectionRefusedError):
            if result := check():
                return result
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def metric_values(http: httpx.Client) -> dict[str, float]:
    """Every sample of /metrics by name and labels, e.g. 'cde_serve_queue_texts' or
    'cde_serve_batch_texts_bucket{le=1.0}'."""
    answer = http.get("/metrics")
    answer.raise_for_status()
    return {sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                           + "}" if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(answer.text)
            for sample in family.samples}
