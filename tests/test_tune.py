"""Kernels checked and timed at first use (`cde_jax.tuning`), on CPU devices standing in for an
accelerator (the platform is the tuner's input): a wrong kernel is rejected, named and never
used; a slow one is not chosen; the cache is reused and invalidated when its key changes;
`cde-jax tune` prints the table and writes its JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import free_port

import cde_jax
from cde_jax import attention, tuning
from cde_jax.buckets import BucketPlan
from cde_jax.profiling import count_compiles
from cde_jax.validation import UserError

WORKER = Path(__file__).with_name("tune_worker.py")

# Probe bucket 32: 4096 // (32 + 520 prefix positions) = 7 rows.
PLAN = BucketPlan(lengths=(16, 32))


def wrong(q_bthe, k_bshe, v_bshe, mask):
    """Attention with its logits scaled by 1.5: a kernel with a bug."""
    return attention.xla(q_bthe * 1.5, k_bshe, v_bshe, mask)


def broken(q_bthe, k_bshe, v_bshe, mask):
    raise RuntimeError("Mosaic failed to compile this kernel")


SLOW_ROUNDS = 8


def slow(q_bthe, k_bshe, v_bshe, mask):
    """xla's attention computed SLOW_ROUNDS times over (each round's q depends on the last
    round's output times zero, so XLA cannot hoist or share the rounds): right, slow."""
    def round_(_, o_bthe):
        return attention.xla(q_bthe + o_bthe * 0, k_bshe, v_bshe, mask)
    return jax.lax.fori_loop(0, SLOW_ROUNDS, round_, jnp.zeros_like(q_bthe))


@pytest.fixture
def kernels():
    """The test kernels, registered as CPU candidates for one test."""
    added = {"test_wrong": wrong, "test_broken": broken}
    for name, kernel in added.items():
        tuning.register(name, kernel, platforms=("cpu",))
    yield added
    for name in added:
        tuning.unregister(name)
    assert set(added).isdisjoint(attention.names())


@pytest.fixture
def slow_kernel():
    """The slow kernel, a GPU candidate for one test (the tuner is told the platform)."""
    tuning.register("test_slow", slow, platforms=("gpu",))
    yield
    tuning.unregister("test_slow")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.TUNE_ENV, str(tmp_path / "tune"))
    return tmp_path / "tune" / tuning.CACHE_NAME


def test_wrong_kernel_is_rejected_named_and_never_used(tiny_checkpoint, kernels, cache,
                                                       caplog):
    caplog.set_level(logging.INFO, logger="cde_jax.tuning")
    model = cde_jax.load(tiny_checkpoint[1], attention="auto", plan=PLAN, tune=True)
    # Chosen among the ones that pass; the probe's runner is the one the model keeps.
    assert model.backbone_config.attention in ("xla", "head_major")
    layer = model.runner.model.second_stage_model.backbone.layers[0]
    assert layer.plan.spec is attention.KERNELS[model.backbone_config.attention]
    [line] = [r.getMessage() for r in caplog.records if r.name == "cde_jax.tuning"]
    assert line.startswith("attention on cpu (float32): ") and "(bucket 7x32; chosen" in line
    assert "test_wrong rejected (differs from xla by " in line
    assert "test_broken rejected (RuntimeError: Mosaic failed to compile this kernel)" in line
    assert caplog.records[-1].levelno == logging.WARNING  # a rejection is shown
    # The run reuses what the probe compiled: texts of the probe's bucket (7 of 17..32
    # tokens) against a corpus of the probe's size compile nothing.
    dataset_md = np.random.default_rng(1).standard_normal((512, 64)).astype(np.float32)
    texts = [" ".join(["word"] * 20 + [str(i)]) for i in range(7)]
    assert {len(ids) for ids in model.tokenize(texts, "search_query: ")} == {27}
    with count_compiles() as compiles:
        model.encode(texts, prompt_name="query", dataset_embeddings=dataset_md)
    assert compiles.count == 0
    [entry] = json.loads(cache.read_text())["decisions"].values()
    trials = {t["kernel"]: t for t in entry["trials"]}
    assert entry["target"]["kernels"] == ["xla", "head_major", "test_wrong", "test_broken"]
    # The bug's error is measured, far over the bound; the right kernels are within it.
    assert 1e-2 < trials["test_wrong"]["max_rel_err"] < 10
    assert trials["test_wrong"]["texts_per_s"] is None
    assert trials["head_major"]["max_rel_err"] <= tuning.FLOAT32_BOUND
    assert trials["head_major"]["min_cosine"] > 0.99999

    # Named explicitly: checked too, an error unless the check is waived.
    with pytest.raises(UserError, match=r"attention 'test_wrong' fails its check on cpu "
                                        r"\(float32\): differs from xla by .* check_kernel=False"):
        cde_jax.load(tiny_checkpoint[1], attention="test_wrong", plan=PLAN, tune=True)
    unchecked = cde_jax.load(tiny_checkpoint[1], attention="test_wrong", plan=PLAN, tune=True,
                             check_kernel=False)
    assert unchecked.backbone_config.attention == "test_wrong"


