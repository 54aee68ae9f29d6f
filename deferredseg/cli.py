"""The ``deferredseg`` command: train, evaluate, demo.

    deferredseg demo                                   # the main job: train + evaluate on synthetic data
    deferredseg train --out runs/a [--layout ...]      # train one model (or --seeds 1,2,3)
    deferredseg evaluate --checkpoint runs/a/best.pt --out runs/a/eval
    deferredseg predict --checkpoint runs/a/best.pt --images new/ --out review/   # masks + review tasks
    deferredseg serve review/                          # the experts' review pages
    deferredseg merge review/                          # final masks and the report

Every training option is also a key of a YAML or JSON file given with
``--config FILE``; options on the command line win over the file. Under
``torchrun --nproc_per_node=N --no-python deferredseg train ...`` training runs
with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

from .train.config import LAYOUTS, METHODS, PROFILES, SCHEDULES, TrainConfig, load_config_file

HELP = {
    "layout": "data layout: synthetic (generated, no files), medsam-npy (imgs/, gts/), "
              "multirater (images/, raters/<rater>/, optional labels/)",
    "data": "dataset folder (not needed for synthetic)",
    "target": "training target: label, majority (multirater default), staple, or a rater name",
    "experts": "number of experts E: the first N raters or simulated experts",
    "expert_profile": "simulated experts: same-accuracy (3), complementary (5), structured (5)",
    "resample_experts": "draw simulated expert labels anew at every access",
    "num_classes": "segmentation channels K (1: binary with a sigmoid)",
    "spatial_dims": "2 or 3 (synthetic data)",
    "image_size": "side of the synthetic images",
    "num_images": "number of synthetic images before the train/val/test split",
    "spatial_size": "resize file data to this size, e.g. 128,128",
    "split_file": "JSON file {\"train\": [ids], \"val\": [...], \"test\": [...]}",
    "backbone": "any monai.networks.nets name, e.g. UNet, BasicUNet, AttentionUnet, SwinUNETR",
    "features": "feature channels of the backbone",
    "method": "what to train: deferredseg (full), no-coherence, no-balance, model-only, "
              "confidence (model-only + confidence-threshold deferral), l2d-single",
    "backend": "loss kernels: auto, reference, triton, cpu, cuda",
    "epochs": "training epochs", "batch_size": "images per step and rank",
    "lr": "AdamW learning rate", "weight_decay": "AdamW weight decay",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "schedule": "learning-rate schedule: cosine, step, constant",
    "step_size": "epochs between decays of the step schedule", "gamma": "step-schedule factor",
    "amp": "bf16 autocast (default: on for CUDA, off for CPU)",
    "patience": "early stopping after this many epochs without a better validation system Dice",
    "checkpoint_every": "also write last.pt every N optimiser steps",
    "threshold": "gate threshold: defer where sigmoid(gate) > threshold",
    "val_hd95": "compute HD95 during validation too (slower)",
    "device": "auto, cpu, cuda", "seed": "random seed",
    "seeds": "several seeds, e.g. 1,2,3: one run each, then mean, std and 95%% CI",
    "workers": "data-loader worker processes", "progress": "show a progress bar",
    "out": "output folder (checkpoints, log.jsonl)",
    "resume": "continue the run in --out from its last.pt",
    "max_steps": "stop after this many optimiser steps (0: no limit)",
}


class CliError(Exception):
    """A bad argument found after parsing: reported like argparse's own errors (exit 2)."""


def _parse_list(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in str(text).split(",") if v.strip() != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}")
    return parse


