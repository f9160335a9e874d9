"""The faults of real clusters (issue 23): preemption signals, processes started with other
arguments, a dead or missing peer, a full disk, text the tokenizer refuses, and smaller
cases. Each runs the real command (two processes joined by jax.distributed on localhost
with gloo, as tests/test_corpus.py starts them) and checks the one line a user sees, the exit
status and what is left on disk, then that the same command resumes.

The command runs are module fixtures and run side by side within each (their waits for a
peer's timeout overlap), with a peer timeout of PEER_TIMEOUT seconds. The full disk is a
small tmpfs where the tests may mount one (as root), else RLIMIT_FSIZE on the command: a
real failed write either way, with no seam in the package.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, max_rel_err
from test_corpus import committed

import cde_jax
from cde_jax import distributed, stopping
from cde_jax.corpus import InputError, open_chunks, sinks
from cde_jax.corpus.npy import ResumableArray
from cde_jax.evaluation import load_beir
from cde_jax.minicorpus import DatasetEmbeddings
from cde_jax.training.data import read_examples
from cde_jax.validation import UserError

REPO = Path(__file__).resolve().parents[1]
PEER_TIMEOUT = 10
RESUME = "the committed chunks are kept: run the same command again on every process to resume"
TERMINATED = "cde-jax embed: terminated: run the same command again to resume"
# What a user must never see: a Python traceback, JAX's C++ fatal log and stack dump.
NOISE = re.compile(r"Traceback|^[EF]\d{4} \d\d:|Check failure|^\s+@\s+0x", re.M)
FORMATS = ("npy", "parquet", "zarr")


def start(*args, disk: SmallDisk | None = None) -> subprocess.Popen:
    """`cde-jax ARGS` (under `disk`'s file-size limit, if it has one)."""
    argv = [sys.executable, "-m", "cde_jax.cli", *map(str, args)]
    if disk is not None and disk.limited:
        argv = [sys.executable, "-c", LIMITED, str(disk.limit), *argv]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                            distributed.PEER_TIMEOUT_ENV: str(PEER_TIMEOUT)})


def start_run(*per_process, n: int = 2) -> list[subprocess.Popen]:
    """Processes 0..len(per_process)-1 of an n-process run, each with its own arguments."""
    port = free_port()
    return [start(*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", n,
                  "--process-id", i) for i, args in enumerate(per_process)]


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    """(exit status, stderr) once it ends."""
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def last_line(err: str) -> str:
    """The last line a user sees (a progress bar may precede it on the same line in \\r)."""
    return err.rstrip("\n").splitlines()[-1]


# Runs argv[2:] with RLIMIT_FSIZE = argv[1] bytes: writes past that in one file fail (EFBIG).
LIMITED = ("import os, resource, sys\n"
           "limit = int(sys.argv[1])\n"
           "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
           "os.execv(sys.argv[2], sys.argv[2:])\n")


