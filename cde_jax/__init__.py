"""cde-jax: Contextual Document Embeddings (cde-small-v2) in pure JAX / Flax NNX."""

from .api import CdeModel, load
from .config import CdeConfig, ModernBertConfig

__all__ = ["CdeConfig", "CdeModel", "ModernBertConfig", "load"]
__version__ = "0.1.0"
