"""The deferredseg command: train, evaluate, demo, and the review loop.

    deferredseg demo                               # the main job: train + evaluate, synthetic data
    deferredseg train --out runs/a [--layout ...]      # train one model (or --seeds 1,2,3)
    deferredseg evaluate --checkpoint runs/a/best.pt --out runs/a/eval
    deferredseg predict --checkpoint runs/a/best.pt --images new/ --out review/  # masks, tasks
    deferredseg serve review/                          # the experts' review pages
    deferredseg merge review/                          # final masks and the report

Every training option is also a key of a YAML or JSON file given with
--config FILE; options on the command line win over the file. Under
torchrun --nproc_per_node=N --no-python deferredseg train ... training runs
with DistributedDataParallel.
"""

# Only the standard library at import time: "deferredseg --help" builds the command list
# without torch (which alone takes seconds to import); a command's options are built, with
# what they need, when that command is used.
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional

from .stats import ci95  # noqa: F401  (re-exported: deferredseg.cli.ci95)

if typing.TYPE_CHECKING:
    from .train.config import TrainConfig

#: The one-line help of the commands defined here.
COMMAND_HELP = {
    "train": "train a model (or one per seed with --seeds)",
    "evaluate": "evaluate a checkpoint: metrics.json and figures",
    "demo": "train and evaluate on synthetic multi-rater data (CPU, minutes)",
}


