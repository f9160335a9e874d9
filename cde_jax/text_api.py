"""The text API: `cde_jax.load(path)` and `CdeModel`, texts in, embeddings out.

`CdeModel` adds to the stage runner (`runner.py`) what texts need: task prompts, the
tokenizer, length buckets and the prefix cache. Array API (stable names): `first_stage(ids,
mask)` -> dataset embeddings (m, d) and `second_stage(ids, mask, dataset_embeddings)` ->
(b, d), float32 numpy, unnormalized. Text API (sentence-transformers style): `embed_dataset`,
`encode`, `embed_queries`, `embed_documents`. With several processes each passes and gets
back its own rows, except for dataset embeddings, which every process gets whole.

`None` as dataset embeddings means one thing everywhere: null-dataset mode (the checkpoint's
null embedding in every row). A corpus with nothing known about it takes the generic
fallback minicorpus instead: `embed_dataset(fallback_minicorpus())`.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import loading, minicorpus, pipeline, prompts, sharding, validation
from .minicorpus import DatasetEmbeddings
from .model import Prefix
from .runner import Stage, StageRunner, process_share
from .tokenization import TextTokenizer, load_tokenizer
from .validation import UserError


def load(path: str | Path, *, dtype: str | None = None, param_dtype: str | None = None,
         attention: str = "auto", backbone_config: str | Path | None = None, mesh=None,
         plan: pipeline.BucketPlan | None = None) -> CdeModel:
    """Loads a converted dir or a released-layout dir (config.json + model.safetensors).

    dtype: compute dtype, one of `config.DTYPES` (default: "bfloat16" on GPU/TPU, with
    float32 accumulation, norms and softmax; "float32" on CPU). param_dtype: defaults to the
    stored one. attention: a kernel from `attention.names()`; "auto" picks the best for the
    platform and dtype. mesh: defaults to every device on a (data, model=1) mesh. plan:
    defaults to the platform's (`pipeline.default_plan`, sized from device memory).
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()
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


class CdeModel:
    """A loaded cde checkpoint: configs, tokenizer and the stage runner on the mesh."""

    def __init__(self, runner: StageRunner, ckpt, backbone, tokenizer: TextTokenizer | None,
                 plan: pipeline.BucketPlan):
        self.runner, self.mesh, self.plan = runner, runner.mesh, plan
        self.backbone_config, self.config = backbone, ckpt.cde
        self.fingerprint, self.config_json = ckpt.fingerprint, ckpt.config_json
        self.tokenizer = tokenizer
        self.hidden_size = backbone.hidden_size
        self._cached_prefix: tuple[str, Prefix] | None = None

    # --- array API -----------------------------------------------------------------------
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

    # --- text API ------------------------------------------------------------------------
    def _embed_texts(self, texts: list[str], stage: Stage, prompt: str, *, batch_size,
                     show_progress_bar, desc: str, extra_len: int = 0) -> np.ndarray:
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer files (tokenizer.json); "
                             "convert it again or copy them into the checkpoint dir")
        token_ids = self.tokenizer.encode([prompt + t for t in validation.texts(texts)])
        show = sys.stderr.isatty() if show_progress_bar is None else show_progress_bar
        with tqdm(total=len(texts), desc=desc, unit="text", disable=not show) as bar:
            return self.runner.run_buckets(
                token_ids, stage, plan=self.plan.with_batch_size(batch_size),
                pad_id=self.backbone_config.pad_token_id, width=self.hidden_size,
                extra_len=extra_len, progress=bar.update)

    def embed_dataset(self, texts, *, seed: int = 0, batch_size: int | None = None,
                      show_progress_bar: bool | None = None) -> np.ndarray:
        """Dataset embeddings (corpus_size, d) of a minicorpus sampled from `texts` (the
        corpus, or `fallback_minicorpus()`). Every process passes the same texts and gets
        the same result."""
        docs = minicorpus.sample_minicorpus(texts, self.config.transductive_corpus_size, seed)
        return self.embed_minicorpus(docs, batch_size=batch_size,
                                     show_progress_bar=show_progress_bar)

    def embed_minicorpus(self, docs: list[str], *, batch_size: int | None = None,
                         show_progress_bar: bool | None = None) -> np.ndarray:
        """Dataset embeddings of exactly these (already sampled) documents, in order, each
        process embedding its share."""
        mine = self._embed_texts(validation.texts(docs)[process_share(len(docs))],
                                 self.runner.first(), prompts.DOCUMENT, batch_size=batch_size,
                                 show_progress_bar=show_progress_bar, desc="minicorpus")
        return self.runner.gather(mine, len(docs))

    def dataset_embeddings_file(self, texts, *, seed: int = 0, **kw) -> DatasetEmbeddings:
        """`embed_dataset` with its provenance, ready to `.save(path)`."""
        return minicorpus.record(self.embed_dataset(texts, seed=seed, **kw), self.fingerprint,
                                 seed)

    def load_dataset_embeddings(self, path: str | Path) -> DatasetEmbeddings:
        return DatasetEmbeddings.load(path, fingerprint=self.fingerprint, width=self.hidden_size)

    def encode(self, texts, *, prompt_name: str | None = None, prompt: str | None = None,
               dataset_embeddings, batch_size: int | None = None,
               normalize_embeddings: bool = True,
               show_progress_bar: bool | None = None) -> np.ndarray:
        """Embeddings (len(texts), d) float32 in input order; L2-normalized by default.

        prompt_name: "query" or "document" selects the task prefix; `prompt` gives one
        directly (e.g. "clustering: "); neither: texts are used as they are.
        """
        prompt = prompts.by_name(prompt_name) if prompt is None else prompt
        prefix = self.prefix(dataset_embeddings)
        out = self._embed_texts(texts, self.runner.second(prefix), prompt, batch_size=batch_size,
                                show_progress_bar=show_progress_bar, desc="encode",
                                extra_len=prefix.embeds.shape[-2])
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def embed_queries(self, texts, dataset_embeddings, **kw) -> np.ndarray:
        return self.encode(texts, prompt_name="query", dataset_embeddings=dataset_embeddings,
                           **kw)

    def embed_documents(self, texts, dataset_embeddings, **kw) -> np.ndarray:
        return self.encode(texts, prompt_name="document", dataset_embeddings=dataset_embeddings,
                           **kw)
