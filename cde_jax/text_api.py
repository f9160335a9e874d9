"""The text API: `cde_jax.load(path)` and `CdeModel`, texts in, embeddings out.

`CdeModel` adds to the stage runner (`runner.py`) what texts need: task prompts, the
tokenizer and length buckets. The corpus a text is embedded against is a `Context`
(`context.py`): `model.context(corpus)` holds the dataset embeddings and the second stage's
prefix, computed once. `model.encode(texts, dataset_embeddings=...)` is the
sentence-transformers-shaped entry (`encode_query`, `encode_document`, `similarity`,
`max_seq_length` too); it builds a context for the call. Array API: `first_stage(ids,
mask)` -> dataset embeddings (m, d), `context.second_stage(ids, mask)` -> (b, d), float32
numpy, unnormalized. Inside other JAX code: `model.graphdef`, `model.params` and
`model.module` (README: "Inside your JAX code"). With several processes each passes and
gets back its own rows, except for dataset embeddings, which every process gets whole.

`None` as dataset embeddings means one thing everywhere: null-dataset mode (the checkpoint's
null embedding in every row). A corpus with nothing known about it takes the generic
fallback minicorpus instead: `model.context(fallback_minicorpus())`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from . import (
    attention,
    buckets,
    convert,
    distributed,
    hub,
    loading,
    minicorpus,
    ops,
    prompts,
    sharding,
    tuning,
    validation,
)
from .config import ModernBertConfig
from .context import Context, ContextSource
from .minicorpus import DatasetEmbeddings
from .model import ContextualEmbedder
from .runner import Stage, StageRunner
from .tokenization import MAX_LENGTH, TextTokenizer, load_tokenizer
from .validation import UserError


def load(path: str | Path, *, revision: str | None = None, dtype: str | None = None,
         param_dtype: str | None = None, activations: str = "compute", attention: str = "auto",
         backbone_config: str | Path | None = None, mesh=None,
         plan: buckets.BucketPlan | None = None, check_kernel: bool = True,
         tune: bool | None = None) -> CdeModel:
    """Loads a converted dir, a released-layout dir (config.json + model.safetensors), or a
    hub id ("jxm/cde-small-v2") at `revision` (branch, tag or commit), converted once into
    a cache dir and reused (`hub.converted_dir`).

    dtype: compute dtype, one of `config.DTYPES` (default: "bfloat16" on GPU/TPU, with
    float32 accumulation, norms and softmax; "float32" on CPU). param_dtype: defaults to the
    stored one. activations: with a half dtype, "compute" keeps the activations between ops
    in it (half the memory traffic), "float32" in float32 (rounding at matmul inputs only,
    the last 1e-4 of fidelity); the same program in float32. attention: a kernel from
    `attention.names()`; "auto" picks the best for the platform and dtype: on a GPU or TPU
    the fastest candidate that matches "xla" on a probe batch, checked and timed at first use
    and cached (`tuning.settle`); a named kernel is checked the same way (failing is an
    error unless `check_kernel=False`). tune: probe on this platform (default: on GPUs and
    TPUs only; True on CPU too; False never). mesh: defaults to every device on a
    (data, model=1) mesh. plan: defaults to the platform's
    (`buckets.default_plan`, sized from the measured memory per token of the kernel).
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()
    path = hub.local_path(path, revision, backbone_config=backbone_config)
    ckpt = loading.read_checkpoint(path, backbone_config=backbone_config, mesh=mesh)
    backbone = loading.runtime_backbone(ckpt.backbone, mesh, dtype=dtype, param_dtype=param_dtype,
                                        attention_name=attention, activations=activations)
    runner = StageRunner(*loading.place_checkpoint(ckpt, backbone, mesh), mesh, backbone.dtype)
    platform = mesh.devices.flat[0].platform
    if tuning.probes(platform, tune):
        backbone, runner = tuning.settle(
            runner, backbone, ckpt.cde, plan or _plan(mesh, backbone.attention),
            requested=attention, platform=platform, check=check_kernel)
    return model_of(ckpt, backbone, runner, plan)


def model_of(ckpt: convert.Checkpoint, backbone: ModernBertConfig, runner: StageRunner,
             plan: buckets.BucketPlan | None = None) -> CdeModel:
    """A `CdeModel` of a runner whose parameters are already on its mesh (no copy): what
    `load` returns, and what training evaluates its current parameters with."""
    tokenizer = ckpt.tokenizer_dir and TextTokenizer(load_tokenizer(ckpt.tokenizer_dir),
                                                     pad_id=backbone.pad_token_id)
    return CdeModel(runner, ckpt, backbone, tokenizer,
                    plan or _plan(runner.mesh, backbone.attention))


