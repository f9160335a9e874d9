"""Compact embeddings: float16, int8 / uint8 and packed sign bits, with the semantics of
sentence-transformers' `quantize_embeddings`, so that what `cde-jax embed --precision`
writes can go straight into the vector stores and search code built on them.

- `int8` / `uint8`: each dimension's calibration range [low, high] is cut into 255 steps
  of `(high - low) / 255` (a step of 0 counts as 1); a value's level is
  `floor((x - low) / step)` clipped to [0, 255], stored as is (uint8) or minus 128 (int8).
  The ranges come from a calibration sample (`calibration_rows`), never from the rows being
  quantized, so that every chunk of a corpus, written by any process in any run, is cut
  the same way.
- `binary` / `ubinary`: the sign bits `x > 0` packed 8 to a byte (`np.packbits`, the last
  byte padded with zeros); binary is ubinary - 128 as int8.
- `float16`: rounded to the nearest float16.

A *quantized score* is what a search over the stored codes ranks by, the query quantized
like the documents: the inner product of the codes (float16 values, int8 or uint8 levels),
and for bits the sign agreement `width - 2 * hamming` (+1 per agreeing sign, -1 per
disagreeing one). *Rescoring* (sentence-transformers' `rescore_multiplier`) recomputes the
best candidates' scores with the float32 query against the dequantized documents.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .minicorpus import sample_indices
from .validation import UserError

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
RANGED = ("int8", "uint8")  # the precisions that need calibration ranges
PACKED = ("binary", "ubinary")
LEVELS = 255  # steps between a range's ends: 256 levels
CALIBRATION_ROWS = 1024
CALIBRATION_SEED = 0
_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8, "uint8": np.uint8,
           "binary": np.int8, "ubinary": np.uint8}


def calibration_rows(n: int) -> np.ndarray:
    """Which of a corpus's `n` rows calibrate int8/uint8 ranges, ascending: up to
    CALIBRATION_ROWS drawn without replacement by the minicorpus's rule (seed 0), so that
    `embed` and `eval` pick the same documents of the same input."""
    return np.sort(sample_indices(n, min(n, CALIBRATION_ROWS), CALIBRATION_SEED))


@dataclasses.dataclass(frozen=True, eq=False)
class Quantization:
    """How embeddings of `width` dimensions are stored: the precision and, for int8/uint8,
    the (2, width) float32 calibration ranges ([low; high] per dimension, the `ranges`
    argument of sentence-transformers' `quantize_embeddings`)."""

    precision: str
    width: int
    ranges: np.ndarray | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}: choose one of "
                            f"{', '.join(PRECISIONS)}")
        if (self.ranges is None) == (self.precision in RANGED):
            need = "needs" if self.ranges is None else "takes no"
            raise UserError(f"precision {self.precision} {need} calibration ranges")
        if self.ranges is not None:
            ranges = np.asarray(self.ranges, np.float32)
            if ranges.shape != (2, self.width):
                raise UserError(f"calibration ranges must have shape (2, {self.width}), got "
                                f"{ranges.shape}")
            if not np.isfinite(ranges).all() or (ranges[0] > ranges[1]).any():
                raise UserError("calibration ranges must be finite, with low <= high")
            object.__setattr__(self, "ranges", ranges)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.precision])

    @property
    def stored_width(self) -> int:
        """Values per stored row: the width, or its bytes of packed bits."""
        return -(-self.width // 8) if self.precision in PACKED else self.width

    def apply(self, values_nd: np.ndarray) -> np.ndarray:
        """(n, width) float embeddings -> (n, stored_width) stored values."""
        values_nd = np.asarray(values_nd, np.float32)
        if self.precision in ("float32", "float16"):
            return values_nd.astype(self.dtype)
        if self.precision in PACKED:
            bits = np.packbits(values_nd > 0, axis=-1)
            return bits if self.precision == "ubinary" else _signed(bits)
        low, step = self._steps()
        levels = np.clip(np.floor((values_nd - low) / step), 0, LEVELS)
        return (levels - 128 if self.precision == "int8" else levels).astype(self.dtype)

    def dequantize(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> approximate (n, width) float32 embeddings: int8/uint8 levels at
        their step's centre (within step / 2 of every value inside the ranges; sentence-
        transformers takes the step's lower end, which ranks any query's candidates the
        same), bits as the unit vector of their signs (+-1 / sqrt(width))."""
        if self.precision in PACKED:
            return self._signs(stored) / np.float32(np.sqrt(self.width))
        if self.precision not in RANGED:
            return np.asarray(stored, np.float32)
        low, step = self._steps()
        return low + (self._levels(stored) + np.float32(0.5)) * step

    def code_vectors(self, stored: np.ndarray) -> np.ndarray:
        """float32 vectors whose inner products are the quantized scores: float values,
        int8/uint8 levels as stored, bits as +-1."""
        if self.precision in PACKED:
            return self._signs(stored)
        return np.asarray(stored, np.float32)

    def scores(self, queries_qd: np.ndarray, stored: np.ndarray) -> np.ndarray:
        """(q, n) quantized scores of float32 queries (quantized here) against stored rows,
        on the host (`evaluation.search.quantized_top_k` keeps the best on the devices)."""
        return self.code_vectors(self.apply(queries_qd)) @ self.code_vectors(stored).T

    def record(self) -> dict:
        """The JSON form kept in an output's metadata (`from_record` reads it back)."""
        ranges = None if self.ranges is None else self.ranges.tolist()
        return {"precision": self.precision, "width": self.width, "ranges": ranges}

    @classmethod
    def from_record(cls, record: dict) -> Quantization:
        return cls(record["precision"], record["width"],
                   None if record["ranges"] is None else np.asarray(record["ranges"], np.float32))

    def _steps(self) -> tuple[np.ndarray, np.ndarray]:
        low = self.ranges[0]
        step = (self.ranges[1] - low) / np.float32(LEVELS)
        return low, np.where(step == 0, np.float32(1), step)

    def _levels(self, stored: np.ndarray) -> np.ndarray:
        levels = np.asarray(stored).astype(np.float32)
        return levels + 128 if self.precision == "int8" else levels

    def _signs(self, stored: np.ndarray) -> np.ndarray:
        stored = np.asarray(stored)
        unsigned = stored if self.precision == "ubinary" else _unsigned(stored)
        bits = np.unpackbits(unsigned, axis=-1, count=self.width)
        return bits.astype(np.float32) * 2 - 1


def _signed(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.int16) - 128).astype(np.int8)


def _unsigned(signed: np.ndarray) -> np.ndarray:
    return (signed.astype(np.int16) + 128).astype(np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)
class Embeddings:
    """A finished `embed` output (`cde_jax.read_embeddings`): the ids, the `values` as
    stored ((n, d) float32 / float16 / int8 / uint8, or (n, d / 8) packed bits) and how they
    were stored. Unpacks as `ids, values = read_embeddings(path)`."""

    ids: np.ndarray
    values: np.ndarray
    quantization: Quantization

    def __iter__(self):
        return iter((self.ids, self.values))

    def dequantize(self) -> np.ndarray:
        """(n, d) approximate float32 embeddings (`Quantization.dequantize`)."""
        return self.quantization.dequantize(self.values)

    def scores(self, queries_qd: np.ndarray) -> np.ndarray:
        """(q, n) quantized scores of float32 queries against every row."""
        return self.quantization.scores(queries_qd, self.values)
