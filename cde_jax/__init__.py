"""cde-jax: Contextual Document Embeddings (cde-small-v2) in pure JAX / Flax NNX.

Layout (docs/architecture.md): `text_api` (load, CdeModel: texts in, embeddings out) and
`context` (a corpus's dataset embeddings and prefix, held once) on `runner` (the stages
compiled on the mesh, batches in and rows out) on `model` / `encoder` (the two stages, the
ModernBERT encoder), with `attention` (the kernel registry), `tuning` (kernels checked and
timed at first use), `sharding` (the rules table), `buckets` (length buckets), `minicorpus`
(sampling, dataset-embeddings files), `prompts`, `validation`; `distributed` (the only module
that talks across processes), `stopping` (how a command stops: signals, a lost peer),
`_jax_compat` (the one workaround past JAX's public API), `outputs` (the lifecycle of every
output), `quantize` (compact outputs), `corpus` (chunked sources, resumable sinks, the
multi-process corpus job); `convert` (the key map and checkpoint formats), `hub` (hub ids
converted once into a cache, `save_pretrained`, `push_to_hub`),
`training`, `evaluation`, `serving` (the embedding server), `commands` (the CLI); `aot`
(the stages compiled for TPU and GPU targets from any host, `hlo`, `flops`: what the
programs cost).

Dimension key: array names end in their shape, one letter per axis, the same everywhere:
  b batch rows          s sequence (key) positions   t query positions
  p prefix positions    m dataset-embedding rows     d hidden
  h heads               e head_dim                   f MLP intermediate
  q queries             c documents of a batch       n corpus rows (search), points
  k top-k results       u k-means clusters           r rows of a block or tile
  g gradient-cache blocks                            a micro-batches
  j reduced width (SVD) l candidates (k-means++)
"""

from .config import CdeConfig, ModernBertConfig
from .context import Context
from .corpus import read_embeddings
from .minicorpus import DatasetEmbeddings, fallback_minicorpus
from .text_api import CdeModel, load

__all__ = ["CdeConfig", "CdeModel", "Context", "DatasetEmbeddings", "ModernBertConfig",
           "fallback_minicorpus", "load", "read_embeddings"]
__version__ = "0.1.0"
