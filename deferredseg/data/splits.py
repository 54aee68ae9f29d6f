"""Train / validation / test splits: a seeded rule or a JSON split file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

__all__ = ["SPLITS", "split_ids", "load_split_file", "select_split"]

SPLITS = ("train", "val", "test")
_ALIASES = {"validation": "val", "valid": "val"}


def split_ids(
    ids: Sequence[str], fractions: Tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> Dict[str, List[str]]:
    """Split ``ids`` into ``{"train", "val", "test"}`` by a seeded rule.

    The ids are sorted, permuted with ``numpy.random.default_rng(seed)``, and cut
    into ``round(f_val * n)`` validation and ``round(f_test * n)`` test ids; the
    rest is training. The same ids and seed always give the same split, wherever
    the files were listed from. Each list is returned sorted.
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions must be three non-negative numbers (train, val, test) summing to 1, "
            f"got {fractions!r}"
        )
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError("split_ids got duplicate ids")
    n = len(ordered)
    perm = np.random.default_rng(int(seed)).permutation(n)
    n_val = int(round(fr[1] * n))
    n_test = min(int(round(fr[2] * n)), n - n_val)
    shuffled = [ordered[i] for i in perm]
    val, test, train = (
        shuffled[:n_val],
        shuffled[n_val : n_val + n_test],
        shuffled[n_val + n_test :],
    )
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def load_split_file(path, ids: Sequence[str]) -> Dict[str, List[str]]:
    """Read a JSON split file ``{"train": [...], "val": [...], "test": [...]}``.

    ``"validation"`` is accepted for ``"val"``; absent splits are empty. Every id
    must be one of ``ids`` and appear in one split only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"split file {path}: cannot be read as JSON ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(
            f'split file {path}: expected a JSON object {{"train": [...], "val": [...], '
            f'"test": [...]}}, got {type(raw).__name__}'
        )
    out: Dict[str, List[str]] = {s: [] for s in SPLITS}
    for key, value in raw.items():
        name = _ALIASES.get(key, key)
        if name not in SPLITS:
            raise ValueError(f"split file {path}: unknown split {key!r}; expected {list(SPLITS)}")
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise ValueError(f"split file {path}: split {key!r} must be a list of case ids")
        out[name] = [str(v) for v in value]
    known = set(ids)
    seen: Dict[str, str] = {}
    for name, members in out.items():
        unknown = [m for m in members if m not in known]
        if unknown:
            raise ValueError(
                f"split file {path}: split {name!r} names ids with no case in the dataset: "
                f"{unknown[:10]}"
            )
        for m in members:
            if m in seen:
                raise ValueError(f"split file {path}: id {m!r} is in both {seen[m]!r} and {name!r}")
            seen[m] = name
    return {k: sorted(v) for k, v in out.items()}


def select_split(
    ids: Sequence[str],
    split: str,
    split_file=None,
    fractions: Tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> List[str]:
    """The ids of ``split`` ("train", "val", "test" or "all")."""
    name = _ALIASES.get(split, split)
    if name == "all":
        return sorted(ids)
    if name not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS) + ['all']}, got {split!r}")
    table = (
        load_split_file(split_file, ids)
        if split_file is not None
        else split_ids(ids, fractions, seed)
    )
    return table[name]
