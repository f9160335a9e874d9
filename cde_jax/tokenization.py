"""Tokenization with the checkpoint's `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no tokenizer.json")
    return Tokenizer.from_file(str(file))


def instruction_end_id(tokenizer: Tokenizer) -> int:
    """The id that ends a task prefix: the first token of `": "` (SPEC 4.6)."""
    return tokenizer.encode(": ", add_special_tokens=False).ids[0]


def packaged_data(name: str) -> Path:
    """A file or folder shipped in `cde_jax/data` (the ModernBERT tokenizer, random_docs.txt)."""
    return Path(str(importlib.resources.files("cde_jax") / "data" / name))
