"""What the benchmark scripts measure with, written once: the parity measure and the CPUs a
run may use. (The tests' `max_rel_err`, tests/conftest.py, is the same measure and also
records each test's worst value; it stays with the tests, which set XLA flags that a
benchmark must not inherit.)"""

from __future__ import annotations

import os

import numpy as np


def max_rel_err(actual, expected) -> float:
    """max |a - b| / max |b| (as the tests measure parity), in float64."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))
