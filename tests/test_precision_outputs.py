"""Compact outputs (`cde_jax.quantize`): quantization against sentence-transformers'
`quantize_embeddings` itself, dequantization and quantized scores against independent numpy,
every sink round-tripping every precision with its metadata, calibration ranges kept by a
resumed run, and the quantized search (with rescoring) against a numpy reference. The
commands are checked in test_cli.py (an int8 embed killed and resumed), test_corpus.py (an
int8 embed on 3 processes, an int8 eval with rescoring on 2) and test_evaluation.py (eval's
nDCG@10 per precision)."""

from __future__ import annotations

import numpy as np
import pytest

import cde_jax
from cde_jax.corpus import calibration, sinks
from cde_jax.evaluation.search import quantized_top_k
from cde_jax.quantize import PRECISIONS, RANGED, Quantization, calibration_rows

WIDTH = 20  # not a multiple of 8: the last byte of packed bits is padded


@pytest.fixture(scope="module")
def values():
    """(calibration rows, rows to quantize): unit-norm rows; the second set reaches outside
    the calibration ranges (clipped), and one dimension is constant in the calibration set
    (a step of 0 counts as 1)."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((80, WIDTH)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    calibration_rd = rows[:30].copy()
    calibration_rd[:, 3] = 0.25
    return calibration_rd, rows[30:]


def quantization(precision: str, calibration_rd: np.ndarray) -> Quantization:
    ranges = np.stack([calibration_rd.min(0), calibration_rd.max(0)])
    return Quantization(precision, WIDTH, ranges if precision in RANGED else None)


def test_quantize_equals_sentence_transformers(values):
    from sentence_transformers.util.quantization import quantize_embeddings

    calibration_rd, rows = values
    assert (rows[:, 3] > 0.25).any() and (rows[:, 3] < 0.25).any()  # outside a 0-wide range
    for precision in PRECISIONS:
        got = quantization(precision, calibration_rd).apply(rows)
        if precision == "float16":  # not one of sentence-transformers' precisions
            want = rows.astype(np.float16)
        else:
            want = quantize_embeddings(rows, precision,
                                       calibration_embeddings=calibration_rd)
        assert got.dtype == want.dtype, precision
        np.testing.assert_array_equal(got, want, err_msg=precision)
    assert got.shape == (50, 3)  # 20 bits in 3 bytes


def test_dequantize_and_quantized_scores(values):
    calibration_rd, rows = values
    inside = (rows >= calibration_rd.min(0)) & (rows <= calibration_rd.max(0))
    assert inside.mean() > 0.5
    queries = rows[:7]
    for precision in RANGED:
        q = quantization(precision, calibration_rd)
        step = (calibration_rd.max(0) - calibration_rd.min(0)) / 255
        step[3] = 1.0
        error = np.abs(q.dequantize(q.apply(rows)) - rows)
        # Within half a step of each value inside the ranges: the step's centre.
        assert (error <= step / 2 * (1 + 1e-5))[inside].all(), precision
        # Quantized scores: integer dot products of the levels as stored.
        codes_q, codes_n = q.apply(queries).astype(np.int64), q.apply(rows).astype(np.int64)
        np.testing.assert_array_equal(q.scores(queries, q.apply(rows)), codes_q @ codes_n.T)
    for precision in ("binary", "ubinary"):
        q = quantization(precision, calibration_rd)
        signs = q.dequantize(q.apply(rows))
        np.testing.assert_allclose(signs, np.where(rows > 0, 1, -1) / np.sqrt(WIDTH),
                                   rtol=0, atol=1e-7)
        # Sign agreement = width - 2 * Hamming distance of the packed bits.
        bits_q, bits_n = (np.packbits(x > 0, axis=1) for x in (queries, rows))
        hamming = np.bitwise_count(bits_q[:, None, :] ^ bits_n[None, :, :]).sum(-1, np.int64)
        np.testing.assert_array_equal(q.scores(queries, q.apply(rows)), WIDTH - 2 * hamming)
    q = quantization("float16", calibration_rd)
    half = rows.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(q.dequantize(q.apply(rows)), half)


def test_bad_quantizations_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        Quantization("int4", 8)
    with pytest.raises(ValueError, match="precision int8 needs calibration ranges"):
        Quantization("int8", 8)
    with pytest.raises(ValueError, match="precision binary takes no calibration ranges"):
        Quantization("binary", 8, np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"must have shape \(2, 8\), got \(2, 7\)"):
        Quantization("uint8", 8, np.zeros((2, 7)))
    with pytest.raises(ValueError, match="finite, with low <= high"):
        Quantization("uint8", 2, np.array([[0, 1], [1, 0]]))


def test_calibration_rows():
    """Up to 1024 distinct rows, ascending, drawn by the minicorpus rule with seed 0."""
    np.testing.assert_array_equal(calibration_rows(5000),
                                  np.sort(np.random.default_rng(0).choice(5000, 1024, False)))
    np.testing.assert_array_equal(calibration_rows(60), np.arange(60))
    assert len(calibration_rows(0)) == 0


# --- sinks ---------------------------------------------------------------------------------
CHUNK_ROWS = 20
BYTES_PER_ROW = {"float32": 4 * WIDTH, "float16": 2 * WIDTH, "int8": WIDTH, "uint8": WIDTH,
                 "binary": 3, "ubinary": 3}


def write(out, q: Quantization, rows: np.ndarray, key="k", chunks=None):
    sink = sinks.open_sink(out, rows=len(rows), width=WIDTH, chunk_rows=CHUNK_ROWS, key=key,
                           id_kind="str", quantization=q)
    for i in range(-(-len(rows) // CHUNK_ROWS)) if chunks is None else chunks:
        part = slice(i * CHUNK_ROWS, (i + 1) * CHUNK_ROWS)
        sink.write_chunk(i, [f"d{j}" for j in range(len(rows))[part]], q.apply(rows[part]))
    return sink


@pytest.mark.parametrize("fmt", sinks.FORMATS)
def test_every_format_round_trips_every_precision(values, tmp_path, fmt):
    calibration_rd, rows = values
    for precision in PRECISIONS:
        q, out = quantization(precision, calibration_rd), tmp_path / f"{precision}{fmt}"
        write(out, q, rows).finish()
        got = cde_jax.read_embeddings(out)
        ids, stored = got  # unpacks as before
        assert list(ids) == [f"d{j}" for j in range(50)]
        np.testing.assert_array_equal(stored, q.apply(rows))
        assert stored.dtype == q.dtype and stored.nbytes == 50 * BYTES_PER_ROW[precision]
        assert (got.quantization.precision, got.quantization.width) == (precision, WIDTH)
        if precision in RANGED:
            np.testing.assert_array_equal(got.quantization.ranges, q.ranges)
        else:
            assert got.quantization.ranges is None
        np.testing.assert_array_equal(got.dequantize(), q.dequantize(stored))
        if fmt == ".npy":  # the bytes np.save writes for the stored array
            np.save(tmp_path / "plain.npy", q.apply(rows))
            assert out.read_bytes() == (tmp_path / "plain.npy").read_bytes()
            sidecar = out.with_name(out.name + sinks.QUANTIZATION_FILE)
            assert sidecar.exists() == (precision != "float32")


@pytest.mark.parametrize("fmt", sinks.FORMATS)
def test_a_run_with_other_ranges_does_not_resume(values, tmp_path, fmt):
    """An unfinished int8 output records its ranges beside the key; a run with other ranges
    is refused (.zarr, .parquet) or starts over (.npy), as another key would be."""
    calibration_rd, rows = values
    out, q = tmp_path / f"o{fmt}", quantization("int8", calibration_rd)
    write(out, q, rows, chunks=[1])
    recorded = sinks.unfinished_run(out)
    assert recorded["key"] == "k"
    np.testing.assert_array_equal(Quantization.from_record(recorded["quantization"]).ranges,
                                  q.ranges)
    other = quantization("int8", calibration_rd * 1.001)
    if fmt == ".npy":
        assert write(out, other, rows, chunks=[]).done_chunks() == set()
    else:
        with pytest.raises(sinks.OutputError, match="holds a run with other arguments"):
            write(out, other, rows, chunks=[])
    assert write(out, q, rows, chunks=[]).done_chunks() == (set() if fmt == ".npy" else {1})


def test_a_resumed_run_keeps_the_recorded_ranges(values, tmp_path):
    """`calibration.calibrate`: an unfinished run's ranges are taken as recorded (its sample
    is not embedded again); another key calibrates on the sample, here all 50 rows."""
    calibration_rd, rows = values
    out, q = tmp_path / "o.zarr", quantization("uint8", calibration_rd)
    write(out, q, rows, chunks=[0])

    def must_not_embed(indices):
        raise AssertionError("the sample was embedded again")

    got = calibration.calibrate(str(out), key="k", width=WIDTH, precision="uint8", rows=50,
                                embed_rows=must_not_embed)
    np.testing.assert_array_equal(got.ranges, q.ranges)
    asked = []
    got = calibration.calibrate(str(out), key="other", width=WIDTH, precision="uint8",
                                rows=50, embed_rows=lambda i: asked.append(i) or rows[i])
    np.testing.assert_array_equal(asked[0], np.arange(50))
    np.testing.assert_array_equal(got.ranges, np.stack([rows.min(0), rows.max(0)]))
    with pytest.raises(ValueError, match="no texts to calibrate int8 ranges on"):
        calibration.calibrate(str(tmp_path / "e.zarr"), key="k", width=WIDTH,
                              precision="int8", rows=0, embed_rows=lambda i: rows[i])


# --- quantized search ----------------------------------------------------------------------
def reference_top_k(queries, corpus, precision, k, multiplier=None, rescore_with=None):
    """sentence-transformers' recipe in numpy: quantize both sides with the corpus's ranges,
    rank by integer code products (sign agreement for bits), stable on ties; rescore the
    best k * multiplier with the float32 query against the float32 or dequantized rows
    (levels at their step's lower end and bits as 0/1, as sentence-transformers does)."""
    from sentence_transformers.util.quantization import quantize_embeddings

    ranges = np.stack([corpus.min(0), corpus.max(0)])
    codes_q, codes_n = (quantize_embeddings(x, precision, ranges=ranges) for x in (queries,
                                                                                    corpus))
    if precision in ("binary", "ubinary"):
        unpack = lambda c: np.unpackbits(c.view(np.uint8) ^ (128 if precision == "binary"
                                                            else 0), axis=1)[:, :WIDTH]
        scores = -np.bitwise_count(codes_q.view(np.uint8)[:, None] ^ codes_n.view(np.uint8)
                                   [None]).sum(-1, np.int64)
        lower = unpack(codes_n).astype(np.float64)
    else:
        scores = codes_q.astype(np.float64) @ codes_n.T.astype(np.float64)
        levels = codes_n.astype(np.float64) + (128 if precision == "int8" else 0)
        lower = ranges[0] + levels * (ranges[1] - ranges[0]) / 255
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k * (multiplier or 1)]
    if multiplier is None:
        return order
    rescore = corpus.astype(np.float64) if rescore_with == "float32" else lower
    rescored = np.einsum("qd,qkd->qk", queries.astype(np.float64), rescore[order])
    return np.take_along_axis(order, np.argsort(-rescored, axis=1, kind="stable")[:, :k], 1)


