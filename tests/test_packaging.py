"""What a user meets before any model runs: the package (one version, the license, py.typed,
an install without PyTorch), `cde-jax --version`, `cde-jax convert` (and its old name
scripts/convert_weights.py), a quiet CLI."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

import cde_jax
from cde_jax import cli

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TEST_ONLY = {"torch", "transformers", "pytest", "ruff", "mteb", "datasets", "pyarrow"}
NO_TORCH = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in sorted(TEST_ONLY))


def test_one_version_source():
    project = PYPROJECT["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "cde_jax.__version__"}
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "\n## Unreleased\n" in changelog and f"\n## {cde_jax.__version__}\n" in changelog


def test_base_install_has_no_test_tools():
    base = {Requirement(r).name.lower() for r in PYPROJECT["project"]["dependencies"]}
    assert not base & TEST_ONLY, base & TEST_ONLY
    test = {Requirement(r).name for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
    assert {"torch", "transformers"} <= test


def test_wheel_contents(tmp_path):
    """The wheel built from this tree (tracked and new files, as a clone would have them):
    the version from cde_jax.__version__, LICENSE, py.typed, the data, no PyTorch."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / name, src / name)
    built = run("-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q",
                "-w", tmp_path / "dist")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    assert wheel.name == f"cde_jax-{cde_jax.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    info = f"cde_jax-{cde_jax.__version__}.dist-info"
    assert {"cde_jax/py.typed", f"{info}/licenses/LICENSE", "cde_jax/data/random_docs.txt",
            "cde_jax/data/modernbert-tokenizer/tokenizer.json", "cde_jax/hub.py",
            "cde_jax/commands/convert.py", "cde_jax/convert/keymap.py",
            "cde_jax/data/h100_sxm.txtpb", "cde_jax/aot.py"} <= names
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert f"\nVersion: {cde_jax.__version__}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata
    required = [Requirement(line.split(": ", 1)[1]) for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    base = {r.name.lower() for r in required if r.marker is None}
    assert "jax" in base and not base & TEST_ONLY


def test_inference_without_torch(synthetic, tmp_path):
    """Loading, embedding, saving, converting and the CLI with PyTorch, transformers, mteb
    and the other test tools unimportable."""
    released, converted = synthetic()
    script = NO_TORCH + f"""
import numpy as np
import cde_jax
from cde_jax import cli
model = cde_jax.load({str(converted)!r})
dataset = model.embed_minicorpus(["a document", "another one"], batch_size=2)
vector = model.encode_query("a query", dataset_embeddings=dataset)
saved = cde_jax.load(model.save_pretrained({str(tmp_path / "saved")!r}))
again = saved.encode_query("a query", dataset_embeddings=dataset)
assert np.array_equal(vector, again), "save_pretrained changed the embeddings"
assert cli.main(["convert", {str(released)!r}, {str(tmp_path / "conv")!r}]) == 0
print("ok", vector.shape, sorted(m for m in {sorted(TEST_ONLY)!r} if m in sys.modules
                                 and sys.modules[m] is not None))
"""
    done = run("-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "ok (64,) []"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"cde-jax {cde_jax.__version__}\n"
    assert run("-m", "cde_jax.cli", "--version").stdout == f"cde-jax {cde_jax.__version__}\n"


def test_convert_command(synthetic, tmp_path):
    released, _ = synthetic()
    out = tmp_path / "converted"
    done = run("-m", "cde_jax.cli", "convert", released, out)
    assert (done.returncode, done.stdout) == (0, f"wrote {out}\n"), done.stderr
    # orbax logs (through absl) on every save: "WARNING:absl:... Skipping merge of OCDBT"
    assert "absl" not in done.stderr and "orbax" not in done.stderr.lower(), done.stderr
    converted, direct = cde_jax.load(out), cde_jax.load(released)
    assert converted.fingerprint == direct.fingerprint
    ids = np.array([[50281, 8716, 64, 7267, 50282]], np.int32)
    np.testing.assert_array_equal(converted.first_stage(ids, np.ones_like(ids)),
                                  direct.first_stage(ids, np.ones_like(ids)))

    exists = run("-m", "cde_jax.cli", "convert", released, out)
    assert exists.returncode == 2
    assert exists.stderr == f"cde-jax convert: error: {out} already exists (pass " \
                            "--overwrite to replace it)\n"
    bf16 = run("scripts/convert_weights.py", released, out, "--overwrite", "--dtype", "bfloat16")
    assert bf16.returncode == 0, bf16.stderr
    assert json.loads((out / "cde_jax.json").read_text())["param_dtype"] == "bfloat16"
    local_revision = run("-m", "cde_jax.cli", "convert", released, tmp_path / "x",
                         "--revision", "main")
    assert local_revision.returncode == 2
    assert "a local directory has no revision" in local_revision.stderr
    assert not (tmp_path / "x").exists()


def test_quiet_logs():
    from absl import logging as absl_logging

    before = (absl_logging.get_verbosity(),
              {name: logging.getLogger(name).level for name in cli.QUIET_LOGGERS})
    try:
        cli.quiet_logs()
        assert absl_logging.get_verbosity() == absl_logging.ERROR
        for name in ("absl", "orbax"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.ERROR
        assert logging.getLogger("cde_jax.tokenization").getEffectiveLevel() <= logging.WARNING
    finally:
        absl_logging.set_verbosity(before[0])
        for name, level in before[1].items():
            logging.getLogger(name).setLevel(level)
