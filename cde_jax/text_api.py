"""The text API: `cde_jax.load(path)` and `CdeModel`, texts in, embeddings out.

`CdeModel` adds to the stage runner (`runner.py`) what texts need: task prompts, the
tokenizer, length buckets and the prefix cache. Array API (stable names): `first_stage(ids,
mask)` -> dataset embeddings (m, d) and `second_stage(ids, mask, dataset_embeddings)` ->
(b, d), float32 numpy, unnormalized. Text API (sentence-transformers style): `embed_dataset`,
`encode` (one str in: one (d,) vector out), `encode_query` / `embed_queries`,
`encode_document` / `embed_documents`, `similarity`, `max_seq_length`. With several processes
each passes and gets back its own rows, except for dataset embeddings, which every process
gets whole. Hub methods (`save_pretrained`, `push_to_hub`) come from `hub.HubMixin`.

`None` as dataset embeddings means one thing everywhere: null-dataset mode (the checkpoint's
null embedding in every row). A corpus with nothing known about it takes the generic
fallback minicorpus instead: `embed_dataset(fallback_minicorpus())`.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import hub, loading, minicorpus, pipeline, prompts, sharding, validation
from .minicorpus import DatasetEmbeddings
from .model import Prefix
from .runner import Stage, StageRunner, process_share
from .tokenization import MAX_LENGTH, TextTokenizer, load_tokenizer
from .validation import UserError


def load(path: str | Path, *, revision: str | None = None, dtype: str | None = None,
         param_dtype: str | None = None, attention: str = "auto",
         backbone_config: str | Path | None = None, mesh=None,
         plan: pipeline.BucketPlan | None = None) -> CdeModel:
    """Loads a converted dir, a released-layout dir (config.json + model.safetensors), or a
    hub id ("jxm/cde-small-v2") at `revision` (branch, tag or commit), converted once into
    a cache dir and reused (`hub.converted_dir`).

    dtype: compute dtype, one of `config.DTYPES` (default: "bfloat16" on GPU/TPU, with
    float32 accumulation, norms and softmax; "float32" on CPU). param_dtype: defaults to the
    stored one. attention: a kernel from `attention.names()`; "auto" picks the best for the
    platform and dtype. mesh: defaults to every device on a (data, model=1) mesh. plan:
    defaults to the platform's (`pipeline.default_plan`, sized from device memory).
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()
    path = hub.local_path(path, revision, backbone_config=backbone_config)
    ckpt = loading.read_checkpoint(path, backbone_config=backbone_config, mesh=mesh)
    backbone = loading.runtime_backbone(ckpt, mesh, dtype=dtype, param_dtype=param_dtype,
                                        attention_name=attention)
    runner = StageRunner(*loading.place_checkpoint(ckpt, backbone, mesh), mesh)
    tokenizer = ckpt.tokenizer_dir and TextTokenizer(load_tokenizer(ckpt.tokenizer_dir),
                                                     pad_id=backbone.pad_token_id)
    device = mesh.devices.flat[0]
    plan = plan or pipeline.default_plan(device.platform, pipeline.device_memory(device),
                                         sharding.data_shards(mesh))
    return CdeModel(runner, ckpt, backbone, tokenizer, plan)


