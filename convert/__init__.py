"""Weight conversion between the released PyTorch layout and cde_jax (installed as
`cde_jax.convert`)."""

from .checkpoint import (
                         Checkpoint,
                         convert,
                         is_converted,
                         read_converted,
                         read_released,
                         released_tensors,
                         write_converted,
                         write_released,
)
from .released import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "convert", "is_converted", "read_converted",
           "read_released", "released_tensors", "write_converted", "write_released"]