def _help_texts() -> Dict[str, str]:
    """The help of every training option (imports torch: the method list and backends)."""
    from deferredseg_kernels import BACKENDS

    from .train.methods import REGISTRY as METHOD_REGISTRY

    return {
        "layout": "data layout: synthetic (generated, no files), medsam-npy (imgs/, gts/), "
        "multirater (images/, raters/<rater>/, optional labels/)",
        "data": "dataset folder (not needed for synthetic)",
        "target": "training target: label, majority (multirater default), staple, or a rater "
        "name or index",
        "experts": "number of experts E: the first N raters or simulated experts",
        "expert_profile": "simulated experts: same-accuracy (3), complementary (5), structured (5)",
        "resample_experts": "draw simulated expert labels anew at every access",
        "num_classes": "segmentation channels K (1: binary with a sigmoid)",
        "spatial_dims": "2 or 3 (synthetic data; file data take it from the files)",
        "image_size": "side of the synthetic images",
        "num_images": "number of synthetic images before the train/val/test split",
        "spatial_size": "resize file data to this size, e.g. 128,128 (needed when cases differ in "
        "size)",
        "split_file": 'JSON file {"train": [ids], "val": [...], "test": [...]}',
        "spacing": "voxel size in mm per axis, e.g. 0.8,0.8,2.0, for HD95 in mm (default: the "
        "NIfTI header of each case; PNG and .npy without it: HD95 in pixels)",
        "backbone": "any monai.networks.nets name, e.g. UNet, BasicUNet, AttentionUnet, SwinUNETR",
        "features": "feature channels of the backbone",
        "method": "what to train: "
        + "; ".join(f"{m.name} ({m.summary})" for m in METHOD_REGISTRY.values()),
        "backend": "loss kernels: " + ", ".join(BACKENDS),
        "epochs": "training epochs",
        "batch_size": "images per step and rank",
        "lr": "AdamW learning rate",
        "weight_decay": "AdamW weight decay",
        "grad_accum": "micro-batches accumulated per optimiser step",
        "schedule": "learning-rate schedule: cosine, step, constant",
        "step_size": "epochs between decays of the step schedule",
        "gamma": "step-schedule factor",
        "amp": "bf16 autocast (default: on for CUDA, off for CPU)",
        "patience": "early stopping after this many epochs without a better validation system Dice",
        "checkpoint_every": "also write last.pt every N optimiser steps",
        "threshold": "unused by training and evaluation, which calibrate a threshold for "
        "--budget (kept so that older configuration files load)",
        "val_hd95": "compute HD95 during validation too (slower)",
        "device": "auto, cpu, cuda",
        "seed": "random seed (weights, batches, simulated experts; and the split unless "
        "--split-seed)",
        "seeds": "several seeds, e.g. 1,2,3: one run each, on one split (that of the first "
        "seed, or --split-seed), then mean, std and 95%% CI",
        "split_seed": "seed of the train/val/test split (default: --seed; with --seeds, the "
        "first seed's split for every run)",
        "workers": "data-loader worker processes",
        "progress": "show a progress bar",
        "out": "output folder (checkpoints, log.jsonl); default: a new runs/<date>-<time>. "
        "A folder "
        "that already holds a run needs --resume or --overwrite",
        "resume": "continue the run in --out from its last.pt, with its settings (options given "
        "are changes)",
        "max_steps": "stop each stage after this many optimiser steps (0: no limit); a smoke "
        "run still writes best.pt. Not taken over by --resume",
        "training": "two-stage (base segmentor, then routing heads on its frozen features) "
        "or joint",
        "head_epochs": "epochs of the second stage (the routing heads)",
        "head_lr": "AdamW learning rate of the second stage (the routing heads alone)",
        "base_checkpoint": "a trained checkpoint whose backbone and segmentation head stage 2 uses "
        "(skips stage 1)",
        "heads": "routing heads: conv (layers of their own) or linear (default: conv for "
        "two-stage)",
        "head_channels": "hidden channels of the conv routing heads",
        "siblings": "sibling networks (the base's architecture from other seeds, trained in "
        "stage 1) whose disagreement the conv heads read; 0: the model alone",
        "sibling_checkpoints": "trained siblings to use instead of training them (as many as "
        "--siblings)",
        "model_seed": "seed of the network's initialisation and batch order (default: --seed, "
        "which also seeds the data)",
        "lambda_seg": "weight of the segmentation loss",
        "lambda_collab": "weight of the collaboration loss",
        "lambda_gate": "weight of the gate loss",
        "lambda_coherence": "weight of the coherence term",
        "lambda_balance": "weight of the load-balancing term (see docs/training.md: it hurts with "
        "unequal experts)",
        "surrogate": "collaboration surrogate: ova (one-vs-all correctness heads), softmax, paper",
        "gate_target": "gate target: benefit (model wrong and chosen expert right) or router (h)",
        "gate_mse": "weight of the gate's pull towards the router's deferral mass",
        "gate_sparsity": "weight of the gate's sparsity penalty",
        "coherence": "coherence penalty: l1 or l2",
        "balance": "balance term: cv2 or band",
        "balance_low": "band balance: lower loads of the E + 1 options",
        "balance_high": "band balance: upper loads of the E + 1 options",
        "budget": "deferral budget (share of pixels for the experts): checkpoint selection and "
        "evaluation",
        "selection": "checkpoint selection: budget-dice (val system Dice at the budget) or rc-auc",
        "route_mode": "deferral at inference: gate or gain at the budget, router (argmax, "
        "own rate), "
        "uncertainty (confidence deferral, heads choose the expert)",
        "expert_cost": "per-expert cost of asking, e.g. 0,0.1,0.2 (a deferred pixel goes to "
        "argmax q_j - cost_j)",
        "expert_choice": "who gets a deferred pixel: heads (the routing heads' choice), best (the "
        "best single expert) or auto (the one of the two with the higher validation system Dice "
        "at the budget)",
        "label_map": "how mask files encode labels: binary (non-zero is 1) or raw:label pairs, "
        "e.g. 0:0,128:1, for every mask folder or per folder, e.g. "
        "'raters:0:0,128:1;labels:binary' "
        "(default: 0/255 masks read as 0/1, other values as labels)",
        "overwrite": "start again in an --out that holds a run; the old run is moved aside to "
        "OUT.old (one previous run is kept: a run already in OUT.old is deleted)",
        "resume_with_changes": "let --resume continue with settings that differ from the "
        "checkpoint's (model, experts and data shape can never change)",
    }