def _plan(mesh, kernel: str) -> buckets.BucketPlan:
    """The platform's default plan for `kernel` on `mesh` (`buckets.default_plan`)."""
    device = mesh.devices.flat[0]
    return buckets.default_plan(device.platform, buckets.device_memory(device),
                                sharding.data_shards(mesh), device_kind=device.device_kind,
                                kernel=kernel)


class ArrayApi:
    """The stable array API of `CdeModel`: numpy token ids and masks in (any 0/1 mask),
    float32 numpy out, unnormalized."""

    def first_stage(self, input_ids, attention_mask) -> np.ndarray:
        """Array API: dataset embeddings (m, d) float32 of tokenized minicorpus documents."""
        ids_bs, mask_bs, runner = self.array_batch(input_ids, attention_mask)
        return runner.run(runner.first(), ids_bs, mask_bs)

    def second_stage(self, input_ids, attention_mask, dataset_embeddings: ContextSource
                     ) -> np.ndarray:
        """Array API: embeddings (b, d) float32, unnormalized, of tokenized texts."""
        return self.context(dataset_embeddings).second_stage(input_ids, attention_mask)

    def array_batch(self, input_ids, attention_mask
                    ) -> tuple[np.ndarray, np.ndarray, StageRunner]:
        """The array API's (ids, mask), validated, and the runner for them: a batch with a
        hole inside a text goes to "xla" on the same parameters where the kernel takes
        padding only (`attention.Kernel.holes` False: cudnn's lengths)."""
        ids_bs, mask_bs = validation.token_arrays(input_ids, attention_mask,
                                                  self.backbone_config.vocab_size)
        if attention.KERNELS[self.backbone_config.attention].holes or not ops.has_hole(mask_bs):
            return ids_bs, mask_bs, self.runner
        self._holes_runner = self._holes_runner or loading.with_kernel(
            self.runner, self.backbone_config, self.config, "xla")
        return ids_bs, mask_bs, self._holes_runner


