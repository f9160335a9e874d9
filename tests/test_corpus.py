"""The corpus job: chunked sources with ids, the three sinks, and every command under 1, 2
and 3 processes joined by jax.distributed on localhost (gloo), killed and restarted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import free_port, max_rel_err

import cde_jax
from cde_jax.corpus import InputError, job, lines, open_chunks, sinks
from cde_jax.evaluation import evaluate_retrieval, load_beir

# Bytes that exercise line splitting: a BOM, CRLF, empty lines, no final newline.
TRICKY = b"\xef\xbb\xbffirst\r\nsecond\n\n\nfifth \xc3\xa9\r\n\nlast"


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 7, 100])
def test_chunks_read_what_lines_reads(tmp_path, chunk_rows):
    path = tmp_path / "in.txt"
    path.write_bytes(TRICKY)
    source = open_chunks(path, chunk_rows)
    want = [text for _, text in lines(path)]
    assert source.rows == len(want) == 7
    got = [(record_id, text) for i in range(len(source)) for record_id, text
           in zip(source[i].ids, source[i].texts)]
    assert got == list(zip(range(1, 8), want))
    assert want[0] == "first" and want[4] == "fifth é" and want[-1] == "last"


def test_ids_from_a_field_and_repeats_named_by_line(tmp_path):
    rows = [{"_id": f"d{i % 5}", "text": f"t{i}"} for i in range(8)]  # d0 repeats on line 6
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = open_chunks(path, 3, id_field="_id")
    assert source[0].ids == ["d0", "d1", "d2"] and source[1].texts == ["t3", "t4", "t5"]
    with pytest.raises(InputError, match=r"in.jsonl: line 6: id 'd0' repeats line 1's"):
        job.validate(source)
    rows[6]["_id"] = 7  # an integer among strings
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"line 7: id 7 is a number, but line 1's is a string"):
        open_chunks(path, 3, id_field="_id")[2]


# --- processes: the command runs are module fixtures -------------------------------------
def run_processes(n, *args, popen=False):
    """`cde-jax ARGS` on n processes, joined by jax.distributed when n > 1: each one's
    (returncode, stderr), or with `popen=True` the running processes."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port = free_port()
    procs = []
    for i in range(n):
        extra = () if n == 1 else ("--coordinator", f"127.0.0.1:{port}", "--num-processes", n,
                                   "--process-id", i)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cde_jax.cli", *map(str, args + extra)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    if popen:
        return procs
    outs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


def ok(results):
    for code, err in results:
        assert code == 0, err[-3000:]
    return results


@pytest.fixture(scope="module")
def corpus(tiny_checkpoint, random_docs, tmp_path_factory):
    """(model dir, dataset-embeddings file, a 60-line .jsonl with string ids)."""
    tmp = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    texts = [" ".join(d.split()[:rng.randint(1, 30)]) for d in random_docs[:60]]
    path = tmp / "in.jsonl"
    path.write_text("".join(json.dumps({"_id": f"doc-{i}", "text": t}) + "\n"
                            for i, t in enumerate(texts)))
    model = tiny_checkpoint[1]
    ok(run_processes(1, "dataset-embeddings", "--model", model, "--input", path, "--seed", 0,
               "--out", tmp / "ds.npz", "--batch-size", 8))
    return model, tmp / "ds.npz", path


def embed_args(corpus, out, chunk_size=4):
    model, dataset, path = corpus
    return ("embed", "--model", model, "--input", path, "--id-field", "_id", "--role",
            "document", "--dataset-embeddings", dataset, "--out", out, "--chunk-size",
            chunk_size, "--batch-size", 8)


def output_bytes(out) -> dict[str, bytes]:
    out = str(out)
    if not os.path.isdir(out):
        return {"": open(out, "rb").read()}
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(out) for f in files}


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """One process, .npy with its ids: the reference of every multi-process run (15 chunks)."""
    tmp = tmp_path_factory.mktemp("single")
    ok(run_processes(1, *embed_args(corpus, tmp / "one.npy")))
    return tmp / "one.npy"


@pytest.fixture(scope="module")
def many(corpus, tmp_path_factory):
    """{(processes, format): output}: 2 processes into one .zarr (also the uninterrupted run
    that a killed one must equal), 3 into one int8 .parquet (each process embeds its share of
    the calibration sample)."""
    tmp = tmp_path_factory.mktemp("many")
    outs = {(2, "zarr"): tmp / "2" / "many.zarr", (3, "parquet"): tmp / "3" / "many.parquet"}
    for (n, fmt), out in outs.items():
        out.parent.mkdir()
        precision = ("--precision", "int8") if fmt == "parquet" else ()
        ok(run_processes(n, *embed_args(corpus, out), *precision))
    return outs