def __getattr__(name: str):
    if name == "HELP":  # deferredseg.cli.HELP, built on first use
        return _help_texts()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CliError(Exception):
    """A bad argument found after parsing: reported like argparse's own errors (exit 2)."""


def _parse_list(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in str(text).split(",") if v.strip() != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__}s, got {text!r}"
            )

    return parse


def _parse_bool(text: str) -> bool:
    v = str(text).lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


#: ``train --help`` in groups: (title, description, the fields in it). Every field of
#: TrainConfig is in exactly one; the rarely used ones share the last heading.
OPTION_GROUPS = (
    (
        "data",
        "what to train on",
        (
            "layout",
            "data",
            "target",
            "experts",
            "expert_profile",
            "num_classes",
            "spatial_size",
            "spacing",
            "label_map",
            "split_file",
            "num_images",
            "image_size",
        ),
    ),
    (
        "model",
        "the network and what is trained",
        ("method", "backbone", "features", "training", "base_checkpoint", "heads", "siblings"),
    ),
    (
        "objective",
        "the loss terms",
        (
            "lambda_seg",
            "lambda_collab",
            "lambda_gate",
            "lambda_coherence",
            "lambda_balance",
            "surrogate",
            "gate_target",
        ),
    ),
    (
        "schedule",
        "how long and how fast",
        (
            "epochs",
            "head_epochs",
            "batch_size",
            "lr",
            "head_lr",
            "schedule",
            "patience",
            "max_steps",
            "seed",
            "seeds",
            "split_seed",
        ),
    ),
    (
        "routing",
        "deferral to the experts",
        ("budget", "selection", "route_mode", "expert_choice", "expert_cost", "threshold"),
    ),
    ("output", "where the run goes", ("out", "resume", "overwrite", "device", "progress")),
    (
        "rarely used",
        "fine control of data, model, optimiser and run",
        (
            "spatial_dims",
            "resample_experts",
            "head_channels",
            "sibling_checkpoints",
            "model_seed",
            "backend",
            "gate_mse",
            "gate_sparsity",
            "coherence",
            "balance",
            "balance_low",
            "balance_high",
            "weight_decay",
            "grad_accum",
            "step_size",
            "gamma",
            "amp",
            "checkpoint_every",
            "val_hd95",
            "workers",
            "resume_with_changes",
        ),
    ),
)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    from deferredseg_kernels import BACKENDS

    from .train.config import (
        BALANCES,
        EXPERT_CHOICES,
        GATE_TARGETS,
        HEADS,
        LAYOUTS,
        METHODS,
        PROFILES,
        ROUTE_MODES,
        SCHEDULES,
        SELECTIONS,
        SURROGATES,
        TRAININGS,
        TrainConfig,
    )
    from .train.validate import describe_type

    helps = _help_texts()
    hints = typing.get_type_hints(TrainConfig)
    choices = {
        "layout": LAYOUTS,
        "method": METHODS,
        "expert_profile": PROFILES,
        "schedule": SCHEDULES,
        "backend": BACKENDS,
        "training": TRAININGS,
        "heads": HEADS,
        "surrogate": SURROGATES,
        "gate_target": GATE_TARGETS,
        "balance": BALANCES,
        "route_mode": ROUTE_MODES,
        "selection": SELECTIONS,
        "expert_choice": EXPERT_CHOICES,
        "coherence": ("l1", "l2"),
    }
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    grouped = [name for _, _, names in OPTION_GROUPS for name in names]
    if sorted(grouped) != sorted(fields):  # a new field must be put in a group
        raise RuntimeError(
            f"cli.OPTION_GROUPS does not cover TrainConfig: missing "
            f"{sorted(set(fields) - set(grouped))}, unknown {sorted(set(grouped) - set(fields))}"
        )
    for title, description, names in OPTION_GROUPS:
        g = p.add_argument_group(title, description)
        for name in names:
            f = fields[name]
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
            kw: Dict[str, Any] = dict(default=argparse.SUPPRESS, help=helps.get(f.name, f.name))
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
            kw["help"] += f" [{f.name}: {describe_type(hint)}]"  # the config-file key, its type
            g.add_argument(flag, **kw)
            if title == "output" and name == "out":
                g.add_argument(
                    "--config", help="YAML or JSON file of options (command-line options win)"
                )


