"""Counting XLA compilations: the check that a loop with fixed shapes never recompiles."""

from __future__ import annotations

import contextlib

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    def __init__(self):
        self.count = 0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1


@contextlib.contextmanager
def count_compiles():
    """`with count_compiles() as c: ...; c.count` is the number of XLA compiles inside."""
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