class ArrayModel:
    """The array API of a loaded checkpoint: token ids in (validated), float32 rows out, and
    the second stage's prefix computed once per set of dataset embeddings."""

    def __init__(self, runner: StageRunner, ckpt, backbone):
        self.runner, self.mesh = runner, runner.mesh
        self.backbone_config, self.config = backbone, ckpt.cde
        self.fingerprint, self.config_json = ckpt.fingerprint, ckpt.config_json
        self.hidden_size = backbone.hidden_size
        self._cached_prefix: tuple[str, Prefix] | None = None

    def first_stage(self, input_ids, attention_mask) -> np.ndarray:
        """Dataset embeddings (m, d) float32 of tokenized minicorpus documents."""
        return self.runner.run(self.runner.first(), *self._tokens(input_ids, attention_mask))

    def second_stage(self, input_ids, attention_mask, dataset_embeddings) -> np.ndarray:
        """Embeddings (b, d) float32 given dataset embeddings (m, d), a `Prefix` from
        `prefix()`, or None (null-dataset mode)."""
        prefix = dataset_embeddings if isinstance(dataset_embeddings, Prefix) else \
            self.prefix(dataset_embeddings)
        return self.runner.run(self.runner.second(prefix),
                               *self._tokens(input_ids, attention_mask))

    def _tokens(self, input_ids, attention_mask):
        return validation.token_arrays(input_ids, attention_mask, self.backbone_config.vocab_size)

    def prefix(self, dataset_embeddings) -> Prefix:
        """The second stage's prefix for these dataset embeddings (None: null-dataset mode),
        computed once and cached for the last embeddings seen."""
        if isinstance(dataset_embeddings, DatasetEmbeddings):
            dataset_embeddings = dataset_embeddings.embeddings
        rows_md = None if dataset_embeddings is None else validation.embedding_rows(
            dataset_embeddings, "dataset embeddings", self.hidden_size)
        key = "null" if rows_md is None else hashlib.sha256(
            rows_md.tobytes() + str(rows_md.shape).encode()).hexdigest()
        if self._cached_prefix is None or self._cached_prefix[0] != key:
            self._cached_prefix = (key, self.runner.prefix(rows_md))
        return self._cached_prefix[1]