def _command_of(argv: List[str]) -> Optional[str]:
    """The command ``argv`` names (its first word that is not an option), or None."""
    for word in argv:
        return None if word.startswith("-") else word
    return None


def _command_list_parser() -> argparse.ArgumentParser:
    """The parser of ``deferredseg [--help]`` without a command: the commands and their
    one-line help, nothing imported to build their options."""
    from .review.cli import COMMAND_HELP as REVIEW_HELP

    parser = argparse.ArgumentParser(
        prog="deferredseg",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = {**COMMAND_HELP, **REVIEW_HELP}
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(names) + "}")
    sub.required = True
    for name, text in names.items():
        sub.add_parser(name, help=text)
    return parser


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The parser of the command line; given ``argv`` without a command (``deferredseg
    --help``), only the command list (fast: no torch)."""
    if argv is not None and _command_of(argv) is None:
        return _command_list_parser()
    from .train.config import EXPERT_CHOICES, LAYOUTS, ROUTE_MODES

    parser = argparse.ArgumentParser(
        prog="deferredseg",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{train,evaluate,demo,predict,serve,merge,review-demo}"
    )
    sub.required = True

    t = sub.add_parser(
        "train",
        help=COMMAND_HELP["train"],
        description="Train a DeferredSeg model (or a baseline) and write checkpoints "
        "(last.pt, best.pt) and log.jsonl to --out. The options are in groups; the "
        "rarely used ones are at the end.",
    )
    _add_config_options(t)

    e = sub.add_parser(
        "evaluate",
        help=COMMAND_HELP["evaluate"],
        description="Evaluate a checkpoint on a data split; writes metrics.json "
        "(system_dice, model_dice, deferral_rate, expert_share, ...) "
        "and figures to --out.",
    )
    e.add_argument("--checkpoint", required=True, help="a best.pt or last.pt written by train")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--data", help="dataset folder (default: the one the model was trained on)")
    e.add_argument("--layout", choices=LAYOUTS, help="data layout (default: the training one)")
    e.add_argument("--split", default="test", choices=("train", "val", "test", "all"))
    e.add_argument(
        "--threshold",
        type=float,
        help="a fixed deferral threshold instead of a budget (in [0, 1]; any number in mode gain)",
    )
    e.add_argument(
        "--budget",
        type=float,
        help="deferral budget: pick the threshold at which the model defers this "
        "fraction of the validation pixels (default: the training budget)",
    )
    e.add_argument(
        "--route-mode",
        choices=ROUTE_MODES,
        help="deferral at inference (default: the training one): gate, gain, router, uncertainty",
    )
    e.add_argument(
        "--expert-cost",
        type=_parse_list(float),
        metavar="A,B,...",
        help="per-expert cost of asking (default: the training one)",
    )
    e.add_argument(
        "--expert-choice",
        choices=EXPERT_CHOICES,
        help="who gets a deferred pixel (default: the training one): heads, best or auto",
    )
    e.add_argument("--device", default="auto")
    e.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    e.add_argument("--no-hd95", action="store_true", help="skip HD95 (the slowest metric)")
    e.add_argument(
        "--spacing",
        type=_parse_list(float),
        metavar="A,B,...",
        help="voxel size in mm per axis, for HD95 in mm (default: the training one, else "
        "the NIfTI header of each case; without either HD95 is in pixels)",
    )

    d = sub.add_parser(
        "demo",
        help=COMMAND_HELP["demo"],
        description="Train DeferredSeg on the synthetic multi-rater set, evaluate it "
        "and print model-only against system Dice, the workload per "
        "expert and the fragmentation of deferral regions.",
    )
    d.add_argument("--out", default="deferredseg-demo", help="output folder (default: %(default)s)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs")
    d.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a tiny run (for tests)")
    from .review.cli import add_review_commands

    add_review_commands(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training configuration: defaults, then (with ``--resume``) the settings the run
    in ``--out`` was trained with, then the config file, then the command line.

    With ``--resume`` only the options given (on the command line or in ``--config``)
    count as changes: everything else is taken from the checkpoint. Every value of the
    config file is checked, also those the command line overrides.
    """
    from .train.config import TrainConfig, load_config_file

    source = args.config or "options"
    file_values: Dict[str, Any] = {}
    if getattr(args, "config", None):
        file_values = load_config_file(args.config)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    values: Dict[str, Any] = {}
    resume = given.get("resume", file_values.get("resume", False))
    if resume is True:
        out = given.get("out", file_values.get("out"))
        if not out:
            raise CliError(
                "--resume needs --out: the run folder to continue (as printed when it stopped)"
            )
        from .train.rundir import RunDirError, stored_run_config

        try:
            stored = stored_run_config(Path(out))
        except RunDirError as exc:
            raise CliError(str(exc)) from None
        values.update({k: v for k, v in stored.items() if k not in _NOT_INHERITED})
    values.update(file_values)
    values.update(given)
    for d in (values, file_values):
        if d.get("data"):  # stored absolute: evaluate and --resume work from any folder
            d["data"] = str(Path(d["data"]).expanduser().resolve())
    try:
        cfg = TrainConfig.from_dict(values, source=source)
    except (TypeError, ValueError) as exc:
        raise CliError(str(exc)) from None
    overridden = sorted(k for k in file_values if k in given)
    if overridden:  # the file's own values are checked too, not only those that win
        try:
            TrainConfig.from_dict({**values, **file_values}, source=args.config)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            if not msg.startswith(str(args.config)):
                msg = f"{args.config}: {msg}"
            flags = ", ".join("--" + k.replace("_", "-") for k in overridden)
            raise CliError(
                f"{msg} (checked although the command line overrides {flags}: fix the file)"
            ) from None
    return cfg


