"""Training and evaluation: the slim loop, checkpoints, configuration and figures."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import METHODS, TrainConfig, load_config_file

__all__ = [
    "METHODS",
    "TrainConfig",
    "load_config_file",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "evaluate",
]


def train(cfg):
    from .loop import train as _train

    return _train(cfg)


def evaluate(checkpoint, **kw):
    from .evaluation import evaluate as _evaluate

    return _evaluate(checkpoint, **kw)
