"""The server's contexts by name: those of --context and --context-dir at start, and those
made over the API (`POST /v1/contexts`), kept in --context-dir across restarts.

A context made from texts embeds its sampled minicorpus on the devices like any request,
but in a thread of its own (one at a time), not through the batcher: queries to the other
contexts keep being answered meanwhile. Every context has the model's minicorpus size of
rows, so the prefix length every batch shape was compiled for. Files are the
`dataset-embeddings` command's `.npz`, written atomically (`DatasetEmbeddings.save`); a
name's file is its URL-quoted name (`org/corpus` -> `org%2Fcorpus.npz`).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import logging
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from .. import minicorpus, validation
from ..context import Context
from ..text_api import CdeModel
from ..validation import UserError
from .config import CONTEXT_NAME
from .protocol import ApiError

log = logging.getLogger(__name__)


def context_file(directory: Path, name: str) -> Path:
    return directory / (quote(name, safe="") + ".npz")


class ContextStore:
    def __init__(self, model: CdeModel, directory: str | None):
        self.model = model
        self.directory = None if directory is None else Path(directory)
        self.contexts: dict[str, Context] = {}
        self.making: set[str] = set()  # names whose context is being made
        self.saved: set[str] = set()  # names with a file in `directory`
        self._maker = concurrent.futures.ThreadPoolExecutor(1, "cde-serve-contexts")

    def load(self, files: dict[str, str]) -> None:
        """The contexts of --context (name: file) and of every NAME.npz in --context-dir."""
        found = dict(files)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.directory.glob("*.npz")):
                name = unquote(path.stem)
                if path.name.startswith(".") or not CONTEXT_NAME.fullmatch(name):
                    raise UserError(f"{path}: not a context's file name (NAME.npz, NAME of "
                                    f"letters, digits and ._:/-, URL-quoted)")
                if name in found:
                    raise UserError(f"context {name!r} is both --context {found[name]} and "
                                    f"{path}")
                found[name] = str(path)
                self.saved.add(name)
        for name, path in found.items():
            self.contexts[name] = self.checked(Context.of(self.model, path), f"{path}")

    def checked(self, context: Context, what: str) -> Context:
        rows = self.model.config.transductive_corpus_size
        got = 0 if context.dataset_embeddings is None else len(context.dataset_embeddings)
        if got != rows:
            raise UserError(f"{what}: {got} rows of dataset embeddings; this model's "
                            f"minicorpus has {rows}")
        return context

    def get(self, name: str | None) -> Context:
        if name is None and self.contexts:
            return next(iter(self.contexts.values()))
        if name in self.making:
            raise ApiError(404, f"model {name!r} is still being made: retry once GET "
                                f"/v1/contexts lists it as ready", param="model",
                           code="model_not_found")
        if name not in self.contexts:
            served = ", ".join(self.contexts) or "none yet (POST /v1/contexts)"
            raise ApiError(404, f"model {name!r} is not served here; the models (contexts) "
                                f"are: {served} (GET /v1/models)", param="model",
                           code="model_not_found")
        return self.contexts[name]

    def listing(self) -> list[dict]:
        return ([self.describe(name) for name in self.contexts]
                + [{"id": name, "object": "context", "status": "making"}
                   for name in sorted(self.making)])

    def describe(self, name: str) -> dict:
        return {"id": name, "object": "context", "status": "ready",
                "rows": len(self.contexts[name].dataset_embeddings),
                "persisted": name in self.saved}

    def reserve(self, name: str) -> None:
        if name in self.contexts or name in self.making:
            raise ApiError(409, f"context {name!r} exists: DELETE /v1/contexts/{name} first",
                           param="name", code="context_exists")
        self.making.add(name)

    def make(self, name: str, texts: list[str] | None, encoded: str | None, seed: int
             ) -> concurrent.futures.Future:
        """In the maker's thread: the context of `texts` (a minicorpus sampled with `seed`
        and embedded) or of base64 little-endian float32 dataset embeddings, saved in
        --context-dir if there is one."""
        def work() -> Context:
            if texts is not None:
                rows_md = self.model.embed_dataset(texts, seed=seed, show_progress_bar=False)
            else:
                rows_md = self.decoded(encoded)
            context = self.checked(Context.of(self.model, rows_md), "dataset_embeddings")
            if self.directory is not None:
                minicorpus.record(rows_md, self.model.fingerprint, seed).save(
                    context_file(self.directory, name))
            return context

        return self._maker.submit(work)

    def decoded(self, encoded: str) -> np.ndarray:
        d = self.model.hidden_size
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"dataset_embeddings is not base64: {e}",
                           param="dataset_embeddings") from None
        if not raw or len(raw) % (4 * d):
            raise ApiError(400, f"dataset_embeddings holds {len(raw)} bytes: expected rows of "
                                f"{d} little-endian float32 ({4 * d} bytes each)",
                           param="dataset_embeddings")
        return validation.embedding_rows(np.frombuffer(raw, "<f4").reshape(-1, d),
                                         "dataset_embeddings", d)

    def added(self, name: str, context: Context | None) -> None:
        """Ends `reserve`: the context made (or None: its making failed)."""
        self.making.discard(name)
        if context is not None:
            self.contexts[name] = context
            if self.directory is not None:
                self.saved.add(name)

    def delete(self, name: str) -> None:
        """Forgets the context; removes its file if it is in --context-dir (a --context file
        is the user's, left alone)."""
        if name not in self.contexts:
            self.get(name)  # the 404
        del self.contexts[name]
        if name in self.saved:
            context_file(self.directory, name).unlink(missing_ok=True)
            self.saved.discard(name)

    def close(self) -> None:
        self._maker.shutdown(wait=True)