class CdeModel(ArrayApi, hub.HubMixin):
    """A loaded cde checkpoint: both stages on the mesh, the tokenizer and the bucket plan."""

    def __init__(self, runner: StageRunner, ckpt: convert.Checkpoint,
                 backbone: ModernBertConfig, tokenizer: TextTokenizer | None,
                 plan: buckets.BucketPlan):
        self.runner, self.mesh, self.plan = runner, runner.mesh, plan
        self.backbone_config, self.config = backbone, ckpt.cde
        self.fingerprint, self.config_json = ckpt.fingerprint, ckpt.config_json
        self.tokenizer, self.tokenizer_dir = tokenizer, ckpt.tokenizer_dir
        self.hidden_size = backbone.hidden_size
        self._holes_runner: StageRunner | None = None  # `array_batch`'s, made when needed
        self.max_seq_length = MAX_LENGTH
        # Inside other JAX code: the NNX graph and the parameters (a pytree of jax.Arrays on
        # the mesh) that `nnx.merge` makes the module of.
        self.graphdef: nnx.GraphDef = runner.graphdef
        self.params: dict = runner.params

    @property
    def module(self) -> ContextualEmbedder:
        """The Flax NNX module holding these parameters (`nnx.merge(graphdef, params)`)."""
        return nnx.merge(self.graphdef, self.params)

    # --- texts -------------------------------------------------------------------------
    @property
    def max_seq_length(self) -> int:
        """Tokens per text, [CLS] and [SEP] and the prompt included (2..512, default 512).
        Longer texts are cut; each call warns with the number of its texts that were cut."""
        return self._max_seq_length

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self._max_seq_length = validation.int_in_range(value, "max_seq_length", 2, MAX_LENGTH)

    def tokenize(self, texts: Sequence[str], prompt: str = "") -> list[list[int]]:
        """Token ids of `prompt + text` for each text, cut at `max_seq_length`. Safe to call
        from several threads (the corpus job tokenizes the next chunks in its readers)."""
        return self.tokenize_with_cuts(texts, prompt)[0]

    def tokenize_with_cuts(self, texts: Sequence[str], prompt: str = ""
                           ) -> tuple[list[list[int]], list[int]]:
        """`tokenize`, and the indices of the texts that were cut."""
        if self.tokenizer is None:
            raise UserError("this checkpoint has no tokenizer files (tokenizer.json); "
                            "convert it again or copy them into the checkpoint dir")
        return self.tokenizer.encode_with_cuts([prompt + t for t in validation.texts(texts)],
                                               self.max_seq_length)

    def run_texts(self, token_ids: Sequence[Sequence[int]], stage: Stage, *,
                  batch_size: int | None, show_progress_bar: bool | None, desc: str,
                  extra_len: int = 0, progress: Callable[[int], object] | None = None
                  ) -> np.ndarray:
        """`stage` over token id lists in length buckets, with a progress bar (or `progress`)."""
        show = sys.stderr.isatty() if show_progress_bar is None else show_progress_bar
        with tqdm(total=len(token_ids), desc=desc, unit="text",
                  disable=not show or progress is not None) as bar:
            return self.runner.run_buckets(
                token_ids, stage, plan=self.plan.with_batch_size(batch_size),
                pad_id=self.backbone_config.pad_token_id, width=self.hidden_size,
                extra_len=extra_len, progress=progress or bar.update)

    # --- the first stage: dataset embeddings ---------------------------------------------
    def embed_dataset(self, texts: Sequence[str], *, seed: int = 0, **kw) -> np.ndarray:
        """Dataset embeddings (corpus_size, d) of a minicorpus sampled from `texts` (the
        corpus, or `fallback_minicorpus()`). Every process passes the same texts and gets
        the same result. `kw`: batch_size, show_progress_bar."""
        docs = minicorpus.sample_minicorpus(texts, self.config.transductive_corpus_size, seed)
        return self.embed_minicorpus(docs, **kw)

    def embed_minicorpus(self, docs: Sequence[str], *, total: int | None = None,
                         batch_size: int | None = None,
                         show_progress_bar: bool | None = None) -> np.ndarray:
        """Dataset embeddings of exactly these (already sampled) documents, in order, on
        every process. Each process embeds its share (`distributed.process_share`); with
        `total`, `docs` is already this process's share of `total` documents."""
        docs = validation.texts(docs)
        if total is None:
            total, docs = len(docs), docs[distributed.process_share(len(docs))]
        out = self.run_texts(self.tokenize(docs, prompts.DOCUMENT), self.runner.first(),
                             batch_size=batch_size, show_progress_bar=show_progress_bar,
                             desc="minicorpus")
        return distributed.gather_rows(out, total)

    def dataset_embeddings_file(self, texts: Sequence[str], *, seed: int = 0,
                                **kw) -> DatasetEmbeddings:
        """`embed_dataset` with its provenance, ready to `.save(path)`."""
        return minicorpus.record(self.embed_dataset(texts, seed=seed, **kw), self.fingerprint,
                                 seed)

    def load_dataset_embeddings(self, path: str | Path) -> DatasetEmbeddings:
        return DatasetEmbeddings.load(path, fingerprint=self.fingerprint, width=self.hidden_size)

    # --- the second stage: a context, then texts -----------------------------------------
    def context(self, source: ContextSource, *, seed: int = 0,
                batch_size: int | None = None) -> Context:
        """The context of a corpus (`Context.of`): its texts (a minicorpus is sampled with
        `seed` and embedded), a `DatasetEmbeddings`, an (m, d) array, a dataset-embeddings
        file, a `Context` of this model, or None (null-dataset mode)."""
        return Context.of(self, source, seed=seed, batch_size=batch_size)

    def encode(self, texts: str | Sequence[str], *, dataset_embeddings: ContextSource,
               **kw) -> np.ndarray:
        """sentence-transformers' `encode`: `self.context(dataset_embeddings).encode(texts,
        **kw)` (prompt_name, prompt, batch_size, normalize_embeddings, show_progress_bar,
        progress). For many calls against one corpus, hold the context instead."""
        return self.context(dataset_embeddings).encode(texts, **kw)

    def encode_query(self, texts, *, dataset_embeddings: ContextSource, **kw) -> np.ndarray:
        return self.context(dataset_embeddings).encode_query(texts, **kw)

    def encode_document(self, texts, *, dataset_embeddings: ContextSource, **kw) -> np.ndarray:
        return self.context(dataset_embeddings).encode_document(texts, **kw)

    @staticmethod
    def similarity(a, b) -> np.ndarray:
        """Cosine similarity matrix (n, m) of embeddings a (n, d) and b (m, d); a single
        (d,) vector counts as one row."""
        return ops.cosine_similarity(a, b)
