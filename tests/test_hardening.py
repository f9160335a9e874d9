"""Hardening (issue #10): one writer per output, nothing left behind by a failed or killed
run, and one clear line (exit 2) for every error a user can fix. Each case runs the real
command in a subprocess (`python -m cde_jax.cli ...`, `scripts/convert_weights.py`) or the
real API call, checks the exact message and exit code, and lists the directory afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from cde_jax import outputs
from cde_jax.convert import CheckpointError, convert, read_converted
from cde_jax.evaluation import load_beir
from cde_jax.outputs import atomic_dir, atomic_file, output_lock
from cde_jax.training.checkpoint import checkpoint_steps
from cde_jax.validation import UserError

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
CONVERT = REPO / "scripts" / "convert_weights.py"
NOT_WRITTEN_BY_AN_ERROR = ("Traceback", "Event loop is closed", "Exception ignored")

# Holds `output_lock(OUT)` until its stdin closes: a second process that owns the output.
HOLD_LOCK = ("import sys\nfrom cde_jax.outputs import output_lock\n"
             "with output_lock(sys.argv[1]):\n"
             "    print('locked', flush=True)\n"
             "    sys.stdin.read()\n")


@pytest.fixture(scope="module")
def python():
    """python(*argv) -> CompletedProcess of `python argv` in the repo (text output)."""
    def run(*argv):
        return subprocess.run([sys.executable, *map(str, argv)], capture_output=True,
                              text=True, timeout=600, cwd=REPO)
    return run


@pytest.fixture(scope="module")
def cli(python):
    return lambda *args: python("-m", "cde_jax.cli", *args)


def listing(directory: Path) -> list[str]:
    """Every entry, hidden ones (temp dirs and files) included."""
    return sorted(p.name for p in directory.iterdir())


def one_line(done: subprocess.CompletedProcess) -> str:
    """The whole of stderr, which must be a single line."""
    assert done.stderr.count("\n") == 1, done.stderr[-3000:]
    return done.stderr.rstrip("\n")


@contextlib.contextmanager
def lock_holder(out: Path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def write_train_data(path: Path, n: int = 8) -> Path:
    path.write_text("".join(json.dumps({"query": f"question {i}", "positive": f"document {i}"})
                            + "\n" for i in range(n)))
    return path


def write_beir(root: Path, judged: dict[str, dict[str, int]] | None = None) -> Path:
    """Three documents and two queries; `judged` replaces the qrels."""
    judged = judged or {"q0": {"d0": 1}, "q1": {"d2": 1}}
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "text": f"document number {i}"}) + "\n" for i in range(3)))
    (root / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(2)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, docs in judged.items() for d, s in docs.items()))
    return root


def corrupt_copy(converted: Path, dst: Path, how: str) -> tuple[Path, Path]:
    """A copy of a converted dir with one array's data file truncated or deleted."""
    shutil.copytree(converted, dst)
    array = dst / "params" / "first_stage_model.mlp.fc1.kernel"
    (chunk,) = [p for p in array.iterdir() if not p.name.startswith(".")]
    if how == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:10])
    else:
        chunk.unlink()
    return dst, chunk


