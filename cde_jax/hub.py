"""The Hugging Face hub, both ways.

In: `cde_jax.load("owner/name", revision=...)` resolves the revision to a commit, downloads
the configs, safetensors and tokenizer files of that commit (never code: `convert.source`'s
patterns), converts them once into a cache directory keyed by repo id and commit, and loads
that directory; the next load of the same commit finds it and converts nothing. The cache
mirrors huggingface_hub's own layout:

    $CDE_JAX_CONVERTED_DIR (default $XDG_CACHE_HOME/cde-jax/converted, ~/.cache/...)
      models--owner--name/refs/<revision>       the commit a branch or tag last resolved to
      models--owner--name/snapshots/<commit>/   a converted checkpoint dir

Offline (or with HF_HUB_OFFLINE=1), a revision resolves through `refs/`, so a model loaded
once loads again without the hub.

Out: `HubMixin` gives `CdeModel` `save_pretrained(dir)`, the released layout
(`model.safetensors`, `config.json`, `modernbert_config.json`, tokenizer files) that
`cde_jax.load` and the PyTorch original both read, and `push_to_hub(repo_id)`, which saves
into a temporary dir and uploads it with `HfApi.create_repo` + `HfApi.upload_folder`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from pathlib import Path

from . import bucket_cache, convert, distributed, params, storage
from .convert import source
from .convert.released import CheckpointError
from .outputs import OutputExistsError
from .resources import cache_dir

log = logging.getLogger(__name__)

CONVERTED_ENV = "CDE_JAX_CONVERTED_DIR"
COMMIT = re.compile(r"[0-9a-f]{40}")


def converted_cache_dir() -> Path:
    """Where hub checkpoints are converted to: $CDE_JAX_CONVERTED_DIR, else
    $XDG_CACHE_HOME/cde-jax/converted (default ~/.cache/cde-jax/converted)."""
    return cache_dir("converted", CONVERTED_ENV)


def _repo_dir(repo_id: str) -> Path:
    return converted_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def resolve_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit of `revision` (a branch, tag or commit; default main): a full commit hash
    as given, else asked of the hub and recorded in `refs/`, which answers when the hub
    cannot."""
    if revision is not None and COMMIT.fullmatch(revision):
        return revision
    ref = _repo_dir(repo_id) / "refs" / (revision or "main")
    try:
        from huggingface_hub import HfApi

        commit = HfApi().model_info(repo_id, revision=revision).sha
    except Exception as e:  # offline, missing repo, auth
        if ref.is_file():
            log.info("hub unreachable (%s): %s@%s from the cache", type(e).__name__, repo_id,
                     revision or "main")
            return ref.read_text().strip()
        raise CheckpointError(
            f"could not resolve {repo_id!r} at revision {revision or 'main'!r} on the Hugging "
            f"Face hub ({type(e).__name__}: {e}), and it was never converted here. Offline? "
            "Pass a local checkpoint directory instead.") from e
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit + "\n")
    return commit


def converted_dir(repo_id: str, revision: str | None = None, *,
                  backbone_config: str | Path | None = None) -> Path:
    """The converted dir of `repo_id` at `revision`, converting it on first use."""
    commit = resolve_commit(repo_id, revision)
    name = commit
    if backbone_config is not None:  # another backbone is another conversion
        digest = hashlib.sha256(Path(backbone_config).read_bytes()).hexdigest()[:12]
        name += f"-backbone-{digest}"
    out = _repo_dir(repo_id) / "snapshots" / name
    if convert.is_converted(out):
        return out
    log.info("converting %s@%s into %s (once)", repo_id, commit, out)
    try:
        convert.convert(repo_id, out, revision=commit, backbone_config=backbone_config)
    except OutputExistsError:  # another process converted it meanwhile
        if not convert.is_converted(out):
            raise
    return out


def local_path(path: str | Path, revision: str | None = None, *,
               backbone_config: str | Path | None = None) -> Path:
    """A local checkpoint dir as is (no revision allowed); a hub id as its converted dir; a
    gs:// or s3:// dir as its local copy (`bucket_cache.local_copy`)."""
    if storage.is_url(path) and revision is None:
        return bucket_cache.local_copy(str(path))
    if source.is_hub_id(path):
        return converted_dir(str(path), revision, backbone_config=backbone_config)
    if revision is not None:
        raise CheckpointError(f"{path}: revision= applies to hub ids (owner/name), not to a "
                              "local directory")
    return Path(path)


MODEL_CARD = """---
library_name: cde-jax
tags: [cde, contextual-document-embeddings, sentence-similarity, jax]
---

# {repo_id}

Contextual Document Embeddings ({embedder} backbone, {width}-dimensional) in the released
cde-small-v2 layout (`model.safetensors`, `config.json`, `modernbert_config.json`, tokenizer),
saved by cde-jax {version}.

```python
import cde_jax

model = cde_jax.load("{repo_id}")
dataset = model.embed_dataset(corpus_texts)
docs = model.encode_document(corpus_texts, dataset_embeddings=dataset)
queries = model.encode_query(["a question"], dataset_embeddings=dataset)
scores = model.similarity(queries, docs)
```
"""


class HubMixin:
    """`save_pretrained` and `push_to_hub` for `CdeModel`."""

    def save_pretrained(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Writes the released layout into `out` (atomically; an existing `out` needs
        overwrite=True): the parameters as held (float32 unless loaded with another
        `param_dtype`), the configs and the tokenizer files. With several processes every
        process must call it; process 0 writes."""
        flat = {path: distributed.to_host(x)
                for path, x in params.flatten(self.runner.params).items()}
        if not distributed.is_main():
            return Path(out)
        ckpt = convert.Checkpoint(flat, self.backbone_config, self.config, self.config_json,
                                  self.fingerprint, self.tokenizer_dir)
        return convert.write_released(ckpt, out, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None,
                    token: str | None = None, revision: str | None = None,
                    commit_message: str = "Upload cde-jax model", create_pr: bool = False):
        """Uploads `save_pretrained`'s files and a model card to the model repo `repo_id`
        (created if missing; `revision`: a branch, created if missing). Returns
        huggingface_hub's `CommitInfo` (None on processes other than 0)."""
        from huggingface_hub import HfApi

        from . import __version__

        with tempfile.TemporaryDirectory(prefix="cde-jax-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            if not distributed.is_main():
                return None
            (folder / "README.md").write_text(MODEL_CARD.format(
                repo_id=repo_id, embedder=self.config.embedder, width=self.hidden_size,
                version=__version__))
            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            if revision is not None and not create_pr:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                     revision=revision, commit_message=commit_message,
                                     create_pr=create_pr)
