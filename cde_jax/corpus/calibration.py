"""The calibration ranges of an int8 / uint8 output: known before its first chunk is written,
and the same on every process and in every run that resumes it.

A new run embeds a fixed sample of the input (`quantize.calibration_rows`: up to 1024 rows,
seed 0; each process embeds its share) and takes each dimension's [min, max] over all of
it. A run that resumes an unfinished output takes the ranges recorded there instead: with
another number of processes the sample's float32 values can differ in their last bits (the
batches differ), and ranges one ulp apart would make the two runs' chunks disagree.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .. import distributed
from ..quantize import RANGED, Quantization, calibration_rows
from ..validation import UserError
from . import sinks


def agreed_ranges(sample_rd: np.ndarray, width: int) -> np.ndarray:
    """(2, width) float32 [min; max] over every process's sample rows (each passes its own,
    possibly none)."""
    low = np.full(width, np.inf, np.float32)
    high = np.full(width, -np.inf, np.float32)
    if len(sample_rd):
        low, high = sample_rd.min(axis=0), sample_rd.max(axis=0)
    return np.stack([-distributed.max_all(-low), distributed.max_all(high)]).astype(np.float32)


def calibrated(precision: str, width: int, rows: int,
               local_values: Callable[[np.ndarray], np.ndarray]) -> Quantization:
    """`precision` for embeddings of `width` dimensions; int8/uint8 with the ranges of the
    calibration sample of a corpus of `rows` rows, `local_values(sample)` returning the
    values of the sample's rows that this process holds (every process calls it)."""
    if precision not in RANGED:
        return Quantization(precision, width)
    sample = calibration_rows(rows)
    if not len(sample):
        raise UserError(f"no texts to calibrate {precision} ranges on (empty input)")
    return Quantization(precision, width, agreed_ranges(local_values(sample), width))


def calibrate(out: str, *, key: str, width: int, precision: str, rows: int,
              embed_rows: Callable[[np.ndarray], np.ndarray]) -> Quantization:
    """How a corpus job of `rows` rows stores its values in `out`: the ranges an unfinished
    run with this key recorded there, or those of the sample, embedded now
    (`embed_rows(indices)`, every process with its share)."""
    if precision in RANGED:
        run = sinks.unfinished_run(out) or {}
        recorded = run.get("quantization") if run.get("key") == key else None
        found = int(distributed.sum_all(np.asarray(recorded is not None)))
        if found == distributed.process_count():  # every process takes the same branch
            ranges = Quantization.from_record(recorded).ranges
            return Quantization(precision, width, agreed_ranges(ranges, width))
    return calibrated(precision, width, rows, lambda sample: embed_rows(
        sample[distributed.process_share(len(sample))]))
