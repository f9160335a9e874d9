"""Where cde_jax finds its files: what the package ships (`cde_jax/data`: the ModernBERT
tokenizer, the fallback minicorpus) and its caches under the user's cache directory."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path


def packaged_data(name: str) -> Path:
    """A file or folder shipped in `cde_jax/data`."""
    return Path(str(importlib.resources.files("cde_jax") / "data" / name))


def cache_dir(kind: str, env: str) -> Path:
    """$`env` when set, else $XDG_CACHE_HOME/cde-jax/`kind` (default ~/.cache/cde-jax/`kind`)."""
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cde-jax" / kind