# --- 1. one writer per output ------------------------------------------------------------
@pytest.mark.parametrize("command", ["convert", "train", "eval", "embed"])
def test_second_writer_fails_at_once_and_a_killed_writer_is_taken_over(
        command, synthetic, ctx_npz, tmp_path, python, cli):
    released, _ = synthetic()
    work = tmp_path / "work"
    work.mkdir()
    out = work / {"convert": "converted", "train": "run", "eval": "results.json",
                  "embed": "q.npy"}[command]
    if command == "embed":
        texts = tmp_path / "in.txt"
        texts.write_text("one\ntwo\n")
        prog = ("-m", "cde_jax.cli")
        args = ("embed", "--model", synthetic()[1], "--input", texts, "--role", "query",
                "--dataset-embeddings", ctx_npz, "--out", out, "--batch-size", 4)
        error = f"cde-jax embed: error: {out} is being written by another run"
    elif command == "convert":
        prog, args = (CONVERT,), (released, out)
        error = f"cde-jax convert: error: {out} is being written by another run"
    elif command == "train":
        data = write_train_data(tmp_path / "train.jsonl")
        prog = ("-m", "cde_jax.cli")
        args = ("train", "--model", released, "--data", data, "--out", out, "--total-steps", 2,
                "--batch-size", 4, "--resume")
        error = f"cde-jax train: error: {out} is being written by another run"
    else:
        dataset = write_beir(tmp_path / "beir", {"q0": {"gone": 1}})
        prog = ("-m", "cde_jax.cli")
        args = ("eval", "--model", released, "--dataset", dataset, "--out", out)
        error = f"cde-jax eval: error: {out} is being written by another run"
    lock = work / f"{out.name}.lock"
    with lock_holder(out) as holder:
        assert lock.read_text() == f"{holder.pid}\n"
        done = python(*prog, *args)
        assert done.returncode == 2
        assert one_line(done) == f"{error} (pid {holder.pid})"
        assert listing(work) == [lock.name]  # the holder's lock, nothing else
        os.kill(holder.pid, signal.SIGKILL)
        assert holder.wait() == -signal.SIGKILL
    assert lock.read_text() == f"{holder.pid}\n"  # left by the killed run, its lock released

    done = python(*prog, *args)  # takes the lock over
    if command == "embed":
        assert done.returncode == 0, done.stderr[-3000:]
        assert listing(work) == ["q.npy", "q.npy.ids.jsonl"]
    elif command == "convert":
        assert done.returncode == 0, done.stderr[-3000:]
        assert listing(work) == ["converted"]
        assert read_converted(out).fingerprint == read_converted(synthetic()[1]).fingerprint
    else:  # past the lock, these stop at the next check (cases 4 and 6 below)
        assert done.returncode == 2
        message = one_line(done)
        assert "being written by another run" not in message
        assert message == (
            f"cde-jax train: error: nothing to resume in {out}; run without --resume to start"
            if command == "train" else
            f"cde-jax eval: error: {dataset}/qrels/test.tsv: none of its 1 judged corpus-id(s) "
            "is in corpus.jsonl (e.g. 'gone'): every metric would be 0; check that the qrels "
            "belong to this corpus")
        assert listing(work) == []  # the lock file is gone with the run that took it over


def test_output_lock_in_process(tmp_path):
    out = tmp_path / "deep" / "er" / "out.npy"
    with output_lock(out) as lock:
        assert lock == tmp_path / "deep" / "er" / "out.npy.lock"
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match=rf"^{out} is being written by another run "
                                            rf"\(pid {os.getpid()}\)$"), output_lock(out):
            pass
    assert listing(tmp_path) == []  # the lock and the directories made for it are gone


# --- 2. temp data of killed runs ---------------------------------------------------------
def test_killed_conversion_temp_is_removed_by_the_next_atomic_write(synthetic, tmp_path,
                                                                    python):
    """Two conversions pause mid-way (parameters written to their temp dir); one is
    SIGKILLed. A third conversion in the same directory removes the dead one's temp dir, not
    the live one's, which then finishes."""
    released, converted = synthetic()
    parent = tmp_path / "models"
    paused = {}
    try:
        _pause_kill_and_convert(released, parent, paused, python)
    finally:
        for proc, _ in paused.values():
            proc.kill()
            proc.wait()
    # The killed run's released lock stays until a run on that output takes it over.
    assert listing(parent) == ["alive", "killed.lock", "next"]
    want = read_converted(converted).fingerprint
    assert read_converted(parent / "alive").fingerprint == want
    assert read_converted(parent / "next").fingerprint == want