@pytest.mark.parametrize("n,fmt", [(2, "zarr"), (3, "parquet")])
def test_processes_write_one_output_with_ids(single, many, n, fmt):
    out = many[n, fmt]
    want_ids, want = cde_jax.read_embeddings(single)
    ids, got = stored = cde_jax.read_embeddings(out)
    assert list(ids) == [f"doc-{i}" for i in range(60)] == list(want_ids)
    if fmt == "parquet":  # int8: ranges from all 60 rows, levels within float32 noise
        q = stored.quantization
        assert max_rel_err(q.ranges, np.stack([want.min(0), want.max(0)])) <= 1e-6
        levels = np.abs(got.astype(int) - q.apply(want))
        assert q.precision == "int8" and levels.max() <= 1 and (levels == 0).mean() >= 0.99
        got = q.dequantize(got)  # within half a step
        assert np.abs(got - want).max() <= ((q.ranges[1] - q.ranges[0]) / 255).max() * 0.51
    else:
        err = max_rel_err(got, want)
        print(f"1 vs {n} processes ({fmt}): max rel err {err:.2e}")
        assert err <= 1e-6
    assert sorted(os.listdir(out.parent)) == [f"many.{fmt}"]  # no parts, locks or temp files


@pytest.fixture(scope="module")
def seven_rows(corpus, tmp_path_factory):
    """7 rows in chunks of 4: two chunks, so the third process has nothing to embed but joins
    every step."""
    tmp = tmp_path_factory.mktemp("seven_rows")
    model, dataset, path = corpus
    short = tmp / "seven.jsonl"
    short.write_text("".join(path.read_text().splitlines(keepends=True)[:7]))
    ok(run_processes(3, *embed_args((model, dataset, short), tmp / "three.zarr")))
    return tmp / "three.zarr"


def test_seven_rows_on_three_processes(single, seven_rows):
    ids, three = cde_jax.read_embeddings(seven_rows)
    assert list(ids) == [f"doc-{i}" for i in range(7)]
    assert max_rel_err(three, cde_jax.read_embeddings(single).values[:7]) <= 1e-6


def committed(out) -> int:
    ids = os.path.join(out, "ids")
    return len([f for f in os.listdir(ids) if f.endswith(".json")]) if os.path.isdir(ids) else 0


def kill_mid_run(args, out, n):
    """Starts n processes, SIGKILLs one once 2 chunks are committed, then the others (they
    would wait for it in their next collective)."""
    procs = run_processes(n, *args, popen=True)
    deadline = time.monotonic() + 300
    while committed(out) < 2:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    procs[-1].send_signal(signal.SIGKILL)
    time.sleep(0.2)
    for p in procs:
        p.kill()
        p.communicate()
    return committed(out)


KILLS = [(2, 2), (2, 3)]


@pytest.fixture(scope="module")
def killed_and_restarted(corpus, tmp_path_factory):
    """{(first, then): (chunks done when killed, output, the restart's first stderr)}: 15
    chunks embedded by `first` processes, killed, then restarted with `then`."""
    tmp = tmp_path_factory.mktemp("killed_and_restarted")
    runs = {}
    for first, then in KILLS:
        out = tmp / f"{first}-{then}" / "emb.zarr"
        out.parent.mkdir()
        args = embed_args(corpus, out)
        done = kill_mid_run(args, out, first)
        exists = sinks.exists(out)
        runs[first, then] = (done, exists, out, ok(run_processes(then, *args))[0][1])
    return runs


@pytest.mark.parametrize("first,then", KILLS)
def test_kill_9_then_restart_resumes(single, many, killed_and_restarted, first, then):
    """Restarted with as many processes: the bytes of the uninterrupted run; with another
    count: the same rows."""
    done, existed, out, stderr = killed_and_restarted[first, then]
    assert 2 <= done < 15 and not existed
    assert f"resuming {out}" in stderr
    if then == 2:
        assert output_bytes(out) == output_bytes(many[2, "zarr"])
    ids, got = cde_jax.read_embeddings(out)
    assert list(ids) == [f"doc-{i}" for i in range(60)]
    assert max_rel_err(got, cde_jax.read_embeddings(single).values) <= 1e-6


