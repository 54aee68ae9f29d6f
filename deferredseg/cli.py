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
    """The help of every training option, as declared in ``train/config.py`` (imports
    torch: the method list and backends)."""
    from .train.config import option_help

    return option_help()


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


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per field of ``TrainConfig``, in the groups, with the help and choices
    its declaration gives (``option(...)`` in ``train/config.py``)."""
    from .train.config import TrainConfig, option_groups
    from .train.validate import describe_type

    hints = typing.get_type_hints(TrainConfig)
    for title, description, fields in option_groups():
        g = p.add_argument_group(title, description)
        for f in fields:
            meta = f.metadata
            flag = "--" + f.name.replace("_", "-")
            hint = hints[f.name]
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
            text = meta["help"].replace("%", "%%")  # argparse formats help with %
            kw: Dict[str, Any] = dict(default=argparse.SUPPRESS, help=text)
            if base is bool:
                if f.default is False:
                    kw.update(action="store_true")
                else:
                    kw.update(type=_parse_bool, metavar="BOOL")
            elif typing.get_origin(base) in (list, List):
                inner = typing.get_args(base)[0]
                kw.update(type=_parse_list(inner), metavar="A,B,...")
            else:
                kw.update(type=base)
                if meta["choices"] is not None:
                    kw.update(choices=meta["choices"])
            if f.default is not None and f.default is not False:
                kw["help"] += f" (default: {f.default})"
            kw["help"] += f" [{f.name}: {describe_type(hint)}]"  # the config-file key, its type
            g.add_argument(flag, **kw)
            if f.name == "out":
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
        from .train.config import resume_names

        # how this invocation runs (out, resume, max_steps, ...) is not taken over
        this_run = resume_names("this-run")
        values.update({k: v for k, v in stored.items() if k not in this_run})
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
