"""Where a checkpoint and its backbone settings come from: a local dir or a hub id.

Hub downloads take configs, safetensors and tokenizer files only; a checkpoint's Python code
is never fetched nor run.
"""

from __future__ import annotations

import json
from pathlib import Path

from cde_jax.config import EMBEDDER_PRESETS, ModernBertConfig
from cde_jax.resources import packaged_data

from .released import CheckpointError

BACKBONE_FILE = "modernbert_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]


def is_hub_id(source: str | Path) -> bool:
    """`owner/name` that is not an existing path: a Hugging Face hub repository id."""
    text = str(source)
    return (not Path(source).exists() and text.count("/") == 1
            and not text.startswith((".", "/", "~")) and all(text.split("/")))


def local_checkpoint(source: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise `owner/name` from the Hugging Face hub (at
    `revision`: a branch, tag or commit; default main)."""
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{source}: a local directory has no revision (revision= "
                                  "applies to hub ids only)")
        return path
    if path.exists():
        raise CheckpointError(f"{source}: expected a checkpoint directory, got a file")
    if not is_hub_id(source):
        raise CheckpointError(f"{source}: no such directory, and not a hub id (owner/name)")
    return hub_download(str(source), revision=revision)


def hub_download(repo_id: str, patterns=HUB_PATTERNS, revision: str | None = None) -> Path:
    """The repository's files matching `patterns` (configs, safetensors, tokenizer files:
    never code) in huggingface_hub's cache; the path's name is the commit."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, missing repo, auth: all end the same way for the user
        at = "" if revision is None else f" at revision {revision!r}"
        raise CheckpointError(
            f"could not download {repo_id!r}{at} from the Hugging Face hub ({type(e).__name__}: "
            f"{e}). Offline? Pass a local checkpoint directory instead.") from e


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def backbone_config(ckpt_dir: Path, cde_json: dict, override: str | Path | None = None,
                    **runtime) -> ModernBertConfig:
    """`--backbone-config` first, then `modernbert_config.json` beside the checkpoint, then the
    preset named by `embedder`."""
    if override is not None and not Path(override).exists():
        raise CheckpointError(f"{override}: backbone config not found")
    for path in (override, Path(ckpt_dir) / BACKBONE_FILE):
        if path is not None and Path(path).exists():
            return ModernBertConfig.from_hf_dict(read_json(Path(path)), **runtime)
    embedder = cde_json.get("embedder")
    if embedder in EMBEDDER_PRESETS:
        return EMBEDDER_PRESETS[embedder](**runtime)
    raise CheckpointError(
        f"no backbone settings for embedder {embedder!r}: known presets are "
        f"{sorted(EMBEDDER_PRESETS)}; put a {BACKBONE_FILE} beside the checkpoint or pass "
        "--backbone-config PATH")


PACKAGED_TOKENIZERS = {"answerdotai/ModernBERT-base": packaged_data("modernbert-tokenizer")}


def embedder_tokenizer(embedder: str | None) -> Path | None:
    """Tokenizer files for a backbone (released cde checkpoints may lack them): the copy
    shipped with cde_jax for ModernBERT-base, else the hub; None when neither has them."""
    packaged = PACKAGED_TOKENIZERS.get(embedder or "")
    if packaged is not None and (packaged / "tokenizer.json").exists():
        return packaged
    if not embedder:
        return None
    try:
        path = hub_download(embedder, list(TOKENIZER_FILES))
    except CheckpointError:
        return None
    return path if (path / "tokenizer.json").exists() else None
