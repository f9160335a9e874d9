"""What the commands that run the model share: their input options, the model options
(compute dtype, attention kernel), the persistent XLA compilation cache (so that a repeated
run loads its programs instead of compiling them) and loading the model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import jax

from .. import attention
from ..config import DTYPES
from ..text_api import CdeModel, load

CACHE_ENV = "CDE_JAX_CACHE_DIR"
CACHE_HELP = (f"Compiled XLA programs are cached on disk so that repeated runs do not "
              f"recompile: in ${CACHE_ENV} if set, else $XDG_CACHE_HOME/cde-jax/xla "
              f"(default ~/.cache/cde-jax/xla).")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def add_input_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="converted checkpoint dir, or a released one (config.json + "
                             "model.safetensors)")
    parser.add_argument("--input", required=True,
                        help=".txt (one text per line, empty lines included), .jsonl (one "
                             "object per line) or .parquet (needs pyarrow)")
    parser.add_argument("--field", default="text",
                        help="the JSONL field or parquet column holding the text (default: text)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="texts per device batch (default: per platform, about 4096 "
                             "tokens on CPU, tens of thousands on accelerators; see README)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--dtype and --attention, for every command that runs the model (one definition)."""
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="compute dtype: matmul inputs in it, float32 accumulation, norms "
                             "and softmax (default: bfloat16 on GPU/TPU, float32 on CPU)")
    parser.add_argument("--attention", choices=attention.names(), default="auto",
                        help="attention kernel (default auto: cudnn on NVIDIA GPUs, splash on "
                             "TPUs, head_major on CPU)")


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cde-jax" / "xla"


def enable_compilation_cache() -> Path:
    """Caches every compiled program (even the quick ones) in `cache_dir()`."""
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def load_model(path: str, *, dtype: str | None = None, attention: str = "auto") -> CdeModel:
    enable_compilation_cache()
    return load(path, dtype=dtype, attention=attention)