class CdeModel(ArrayModel, hub.HubMixin):
    """A loaded cde checkpoint: the array API plus texts (prompts, tokenizer, buckets)."""

    def __init__(self, runner: StageRunner, ckpt, backbone, tokenizer: TextTokenizer | None,
                 plan: pipeline.BucketPlan):
        super().__init__(runner, ckpt, backbone)
        self.tokenizer, self.tokenizer_dir, self.plan = tokenizer, ckpt.tokenizer_dir, plan
        self.max_seq_length = MAX_LENGTH

    @property
    def max_seq_length(self) -> int:
        """Tokens per text, [CLS] and [SEP] and the prompt included (2..512, default 512).
        Longer texts are cut; each call warns with the number of its texts that were cut."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self._max_seq_length = validation.int_in_range(value, "max_seq_length", 2, MAX_LENGTH)

    def tokenize(self, texts, prompt: str = "") -> list[list[int]]:
        """Token ids of `prompt + text` for each text, cut at `max_seq_length`. Safe to call
        from several threads (the corpus job tokenizes the next chunks in its readers)."""
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer files (tokenizer.json); "
                            "convert it again or copy them into the checkpoint dir")
        if self.tokenizer.max_length != self.max_seq_length:  # no change while others encode
            self.tokenizer.max_length = self.max_seq_length
        return self.tokenizer.encode([prompt + t for t in validation.texts(texts)])

    def _embed_texts(self, texts, stage: Stage, prompt: str, *, batch_size, show_progress_bar,
                     desc: str, extra_len: int = 0,
                     progress: Callable[[int], object] | None = None) -> np.ndarray:
        """`texts`: strings, or token id lists from `tokenize` (which hold their prompt)."""
        if texts and isinstance(texts[0], list):
            if prompt:
                raise UserError("token ids from `tokenize` already hold their prompt: pass "
                                "no prompt_name or prompt with them")
            token_ids = texts
        else:
            token_ids = self.tokenize(texts, prompt)
        show = sys.stderr.isatty() if show_progress_bar is None else show_progress_bar
        with tqdm(total=len(token_ids), desc=desc, unit="text",
                  disable=not show or progress is not None) as bar:
            return self.runner.run_buckets(
                token_ids, stage, plan=self.plan.with_batch_size(batch_size),
                pad_id=self.backbone_config.pad_token_id, width=self.hidden_size,
                extra_len=extra_len, progress=progress or bar.update)

    def embed_dataset(self, texts, *, seed: int = 0, batch_size: int | None = None,
                      show_progress_bar: bool | None = None) -> np.ndarray:
        """Dataset embeddings (corpus_size, d) of a minicorpus sampled from `texts` (the
        corpus, or `fallback_minicorpus()`). Every process passes the same texts and gets
        the same result."""
        docs = minicorpus.sample_minicorpus(texts, self.config.transductive_corpus_size, seed)
        return self.embed_minicorpus(docs, batch_size=batch_size,
                                     show_progress_bar=show_progress_bar)

    def embed_minicorpus(self, docs: list[str], **kw) -> np.ndarray:
        """Dataset embeddings of exactly these (already sampled) documents, in order, each
        process embedding its share."""
        docs = validation.texts(docs)
        return self.embed_minicorpus_share(docs[process_share(len(docs))], len(docs), **kw)

    def embed_minicorpus_share(self, mine: list[str], total: int, *,
                               batch_size: int | None = None,
                               show_progress_bar: bool | None = None) -> np.ndarray:
        """`embed_minicorpus` when each process holds only its share (`runner.process_share`
        of `total` documents): all `total` dataset embeddings, on every process."""
        out = self._embed_texts(mine, self.runner.first(), prompts.DOCUMENT,
                                batch_size=batch_size, show_progress_bar=show_progress_bar,
                                desc="minicorpus")
        return self.runner.gather(out, total)

    def dataset_embeddings_file(self, texts, *, seed: int = 0, **kw) -> DatasetEmbeddings:
        """`embed_dataset` with its provenance, ready to `.save(path)`."""
        return minicorpus.record(self.embed_dataset(texts, seed=seed, **kw), self.fingerprint,
                                 seed)

    def load_dataset_embeddings(self, path: str | Path) -> DatasetEmbeddings:
        return DatasetEmbeddings.load(path, fingerprint=self.fingerprint, width=self.hidden_size)

    def encode(self, texts, *, prompt_name: str | None = None, prompt: str | None = None,
               dataset_embeddings, batch_size: int | None = None,
               normalize_embeddings: bool = True, show_progress_bar: bool | None = None,
               progress: Callable[[int], object] | None = None) -> np.ndarray:
        """Embeddings (len(texts), d) float32 in input order, or one (d,) vector for one
        str; L2-normalized by default. prompt_name: "query" or "document" selects the task
        prefix; `prompt` gives one directly (e.g. "clustering: "); neither: texts as they are.
        `texts` may also be the token id lists of `tokenize(texts, prompt)` (tokenized ahead,
        e.g. in other threads). progress: called with the number of texts done after each
        batch (an outer progress bar), instead of this call's own bar.
        """
        prompt = prompts.by_name(prompt_name) if prompt is None else prompt
        prefix = self.prefix(dataset_embeddings)
        one = isinstance(texts, str)
        out = self._embed_texts([texts] if one else texts, self.runner.second(prefix), prompt,
                                batch_size=batch_size, show_progress_bar=show_progress_bar,
                                desc="encode", extra_len=prefix.embeds.shape[-2],
                                progress=progress)
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if one else out

    def encode_query(self, texts, *, dataset_embeddings, **kw) -> np.ndarray:
        return self.encode(texts, prompt_name="query", dataset_embeddings=dataset_embeddings,
                           **kw)

    def encode_document(self, texts, *, dataset_embeddings, **kw) -> np.ndarray:
        return self.encode(texts, prompt_name="document", dataset_embeddings=dataset_embeddings,
                           **kw)

    def embed_queries(self, texts, dataset_embeddings, **kw) -> np.ndarray:
        return self.encode_query(texts, dataset_embeddings=dataset_embeddings, **kw)

    def embed_documents(self, texts, dataset_embeddings, **kw) -> np.ndarray:
        return self.encode_document(texts, dataset_embeddings=dataset_embeddings, **kw)

    @staticmethod
    def similarity(a, b) -> np.ndarray:
        """Cosine similarity matrix (n, m) of embeddings a (n, d) and b (m, d); a single
        (d,) vector counts as one row."""
        return cosine_similarity(a, b)


def cosine_similarity(a, b) -> np.ndarray:
    a_nd, b_md = (np.atleast_2d(np.asarray(x, np.float32)) for x in (a, b))
    if a_nd.ndim != 2 or a_nd.shape[1:] != b_md.shape[1:]:
        raise UserError(f"similarity needs (n, d) and (m, d) embeddings, got shapes "
                        f"{np.shape(a)} and {np.shape(b)}")
    a_nd, b_md = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                  for x in (a_nd, b_md))
    return a_nd @ b_md.T
