"""Corpora and outputs in buckets (issue 32), against real protocols on 127.0.0.1: moto's S3
server for s3:// and gcp-storage-emulator for gs:// (tests/object_stores.py), reached the
standard way (AWS_ENDPOINT_URL + AWS_* credentials, STORAGE_EMULATOR_HOST).

What the emulators lack, and so what is tested where:
- gcp-storage-emulator ignores ifGenerationMatch=0 (an existing object is overwritten), so
  the conditional create of the one-writer lock is tested on S3 (moto honours
  If-None-Match: *, answering 412); on gs:// the lock's read-before-create refusal is.
- gcp-storage-emulator ignores a listing's startOffset/endOffset, which tensorstore's gcs
  kvstore sends: every object in the output bucket is kept at least as long as the listed
  prefix (tensorstore aborts on a shorter one).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from object_stores import GcsServer, S3Server, free_port

REPO = Path(__file__).resolve().parents[1]
CHUNK = 4


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The two servers; this process's environment points at them while the module runs
    (for the test's own reads, as user "tester")."""
    s3 = S3Server()
    gcs = GcsServer(tmp_path_factory.mktemp("gcs"))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {**s3.env("tester"), **gcs.env()}.items():
            patch.setenv(name, value)
        yield {"s3": s3, "gcs": gcs}
    s3.stop()
    gcs.stop()


def env_of(stores, key: str = "p0") -> dict:
    return {**os.environ, **stores["s3"].env(key), **stores["gcs"].env(),
            "JAX_PLATFORMS": "cpu", "CDE_JAX_STORAGE_RETRIES": "2",
            "CDE_JAX_PEER_TIMEOUT": "20"}


def in_process(stores):
    """`cde_jax.storage`, for the test's own reads (the `stores` fixture set the env)."""
    from cde_jax import storage

    return storage


def start(stores, *args, key: str = "p0") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cde_jax.cli", *map(str, args)], cwd=REPO,
                            env=env_of(stores, key), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def embed_args(inputs: dict, source, out) -> tuple:
    return ("embed", "--model", inputs["model"], "--input", source, "--id-field", "_id",
            "--role", "document", "--dataset-embeddings", inputs["ctx"], "--out", out,
            "--chunk-size", CHUNK, "--batch-size", 8, "-q")


def two_processes(stores, *args) -> list[tuple[int, str]]:
    port = free_port()
    procs = [start(stores, *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                   "--process-id", i, key=f"p{i}") for i in range(2)]
    return [finish(p) for p in procs]


def last_line(err: str) -> str:
    return err.rstrip("\n").splitlines()[-1]


@pytest.fixture(scope="module")
def inputs(stores, tiny_checkpoint, ctx_npz, random_docs, tmp_path_factory):
    """A 60-line corpus, local and at s3://cde-in/corpus.jsonl, and the local reference: one
    process, local in, local .zarr out."""
    tmp = tmp_path_factory.mktemp("buckets")
    texts = [" ".join(d.split()[:1 + i % 30]) for i, d in enumerate(random_docs[:60])]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"doc-{i}", "text": t}) + "\n"
                              for i, t in enumerate(texts)))
    storage = in_process(stores)
    fs = storage.filesystem("s3://cde-in/x")
    fs.mkdir("cde-in")
    fs.pipe_file("cde-in/corpus.jsonl", corpus.read_bytes())
    fs.pipe_file("cde-in/dataset-embeddings.npz", Path(ctx_npz).read_bytes())
    found = {"model": tiny_checkpoint[1], "ctx": ctx_npz, "local": corpus,
             "url": "s3://cde-in/corpus.jsonl", "size": corpus.stat().st_size,
             "ref": tmp / "ref.zarr"}
    code, err = finish(start(stores, *embed_args(found, corpus, found["ref"])))
    assert code == 0, err[-3000:]
    return found


def read(path):
    from cde_jax.corpus import read_embeddings

    return read_embeddings(path)


