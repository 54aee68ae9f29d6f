"""The examples run, small: the drop-in loss in a plain loop defers its budget and helps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # a whole example run (about 100 s on a loaded 2-core machine)
def test_own_training_loop_defers_its_budget_and_beats_the_model_alone(tmp_path):
    budget = 0.1
    res = _load("own_training_loop").main(
        ["--small", "--budget", str(budget), "--data", str(tmp_path)]
    )
    assert 0.5 * budget <= res["deferral_rate"] <= 1.5 * budget, res
    assert res["system_dice"] > res["model_dice"], res
    assert abs(res["policy"]["calibration"]["rate"] - budget) <= 0.005  # on validation