#: Settings of a stored run that a resumed run does not inherit: how this invocation runs.
#: ``max_steps`` too: a run stopped by it continues to its end unless given again.
_NOT_INHERITED = frozenset(
    {"resume", "overwrite", "resume_with_changes", "out", "seeds", "max_steps"}
)


SUMMARY_KEYS = (
    "system_dice",
    "model_dice",
    "deferral_rate",
    "system_hd95",
    "deferral_components_per_image",
    "risk_coverage_auc",
)


def _is_rank0() -> bool:
    """Whether this process prints the run's summary (rank 0 under torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def _labelled_interval(s: Dict[str, Any]) -> Dict[str, Any]:
    """``ci95``'s dict with the interval named: its half-width and its two ends."""
    half, mean = s.get("ci95"), s.get("mean")
    return {
        "mean": mean,
        "std": s.get("std"),
        "n": s.get("n"),
        "ci95_halfwidth": half,
        "ci95_low": None if half is None else mean - half,
        "ci95_high": None if half is None else mean + half,
    }


def run_train(cfg: TrainConfig) -> int:
    from .train.evaluation import evaluate
    from .train.loop import train
    from .train.rundir import default_run_dir

    main_rank = _is_rank0()
    if not cfg.out and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CliError("under torchrun give --out: every rank must write to the same folder")
    if not cfg.out:  # never train into the void: a new folder, said where
        cfg = dataclasses.replace(cfg, out=str(default_run_dir()))
        print(f"no --out given: writing the run to {cfg.out}", file=sys.stderr)
    if not cfg.seeds:
        if main_rank:
            print(f"seed {cfg.seed}: training into {cfg.out}", flush=True)
        result = train(cfg)
        from .train.report import train_summary

        if main_rank:  # under torchrun every rank trains; rank 0 alone reports
            print("\n".join(train_summary(result, cfg.out)))
        return 0
    if not cfg.out:
        raise CliError("--seeds needs --out: each seed writes to OUT/seed_<n>")
    # one train/val/test split for every seed: the runs differ by their seed alone
    split_seed = cfg.split_seed if cfg.split_seed is not None else cfg.seeds[0]
    runs = []
    for i, seed in enumerate(cfg.seeds):
        one = dataclasses.replace(
            cfg,
            seed=seed,
            seeds=None,
            split_seed=split_seed,
            out=str(Path(cfg.out) / f"seed_{seed}"),
        )
        if main_rank:
            print(
                f"seed {seed} ({i + 1} of {len(cfg.seeds)}, split of seed {split_seed}): "
                f"training into {one.out}",
                flush=True,
            )
        train(one)
        ck = Path(one.out) / "best.pt"
        runs.append(evaluate(ck, out=str(Path(one.out) / "eval"), figures=False))
    summary: Dict[str, Any] = {
        k: _labelled_interval(ci95([r.get(k) for r in runs])) for k in SUMMARY_KEYS
    }
    summary["seeds"] = list(cfg.seeds)
    summary["split_seed"] = split_seed
    if not main_rank:
        return 0
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.out) / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    for k in SUMMARY_KEYS:
        s = summary[k]
        if s["mean"] is not None:
            half = s["ci95_halfwidth"]
            ci = f" +- {half:.4f} (95% CI half-width, n={s['n']})" if half is not None else ""
            print(f"{k}: {s['mean']:.4f}{ci}")
    return 0


