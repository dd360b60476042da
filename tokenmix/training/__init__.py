"""Training: the run's config (:mod:`.config`), the loop shared by ``tokenmix train`` and
``tokenmix compare`` (:mod:`.loop`), crash-safe checkpoints (:mod:`.checkpoint`), torchrun
set-up (:mod:`.distributed`) and one run end to end (:mod:`.run`)."""

from .checkpoint import checkpoint_epochs, load_checkpoint, save_checkpoint
from .config import DTYPES, OPTIMIZERS, TrainConfig, add_config_arguments, config_from_args
from .distributed import Dist, setup_distributed
from .loop import Interrupted, Loop, evaluate, make_optimizer, make_scheduler, make_train_loader, train_epoch
from .run import build_model, count_macs, model_in_channels, train

__all__ = ["TrainConfig", "DTYPES", "OPTIMIZERS", "add_config_arguments", "config_from_args", "Dist",
           "setup_distributed", "Loop", "Interrupted", "evaluate", "make_optimizer", "make_scheduler",
           "make_train_loader", "train_epoch", "save_checkpoint", "load_checkpoint", "checkpoint_epochs", "train",
           "build_model", "count_macs", "model_in_channels"]