@pytest.fixture(scope="module")
def two_process_commands(corpus, random_docs, tmp_path_factory):
    """`dataset-embeddings` (seed 3) and `eval` (on a BEIR dir, the corpus int8, the best 20
    rescored: each process rescores its own documents) on two processes: (their output
    files, the BEIR dir)."""
    tmp = tmp_path_factory.mktemp("two_process_commands")
    from test_evaluation import write_beir

    model_dir, _, path = corpus
    ok(run_processes(2, "dataset-embeddings", "--model", model_dir, "--input", path, "--seed", 3,
               "--out", tmp / "ds2.npz", "--batch-size", 8))
    write_beir(tmp / "beir", random_docs)
    ok(run_processes(2, "eval", "--model", model_dir, "--dataset", tmp / "beir", "--out",
               tmp / "r2.json", "--k", "1,5", "--batch-size", 8, "--precision", "int8",
               "--rescore-multiplier", 2))
    return tmp / "ds2.npz", tmp / "r2.json", tmp / "beir"


def test_dataset_embeddings_and_eval_on_two_processes(corpus, two_process_commands):
    """Two processes against one (this process: test_cli and test_evaluation check that the
    one-process commands equal these calls)."""
    model_dir, _, path = corpus
    ds_file, report, beir = two_process_commands
    model = cde_jax.load(model_dir)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 60 texts for 512: oversampled
        one = model.embed_dataset(texts, seed=3, batch_size=8)
    two = np.load(ds_file)["embeddings"]
    assert one.shape == (512, 64) and max_rel_err(two, one) <= 1e-6

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = evaluate_retrieval(model, load_beir(beir), [1, 5], batch_size=8,
                                 show_progress_bar=False, precision="int8",
                                 rescore_multiplier=2)
    result = json.loads(report.read_text())
    two = result["metrics"]
    assert (result["precision"], result["rescore_multiplier"]) == ("int8", 2)
    assert two == pytest.approx(one, abs=1e-12) and one["ndcg@5"] > 0


@pytest.fixture(scope="module")
def two_process_training(tiny_checkpoint, random_docs, tmp_path_factory):
    """4 steps on one process; on two, process 1 SIGKILLed when it asks for the 4th batch
    (after the step-2 checkpoint, which both wait for), then both restarted with --resume.
    (the two output dirs)"""
    tmp = tmp_path_factory.mktemp("two_process_training")
    from test_training import retrieval_examples, write_jsonl

    data = write_jsonl(tmp / "train.jsonl", retrieval_examples(random_docs, 48))

    def args(out):
        return ("train", "--model", tiny_checkpoint[0], "--data", data, "--out", out,
                "--total-steps", 4, "--batch-size", 8, "--learning-rate", "1e-3",
                "--query-length", 24, "--document-length", 48, "--checkpoint-every", 2,
                "--seed", 1)

    ok(run_processes(1, *args(tmp / "one")))
    port, killed = free_port(), tmp / "two"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "train_killed.py"),
         str(3 if i == 1 else 10 ** 9), *map(str, args(killed)), "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    assert procs[1].wait(timeout=600) == -signal.SIGKILL, procs[1].communicate()[1][-3000:]
    procs[0].kill()
    procs[0].communicate()
    ok(run_processes(2, *args(killed), "--resume"))
    return tmp / "one", killed


def test_training_on_two_processes_equals_one_and_resumes(two_process_training):
    logs = [[json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            for out in two_process_training]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    # Step 1 starts from the same parameters: float32 agreement. Later steps start from
    # parameters that AdamW has moved apart by up to ~lr (below), so they agree less closely.
    for one, two in zip(*logs):
        loss_tol, grad_tol = (1e-5, 1e-4) if one["step"] == 1 else (1e-4, 1e-3)
        assert abs(one["loss"] - two["loss"]) <= loss_tol * one["loss"], (one, two)
        assert abs(one["grad_norm"] - two["grad_norm"]) <= grad_tol * one["grad_norm"], (one,
                                                                                        two)
    print("trained 1 vs 2 processes, loss rel diff per step:",
          [f"{abs(a['loss'] - b['loss']) / a['loss']:.1e}" for a, b in zip(*logs)])
    from safetensors.numpy import load_file
    a, b = (load_file(str(out / "model" / "model.safetensors")) for out in two_process_training)
    # AdamW divides each update by the root of its squared-gradient average, so an element
    # whose gradient is ~0 moves by up to the learning rate either way on summation-order
    # noise: parameters agree to ~lr, not to float precision (loss and gradients do).
    worst = max(float(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max()) for k in a)
    print(f"trained 1 vs 2 processes (killed and resumed): worst tensor rel diff {worst:.2e}")
    assert worst <= 2e-3