def _pause_kill_and_convert(released: Path, parent: Path, paused: dict, python) -> None:
    for name in ("killed", "alive"):
        proc = subprocess.Popen([sys.executable, TESTS / "convert_paused.py", released,
                                 parent / name], cwd=REPO, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        paused[name] = (proc, None)
        line = proc.stdout.readline()
        assert line.startswith("paused "), proc.communicate()[1][-3000:]
        temp = Path(line.split(" ", 1)[1].strip())
        assert temp.parent == parent and temp.name.startswith(f".{name}.tmp-{proc.pid}-")
        assert (temp / "params").is_dir()  # partial data: the parameters, no configs yet
        paused[name] = (proc, temp)
    killed, killed_temp = paused["killed"]
    alive, alive_temp = paused["alive"]
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert killed_temp.exists()  # what kill -9 leaves

    done = python(CONVERT, released, parent / "next")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not killed_temp.exists()
    assert alive_temp.exists()  # a live process's temp is never touched

    _, err = alive.communicate("\n", timeout=600)
    assert alive.returncode == 0, err[-3000:]


def test_atomic_writes_remove_only_dead_processes_temps(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = outputs._HOST
    kept = {f".d.tmp-{os.getpid()}-{host}-x4",     # a live process's (this one)
            f".e.tmp-{dead.pid}-another_host-x5",  # another host's: its pid means nothing here
            ".f.tmp-abcd1234"}                     # no owner in the name
    removed = {f".a.tmp-{dead.pid}-{host}-x1", f".b.npy.tmp-{dead.pid}-{host}-x2",
               f".c.old-{dead.pid}-{host}-x3"}
    for name in kept | removed:
        if ".npy" in name or name.startswith(".f"):
            (tmp_path / name).write_bytes(b"partial")
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "data").write_bytes(b"partial")
    with atomic_file(tmp_path / "out.json", "w") as f:
        f.write("{}")
    assert set(listing(tmp_path)) == kept | {"out.json"}
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}-{host}-")
    assert set(listing(tmp_path)) == kept | {"out.json", "out"}