def test_two_processes_embed_s3_input_into_a_gcs_zarr_as_one_local_process(stores, inputs):
    """Each process fetches only its share of the input (bytes counted by the S3 server per
    access key), and the rows equal a local one-process run's."""
    stores["s3"].fetched.clear()
    out = "gs://cde-out/two-processes.zarr"
    from_bucket = {**inputs, "ctx": "s3://cde-in/dataset-embeddings.npz"}
    results = two_processes(stores, *embed_args(from_bucket, inputs["url"], out))
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    in_process(stores)
    ids, values = read(out)
    ref_ids, ref_values = read(inputs["ref"])
    assert ids.tolist() == ref_ids.tolist()
    assert np.abs(values - ref_values).max() <= 1e-6
    ctx = Path(inputs["ctx"]).stat().st_size  # each process reads the whole .npz
    share, index = inputs["size"] / 2, 1024 + ctx  # the index: line 1 and the last byte
    fetched = {key: stores["s3"].fetched[key] for key in ("p0", "p1")}
    print(f"bytes fetched per process of {inputs['size']}: {fetched}")
    for key, n in fetched.items():
        assert 0 < n <= share + 0.1 * inputs["size"] + index, (key, fetched)
    # A second run on the finished output: refused as locally.
    code, err = finish(start(stores, *embed_args(inputs, inputs["url"], out)))
    assert code == 2
    assert last_line(err) == f"cde-jax embed: error: {out} already exists (pass --overwrite " \
                             "to replace it)"


def test_a_live_lock_refuses_and_a_dead_runs_lock_is_taken_over(stores, inputs):
    """The lock object is created only if absent (S3 If-None-Match: *): a live owner's refuses
    the run; one whose pid is gone on this host is taken over."""
    storage = in_process(stores)
    out = "s3://cde-in/locked.zarr"
    from cde_jax import outputs

    alive = {"host": outputs._HOST, "pid": os.getpid(),
             "expires": time.time() + 60}
    assert storage.create(out + ".lock", json.dumps(alive).encode())
    assert not storage.create(out + ".lock", b"{}")  # the store's conditional create
    code, err = finish(start(stores, *embed_args(inputs, inputs["url"], out)))
    assert code == 2
    assert last_line(err) == (f"cde-jax embed: error: {out} is being written by another run "
                              f"(pid {os.getpid()} on {alive['host']})")
    storage.write(out + ".lock", json.dumps({**alive, "pid": 2 ** 22 + 17}).encode())
    code, err = finish(start(stores, *embed_args(inputs, inputs["url"], out)))
    assert code == 0, err[-2000:]
    assert storage.read(out + ".lock") is None  # removed at the end
    assert np.array_equal(read(out).values, read(inputs["ref"]).values)


def committed(storage, out: str) -> int:
    """Chunks committed so far (a fresh listing, not fsspec's cached one)."""
    fs = storage.filesystem(out)
    fs.invalidate_cache()
    return len(fs.glob(out[5:] + "/ids/*.json"))


def embedding_until(stores, inputs, out: str, chunks: int) -> tuple[subprocess.Popen, str]:
    """A one-process embed into `out` (or `out` renamed, on another try), once it has
    committed `chunks` chunks and not all of them: (the process, its output). A run that
    finished between two looks (the 15 chunks can all land within one listing of a loaded
    emulator) is tried again under a new name, up to three times."""
    storage = in_process(stores)
    for attempt in range(3):
        target = out if attempt == 0 else out.replace(".zarr", f"-{attempt}.zarr")
        proc = start(stores, *embed_args(inputs, inputs["url"], target))
        deadline = time.monotonic() + 120
        while committed(storage, target) < chunks and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if proc.poll() is None:
            return proc, target
        assert proc.returncode == 0, proc.communicate()[1][-2000:]
    raise AssertionError("three runs finished before they could be stopped mid-run")