def test_slow_kernel_loses_and_cache_is_keyed(tiny_checkpoint, slow_kernel, cache):
    """GPU candidates on CPU devices (the platform is the tuner's input): cuDNN is rejected
    by name (no NVIDIA GPU here), the slow kernel passes the check and is not chosen. The
    decision is reused from the cache, and probed again when the key changes."""
    model = cde_jax.load(tiny_checkpoint[1], attention="xla", plan=PLAN, tune=False)
    runner, backbone, cde = model.runner, model.backbone_config, model.config
    kernels = tuning.candidates("gpu")
    assert kernels == ("xla", "cudnn", "test_slow") and "test_slow" not in tuning.candidates(
        "cpu")

    def decide(kernels, backbone=backbone):
        return tuning.decide(runner, backbone, cde, kernels, rows=7, length=32,
                             platform="gpu", cache=cache, repeats=3)

    first, _, kept = decide(kernels)
    assert first.chosen == "xla" and set(kept) == {"xla", "test_slow"}
    slow_trial = first.trial("test_slow")
    assert slow_trial.error is None and slow_trial.max_rel_err <= tuning.FLOAT32_BOUND
    # SLOW_ROUNDS attentions a layer: several times slower, whatever else the cores run.
    assert slow_trial.texts_per_s < first.trial("xla").texts_per_s / 2
    assert first.trial("cudnn").error.startswith("UserError: attention 'cudnn' needs an "
                                                 "NVIDIA GPU; this device is cpu")
    assert first.target.platform == "gpu" and first.target.bucket == "7x32"
    again, _, kept = decide(kernels)
    assert kept == {} and again == first  # from the file, nothing run
    # A changed key probes again: another kernel set, another dtype ...
    # A changed key probes again: another kernel set ...
    _, _, kept = decide(("xla", "cudnn"))
    assert set(kept) == {"xla"}
    # ... or another dtype, other versions, another device kind or bucket (the key names them).
    assert tuning.cached(cache, first.target) == first
    versions = tuple((k, "0.0.1" if k == "jax" else v) for k, v in first.target.versions)
    for change in ({"versions": versions}, {"dtype": "bfloat16"},
                   {"device_kind": "TPU v5 lite"}, {"rows": 8}):
        assert tuning.cached(cache, dataclasses.replace(first.target, **change)) is None
    stored = json.loads(cache.read_text())["decisions"]
    assert len(stored) == 2 and first.target.key() in stored


def test_cpu_auto_keeps_its_static_choice_without_probing(tiny_checkpoint, cache):
    model = cde_jax.load(tiny_checkpoint[1], attention="auto", plan=PLAN)
    assert model.backbone_config.attention == "head_major"
    assert not cache.exists()


