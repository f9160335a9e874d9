"""`cde-jax context` and `cde-jax embed`, run as subprocesses on the tiny synthetic checkpoint:
outputs against the Python API, input formats and errors, kill -9 and resume, the XLA cache."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import max_rel_err

import cde_jax
from cde_jax.corpus import job, open_chunks
from cde_jax.corpus.npy import ResumableArray
from cde_jax.minicorpus import (
    DatasetEmbeddings,
    fallback_minicorpus,
    sample_indices,
    sample_minicorpus,
)
from cde_jax.prompts import DOCUMENT as DOCUMENT_PREFIX

CHUNK = ("--chunk-size", "16", "--batch-size", "8")


def run_cli(*args, cmd=("-m", "cde_jax.cli"), popen=False, **kw):
    """CompletedProcess of `python -m cde_jax.cli args` (text output); `popen=True`: the
    running process."""
    argv = [sys.executable, *cmd, *map(str, args)]
    if popen:
        return subprocess.Popen(argv, **kw)
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cli():
    return run_cli


@pytest.fixture(scope="module")
def model_dir(synthetic):
    return synthetic()[1]


@pytest.fixture(scope="module")
def model(model_dir):
    return cde_jax.load(model_dir)


def mixed_texts(random_docs, n: int, seed: int = 0) -> list[str]:
    """Empty lines and 1 to 40 words: mixed lengths in a few buckets (<= 128 tokens, for speed)."""
    rng = random.Random(seed)
    return ["" if rng.random() < 0.1 else " ".join(doc.split()[:rng.randint(1, 40)])
            for doc in random_docs[:n]]


def write_txt(path, texts):
    path.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    return path


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def texts(random_docs):
    return mixed_texts(random_docs, 64)


@pytest.fixture(scope="module")
def documents_ref(model, texts, ctx_npz):
    return model.encode(texts, prompt_name="document",
                        dataset_embeddings=model.load_dataset_embeddings(ctx_npz), batch_size=8)


@pytest.fixture(scope="module")
def embedded_txt(cli, model_dir, texts, ctx_npz, tmp_path_factory):
    """An uninterrupted `embed` of `texts` as .txt: (input, output, completed process)."""
    tmp = tmp_path_factory.mktemp("embed-txt")
    src, out = write_txt(tmp / "in.txt", texts), tmp / "emb.npy"
    done = cli("embed", "--model", model_dir, "--input", src, "--role", "document",
               "--dataset-embeddings", ctx_npz, "--out", out, *CHUNK)
    return src, out, done


# --- context -------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [40, 600])  # oversampled / sampled down to 512
def test_context_equals_python_api(cli, model, model_dir, random_docs, tmp_path, count):
    texts = mixed_texts(random_docs, count, seed=count)
    assert texts.count("") > 0
    src = write_jsonl(tmp_path / "in.jsonl", texts, field="body")
    done = cli("dataset-embeddings", "--model", model_dir, "--input", src, "--field", "body",
               "--seed", 7, "--out", tmp_path / "ctx.npz")
    assert done.returncode == 0, done.stderr
    got = model.load_dataset_embeddings(tmp_path / "ctx.npz")
    want = model.dataset_embeddings_file(texts, seed=7)
    np.testing.assert_array_equal(got.embeddings, want.embeddings)
    assert (got.fingerprint, got.prefix, got.seed) == (model.fingerprint, DOCUMENT_PREFIX, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx.npz", "in.jsonl"]


@pytest.mark.parametrize("count,size,seed", [(1000, 512, 0), (512, 512, 3), (700, 64, 42),
                                             (5, 16, 1)])
def test_chunked_minicorpus_samples_like_the_api(tmp_path, count, size, seed):
    texts = [f"t{i}" for i in range(count)]
    source = open_chunks(write_txt(tmp_path / "in.txt", texts), 37)
    chosen = job.read_rows(source, sample_indices(source.rows, size, seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oversampling 5 texts
        assert chosen == sample_minicorpus(texts, size, seed)


# --- embed ---------------------------------------------------------------------------------
def test_embed_txt_equals_encode_in_order(embedded_txt, documents_ref, texts):
    src, out, done = embedded_txt
    assert done.returncode == 0, done.stderr
    assert "text/s" in done.stderr  # the progress bar
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (len(texts), 64)
    assert max_rel_err(got, documents_ref) <= 1e-6  # max|ref| <= 1: at least as strict as abs
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    empty = [i for i, t in enumerate(texts) if t == ""]
    assert len(empty) >= 3 and len(set(map(len, texts))) > 20  # empty lines kept, mixed
    # A plain .npy: the bytes np.save writes; nothing else left beside it.
    np.save(src.parent / "resaved.npy", got)
    assert out.read_bytes() == (src.parent / "resaved.npy").read_bytes()
    (src.parent / "resaved.npy").unlink()
    # Ids beside it: the line numbers; nothing else left.
    ids, values = cde_jax.read_embeddings(out)
    np.testing.assert_array_equal(ids, np.arange(1, len(texts) + 1))
    np.testing.assert_array_equal(values, got)
    assert sorted(p.name for p in src.parent.iterdir()) == ["emb.npy", "emb.npy.ids.jsonl",
                                                            "in.txt"]


@pytest.fixture(scope="module")
def jsonl_fallback_run(tiny_checkpoint, random_docs, tmp_path_factory):
    """`embed` of a .jsonl field (40 texts) with the fallback minicorpus: its output."""
    tmp = tmp_path_factory.mktemp("jsonl_fallback_run")
    src = write_jsonl(tmp / "in.jsonl", mixed_texts(random_docs, 40), field="body")
    done = run_cli("embed", "--model", tiny_checkpoint[1], "--input", src, "--field", "body",
                   "--role", "query", "--dataset-embeddings", "fallback", "--out",
                   tmp / "q.npy", *CHUNK)
    assert done.returncode == 0, done.stderr
    return np.load(tmp / "q.npy")


def test_embed_jsonl_field_fallback_minicorpus(model, texts, jsonl_fallback_run):
    want = model.encode(texts[:40], prompt_name="query",
                        dataset_embeddings=model.embed_dataset(fallback_minicorpus()),
                        batch_size=8)
    assert max_rel_err(jsonl_fallback_run, want) <= 1e-6


def test_embed_parquet(cli, model_dir, texts, ctx_npz, documents_ref, tmp_path):
    import pyarrow as pa  # the test extra's: a missing pyarrow fails, it does not skip
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}),
                   tmp_path / "in.parquet", row_group_size=30)
    done = cli("embed", "--model", model_dir, "--input", tmp_path / "in.parquet", "--field",
               "body", "--role", "document", "--dataset-embeddings", ctx_npz, "--out",
               tmp_path / "d.npy", *CHUNK)
    assert done.returncode == 0, done.stderr
    assert max_rel_err(np.load(tmp_path / "d.npy"), documents_ref) <= 1e-6


def test_kill_9_then_resume_is_byte_identical(cli, model_dir, ctx_npz, embedded_txt, tmp_path):
    """An int8 run, killed with SIGKILL and run again, writes what an uninterrupted run
    writes: the uninterrupted float32 run's rows (the same chunks, batches and programs)
    quantized with the ranges its calibration sample gave, here all 64 texts' [min, max]
    (embedded in other batches: float32 noise), recorded by the killed run."""
    src, uninterrupted, _ = embedded_txt
    out = tmp_path / "emb.npy"
    journal, partial = tmp_path / "emb.npy.journal", tmp_path / "emb.npy.partial"
    args = ("embed", "--model", model_dir, "--input", src, "--role", "document",
            "--dataset-embeddings", ctx_npz, "--out", out, "--precision", "int8", *CHUNK)
    with open(tmp_path / "log", "w") as log:
        proc = cli(*args, popen=True, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while not (journal.exists() and journal.read_text().count("\n") >= 2):
            assert proc.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finished = journal.read_text().count("\n") - 1
    n_chunks = 64 // 16
    assert 1 <= finished < n_chunks and not out.exists() and partial.exists()

    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out}: {finished}/{n_chunks} chunks already done" in done.stderr
    got, rows = cde_jax.read_embeddings(out), np.load(uninterrupted)
    assert (got.quantization.precision, got.quantization.width) == ("int8", 64)
    assert max_rel_err(got.quantization.ranges, np.stack([rows.min(0), rows.max(0)])) <= 1e-6
    np.save(tmp_path / "want.npy", got.quantization.apply(rows))
    assert out.read_bytes() == (tmp_path / "want.npy").read_bytes()
    assert Path(f"{out}.ids.jsonl").read_bytes() == Path(f"{uninterrupted}.ids.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "emb.npy", "emb.npy.ids.jsonl", "emb.npy.quantization.json", "log", "want.npy"]


@pytest.fixture(scope="module")
def repeated_runs(tiny_checkpoint, ctx_npz, random_docs, tmp_path_factory):
    """The same `embed` three times: as is, again (refused: the output exists), and with
    --overwrite, counting JAX's compilation-cache events. (The three runs, the first and
    last outputs.)"""
    tmp = tmp_path_factory.mktemp("repeated_runs")
    src = write_txt(tmp / "in.txt", mixed_texts(random_docs, 12))
    argv = ("embed", "--model", tiny_checkpoint[1], "--input", src, "--role", "query",
            "--dataset-embeddings", ctx_npz, "--out", tmp / "q.npy", *CHUNK)
    first = run_cli(*argv)
    first_bytes = (tmp / "q.npy").read_bytes() if first.returncode == 0 else None
    again = run_cli(*argv)
    counting = ("import collections, json, sys, jax; from cde_jax import cli"
                "; c = collections.Counter()"
                "; jax.monitoring.register_event_listener(lambda e, **k: c.update([e]))"
                "; rc = cli.main(sys.argv[1:]); print(json.dumps(c)); sys.exit(rc)")
    last = run_cli(*argv, "--overwrite", cmd=("-c", counting))
    return (first, again, last), first_bytes, (tmp / "q.npy").read_bytes()


def test_embed_cache_hits_on_a_repeated_run(repeated_runs):
    (first, again, last), first_bytes, last_bytes = repeated_runs
    assert first.returncode == 0, first.stderr
    # An existing output is kept unless --overwrite.
    assert again.returncode == 2 and "already exists (pass --overwrite" in again.stderr
    assert last.returncode == 0, last.stderr
    events = json.loads(last.stdout.strip().splitlines()[-1])
    assert events.get("/jax/compilation_cache/cache_hits", 0) >= 2, events
    assert events.get("/jax/compilation_cache/cache_misses", 0) == 0, events
    assert last_bytes == first_bytes


# --- errors --------------------------------------------------------------------------------
BAD_INPUTS = {
    "not-json": ("in.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": \n{"text": "d"}\n',
                 "line 3: invalid JSON"),
    "missing-field": ("in.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "line 2: no field 'text'"),
    "not-a-string": ("in.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"text": 5}\n',
                     "line 4: field 'text' is a number, not a string"),
    "not-utf8": ("in.txt", b"fine\n\xff\xfe broken\n", "line 2: not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(cli, model_dir, ctx_npz, tmp_path, case):
    name, data, message = BAD_INPUTS[case]
    (tmp_path / name).write_bytes(data)
    done = cli("embed", "--model", model_dir, "--input", tmp_path / name, "--role", "query",
               "--dataset-embeddings", ctx_npz, "--out", tmp_path / "q.npy")
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_parquet_without_pyarrow_is_a_clear_error(cli, model_dir, tmp_path):
    (tmp_path / "in.parquet").write_bytes(b"PAR1")
    blocked = ("import sys; sys.modules['pyarrow'] = None; from cde_jax import cli; "
               "sys.exit(cli.main(sys.argv[1:]))")
    done = cli("dataset-embeddings", "--model", model_dir, "--input", tmp_path / "in.parquet",
               "--out", tmp_path / "c.npz", cmd=("-c", blocked))
    assert done.returncode == 2 and "needs pyarrow" in done.stderr, done.stderr


def test_context_from_another_model_is_refused(cli, model_dir, texts, tmp_path):
    other = DatasetEmbeddings(np.ones((512, 64), np.float32), "another-model", DOCUMENT_PREFIX, 0)
    other.save(tmp_path / "ctx.npz")
    src = write_txt(tmp_path / "in.txt", texts[:4])
    done = cli("embed", "--model", model_dir, "--input", src, "--role", "query",
               "--dataset-embeddings", tmp_path / "ctx.npz", "--out", tmp_path / "q.npy")
    assert done.returncode == 2 and "made by model another-model" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx.npz", "in.txt"]


# --- the resumable writer ------------------------------------------------------------------
def test_resumable_array_journal(tmp_path):
    out = tmp_path / "a.npy"
    rows_nd = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    open_ = lambda key="k": ResumableArray(out, rows=7, width=3, chunk_rows=3, key=key)
    with open_() as a:
        assert not a.resumed and a.n_chunks == 3
        a.write(2, rows_nd[6:])  # the short last chunk
        assert a.chunk_slice(2) == slice(6, 7)
    with open(tmp_path / "a.npy.journal", "a") as f:
        f.write("1")  # a line torn by a kill: not a finished chunk
    with open_() as a:
        assert a.resumed and a.done == {2}
        with pytest.raises(ValueError, match=r"chunk 0 needs shape \(3, 3\)"):
            a.write(0, rows_nd[:2])
        with pytest.raises(RuntimeError, match=r"chunks \[0, 1\] not written"):
            a.finish()
    with open_(key="other arguments") as a:
        assert not a.resumed and a.done == set()
        for chunk in range(3):
            a.write(chunk, rows_nd[a.chunk_slice(chunk)])
        a.finish()
    np.testing.assert_array_equal(np.load(out), rows_nd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    (tmp_path / "a.npy.partial").write_bytes(b"x")  # a data file of the wrong size
    (tmp_path / "a.npy.journal").write_text(
        json.dumps({"version": 1, "key": "k", "rows": 7, "width": 3, "chunk_rows": 3}) + "\n0\n")
    with open_() as a:
        assert not a.resumed and a.done == set()


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from cde_jax import cli
    from cde_jax.commands import embed
    from cde_jax.validation import UserError

    argv = ["embed", "--model", "m", "--input", "in.txt", "--role", "query",
            "--dataset-embeddings", "fallback", "--out", "o.npy"]

    def user_error(args):
        raise UserError("in.txt: line 3: not valid JSON")

    monkeypatch.setattr(embed, "run", user_error)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "cde-jax embed: error: in.txt: line 3: not valid JSON\n"

    def bug(args):
        return len(None)  # a TypeError from a bug, not from the user's input

    monkeypatch.setattr(embed, "run", bug)
    with pytest.raises(TypeError, match="NoneType"):
        cli.main(argv)


def test_every_option_has_help_and_every_command_an_example():
    from cde_jax import cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"convert", "dataset-embeddings", "embed", "cluster", "train",
                             "eval", "serve", "tune"}
    for name, sub in commands.items():
        assert "example:\n  cde-jax " + name in sub.description, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings}: no help"
        text = sub.format_help()
        assert "--quiet" in text and "--verbose" in text
    embed_help = commands["embed"].format_help()
    assert "(default: 4096)" in embed_help and "(default: text)" in embed_help
    assert "8192" not in embed_help


def test_quiet_and_warnings_above_the_bar(cli, model_dir, texts, tmp_path):
    src = write_txt(tmp_path / "in.txt", texts[:12])
    args = ("dataset-embeddings", "--model", model_dir, "--input", src, "--batch-size", 8)
    loud = cli(*args, "--out", tmp_path / "a.npz")
    assert loud.returncode == 0, loud.stderr
    # The oversampling warning is a line of its own, before the bar starts drawing.
    first = loud.stderr.split("\n")[0]
    assert first == "cde-jax: WARNING: only 12 texts for a minicorpus of 512: oversampling " \
                    "with replacement (seed 0)", loud.stderr
    assert "minicorpus:" in loud.stderr
    quiet = cli(*args, "--out", tmp_path / "b.npz", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["embeddings"],
                                  np.load(tmp_path / "b.npz")["embeddings"])


@pytest.mark.parametrize("command", ["dataset-embeddings", "embed", "eval", "train", "serve"])
def test_model_options_reach_the_model(command, monkeypatch, tmp_path, capsys):
    """--dtype, --activations and --attention, defined once (`runtime.add_model_args`), on
    every command that runs the model, validated by argparse and passed to `load` /
    training."""
    from cde_jax import cli
    from cde_jax.commands import flags, runtime
    from cde_jax.training import TrainConfig

    src = write_txt(tmp_path / "in.txt", ["a text"])
    required = {
        "dataset-embeddings": ["--input", src, "--out", tmp_path / "d.npz"],
        "embed": ["--input", src, "--role", "query", "--dataset-embeddings", "fallback",
                  "--out", tmp_path / "e.npy"],
        "eval": ["--dataset", tmp_path, "--out", tmp_path / "r.json"],
        "train": ["--data", src, "--out", tmp_path / "run", "--total-steps", "1",
                  "--batch-size", "2"],
        "serve": ["--context", f"corpus={tmp_path / 'c.npz'}"],
    }[command]
    argv = [command, "--model", "m", *map(str, required)]
    parser = cli.build_parser()
    defaults = parser.parse_args(argv)
    assert (defaults.dtype, defaults.activations, defaults.attention) == (None, "compute",
                                                                          "auto")
    args = parser.parse_args(argv + ["--dtype", "bfloat16", "--activations", "float32",
                                     "--attention", "xla"])
    if command == "train":
        cfg = flags.config_from_args(TrainConfig, args)
        assert (cfg.dtype, cfg.activations, cfg.attention) == ("bfloat16", "float32", "xla")
    else:
        seen = {}

        def fake_load(path, **kw):
            seen.update(kw)
            raise SystemExit(0)

        monkeypatch.setattr(runtime, "load", fake_load)
        monkeypatch.setattr("cde_jax.commands.eval.load_beir", lambda *a: None)
        with pytest.raises(SystemExit):
            args.func(args)
        assert seen == {"dtype": "bfloat16", "activations": "float32", "attention": "xla",
                        "check_kernel": True}
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--dtype", "bf16"])
    err = capsys.readouterr().err
    assert "invalid choice: 'bf16'" in err and "bfloat16" in err and "float16" in err


def test_train_flags_are_the_config_fields(capsys):
    """Every field of `TrainConfig` and its parts is a flag of its own name, and the parsed
    flags build the config that Python would: the config is the one source of the flags."""
    import dataclasses
    import typing

    from cde_jax import cli
    from cde_jax.commands import flags
    from cde_jax.training import TrainConfig
    from cde_jax.training.data import BatchConfig
    from cde_jax.training.step import StepConfig

    def leaves(cls):
        for field in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[field.name]
            yield from leaves(kind) if dataclasses.is_dataclass(kind) else [field.name]

    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    names = list(leaves(TrainConfig))
    assert len(names) == len(set(names)) > 20
    shown = set(re.findall(r"--[a-z0-9-]+", help_text))
    missing = [n for n in names if flags.flag(n) not in shown]
    assert not missing, missing
    args = parser.parse_args(["train", "--model", "m", "--data", "d.jsonl", "--out", "run",
                              "--total-steps", "7", "--batch-size", "4", "--learning-rate",
                              "3e-5", "--grad-cache-rows", "2", "--no-permute",
                              "--accum-steps", "2"])
    want = TrainConfig(model="m", data="d.jsonl", out="run",
                       batch=BatchConfig(batch_size=4),
                       step=StepConfig(total_steps=7, learning_rate=3e-5, grad_cache_rows=2,
                                       permute=False),
                       accum_steps=2)
    assert flags.config_from_args(TrainConfig, args) == want
