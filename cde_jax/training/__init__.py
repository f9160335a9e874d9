"""Fine-tuning cde models: contrastive two-stage training (optax), sharded, checkpointed
(orbax), resumable, exported back to the released layout."""

from .data import BatchConfig, Example, TrainData, read_examples
from .loop import TrainConfig, TrainResult, train
from .loss import contrastive_loss
from .step import Stages, StepConfig, batch_loss, loss_and_grad, make_optimizer, make_train_step

__all__ = ["BatchConfig", "Example", "StepConfig", "Stages", "TrainConfig", "TrainData",
           "TrainResult", "batch_loss", "contrastive_loss", "loss_and_grad", "make_optimizer",
           "make_train_step", "read_examples", "train"]