def test_kill_9_mid_run_then_rerun_is_byte_identical(stores, inputs):
    proc, out = embedding_until(stores, inputs, "gs://cde-out/killed-run.zarr", 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from cde_jax.corpus import sinks

    assert not sinks.exists(out)
    code, err = finish(start(stores, *embed_args(inputs, inputs["url"], out)))
    assert code == 0, err[-2000:]
    assert read(out).values.tobytes() == read(inputs["ref"]).values.tobytes()


def test_processes_that_disagree_are_refused(stores, inputs):
    port = free_port()
    out = "gs://cde-out/disagree.zarr"
    procs = [start(stores, *embed_args(inputs, inputs["url"], out), "--coordinator",
                   f"127.0.0.1:{port}", "--num-processes", 2, "--process-id", i,
                   *(["--precision", "float16"] if i else []), key=f"p{i}") for i in range(2)]
    results = [finish(p) for p in procs]
    assert all(code != 0 for code, _ in results), results
    assert "--precision" in results[0][1], results[0][1][-2000:]
    from cde_jax.corpus import sinks

    in_process(stores)
    assert not sinks.exists(out)


@pytest.mark.parametrize(("url", "cause"), [
    ("gs://no-such-bucket/out.zarr", "bucket 'no-such-bucket' does not exist"),
    ("s3://no-such-bucket/out.zarr", "bucket 'no-such-bucket' does not exist")])
def test_a_missing_bucket_is_one_line_before_any_work(stores, inputs, url, cause):
    code, err = finish(start(stores, *embed_args(inputs, inputs["url"], url)))
    assert code == 2
    assert err.strip().splitlines() == [f"cde-jax embed: error: {url}: {cause}"], err[-2000:]


def test_an_input_in_a_missing_bucket_is_one_line(stores, inputs, tmp_path):
    url = "s3://no-such-bucket/corpus.jsonl"
    code, err = finish(start(stores, *embed_args(inputs, url, tmp_path / "o.zarr")))
    assert code == 2
    assert last_line(err) == f"cde-jax embed: error: {url}: no such file", err[-2000:]
    assert not (tmp_path / "o.zarr").exists()


def test_a_url_without_the_cloud_extra_is_one_line(tmp_path):
    """gcsfs / s3fs missing (blocked from import): one line naming the extra."""
    code = ("import sys; sys.modules['gcsfs'] = None; sys.modules['s3fs'] = None\n"
            "from cde_jax.cli import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, "embed", "--model", "m", "--input",
                           "gs://bucket/corpus.txt", "--role", "query",
                           "--dataset-embeddings", "fallback", "--out", tmp_path / "o.npy"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "cde-jax embed: error: gs:// paths need the cloud extra: pip install 'cde-jax[cloud]'")


def test_503_and_500_are_retried(stores):
    """S3 throttles with 503 SlowDown (botocore's standard retry mode retries it and 5xx;
    a bare 429 is not an S3 answer, which it does not retry)."""
    storage = in_process(stores)
    url = "s3://cde-in/retried.txt"
    storage.write(url, b"hello")
    stores["s3"].fail_next(2, 503)
    stores["s3"].fail_next(1, 500)
    assert storage.read(url) == b"hello"
    assert not stores["s3"].failures  # all three were answered, and retried


def test_the_store_going_away_is_one_line_and_the_rerun_is_byte_identical(stores, inputs):
    proc, out = embedding_until(stores, inputs, "gs://cde-out/store-gone.zarr", 1)
    proc.send_signal(signal.SIGSTOP)  # held while the store goes, so it cannot finish first
    stores["gcs"].stop()
    proc.send_signal(signal.SIGCONT)
    try:
        code, err = finish(proc)
    finally:
        stores["gcs"] = stores["gcs"].restart()
    print("the store went away:", last_line(err))
    assert code != 0
    assert "Traceback" not in err, err[-3000:]
    # One line of ours. With an emulator (no Google credentials), tensorstore's C++ log says
    # so first, in its own line: not ours to silence (absl logging of the extension).
    ours = [line for line in err.strip().splitlines() if "google_auth_provider" not in line]
    assert len(ours) == 1, err[-3000:]
    assert out in last_line(err)
    from cde_jax.corpus import sinks

    assert not sinks.exists(out)
    code, err = finish(start(stores, *embed_args(inputs, inputs["url"], out)))
    assert code == 0, err[-2000:]
    assert read(out).values.tobytes() == read(inputs["ref"]).values.tobytes()


def test_a_dataset_embeddings_file_both_ways(stores, ctx_npz):
    from cde_jax.minicorpus import DatasetEmbeddings

    local = np.load(ctx_npz)
    made = DatasetEmbeddings(local["embeddings"], str(local["fingerprint"]), str(local["prefix"]),
                             int(local["seed"]))
    for url in ("gs://cde-out/dataset-embeddings-file.npz", "s3://cde-in/dataset.npz"):
        assert made.save(url) == url
        back = DatasetEmbeddings.load(url, fingerprint=made.fingerprint, width=64)
        assert back.embeddings.tobytes() == made.embeddings.tobytes()
        assert (back.fingerprint, back.prefix, back.seed) == (made.fingerprint, made.prefix,
                                                              made.seed)


def test_load_from_a_bucket_equals_the_local_load(stores, tiny_checkpoint, ctx_npz, tmp_path,
                                                  monkeypatch):
    import cde_jax
    from cde_jax import bucket_cache

    storage = in_process(stores)
    monkeypatch.setenv("CDE_JAX_BUCKET_CACHE", str(tmp_path / "cache"))
    url = "s3://cde-in/models/tiny-converted"
    storage.filesystem(url).put(str(tiny_checkpoint[1]) + "/", url[5:], recursive=True)
    texts = ["a bucket", "holds the model"]
    local = cde_jax.load(tiny_checkpoint[1]).encode_query(texts, dataset_embeddings=str(ctx_npz))
    remote = cde_jax.load(url).encode_query(texts, dataset_embeddings=str(ctx_npz))
    assert remote.tobytes() == local.tobytes()
    copied = tmp_path / "cache" / "s3" / "cde-in" / "models" / "tiny-converted"
    assert copied.is_dir()
    stamp = (copied / bucket_cache.STAMP).stat().st_mtime_ns
    cde_jax.load(url)  # unchanged objects: the copy is reused, not fetched again
    assert (copied / bucket_cache.STAMP).stat().st_mtime_ns == stamp


@pytest.mark.parametrize(("command", "flag"), [("train", "--out"), ("cluster", "--data")])
def test_paths_that_cannot_be_urls_yet_are_one_line(command, flag, tmp_path):
    args = {"train": ["--model", "m", "--data", "d.jsonl", "--out", "gs://b/run",
                      "--batch-size", "2", "--total-steps", "1"],
            "cluster": ["--model", "m", "--data", "gs://b/pairs.jsonl", "--out", "o.jsonl",
                        "--batch-size", "2"]}
    proc = subprocess.run([sys.executable, "-m", "cde_jax.cli", command, *args[command]],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert f"`cde-jax {command} {flag}` takes a local path" in line, proc.stderr[-2000:]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_an_input_in_a_bucket_reads_as_the_local_file(stores, tmp_path, suffix):
    """Chunks (ids, texts), row count and id kind of s3:// and gs:// inputs equal the local
    file's; with one process, the share is the whole file, fetched once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cde_jax.corpus import open_chunks

    storage = in_process(stores)
    texts = [f"text {i} " + "word " * (i % 7) for i in range(23)] + [""]
    local = tmp_path / f"input{suffix}"
    if suffix == ".txt":
        local.write_text("\n".join(texts))  # no final newline: the last line still counts
    elif suffix == ".jsonl":
        local.write_text("".join(json.dumps({"id": f"x{i}", "text": t}) + "\n"
                                 for i, t in enumerate(texts)))
    else:
        pq.write_table(pa.table({"id": [f"x{i}" for i in range(len(texts))], "text": texts}),
                       local, row_group_size=5)
    id_field = None if suffix == ".txt" else "id"
    want = open_chunks(local, 5, id_field=id_field)
    for url in (f"s3://cde-in/inputs/input{suffix}", f"gs://cde-out/inputs-long-name{suffix}"):
        storage.write(url, local.read_bytes())
        got = open_chunks(url, 5, id_field=id_field)
        assert (got.rows, len(got), got.id_kind) == (want.rows, len(want), want.id_kind)
        assert [got[i] for i in range(len(got))] == [want[i] for i in range(len(want))]