# --- 3. non-finite weights ------------------------------------------------------------------
def with_bad_value(released: Path, dst: Path, name: str, index, value) -> Path:
    shutil.copytree(released, dst)
    tensors = load_file(dst / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_nan_weight_is_refused_by_name(synthetic, tmp_path, python):
    name = "second_stage_model.backbone.layers.2.mlp.Wi.weight"
    src = with_bad_value(synthetic()[0], tmp_path / "src", name, (3, 5), np.nan)
    out = tmp_path / "models" / "out"
    done = python(CONVERT, src, out)
    assert done.returncode == 2
    assert one_line(done) == (f"cde-jax convert: error: {src}/model.safetensors: tensor "
                              f"'{name}' has 1 non-finite value(s) (NaN; the first at index "
                              "(3, 5))")
    assert listing(tmp_path) == ["src"]  # no output, temp, lock, nor the parent made for it


def test_an_inf_weight_is_refused_by_name(synthetic, tmp_path):
    name = "first_stage_model.mlp.0.bias"
    src = with_bad_value(synthetic()[0], tmp_path / "src", name, 7, -np.inf)
    with pytest.raises(CheckpointError, match=rf"^{src}/model.safetensors: tensor '{name}' has "
                                              r"1 non-finite value\(s\) \(inf; the first at "
                                              r"index \(7,\)\)$"):
        convert(src, tmp_path / "out")
    assert listing(tmp_path) == ["src"]


# --- 4. --resume with nothing to resume -------------------------------------------------------
def test_resume_needs_a_checkpoint(synthetic, tmp_path, python, cli):
    """Nothing in OUT, or a run killed before its first checkpoint: `--resume` is an error
    that touches nothing; a run without it starts over."""
    data = write_train_data(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    args = ("train", "--model", synthetic()[0], "--data", data, "--out", out, "--total-steps", 2,
            "--batch-size", 4, "--query-length", 16, "--document-length", 16,
            "--corpus-size", 8, "--checkpoint-every", 100)
    message = f"cde-jax train: error: nothing to resume in {out}; run without --resume to start"
    done = cli(*args, "--resume")
    assert done.returncode == 2 and one_line(done) == message
    assert listing(tmp_path) == ["train.jsonl"]

    killed = python(TESTS / "train_killed.py", 1, *args)  # SIGKILLed in step 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint_steps(out / "checkpoints") == []
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert out / "train_config.json" in before

    done = cli(*args, "--resume")
    assert done.returncode == 2 and one_line(done) == message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{out} holds a run that never reached a checkpoint: starting over" in done.stderr
    assert [json.loads(line)["step"] for line in
            (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert checkpoint_steps(out / "checkpoints") == [2]
    assert listing(tmp_path) == ["run", "train.jsonl"]


# --- 5. messages, not tracebacks -------------------------------------------------------------
def test_converter_output_in_a_read_only_directory(synthetic, tmp_path):
    """The tests may run as root, for whom a directory's mode blocks nothing: then the
    converter runs under `setpriv` without CAP_DAC_OVERRIDE (and DAC_READ_SEARCH), i.e. as a
    root that the permission bits apply to, exactly as they apply to any other user."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root without setpriv: cannot make a directory read-only for root")
        prefix = [setpriv, "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search", "--"]
        probe = subprocess.run([*prefix, "touch", str(ro / "probe")], capture_output=True)
        if probe.returncode == 0 or b"Permission denied" not in probe.stderr:
            pytest.skip(f"setpriv could not drop CAP_DAC_OVERRIDE: {probe.stderr!r}")
    try:
        done = subprocess.run([*prefix, sys.executable, str(CONVERT), str(synthetic()[0]),
                               str(ro / "out")], capture_output=True, text=True, timeout=600,
                              cwd=REPO)
    finally:
        ro.chmod(0o755)
    assert done.returncode == 2
    assert one_line(done) == (f"cde-jax convert: error: cannot write {ro / 'out'}: {ro} is not "
                              "writable (Permission denied)")
    assert listing(ro) == []


def test_converter_output_under_a_file(synthetic, tmp_path, python):
    (tmp_path / "models").write_text("a file where a directory should be")
    out = tmp_path / "models" / "cde" / "out"
    done = python(CONVERT, synthetic()[0], out)
    assert done.returncode == 2
    assert one_line(done) == (f"cde-jax convert: error: cannot write {out}: "
                              f"{tmp_path / 'models'} is a file, not a directory")
    assert listing(tmp_path) == ["models"]


@pytest.mark.parametrize("kind,what", [("text", "not an .npz archive"),
                                       ("npy", "a .npy array")])
def test_dataset_embeddings_file_that_is_not_one(synthetic, tmp_path, cli, kind, what):
    path = tmp_path / "dataset.npz"
    if kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((512, 64), np.float32))
    else:
        path.write_text("these are not embeddings\n")
    (tmp_path / "in.txt").write_text("a query\n")
    done = cli("embed", "--model", synthetic()[1], "--input", tmp_path / "in.txt", "--role",
               "query", "--dataset-embeddings", path, "--out", tmp_path / "q.npy")
    assert done.returncode == 2
    assert one_line(done) == (f"cde-jax embed: error: {path}: not a dataset-embeddings file "
                              f"({what}; make one with `cde-jax dataset-embeddings`)")
    assert listing(tmp_path) == ["dataset.npz", "in.txt"]


def test_converted_dir_without_its_metadata(synthetic, tmp_path, cli):
    model = tmp_path / "model"
    shutil.copytree(synthetic()[1], model)
    (model / "cde_jax.json").unlink()
    dataset = write_beir(tmp_path / "beir")
    done = cli("eval", "--model", model, "--dataset", dataset, "--out", tmp_path / "r.json")
    assert done.returncode == 2
    assert one_line(done) == (f"cde-jax eval: error: {model}: incomplete converted checkpoint "
                              "(missing cde_jax.json); convert it again")
    assert listing(tmp_path) == ["beir", "model"]


@pytest.mark.parametrize("how,detail", [
    ("truncated", 'FAILED_PRECONDITION: Error reading local file "{chunk}": Truncated '
                  "Zstd-compressed stream; at byte 10; at uncompressed byte 0"),
    ("deleted", 'NOT_FOUND: chunk {{0, 0}} stored at local file "{chunk}" is missing'),
])
def test_corrupt_orbax_checkpoint_is_one_line(synthetic, tmp_path, cli, how, detail):
    """One line, and none of the asyncio noise orbax left behind at exit ("Event loop is
    closed" from tensorstore's threads, abandoned coroutines)."""
    model, chunk = corrupt_copy(synthetic()[1], tmp_path / "model", how)
    dataset = write_beir(tmp_path / "beir")
    done = cli("eval", "--model", model, "--dataset", dataset, "--out", tmp_path / "r.json")
    assert done.returncode == 2
    for noise in NOT_WRITTEN_BY_AN_ERROR:
        assert noise not in done.stderr, done.stderr[-3000:]
    assert one_line(done) == (f"cde-jax eval: error: {model}/params: corrupt or incomplete "
                              f"checkpoint ({detail.format(chunk=chunk)}); convert it again")
    assert listing(tmp_path) == ["beir", "model"]


# --- 6. evaluation that could only score 0 ----------------------------------------------------
def test_eval_with_no_judged_document_in_the_corpus(tmp_path, cli):
    """Refused before the model is read: here the model path does not even exist."""
    dataset = write_beir(tmp_path / "beir", {"q0": {"gone0": 1}, "q1": {"gone1": 1}})
    done = cli("eval", "--model", tmp_path / "no-such-model", "--dataset", dataset,
               "--out", tmp_path / "r.json")
    assert done.returncode == 2
    assert one_line(done) == (
        f"cde-jax eval: error: {dataset}/qrels/test.tsv: none of its 2 judged corpus-id(s) is "
        "in corpus.jsonl (e.g. 'gone0'): every metric would be 0; check that the qrels belong "
        "to this corpus")
    assert listing(tmp_path) == ["beir"]


def test_beir_with_no_relevant_judgement_in_the_corpus(tmp_path):
    dataset = write_beir(tmp_path / "beir", {"q0": {"d0": 0, "gone": 2}})
    with pytest.raises(UserError, match=r"test.tsv: no judgement with a score above 0 names a "
                                        r"document in corpus.jsonl: every metric would be 0$"):
        load_beir(dataset)


def test_token_ids_are_checked(synthetic):
    import cde_jax

    model = cde_jax.load(synthetic()[1])
    ids, mask = np.full((2, 5), 7, np.int64), np.ones((2, 5), np.int64)
    cases = [((1, 3), 50368, "input_ids[1, 3] = 50368 is outside the valid range [0, 50367]"),
             ((0, 2), -5, "input_ids[0, 2] = -5 is outside the valid range [0, 50367]"),
             ((1, 0), 2 ** 40, "input_ids[1, 0] = 1099511627776 is outside the valid range")]
    for (row, col), value, message in cases:
        bad = ids.copy()
        bad[row, col] = value
        for stage in (lambda i, m: model.first_stage(i, m),
                      lambda i, m: model.second_stage(i, m, np.ones((4, 64), np.float32))):
            with pytest.raises(UserError, match=re.escape(message)):
                stage(bad, mask)
    bad_mask = mask.copy()
    bad_mask[0, 4] = 2
    with pytest.raises(UserError, match=re.escape("attention_mask[0, 4] = 2 is outside the "
                                                  "valid range [0, 1]")):
        model.first_stage(ids, bad_mask)
    with pytest.raises(UserError, match=r"input_ids of shape \(2, 0\): sequences must have at "
                                        "least one token"):
        model.first_stage(ids[:, :0], mask[:, :0])
    assert np.isfinite(model.first_stage(ids, mask)).all()  # the same arrays, valid


def test_empty_dataset_embeddings_file_fails_before_any_output(synthetic, tmp_path, cli):
    from cde_jax.minicorpus import DatasetEmbeddings

    model, _ = synthetic()[1], None
    fingerprint = read_converted(model).fingerprint
    empty = DatasetEmbeddings(np.zeros((0, 64), np.float32), fingerprint, "x", 0).save(
        tmp_path / "empty.npz")
    (tmp_path / "in.txt").write_text("one\n")
    done = cli("embed", "--model", model, "--input", tmp_path / "in.txt", "--role", "query",
               "--dataset-embeddings", empty, "--out", tmp_path / "q.npy")
    assert done.returncode == 2
    assert one_line(done) == (f"cde-jax embed: error: {empty}: dataset embeddings are empty "
                              "(0 rows)")
    assert listing(tmp_path) == ["empty.npz", "in.txt"]


def test_interrupted_embed_says_how_to_resume(synthetic, ctx_npz, tmp_path):
    """Ctrl-C (SIGINT) mid-run: one line and exit 130, then the same command resumes."""
    texts = tmp_path / "in.txt"
    texts.write_text("".join(f"text number {i}\n" for i in range(400)))  # 100 chunks
    out = tmp_path / "q.npy"
    argv = [sys.executable, "-m", "cde_jax.cli", "embed", "--model", str(synthetic()[1]),
            "--input", str(texts), "--role", "query", "--dataset-embeddings", str(ctx_npz),
            "--out", str(out), "--chunk-size", "4", "--batch-size", "4", "--quiet"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=REPO)
    journal = tmp_path / "q.npy.journal"
    while not (journal.exists() and journal.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err == "cde-jax embed: interrupted: run the same command again to resume\n"
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" in done.stderr or done.stderr == ""
    assert listing(tmp_path) == ["in.txt", "q.npy", "q.npy.ids.jsonl"]
