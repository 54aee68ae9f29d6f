"""Training and evaluation: the slim loop, checkpoints, configuration and figures.

The names below are imported on first use (``from deferredseg.train import TrainConfig``
works as before), so that light modules of this package, such as :mod:`.rundir`, can be
imported without torch.
"""

__all__ = [
    "METHODS",
    "TrainConfig",
    "load_config_file",
    "load_checkpoint",
    "save_checkpoint",
    "train",
    "evaluate",
]

_LAZY = {
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "METHODS": "config",
    "TrainConfig": "config",
    "load_config_file": "config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(cfg):
    from .loop import train as _train

    return _train(cfg)


def evaluate(checkpoint, **kw):
    from .evaluation import evaluate as _evaluate

    return _evaluate(checkpoint, **kw)
