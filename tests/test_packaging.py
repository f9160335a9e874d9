"""What a user meets before any model runs: `cde-jax --version`, `cde-jax convert` (and its
old name scripts/convert_weights.py), a quiet CLI."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cde_jax
from cde_jax import cli

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd=REPO):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


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
    assert exists.stderr == f"cde-jax convert: error: {out} already exists (refusing to " \
                            "overwrite it)\n"
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
