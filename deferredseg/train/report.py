"""What a user reads on screen: one line per epoch, summary tables of a training and an
evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

TERM_ORDER = ("loss", "seg", "collab", "gate", "coherence", "balance", "l2d", "deferral")


def _f(v: Any, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


class EpochMeter:
    """Mean of the logged training terms over an epoch's optimiser steps."""

    def __init__(self) -> None:
        self.sums: Dict[str, float] = {}
        self.n = 0

    def add(self, record: Dict[str, Any]) -> None:
        self.n += 1
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "lr":
                self.sums[k] = self.sums.get(k, 0.0) + float(v)

    def means(self) -> Dict[str, float]:
        return {k: v / max(self.n, 1) for k, v in self.sums.items()}

    def line(
        self,
        epoch: int,
        epochs: int,
        metrics: Dict[str, Any],
        hidden: Iterable[str] = (),
        defers: bool = True,
    ) -> str:
        """One line, for example ``epoch 3/20: loss 0.41 (seg 0.30, ...) | val system Dice
        0.81, model Dice 0.78, deferral 12.3%`` (``epoch`` counted from 0; ``hidden``: terms
        not trained, left out; ``defers`` False: the model Dice alone, no deferral)."""
        mean = self.means()
        hidden = set(hidden)
        keys = [
            k for k in TERM_ORDER if k in mean and k not in ("loss", "deferral") and k not in hidden
        ]
        keys += sorted(k for k in mean if k not in TERM_ORDER and k not in hidden)
        terms = ", ".join(f"{k} {mean[k]:.3f}" for k in keys)
        train = f"loss {_f(mean.get('loss'), '.4f')}" + (f" ({terms})" if terms else "")
        rate = metrics.get("deferral_rate")
        if defers:
            val = (
                f"val system Dice {_f(metrics.get('system_dice'))}, model Dice "
                f"{_f(metrics.get('model_dice'))}, deferral {_f(rate, '.1%')}"
            )
        else:
            val = f"val model Dice {_f(metrics.get('model_dice'))}"
        return f"epoch {epoch + 1}/{epochs}: {train} | {val}"


def metrics_table(m: Dict[str, Any]) -> List[str]:
    """The demo's table of an evaluation (Dice, HD95, deferral rate), rounded."""
    unit = m.get("hd95_unit") or "px"
    lines = [
        f"| prediction | Dice | HD95 ({unit}) | deferral rate |",
        "|---|---|---|---|",
        f"| model alone | {_f(m.get('model_dice'))} | {_f(m.get('model_hd95'), '.2f')} | 0 |",
        f"| system (model + experts) | {_f(m.get('system_dice'))} | "
        f"{_f(m.get('system_hd95'), '.2f')} | {_f(m.get('deferral_rate'), '.3f')} |",
    ]
    share = m.get("expert_share")
    if isinstance(share, dict):  # metrics.json: keyed by expert name
        pairs = list(share.items())
    else:
        names = m.get("expert_names") or [f"expert {j}" for j in range(len(share or []))]
        pairs = list(zip(names, share or []))
    if pairs:
        lines.append(
            "workload per expert (share of the deferred pixels): "
            + ", ".join(f"{n} {s:.1%}" for n, s in pairs)
        )
    return lines


def train_summary(result: Dict[str, Any], out: Optional[str]) -> List[str]:
    """The best validation metrics of a finished training and where its files are."""
    lines: List[str] = []
    best = Path(out) / "best.pt" if out else None
    if best is not None and best.is_file():
        from .checkpoint import load_checkpoint

        ck = load_checkpoint(best, map_location="cpu")
        val = dict(ck.get("val") or {})
        conf = ck.get("config") or {}
        if ck.get("stage") == 2:
            lines.append(
                f"best validation epoch {ck.get('epoch')}/{conf.get('head_epochs')} of stage 2 "
                f"(the routing heads; 0: as initialised), step {ck.get('global_step')}, "
                f"seed {conf.get('seed')}:"
            )
        else:
            lines.append(
                f"best validation epoch {ck.get('epoch')}/{conf.get('epochs')} (step "
                f"{ck.get('global_step')}), seed {conf.get('seed')}:"
            )
        lines += metrics_table(val)
    if result.get("stopped"):
        where = f"; continue with `deferredseg train --resume --out {out}`" if out else ""
        lines.append(f"stopped at step {result.get('global_step')} (--max-steps){where}")
    if out:
        files = [n for n in ("best.pt", "last.pt", "log.jsonl") if (Path(out) / n).is_file()]
        lines.append(f"run folder: {out} ({', '.join(files) or 'no files'})")
    return lines