def describe_policy(m: Dict[str, Any]) -> str:
    """How an evaluation routed, in words: the mode, the budget, where the threshold came from."""
    p, source = m["policy"], m.get("threshold_source")
    if p["mode"] == "router":
        return "deferral by the router's argmax at its own rate (no budget, no threshold)"
    if source == "never defers":
        return "the model alone (this method never defers)"
    who = {"heads": "the heads' choice", "best": "the best single expert"}
    expert = who[p["chosen"] or p["expert_choice"]]
    if source == "fixed threshold":
        return f"deferral by {p['mode']} above the fixed threshold {p['threshold']:.4g} to {expert}"
    return (
        f"deferral by {p['mode']} at a {m['budget']:.0%} budget (threshold {p['threshold']:.4g}, "
        f"chosen on the {source}; {p['calibration'].get('rate', 0):.1%} of the validation pixels), "
        f"to {expert}"
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from .train.evaluation import evaluate
    from .train.rundir import check_output_folder

    check_output_folder(args.out)  # a bad --out is found before anything is computed
    if args.data:
        args.data = str(Path(args.data).expanduser().resolve())
    overrides = {
        "data": args.data,
        "layout": args.layout,
        "route_mode": args.route_mode,
        "expert_cost": args.expert_cost,
        "expert_choice": args.expert_choice,
        "spacing": args.spacing,
    }
    m = evaluate(
        args.checkpoint,
        out=args.out,
        split=args.split,
        threshold=args.threshold,
        budget=args.budget,
        overrides=overrides,
        figures=not args.no_figures,
        device=args.device,
        with_hd95=not args.no_hd95,
    )
    from .train.report import metrics_table

    print(f"{m['split']} split ({m.get('images')} images), {describe_policy(m)}:")
    print("\n".join(metrics_table(m)))
    if m.get("figures"):
        print("figures: " + ", ".join(m["figures"]))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .train.rundir import Interrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "run"):  # the review subcommands
            return args.run(args)
        if args.command == "train":
            return run_train(config_from_args(args))
        if args.command == "evaluate":
            return run_evaluate(args)
        from .demo import run_demo

        return run_demo(
            out=args.out, epochs=args.epochs, device=args.device, seed=args.seed, quick=args.quick
        )
    except CliError as exc:
        parser.error(str(exc))  # exits with status 2
    except Interrupted as exc:  # SIGINT / SIGTERM: last.pt written, one line, 130 / 143
        print(f"deferredseg {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside training
        print(f"deferredseg {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError) as exc:
        print(f"deferredseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