@pytest.mark.parametrize("precision", ["int8", "uint8", "ubinary", "binary"])
def test_quantized_top_k_equals_the_reference(precision):
    rng = np.random.default_rng(1)
    corpus = rng.standard_normal((300, WIDTH)).astype(np.float32)
    queries = rng.standard_normal((9, WIDTH)).astype(np.float32)
    q = Quantization(precision, WIDTH, np.stack([corpus.min(0), corpus.max(0)])
                     if precision in RANGED else None)
    stored = q.apply(corpus)
    for multiplier, rescore_nd in [(None, None), (4, None), (4, corpus)]:
        scores, rows = quantized_top_k(queries, stored, q, 10, rescore_multiplier=multiplier,
                                       rescore_nd=rescore_nd)
        want = reference_top_k(queries, corpus, precision, 10, multiplier,
                               None if rescore_nd is None else "float32")
        np.testing.assert_array_equal(rows, want, err_msg=f"{precision} x{multiplier}")
        docs = q.dequantize(stored) if rescore_nd is None else corpus
        expected = (np.take_along_axis(queries @ docs.T, rows, 1) if multiplier
                    else np.take_along_axis(q.scores(queries, stored), rows, 1))
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="rescoring needs a quantized corpus"):
        quantized_top_k(queries, corpus, Quantization("float32", WIDTH), 3,
                        rescore_multiplier=2)
