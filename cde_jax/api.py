"""`cde_jax.load(path)` and the loaded model: arrays in, embeddings out, sharded.

Array API (stable names): `first_stage(ids, mask)` -> dataset embeddings (n, d) and
`second_stage(ids, mask, dataset_embeddings)` -> (b, d), both float32 numpy, unnormalized,
jit-compiled once per shape. Text API (sentence-transformers style): `embed_context`,
`encode`, `embed_queries`, `embed_documents`. With several processes, each passes and gets
back its own rows; parameters and batches are laid out by `sharding`'s rules table.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from . import convert, pipeline, sharding
from .config import CdeConfig, ModernBertConfig
from .context import DOCUMENT_PREFIX, DatasetEmbeddings, sample_minicorpus
from .model import Context, ContextualEmbedder
from .params import abstract_model, map_params, with_params
from .tokenization import TextTokenizer, load_tokenizer

PROMPTS = {"query": "search_query: ", "document": DOCUMENT_PREFIX}


def load(path: str | Path, *, dtype: str | None = None, param_dtype: str | None = None,
         backbone_config: str | Path | None = None, mesh=None,
         plan: pipeline.BucketPlan | None = None) -> "CdeModel":
    """Loads a converted dir or a released-layout dir (config.json + model.safetensors).

    dtype: compute dtype ("float32" default; "bfloat16" for accelerators). param_dtype:
    defaults to the stored one. mesh: defaults to every device on a (data, model=1) mesh.
    """
    return CdeModel.from_checkpoint(read_checkpoint(path, backbone_config=backbone_config),
                                    dtype=dtype, param_dtype=param_dtype, mesh=mesh, plan=plan)


def read_checkpoint(path: str | Path, *, backbone_config: str | Path | None = None
                    ) -> "convert.Checkpoint":
    """A converted dir, or a released-layout dir or hub id, as an in-memory `Checkpoint`."""
    path = Path(path)
    if convert.is_converted(path):
        return convert.read_converted(path)
    return convert.read_released(convert.source.local_checkpoint(path),
                                 backbone_config=backbone_config)


def _tokens(name: str, array, shape=None) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{name} must be a 2-D integer array, got {array.dtype} {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, input_ids has {shape}")
    return array.astype(np.int32)


class CdeModel:
    """A loaded cde checkpoint: parameters on the mesh, configs, tokenizer, compiled stages."""

    def __init__(self, model: ContextualEmbedder, backbone: ModernBertConfig, cde: CdeConfig, *,
                 fingerprint: str, tokenizer=None, config_json: dict | None = None, mesh=None,
                 plan: pipeline.BucketPlan | None = None):
        self.backbone_config, self.config = backbone, cde
        self.fingerprint = fingerprint
        self.config_json = config_json or {}
        self.tokenizer = tokenizer and TextTokenizer(tokenizer, pad_id=backbone.pad_token_id)
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.plan = plan or pipeline.BucketPlan()
        self.graphdef, params = nnx.split(model)
        self.params = map_params(params, lambda path, x: sharding.place(
            x, sharding.param_sharding(path, x.shape, self.mesh)))
        rows, replicated = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        self._first = jax.jit(self._first_fn, out_shardings=rows)
        self._context = jax.jit(self._context_fn, out_shardings=replicated)
        self._second = jax.jit(self._second_fn, out_shardings=rows)
        self._cached_context: tuple[str, Context] | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: "convert.Checkpoint", *, dtype: str | None = None,
                        param_dtype: str | None = None, mesh=None, plan=None) -> "CdeModel":
        param_dtype = param_dtype or ckpt.backbone.param_dtype
        backbone = ckpt.backbone.replace(param_dtype=param_dtype, dtype=dtype or "float32")
        model = with_params(abstract_model(backbone, ckpt.cde,
                                           has_null_embedding=ckpt.has_null_embedding),
                            ckpt.flat, dtype=param_dtype)
        tokenizer = load_tokenizer(ckpt.tokenizer_dir) if ckpt.tokenizer_dir else None
        return cls(model, backbone, ckpt.cde, fingerprint=ckpt.fingerprint, tokenizer=tokenizer,
                   config_json=ckpt.config_json, mesh=mesh, plan=plan)

    @property
    def model(self) -> ContextualEmbedder:
        return nnx.merge(self.graphdef, self.params)

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    # --- compiled pure functions of (params, arrays) ---------------------------------
    def _first_fn(self, params, input_ids, attention_mask):
        return nnx.merge(self.graphdef, params).first_stage_model(input_ids, attention_mask)

    def _context_fn(self, params, dataset_embeddings):
        return nnx.merge(self.graphdef, params).second_stage_model.context(dataset_embeddings)

    def _second_fn(self, params, input_ids, attention_mask, context):
        return nnx.merge(self.graphdef, params).second_stage_model(input_ids, attention_mask,
                                                                     context)

    def _run(self, fn, input_ids, attention_mask, *extra) -> np.ndarray:
        """One batch of this process's rows, padded to a multiple of its data shards."""
        ids = _tokens("input_ids", input_ids)
        mask = _tokens("attention_mask", attention_mask, ids.shape)
        multiple = max(1, sharding.data_shards(self.mesh) // jax.process_count())
        pad = -len(ids) % multiple
        if pad:
            ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), np.int32)])
            mask = np.concatenate([mask, np.zeros((pad, ids.shape[1]), np.int32)])
        rows = sharding.batch_sharding(self.mesh)
        out = fn(self.params, jax.make_array_from_process_local_data(rows, ids),
                 jax.make_array_from_process_local_data(rows, mask), *extra)
        return pipeline.local_rows(out, self.mesh)[:len(ids) - pad]

    # --- array API -------------------------------------------------------------------
    def first_stage(self, input_ids, attention_mask) -> np.ndarray:
        """Dataset embeddings (n, d) float32 for tokenized minicorpus documents."""
        return self._run(self._first, input_ids, attention_mask)

    def check_dataset_embeddings(self, dataset_embeddings) -> np.ndarray:
        if isinstance(dataset_embeddings, DatasetEmbeddings):
            dataset_embeddings = dataset_embeddings.embeddings
        emb = np.asarray(dataset_embeddings, dtype=np.float32)
        if emb.ndim == 3 and emb.shape[0] == 1:
            emb = emb[0]
        if emb.ndim != 2 or emb.shape[1] != self.hidden_size:
            raise ValueError(f"dataset embeddings must be (n, {self.hidden_size}), got "
                             f"{np.shape(dataset_embeddings)}")
        if emb.shape[0] == 0:
            raise ValueError("dataset embeddings are empty (0 rows)")
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if bad.size:
            raise ValueError(f"dataset embeddings have non-finite values in row(s) "
                             f"{bad[:10].tolist()}")
        return emb

    def context(self, dataset_embeddings=None) -> Context:
        """The second stage's prefix for these dataset embeddings (None: null-dataset mode),
        computed once and cached for the last embeddings seen."""
        if dataset_embeddings is None:
            key, emb = "null", None
        else:
            emb = self.check_dataset_embeddings(dataset_embeddings)
            key = hashlib.sha256(emb.tobytes() + str(emb.shape).encode()).hexdigest()
        if self._cached_context is None or self._cached_context[0] != key:
            placed = None if emb is None else sharding.place(emb,
                                                             sharding.replicated(self.mesh))
            self._cached_context = (key, self._context(self.params, placed))
        return self._cached_context[1]

    def second_stage(self, input_ids, attention_mask, dataset_embeddings) -> np.ndarray:
        """Query/document embeddings (b, d) float32 given dataset embeddings (n, d), a
        prepared `Context`, or None for null-dataset mode."""
        ctx = dataset_embeddings if isinstance(dataset_embeddings, Context) else \
            self.context(dataset_embeddings)
        return self._run(self._second, input_ids, attention_mask, ctx)

    # --- text API --------------------------------------------------------------------
    def _require_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer files (tokenizer.json); "
                             "convert it again or copy them into the checkpoint dir")
        return self.tokenizer

    def _encode_texts(self, texts, stage, prefix: str, *, batch_size, show_progress_bar,
                      desc: str, extra_len: int = 0) -> np.ndarray:
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text at index {i} is {type(text).__name__}, not str")
        token_ids = self._require_tokenizer().encode([prefix + t for t in texts])
        show = sys.stderr.isatty() if show_progress_bar is None else show_progress_bar
        with tqdm(total=len(texts), desc=desc, unit="text", disable=not show) as bar:
            return pipeline.run_bucketed(
                token_ids, stage, mesh=self.mesh, pad_id=self.backbone_config.pad_token_id,
                plan=self.plan.with_batch_size(batch_size), width=self.hidden_size,
                extra_len=extra_len, progress=bar.update)

    def embed_context(self, texts=None, *, seed: int = 0, batch_size: int | None = None,
                      show_progress_bar: bool | None = None) -> np.ndarray:
        """Dataset embeddings (corpus_size, d) from a minicorpus sampled from `texts` (None:
        the generic fallback). Every process passes the same texts and gets the same result."""
        docs = sample_minicorpus(texts, self.config.transductive_corpus_size, seed)
        return self.embed_minicorpus(docs, batch_size=batch_size,
                                     show_progress_bar=show_progress_bar)

    def embed_minicorpus(self, docs: list[str], *, batch_size: int | None = None,
                         show_progress_bar: bool | None = None) -> np.ndarray:
        """Dataset embeddings of exactly these (already sampled) documents, in order."""
        procs, me = jax.process_count(), jax.process_index()
        per = -(-len(docs) // procs)
        stage = lambda ids, mask: self._first(self.params, ids, mask)
        mine = self._encode_texts(docs[me * per:(me + 1) * per], stage, DOCUMENT_PREFIX,
                                  batch_size=batch_size, show_progress_bar=show_progress_bar,
                                  desc="minicorpus")
        if procs == 1:
            return mine
        padded = np.zeros((per, self.hidden_size), np.float32)
        padded[:len(mine)] = mine
        return multihost_utils.process_allgather(padded).reshape(-1, self.hidden_size)[:len(docs)]

    def context_record(self, texts=None, *, seed: int = 0, sampled: list[str] | None = None,
                       **kw) -> DatasetEmbeddings:
        """`embed_context` with its provenance, ready to `.save(path)`. `sampled`: the
        minicorpus already drawn from the texts with `seed` (the streaming CLI's path)."""
        emb = (self.embed_context(texts, seed=seed, **kw) if sampled is None
               else self.embed_minicorpus(sampled, **kw))
        return DatasetEmbeddings(emb, self.fingerprint, DOCUMENT_PREFIX, seed)

    def load_context(self, path: str | Path) -> DatasetEmbeddings:
        return DatasetEmbeddings.load(path, fingerprint=self.fingerprint, width=self.hidden_size)

    def encode(self, texts, *, prompt_name: str | None = None, prompt: str | None = None,
               dataset_embeddings, batch_size: int | None = None,
               normalize_embeddings: bool = True,
               show_progress_bar: bool | None = None) -> np.ndarray:
        """Embeddings (len(texts), d) float32 in input order; L2-normalized by default.

        prompt_name: "query" or "document" selects the task prefix; `prompt` gives one
        directly (e.g. "clustering: "); neither: texts are used as they are.
        """
        if prompt is None:
            if prompt_name is not None and prompt_name not in PROMPTS:
                raise ValueError(f"prompt_name must be one of {sorted(PROMPTS)}, got "
                                 f"{prompt_name!r}")
            prompt = PROMPTS.get(prompt_name, "")
        ctx = self.context(dataset_embeddings)
        stage = lambda ids, mask: self._second(self.params, ids, mask, ctx)
        out = self._encode_texts(texts, stage, prompt, batch_size=batch_size,
                                 show_progress_bar=show_progress_bar, desc="encode",
                                 extra_len=ctx.embeds.shape[-2])
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def embed_queries(self, texts, dataset_embeddings, **kw) -> np.ndarray:
        return self.encode(texts, prompt_name="query", dataset_embeddings=dataset_embeddings,
                           **kw)

    def embed_documents(self, texts, dataset_embeddings, **kw) -> np.ndarray:
        return self.encode(texts, prompt_name="document", dataset_embeddings=dataset_embeddings,
                           **kw)