class SmallDisk:
    """A directory whose writes fail: a tmpfs of `size` bytes where the tests may mount one,
    else a plain directory whose commands run with RLIMIT_FSIZE = `limit` (a write past
    `limit` bytes of one file fails: "File too large"). CDE_TEST_NO_MOUNT=1 takes the second
    way. `grow()` makes room."""

    def __init__(self, path: Path, size: int = 48 << 10, limit: int = 768):
        path.mkdir(parents=True)
        self.path, self.limit = path, limit
        self.mounted = os.environ.get("CDE_TEST_NO_MOUNT") != "1" and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True).returncode == 0
        self.limited = not self.mounted

    def grow(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,size=16m", str(self.path)], check=True)
        self.limited = False

    def close(self) -> None:
        if self.mounted:  # lazily: a reader's memory map may still hold a file
            subprocess.run(["umount", "--lazy", str(self.path)], check=True)


def embed_args(inputs: dict, out, source=None, chunk_size: int = 4) -> tuple:
    return ("embed", "--model", inputs["model"], "--input", source or inputs["a"],
            "--id-field", "_id", "--role", "document", "--dataset-embeddings", inputs["ctx"],
            "--out", out, "--chunk-size", chunk_size, "--batch-size", 8, "-q")


def wait_for(done, procs, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not done():
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint, ctx_npz, random_docs, tmp_path_factory):
    """Two 60-line corpora with the same ids (`a`, `b`), and the reference: `a` embedded by
    one uninterrupted process into a .npy (which also fills the compile cache that every
    later run reads)."""
    tmp = tmp_path_factory.mktemp("inputs")
    texts = [" ".join(d.split()[:1 + i % 30]) for i, d in enumerate(random_docs[:60])]
    for name, order in (("a", texts), ("b", texts[::-1])):
        (tmp / f"{name}.jsonl").write_text("".join(
            json.dumps({"_id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(order)))
    found = {"model": tiny_checkpoint[1], "ctx": ctx_npz, "a": tmp / "a.jsonl",
             "b": tmp / "b.jsonl", "ref": tmp / "ref.npy"}
    code, err = finish(start(*embed_args(found, found["ref"])))
    assert code == 0, err[-3000:]
    return found


def killed(inputs: dict, out: Path, victim: int) -> dict:
    """Two processes; `victim` SIGKILLed once 2 chunks are committed; the other's end."""
    procs = start_run(embed_args(inputs, out), embed_args(inputs, out))
    wait_for(lambda: committed(out) >= 2, procs, "2 chunks committed")
    at_kill = committed(out)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    code, err = finish(procs[1 - victim])
    return {"code": code, "err": err, "seconds": time.monotonic() - killed_at,
            "victim": finish(procs[victim])[0], "at_kill": at_kill, "after": committed(out),
            "complete": sinks.exists(out)}


def terminated(inputs: dict, out: Path) -> dict:
    """Two processes; SIGTERM to process 1 alone once 2 chunks are committed; then the same
    command again. Chunks of one text: 58 chunks are left when the signal goes (with 4 texts
    a chunk, the 13 left could all commit before it arrived, and the run end with 0)."""
    args = embed_args(inputs, out, chunk_size=1)
    procs = start_run(args, args)
    wait_for(lambda: committed(out) >= 2, procs, "2 chunks committed")
    procs[1].send_signal(signal.SIGTERM)
    stopped = [finish(p) for p in procs]
    complete = sinks.exists(out)
    again = [finish(p) for p in start_run(args, args)]
    return {"stopped": stopped, "complete": complete, "again": again,
            "read": cde_jax.read_embeddings(out)}


def disagreeing(inputs: dict, out: Path) -> dict:
    """Process 0 with --input a, process 1 with --input b."""
    results = [finish(p) for p in start_run(embed_args(inputs, out),
                                            embed_args(inputs, out, inputs["b"]))]
    return {"results": results, "left": sorted(p.name for p in out.parent.iterdir())}


def missing(inputs: dict, out: Path) -> dict:
    """Process 0 of 2, alone."""
    begin = time.monotonic()
    code, err = finish(start_run(embed_args(inputs, out))[0])
    return {"code": code, "err": err, "seconds": time.monotonic() - begin}


@pytest.fixture(scope="module")
def peers(inputs, tmp_path_factory):
    """The two-process cases, side by side: {case: what happened}."""
    tmp = tmp_path_factory.mktemp("peers")
    cases = {"terminated": terminated, "killed 1": lambda i, o: killed(i, o, 1),
             "killed 0": lambda i, o: killed(i, o, 0), "disagree": disagreeing,
             "missing": missing}
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {}
        for name, case in cases.items():
            (tmp / name).mkdir()
            futures[name] = pool.submit(case, inputs, tmp / name / "out.zarr")
        return {name: f.result() for name, f in futures.items()}


# Formats whose run on a full disk is resumed: the .npy journal and the .zarr markers (a
# .parquet's parts commit as the .zarr's ids do; resuming after a kill: tests/test_corpus.py).
RESUMED = ("npy", "zarr")


def full_disk(inputs: dict, tmp: Path, fmt: str) -> dict:
    """`embed` into a small disk: the failed run, then (`RESUMED`) the same command with
    room."""
    disk = SmallDisk(tmp / f"disk-{fmt}")
    try:
        out = disk.path / f"out.{fmt}"
        code, err = finish(start(*embed_args(inputs, out), disk=disk))
        complete = sinks.exists(out)
        if fmt not in RESUMED:
            return {"code": code, "err": err, "complete": complete}
        disk.grow()
        again = finish(start(*embed_args(inputs, out)))
        ids, values = cde_jax.read_embeddings(out) if again[0] == 0 else (None, None)
        return {"code": code, "err": err, "complete": complete, "again": again,
                "read": (ids, None if values is None else np.array(values))}
    finally:
        disk.close()


# The other writers, each inside `outputs.claim` on a full disk (the CLI's log settings).
OTHER_WRITERS = """
import json, sys
from pathlib import Path
import numpy as np
from cde_jax import cli, outputs
from cde_jax.convert import released
from cde_jax.minicorpus import DatasetEmbeddings
from cde_jax.training.checkpoint import Checkpoints, TrainState
from cde_jax.validation import UserError

cli.quiet_logs()
disk = Path(sys.argv[1])
with open(disk / "filler", "wb", buffering=0) as filler:  # fill the disk, keep 2 pages
    try:
        while True:
            filler.write(bytes(4096))
    except OSError:
        filler.truncate(max(0, filler.tell() - 8192))
rows = np.random.default_rng(0).random((512, 64), np.float32)

def checkpoint(out):
    saved = Checkpoints(out / "checkpoints")
    try:
        saved.save(TrainState(1, {"w": rows}, {"m": rows}, 0, np.zeros(2, np.uint32)))
    finally:
        saved.close()

def results(out):
    with outputs.atomic_file(out, "w") as f:
        json.dump({f"ndcg@{k}": 0.5 for k in range(1000)}, f)

writers = {"dataset.npz": lambda out: DatasetEmbeddings(rows, "f", "p", 0).save(out),
           "run": checkpoint, "model": lambda out: released.write_weights(out, {"w": rows}),
           "results.json": results}
for name, write in writers.items():
    try:
        with outputs.claim(disk / name):
            write(disk / name)
        print(f"{name}: written")
    except UserError as e:
        print(f"{name}: {e}")
"""


def other_writers(tmp: Path) -> dict:
    disk = SmallDisk(tmp / "disk-writers", limit=4096)
    try:
        argv = [sys.executable, "-c", OTHER_WRITERS, str(disk.path)]
        if disk.limited:
            argv = [sys.executable, "-c", LIMITED, str(disk.limit), *argv]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        return {"code": done.returncode, "out": done.stdout, "err": done.stderr,
                "left": sorted(p.name for p in disk.path.iterdir())}
    finally:
        disk.close()


def surrogate(inputs: dict, out: Path) -> dict:
    source = out.parent / "lone.jsonl"
    source.write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": "pair \\ud83d\\ude00"}\n'
                      '{"_id": "c", "text": "lone \\ud800 high"}\n')
    code, err = finish(start(*embed_args(inputs, out, source)))
    return {"code": code, "err": err, "left": sorted(p.name for p in out.parent.iterdir())}


@pytest.fixture(scope="module")
def alone(inputs, tmp_path_factory):
    """The one-process cases, side by side: {case: what happened}."""
    tmp = tmp_path_factory.mktemp("alone")
    (tmp / "surrogate").mkdir()
    with ThreadPoolExecutor(5) as pool:
        futures = {fmt: pool.submit(full_disk, inputs, tmp, fmt) for fmt in FORMATS}
        futures["writers"] = pool.submit(other_writers, tmp)
        futures["surrogate"] = pool.submit(surrogate, inputs, tmp / "surrogate" / "out.npy")
        return {name: f.result() for name, f in futures.items()}


# --- SIGTERM and SIGHUP ---------------------------------------------------------------------
def test_sigterm_to_one_process_stops_every_process_and_the_run_resumes(inputs, peers):
    run = peers["terminated"]
    for code, err in run["stopped"]:
        assert code == 143 and last_line(err) == TERMINATED, err[-3000:]
        assert not NOISE.search(err), err[-3000:]
    assert not run["complete"]
    for code, err in run["again"]:
        assert code == 0, err[-3000:]
    ids, got = run["read"]
    want_ids, want = cde_jax.read_embeddings(inputs["ref"])
    assert list(ids) == list(want_ids) == [f"doc-{i}" for i in range(60)]
    assert max_rel_err(got, want) <= 1e-6  # 2 processes against 1


def test_sigterm_to_a_single_process_is_one_line(monkeypatch, capsys):
    """One process (the multi-process case above runs the real command): the signal raises
    `Terminated` once, the command ends with the line and 143, the handlers come back."""
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(stopping.Terminated) as stopped, stopping.stop_signals():
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)
        finally:  # a second signal while the first one's stop runs: ignored
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
    assert stopped.value.signum == signal.SIGHUP
    assert stopping.signal_stop(signal.SIGHUP) == stopping.Stop(129, stopping.TERMINATED)
    assert signal.getsignal(signal.SIGTERM) is before

    from cde_jax import cli
    from cde_jax.commands import embed

    def preempted(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(embed, "run", preempted)
    argv = ["embed", "--model", "m", "--input", "in.txt", "--role", "query",
            "--dataset-embeddings", "fallback", "--out", "o.npy"]
    assert cli.main(argv) == 143
    assert capsys.readouterr().err == TERMINATED + "\n"


# --- one run record ---------------------------------------------------------------------------
def test_processes_that_disagree_stop_before_any_work(peers):
    run = peers["disagree"]
    lines = set()
    for code, err in run["results"]:
        assert code == 2 and not NOISE.search(err), err[-3000:]
        lines.add(last_line(err))
    assert len(lines) == 1  # every process says the same
    line = lines.pop()
    assert line.startswith("cde-jax embed: error: the processes disagree on the run: process 1 "
                           'has --input "') and "a.jsonl" in line and "b.jsonl" in line
    assert "start every process with the same command and files" in line
    assert run["left"] == []  # no output, no lock, no temp file


# --- a dead or missing peer -------------------------------------------------------------------
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_peer_ends_the_other_with_one_line(peers, victim):
    run = peers[f"killed {victim}"]
    who = "process 1" if victim else "process 0 (the coordinator)"
    assert run["victim"] == -signal.SIGKILL
    assert run["code"] == stopping.PEER_LOST, run["err"][-3000:]
    assert last_line(run["err"]) == (f"cde-jax embed: error: {who} stopped answering (nothing "
                                     f"from it for {PEER_TIMEOUT} s); {RESUME}")
    assert not NOISE.search(run["err"]), run["err"][-3000:]
    print(f"process {1 - victim} ended {run['seconds']:.1f} s after process {victim} was killed")
    assert run["seconds"] <= PEER_TIMEOUT + 20
    assert 2 <= run["at_kill"] <= run["after"] < 15 and not run["complete"]


def test_a_missing_peer_ends_the_run_with_one_line(peers):
    run = peers["missing"]
    assert run["code"] == stopping.PEER_LOST, run["err"][-3000:]
    assert re.fullmatch(
        rf"cde-jax embed: error: not all 2 processes joined the run at 127\.0\.0\.1:\d+ within "
        rf"{PEER_TIMEOUT} s; start the same command on every process \(--peer-timeout sets the "
        r"wait\)", last_line(run["err"])), run["err"][-3000:]
    assert not NOISE.search(run["err"])
    assert run["seconds"] >= PEER_TIMEOUT  # it waited, then ended by itself


# --- a full disk --------------------------------------------------------------------------------
CANNOT_WRITE = (r"cannot write (?P<path>\S+): (No space left on device|File too large) "
                r"\(nothing was marked complete; run the same command again once it can write\)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_full_disk_is_one_line_and_the_same_command_resumes(inputs, alone, fmt):
    run = alone[fmt]
    assert run["code"] == 2, run["err"][-3000:]
    assert re.fullmatch("cde-jax embed: error: " + CANNOT_WRITE + "\n", run["err"]), run["err"]
    assert not run["complete"]
    if fmt not in RESUMED:
        return
    assert run["again"][0] == 0, run["again"][1][-3000:]
    want_ids, want = cde_jax.read_embeddings(inputs["ref"])
    ids, got = run["read"]
    assert list(ids) == list(want_ids)
    np.testing.assert_array_equal(got, want)  # one process, as the reference: bit for bit


def test_the_other_writers_on_a_full_disk_are_one_line(alone):
    run = alone["writers"]
    assert run["code"] == 0 and run["err"] == "", run["err"][-3000:]
    said = dict(line.split(": ", 1) for line in run["out"].splitlines())
    assert list(said) == ["dataset.npz", "run", "model", "results.json"]
    for name, line in said.items():
        match = re.fullmatch(CANNOT_WRITE, line)
        assert match and name in match["path"], line
    assert run["left"] in (["filler"], ["filler", "run"])  # orbax's unfinished step stays in
    # its own temp name under run/checkpoints, which a resumed run ignores


# --- text the tokenizer refuses -----------------------------------------------------------------
def test_a_lone_surrogate_is_refused_by_line_before_any_output(alone):
    run = alone["surrogate"]
    assert run["code"] == 2
    assert re.fullmatch(r"cde-jax embed: error: \S+lone\.jsonl: line 3: field 'text' holds a "
                        r"lone surrogate \(\\ud800\), which is not text\n", run["err"]), run["err"]
    assert run["left"] == ["lone.jsonl"]


def test_every_jsonl_reader_refuses_a_lone_surrogate(tmp_path):
    pair, lone = r'"pair \ud83d\ude00"', r'"lone \udfff"'
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(f'{{"text": {pair}}}\n')
    assert open_chunks(corpus, 4)[0].texts == ["pair \U0001f600"]
    corpus.write_text(f'{{"text": {pair}}}\n{{"text": {lone}}}\n')
    with pytest.raises(InputError, match=r"c\.jsonl: line 2: field 'text' holds a lone "
                                         r"surrogate \(\\udfff\)"):
        open_chunks(corpus, 4)[0]
    train = tmp_path / "train.jsonl"
    train.write_text(f'{{"query": "q", "positive": {lone}}}\n')
    with pytest.raises(UserError, match=r"train\.jsonl: line 1: field 'positive' holds a lone"):
        read_examples(train)
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(f'{{"_id": "d", "text": {pair}}}\n'
                                       f'{{"_id": "e", "title": {lone}, "text": "t"}}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q", "text": "q"}\n')
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq\td\t1\n")
    with pytest.raises(UserError, match=r"corpus\.jsonl: line 2: field 'title' holds a lone"):
        load_beir(beir)


# --- smaller cases ------------------------------------------------------------------------------
def test_a_directory_named_like_an_input_is_called_a_directory(tmp_path):
    (tmp_path / "corpus.txt").mkdir()
    with pytest.raises(InputError, match=r"corpus\.txt: is a directory, not a file"):
        open_chunks(tmp_path / "corpus.txt", 4)
    with pytest.raises(FileNotFoundError, match=r"absent\.txt: no such file"):
        open_chunks(tmp_path / "absent.txt", 4)


def test_an_unfinished_npy_output_reads_as_unfinished(tmp_path):
    out = tmp_path / "out.npy"
    with ResumableArray(out, rows=8, width=4, chunk_rows=4, key="k") as array:
        array.write(0, np.ones((4, 4), np.float32))
    with pytest.raises(sinks.OutputError, match=r"out\.npy: unfinished \(run the same command "
                                                r"again to finish it\)"):
        cde_jax.read_embeddings(out)
    with pytest.raises(FileNotFoundError, match=r"other\.npy: no such output"):
        cde_jax.read_embeddings(tmp_path / "other.npy")


class _Unpickled:
    """Unpickling it would create the file it names."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_dataset_embeddings_file_with_an_unknown_member_is_refused_unread(tmp_path):
    path, marker = tmp_path / "ds.npz", tmp_path / "unpickled"
    evil = np.empty(1, object)
    evil[0] = _Unpickled(marker)
    np.savez(path, embeddings=np.ones((4, 8), np.float32), fingerprint="f", prefix="p", seed=0,
             extra=evil)
    assert pickle.loads(pickle.dumps(evil[0])) is None and marker.exists()  # it would
    marker.unlink()
    with pytest.raises(UserError, match=r"ds\.npz: not a dataset-embeddings file \(unknown "
                                        r"members \['extra'\]\)"):
        DatasetEmbeddings.load(path, fingerprint="f", width=8)
    assert not marker.exists()