@pytest.fixture(scope="module")
def tune_run(tiny_checkpoint, tmp_path_factory):
    """`cde-jax tune` on CPU, buckets 16 and 32, its cache in `tmp`: (the run, its JSON, the
    cache file)."""
    tmp = tmp_path_factory.mktemp("tune_run")
    out, cache = tmp / "tune.json", tmp / "tune" / tuning.CACHE_NAME
    done = subprocess.run(
        [sys.executable, "-m", "cde_jax.cli", "tune", "--model", str(tiny_checkpoint[1]),
         "--buckets", "16", "--buckets", "32", "--repeats", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, tuning.TUNE_ENV: str(cache.parent)})
    return done, out, cache


def test_tune_command_prints_the_table_and_writes_json(tune_run):
    done, out, cache = tune_run
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["kernel", "max", "rel", "err", "vs", "xla", "min", "cosine",
                                "vs", "xla", "texts/s", "7x16", "texts/s", "7x32", "chosen"]
    assert [line.split()[0] for line in lines[1:3]] == ["xla", "head_major"]
    assert lines[3].startswith("attention on cpu (float32): ") and "bucket 7x16" in lines[3]
    assert "bucket 7x32" in lines[4] and len(lines) == 5
    decisions = json.loads(out.read_text())["decisions"]
    assert [d["target"]["length"] for d in decisions] == [16, 32]
    for decision in decisions:
        xla, head_major = decision["trials"]
        assert decision["chosen"] in ("xla", "head_major")
        assert head_major["max_rel_err"] <= tuning.FLOAT32_BOUND
        assert xla["texts_per_s"] > 0 and head_major["texts_per_s"] > 0
    assert len(json.loads(cache.read_text())["decisions"]) == 2  # and the cache has them


def test_registry_and_cache_file_errors(cache, caplog):
    with pytest.raises(UserError, match="attention 'xla' is registered already"):
        tuning.register("xla", wrong, platforms=("cpu",))
    with pytest.raises(UserError, match="attention 'splash' was not added by tuning.register"):
        tuning.unregister("splash")
    with pytest.raises(UserError, match="attention 'splash' was not added by register"):
        attention.unregister("splash")
    assert tuning.read_cache(cache) == {}  # none yet
    cache.parent.mkdir(parents=True)
    cache.write_text('{"format": 1, "decisions": {"k": ')  # cut short
    with caplog.at_level(logging.WARNING, logger="cde_jax.tuning"):
        assert tuning.read_cache(cache) == {}
    assert "kernels.json is unreadable (Expecting value" in caplog.text
    assert "probing again" in caplog.text


@pytest.fixture(scope="module")
def two_process_runs(tiny_checkpoint, tmp_path_factory):
    """Two processes load with tune=True twice: with empty caches, then with process 0's
    cache filled and process 1's empty (each process its own cache dir, as on two hosts).
    Each round: [(returncode, stdout, stderr)] per process."""
    tmp = tmp_path_factory.mktemp("two_process_runs")

    def round_(dirs):
        port = free_port()
        procs = [subprocess.Popen([sys.executable, str(WORKER), str(tiny_checkpoint[1]), str(i),
                                   str(port), str(tmp / d)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i, d in enumerate(dirs)]
        return [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    return round_(("a0", "a1")), round_(("a0", "b1"))


def test_processes_probe_together_and_agree(two_process_runs):
    """Every process probes when any misses (here process 1 in the second round), and all take
    process 0's choice: the same line and kernel everywhere, no process waiting on another."""
    for runs in two_process_runs:
        assert [code for code, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
        chosen = {out.strip().splitlines()[-1] for _, out, _ in runs}  # after gloo's lines
        assert len(chosen) == 1 and chosen <= {"chosen xla", "chosen head_major"}
        lines = [[x for x in err.splitlines() if x.startswith("cde_jax.tuning: ")]
                 for _, _, err in runs]
        assert lines[0] == lines[1] and len(lines[0]) == 1
        assert "(bucket 6x32; chosen" in lines[0][0] and "measured before" not in lines[0][0]
