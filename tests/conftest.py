"""Shared fixtures: the ModernBERT tokenizer and the fallback minicorpus (random_docs.txt),
and synthetic released-layout checkpoints (random weights) built once per session.

The tokenizer and random_docs come from $CDE_SHARED_DIR when set, else from ../shared beside
the repo when it is there, else from the byte-identical copies the package ships
(`cde_jax/data`), so a bare clone runs every test.

The session runs on the CPU backend (JAX_PLATFORMS=cpu) and compiles at XLA backend
optimization level 0. The suite compiles about a thousand
programs for a few rows each, and LLVM's optimization passes were half of all compile time
while buying nothing at these sizes (test_model + test_attention: 145 s -> 101 s). The HLO,
its fusions and the float semantics are the same; only the machine code is less tuned.
Commands the tests start inherit the flag; timings that matter come from scripts/, which
never set it.

Tiers (markers registered in pyproject.toml): `slow` (benchmark runs, full-size models, long
command runs), `multiprocess` (several processes joined by jax.distributed), `aot` (deviceless
compiles for TPUs and the H100, the `aot` extra). Before every commit:
`python3 -m pytest -m "not slow" -n 2`; CI (scripts/test.sh) runs everything. Under
pytest-xdist (`-n`) the files are shared out whole (`--dist loadfile`), so a module's command
runs (module fixtures) run once."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

# Before JAX starts: the cde_jax import below starts it.
FAST_COMPILE = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
# The suite runs on the CPU backend, also where the aot extra (libtpu, the CUDA plugin) is
# installed: without this JAX would try those backends at start-up (libtpu logs its search
# for a TPU VM, the CUDA plugin its missing driver) in every command the tests start.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cde_jax.resources import packaged_data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _data_dir() -> Path:
    if os.environ.get("CDE_SHARED_DIR"):
        return Path(os.environ["CDE_SHARED_DIR"])
    shared = Path(__file__).resolve().parents[2] / "shared"
    return shared if (shared / "random_docs.txt").exists() else packaged_data("")


DATA_DIR = _data_dir()
TOKENIZER_DIR = DATA_DIR / "modernbert-tokenizer"
RANDOM_DOCS = DATA_DIR / "random_docs.txt"


def pytest_sessionstart(session):
    # A missing file must fail loudly: skipping would hide every parity test.
    for path in (TOKENIZER_DIR / "tokenizer.json", RANDOM_DOCS):
        if not path.exists():
            raise pytest.UsageError(f"{path} not found (CDE_SHARED_DIR={DATA_DIR})")


@pytest.fixture(scope="session", autouse=True)
def command_compile_cache(tmp_path_factory):
    """One XLA cache for every command a test starts (they all turn the persistent cache on):
    a program is compiled once per session, and nothing is written to the user's
    ~/.cache. This test process itself keeps the cache off (writing it costs more than the
    few hits it would get)."""
    path = tmp_path_factory.mktemp("xla-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDE_JAX_CACHE_DIR", str(path))
        yield path


# --- tiers --------------------------------------------------------------------------------
# The tests that use these module fixtures (command runs in subprocesses), directly or through
# another fixture, are `slow` / `multiprocess`; every test of an AOT file is `aot` and `slow`.
# One table, so that the tiers read in one place; a test marks itself with
# @pytest.mark.slow where the cost is its own (e.g. test_model's 512-row parity).
SLOW_RUNS = {
    "test_benchmark.py": {"quick", "gpu_smoke"},
    "test_cli.py": {"repeated_runs"},
    "test_clustering.py": {"eight_devices", "two_processes", "model_clustered",
                           "filtered_training"},
    "test_corpus.py": {"single", "many", "seven_rows", "killed_and_restarted",
                       "two_process_commands", "two_process_training"},
    "test_evaluation.py": {"top_k_on_8_devices"},
    "test_examples.py": {"search_run", "finetune_run", "mteb_run"},
    "test_faults.py": {"peers", "alone"},
    "test_serve.py": {"server"},
    "test_sharding.py": {"single", "eight_devices", "two_processes"},
    "test_training.py": {"cli_runs", "devices"},
    "test_tune.py": {"tune_run", "two_process_runs"},
}
MULTIPROCESS_RUNS = {
    "test_clustering.py": {"two_processes"},
    "test_corpus.py": {"many", "seven_rows", "killed_and_restarted", "two_process_commands",
                       "two_process_training"},
    "test_faults.py": {"peers"},
    "test_sharding.py": {"two_processes"},
    "test_tune.py": {"two_process_runs"},
}
AOT_FILES = {"test_aot.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        name, used = item.path.name, set(getattr(item, "fixturenames", ()))
        if used & SLOW_RUNS.get(name, set()) or name in AOT_FILES:
            item.add_marker(pytest.mark.slow)
        if used & MULTIPROCESS_RUNS.get(name, set()):
            item.add_marker(pytest.mark.multiprocess)
        if name in AOT_FILES:
            item.add_marker(pytest.mark.aot)


PARITY: dict[str, float] = {}  # this process's tests: the worst error of each
WORST: dict[str, float] = {}   # every test's, gathered where the summary is written


def max_rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the parity measure used throughout. The
    worst value per test is printed in the session summary."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.isfinite(actual).all()
    err = float(np.abs(actual - expected).max() / np.abs(expected).max())
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    PARITY[test] = max(err, PARITY.get(test, 0.0))
    return err


def free_port() -> int:
    """A free TCP port on the loopback address (jax.distributed's coordinator, servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Each test's parity errors travel with its report, so that the summary has them also
    when pytest-xdist ran the test in another process."""
    report = yield
    if item.nodeid in PARITY:
        report.user_properties.append(("parity", PARITY.pop(item.nodeid)))
    return report


def pytest_runtest_logreport(report):
    for name, value in report.user_properties:
        if name == "parity":
            WORST[report.nodeid] = max(value, WORST.get(report.nodeid, 0.0))


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.section("worst parity error per test (max|a-b| / max|b|)")
        for test, err in sorted(WORST.items()):
            terminalreporter.write_line(f"{err:10.3e}  {test}")


@pytest.fixture(scope="session")
def random_docs() -> list[str]:
    return [line.rstrip("\n") for line in RANDOM_DOCS.open(encoding="utf-8") if line.strip()]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """synthetic(**options) -> (released dir, converted dir), built once per option set."""
    from cde_jax.convert import convert
    from cde_jax.convert.synthetic import make_synthetic_checkpoint

    cache = {}

    def build(preset="tiny", ignore_instruction_tokens=True, null_embedding=False, seed=0):
        key = (preset, ignore_instruction_tokens, null_embedding, seed)
        if key not in cache:
            root = tmp_path_factory.mktemp("ckpt-" + "-".join(map(str, key)))
            released = make_synthetic_checkpoint(
                root / "released", preset=preset, seed=seed, tokenizer_dir=TOKENIZER_DIR,
                ignore_instruction_tokens=ignore_instruction_tokens,
                null_embedding=null_embedding)
            cache[key] = (released, convert(released, root / "converted"))
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic):
    """(released dir, converted dir) of the default tiny synthetic checkpoint."""
    return synthetic()


@pytest.fixture(scope="session")
def ctx_npz(tiny_checkpoint, tmp_path_factory):
    """A dataset-embeddings file for the tiny checkpoint, of random values: enough for a
    command that only needs a valid one, without the 512-document fallback's compute."""
    from cde_jax.convert import read_converted
    from cde_jax.minicorpus import DatasetEmbeddings
    from cde_jax.prompts import DOCUMENT

    emb = np.random.default_rng(0).standard_normal((512, 64)).astype(np.float32)
    fingerprint = read_converted(tiny_checkpoint[1]).fingerprint
    return DatasetEmbeddings(emb, fingerprint, DOCUMENT, 0).save(
        tmp_path_factory.mktemp("ctx") / "ctx.npz")
