"""Checkpoints: written atomically, read with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import torch

from ..fileio import atomic_save_torch


def save_checkpoint(path: Union[str, Path], state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file and a rename
    (:func:`deferredseg.fileio.atomic_save_torch`).

    A run killed while saving leaves the previous checkpoint intact, never a
    truncated one. The file gets the permissions of any new file under the
    process umask (group-readable with the usual 022 or 002), not 0600.
    """
    atomic_save_torch(path, state)


def load_checkpoint(path: Union[str, Path], map_location=None) -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a corrupt file or one holding more than tensors and containers
        raise ValueError(f"checkpoint {str(path)!r} cannot be read safely: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"checkpoint {str(path)!r} is not a deferredseg training checkpoint")
    return state