def _parse_bool(text: str) -> bool:
    v = str(text).lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    choices = {"layout": LAYOUTS, "method": METHODS, "expert_profile": PROFILES,
               "schedule": SCHEDULES, "backend": ("auto", "reference", "triton", "cpu", "cuda")}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
        kw: Dict[str, Any] = dict(default=argparse.SUPPRESS, help=HELP.get(f.name, f.name))
        if base is bool:
            if f.default is False and f.name != "progress":
                kw.update(action="store_true")
            else:
                kw.update(type=_parse_bool, metavar="BOOL")
        elif typing.get_origin(base) in (list, List):
            inner = typing.get_args(base)[0]
            kw.update(type=_parse_list(inner), metavar="A,B,...")
        else:
            kw.update(type=base)
            if f.name in choices:
                kw.update(choices=choices[f.name])
        if f.default is not None and f.default is not False and "help" in kw:
            kw["help"] += f" (default: {f.default})"
        p.add_argument(flag, **kw)
    p.add_argument("--config", help="YAML or JSON file of options (command-line options win)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deferredseg", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command",
                                metavar="{train,evaluate,demo,predict,serve,merge,review-demo}")
    sub.required = True

    t = sub.add_parser("train", help="train a model (or one per seed with --seeds)",
                       description="Train a DeferredSeg model (or a baseline) and write checkpoints "
                                   "(last.pt, best.pt) and log.jsonl to --out.")
    _add_config_options(t)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint: metrics.json and figures",
                       description="Evaluate a checkpoint on a data split; writes metrics.json "
                                   "(system_dice, model_dice, deferral_rate, expert_share, ...) "
                                   "and figures to --out.")
    e.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by train")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--data", help="dataset folder (default: the one the model was trained on)")
    e.add_argument("--layout", choices=LAYOUTS, help="data layout (default: the training one)")
    e.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    e.add_argument("--threshold", type=float, help="gate threshold (default: the training one)")
    e.add_argument("--budget", type=float,
                   help="deferral budget: pick the threshold at which the model defers this "
                        "fraction of the validation pixels (overrides --threshold)")
    e.add_argument("--device", default="auto")
    e.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    e.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slowest metric)")

    d = sub.add_parser("demo", help="train and evaluate on synthetic multi-rater data (CPU, minutes)",
                       description="Train DeferredSeg on the synthetic multi-rater set, evaluate it "
                                   "and print model-only against system Dice, the workload per "
                                   "expert and the fragmentation of deferral regions.")
    d.add_argument("--out", default="deferredseg-demo", help="output folder (default: %(default)s)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a tiny run (for tests)")
    from .review.cli import add_review_commands

    add_review_commands(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: Dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    values.update(given)
    try:
        return TrainConfig.from_dict(values, source=args.config or "options")
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None


def ci95(values: List[float]) -> Dict[str, float]:
    """Mean, standard deviation and the half-width of the t-based 95% confidence interval."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = sum(vals) / n
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci95": None, "n": 1}
    from scipy import stats

    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return {"mean": mean, "std": std, "ci95": float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n),
            "n": n}


SUMMARY_KEYS = ("system_dice", "model_dice", "deferral_rate", "system_hd95",
                "deferral_components_per_image", "risk_coverage_auc")


def run_train(cfg: TrainConfig) -> int:
    from .train.loop import evaluate, train

    if not cfg.seeds:
        result = train(cfg)
        print(json.dumps(result))
        return 0
    if not cfg.out:
        raise CliError("--seeds needs --out: each seed writes to OUT/seed_<n>")
    runs = []
    for seed in cfg.seeds:
        one = dataclasses.replace(cfg, seed=seed, seeds=None, out=str(Path(cfg.out) / f"seed_{seed}"))
        train(one)
        ck = Path(one.out) / "best.pt"
        runs.append(evaluate(ck, out=str(Path(one.out) / "eval"), figures=False))
    summary = {k: ci95([r.get(k) for r in runs]) for k in SUMMARY_KEYS}
    summary["seeds"] = list(cfg.seeds)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.out) / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    for k in SUMMARY_KEYS:
        s = summary[k]
        if s["mean"] is not None:
            ci = f" +- {s['ci95']:.4f}" if s["ci95"] is not None else ""
            print(f"{k}: {s['mean']:.4f}{ci} (95% CI, n={s['n']})")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from .train.loop import evaluate

    overrides = {"data": args.data, "layout": args.layout}
    m = evaluate(args.checkpoint, out=args.out, split=args.split, threshold=args.threshold,
                 budget=args.budget, overrides=overrides, figures=not args.no_figures,
                 device=args.device, with_hd95=not args.no_hd95)
    print(f"system Dice {m['system_dice']}, model Dice {m['model_dice']}, "
          f"deferral rate {m['deferral_rate']:.4f}; wrote {Path(args.out) / 'metrics.json'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "run"):  # the review subcommands
            return args.run(args)
        if args.command == "train":
            return run_train(config_from_args(args))
        if args.command == "evaluate":
            return run_evaluate(args)
        from .demo import run_demo

        return run_demo(out=args.out, epochs=args.epochs, device=args.device, seed=args.seed,
                        quick=args.quick)
    except CliError as exc:
        parser.error(str(exc))  # exits with status 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"deferredseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
