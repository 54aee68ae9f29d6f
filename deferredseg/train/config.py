"""The training configuration: one dataclass, settable from a YAML/JSON file and the CLI.

Every field is a command-line option of the same name (``--batch-size`` for
``batch_size``) and a key of the config file; the command line wins over the
file, the file over the defaults.

Each field is declared once, with :func:`option`: its default, its help, its
``--help`` group, its choices (imported from the layer that defines them: the
loss kernels, the policy, the methods, the data layouts), its bounds, what
``--resume`` does with it, and whether it is an option of the loss. From these
declarations come the command line's options (``deferredseg.cli``), the checks of
:meth:`TrainConfig.validate`, the resume policy (``train/rundir.py``), the options
given to the loss (:meth:`TrainConfig.loss_options`) and the option tables of
docs/configuration.md (``python -m deferredseg.train.config --write-doc
docs/configuration.md``; tests/test_config_doc.py checks they are current).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from deferredseg_kernels import BACKENDS, BALANCES, COHERENCES, GATE_TARGETS, SURROGATES
from deferredseg_kernels import default_option as _default

from ..data.layouts import FILE_LAYOUTS, LAYOUTS, layouts_help
from ..metrics import SELECTIONS
from ..policy import EXPERT_CHOICES
from ..policy import MODES as ROUTE_MODES
from .methods import METHODS, REGISTRY  # one record per method; its names are the choices

__all__ = [
    "TrainConfig",
    "option",
    "load_config_file",
    "GROUPS",
    "RESUME_RULES",
    "option_groups",
    "option_help",
    "resume_names",
    "options_markdown",
    "LAYOUTS",
    "PROFILES",
    "SCHEDULES",
    "TRAININGS",
    "HEADS",
    "SURROGATES",
    "GATE_TARGETS",
    "BALANCES",
    "COHERENCES",
    "BACKENDS",
    "ROUTE_MODES",
    "SELECTIONS",
    "EXPERT_CHOICES",
    "METHODS",
]

PROFILES = ("same-accuracy", "complementary", "structured")
SCHEDULES = ("cosine", "step", "constant")
TRAININGS = ("two-stage", "joint")
HEADS = ("conv", "linear")

#: The groups of ``deferredseg train --help`` and of docs/configuration.md, in order:
#: (title, description). The rarely used options share the last one.
GROUPS: Tuple[Tuple[str, str], ...] = (
    ("data", "what to train on"),
    ("model", "the network and what is trained"),
    ("objective", "the loss terms"),
    ("schedule", "how long and how fast"),
    ("routing", "deferral to the experts"),
    ("output", "where the run goes"),
    ("rarely used", "fine control of data, model, optimiser and run"),
)

#: What ``--resume`` does with a setting of the stored run, and its words in the docs.
#: "fixed": the weights or the meaning of the routing channels depend on it: it can never
#: change. "changes": it changes only with ``--resume-with-changes``. "free": how long
#: and where to run: it may change. "this-run": how this invocation runs: not taken over
#: from the stored run (and it may change).
RESUME_RULES: Dict[str, str] = {
    "fixed": "never changes",
    "changes": "changes with `--resume-with-changes`",
    "free": "may change",
    "this-run": "not taken over",
}


def option(
    default: Any = None,
    *,
    help: str,
    group: str,
    resume: str = "changes",
    choices: Optional[Sequence[Any]] = None,
    loss: bool = False,
    at_least: Optional[float] = None,
    above: Optional[float] = None,
    within: Optional[Tuple[float, float]] = None,
) -> Any:
    """One option of :class:`TrainConfig`: a dataclass field carrying its declaration.

    ``help``: its text in ``--help`` and the docs; ``group``: its heading (a title of
    :data:`GROUPS`); ``resume``: a key of :data:`RESUME_RULES`; ``choices``: the values
    it takes (None, the default of an optional field, is always allowed); ``loss``: it
    is given to the loss under its own name (:meth:`TrainConfig.loss_options`);
    ``at_least`` / ``above`` / ``within``: its bounds (``>=``, ``>``, a closed interval).
    """
    if group not in dict(GROUPS):
        raise ValueError(f"option group must be one of {[g for g, _ in GROUPS]}, got {group!r}")
    if resume not in RESUME_RULES:
        raise ValueError(f"option resume must be one of {list(RESUME_RULES)}, got {resume!r}")
    meta = dict(
        help=help,
        group=group,
        resume=resume,
        choices=None if choices is None else tuple(choices),
        loss=loss,
        at_least=at_least,
        above=above,
        within=within,
    )
    return dataclasses.field(default=default, metadata=meta)


def _methods_help() -> str:
    return "what to train: " + "; ".join(f"{m.name} ({m.summary})" for m in REGISTRY.values())


@dataclass
class TrainConfig:
    # ------------------------------------------------------------------ data
    layout: str = option(
        "synthetic",
        help="data layout: " + layouts_help(),
        group="data",
        resume="fixed",
        choices=LAYOUTS,
    )
    data: Optional[str] = option(help="dataset folder (not needed for synthetic)", group="data")
    target: Optional[Union[str, int]] = option(
        help="training target: label, majority (multirater default), staple, or a rater "
        "name or index",
        group="data",
    )
    experts: Optional[int] = option(
        help="number of experts E: the first N raters or simulated experts",
        group="data",
        resume="fixed",
        at_least=1,
    )
    expert_profile: Optional[str] = option(
        help="simulated experts: same-accuracy (3), complementary (5), structured (5)",
        group="data",
        resume="fixed",
        choices=PROFILES,
    )
    resample_experts: bool = option(
        False,
        help="draw simulated expert labels anew at every access",
        group="rarely used",
        resume="fixed",
    )
    num_classes: int = option(
        1,
        help="segmentation channels K (1: binary with a sigmoid)",
        group="data",
        resume="fixed",
        at_least=1,
    )
    spatial_dims: int = option(
        2,
        help="2 or 3 (synthetic data; file data take it from the files)",
        group="rarely used",
        resume="fixed",
        choices=(2, 3),
    )
    image_size: int = option(
        64, help="side of the synthetic images", group="data", resume="fixed", at_least=1
    )
    num_images: int = option(
        48,
        help="number of synthetic images before the train/val/test split",
        group="data",
        at_least=1,
    )
    spatial_size: Optional[List[int]] = option(
        help="resize file data to this size, e.g. 128,128 (needed when cases differ in size)",
        group="data",
        resume="fixed",
    )
    spacing: Optional[List[float]] = option(
        help="voxel size in mm per axis, e.g. 0.8,0.8,2.0, for HD95 in mm (default: the "
        "NIfTI header of each case; PNG and .npy without it: HD95 in pixels)",
        group="data",
    )
    split_file: Optional[str] = option(
        help='JSON file {"train": [ids], "val": [...], "test": [...]}', group="data"
    )
    split_seed: Optional[int] = option(
        help="seed of the train/val/test split (default: --seed; with --seeds, the first "
        "seed's split for every run)",
        group="schedule",
        resume="fixed",
    )
    label_map: Optional[str] = option(
        help="how mask files encode labels: binary (non-zero is 1) or raw:label pairs, "
        "e.g. 0:0,128:1, for every mask folder or per folder, e.g. "
        "'raters:0:0,128:1;labels:binary' (default: 0/255 masks read as 0/1, other values "
        "as labels)",
        group="data",
    )
    # ------------------------------------------------------------------ model
    backbone: str = option(
        "UNet",
        help="any monai.networks.nets name, e.g. UNet, BasicUNet, AttentionUnet, SwinUNETR",
        group="model",
        resume="fixed",
    )
    features: int = option(
        16, help="feature channels of the backbone", group="model", resume="fixed", at_least=1
    )
    # ------------------------------------------------------------------ method and loss
    method: str = option(
        "deferredseg", help=_methods_help(), group="model", resume="fixed", choices=METHODS
    )
    backend: str = option(
        "auto",
        help="loss kernels: " + ", ".join(BACKENDS),
        group="rarely used",
        choices=BACKENDS,
        loss=True,
    )
    # How the network is trained (docs/training.md, "Training schedules"): "two-stage"
    # trains the base segmentor (or takes base_checkpoint), then the routing and gate
    # heads, with conv layers of their own, on its frozen features; "joint" trains
    # everything at once with the whole objective.
    training: str = option(
        "two-stage",
        help="two-stage (base segmentor, then routing heads on its frozen features) or joint",
        group="model",
        resume="fixed",
        choices=TRAININGS,
    )
    head_epochs: int = option(
        30,
        help="epochs of the second stage (the routing heads)",
        group="schedule",
        resume="free",
        at_least=0,
    )
    head_lr: float = option(
        1e-2,
        help="AdamW learning rate of the second stage (the routing heads alone)",
        group="schedule",
        resume="free",
        above=0,
    )
    base_checkpoint: Optional[str] = option(
        help="a trained checkpoint whose backbone and segmentation head stage 2 uses "
        "(skips stage 1)",
        group="model",
        resume="fixed",
    )
    heads: Optional[str] = option(
        help="routing heads: conv (layers of their own) or linear (default: conv for two-stage)",
        group="model",
        resume="fixed",
        choices=HEADS,
    )
    head_channels: int = option(
        16, help="hidden channels of the conv routing heads", group="rarely used", resume="fixed"
    )
    # Sibling networks: the base segmentor's architecture trained again from other seeds
    # (same data and split) in stage 1; the conv heads read their segmentation logits and
    # start from the ensemble's probability that the model is wrong (docs/training.md,
    # "Sibling networks").
    siblings: int = option(
        2,
        help="sibling networks (the base's architecture from other seeds, trained in stage 1) "
        "whose disagreement the conv heads read; 0: the model alone",
        group="model",
        resume="fixed",
        at_least=0,
    )
    sibling_checkpoints: Optional[List[str]] = option(
        help="trained siblings to use instead of training them (as many as --siblings)",
        group="rarely used",
        resume="fixed",
    )
    model_seed: Optional[int] = option(
        help="seed of the network's initialisation and batch order (default: --seed, which "
        "also seeds the data)",
        group="rarely used",
        resume="fixed",
    )
    # The loss options: the objective's "default" preset (deferredseg_kernels.PRESETS,
    # chosen by the evidence in the README: one-vs-all correctness heads, a gate trained on
    # "the model is wrong and the chosen expert is right", no pull of the gate towards D).
    lambda_seg: float = option(
        _default("lambda_seg"), help="weight of the segmentation loss", group="objective", loss=True
    )
    lambda_collab: float = option(
        _default("lambda_collab"),
        help="weight of the collaboration loss",
        group="objective",
        loss=True,
    )
    lambda_gate: float = option(
        _default("lambda_gate"), help="weight of the gate loss", group="objective", loss=True
    )
    lambda_coherence: float = option(
        _default("lambda_coherence"),
        help="weight of the coherence term",
        group="objective",
        loss=True,
    )
    lambda_balance: float = option(
        _default("lambda_balance"),
        help="weight of the load-balancing term (see docs/training.md: it hurts with "
        "unequal experts)",
        group="objective",
        loss=True,
    )
    surrogate: str = option(
        _default("surrogate"),
        help="collaboration surrogate: ova (one-vs-all correctness heads), softmax, paper",
        group="objective",
        choices=SURROGATES,
        loss=True,
    )
    gate_target: str = option(
        _default("gate_target"),
        help="gate target: benefit (model wrong and chosen expert right) or router (h)",
        group="objective",
        choices=GATE_TARGETS,
        loss=True,
    )
    gate_mse: float = option(
        _default("gate_mse"),
        help="weight of the gate's pull towards the router's deferral mass",
        group="rarely used",
        loss=True,
    )
    gate_sparsity: float = option(
        _default("gate_sparsity"),
        help="weight of the gate's sparsity penalty",
        group="rarely used",
        loss=True,
    )
    coherence: str = option(
        _default("coherence"),
        help="coherence penalty: " + " or ".join(COHERENCES),
        group="rarely used",
        choices=COHERENCES,
        loss=True,
    )
    balance: str = option(
        _default("balance"),
        help="balance term: " + " or ".join(BALANCES),
        group="rarely used",
        choices=BALANCES,
        loss=True,
    )
    balance_low: Optional[List[float]] = option(
        help="band balance: lower loads of the E + 1 options", group="rarely used", loss=True
    )
    balance_high: Optional[List[float]] = option(
        help="band balance: upper loads of the E + 1 options", group="rarely used", loss=True
    )
    # ------------------------------------------------------------------ optimisation
    epochs: int = option(20, help="training epochs", group="schedule", resume="free", at_least=1)
    batch_size: int = option(4, help="images per step and rank", group="schedule", at_least=1)
    lr: float = option(3e-3, help="AdamW learning rate", group="schedule", above=0)
    weight_decay: float = option(1e-4, help="AdamW weight decay", group="rarely used")
    grad_accum: int = option(
        1, help="micro-batches accumulated per optimiser step", group="rarely used", at_least=1
    )
    schedule: str = option(
        "cosine",
        help="learning-rate schedule: " + ", ".join(SCHEDULES),
        group="schedule",
        choices=SCHEDULES,
    )
    step_size: int = option(
        10, help="epochs between decays of the step schedule", group="rarely used"
    )
    gamma: float = option(0.5, help="step-schedule factor", group="rarely used")
    amp: Optional[bool] = option(
        help="bf16 autocast (default: on for CUDA, off for CPU)",
        group="rarely used",
        resume="free",
    )
    patience: int = option(
        0,
        help="early stopping after this many epochs without a better validation system Dice",
        group="schedule",
        resume="free",
    )
    checkpoint_every: int = option(
        0,
        help="also write last.pt every N optimiser steps",
        group="rarely used",
        resume="free",
    )
    # ------------------------------------------------------------------ routing and evaluation
    budget: float = option(
        0.1,
        help="deferral budget (share of pixels for the experts): checkpoint selection and "
        "evaluation",
        group="routing",
        within=(0.0, 1.0),
    )
    selection: str = option(
        "budget-dice",
        help="checkpoint selection: budget-dice (val system Dice at the budget) or rc-auc",
        group="routing",
        choices=SELECTIONS,
    )
    route_mode: str = option(
        "gate",
        help="deferral at inference: gate or gain at the budget, router (argmax, own rate), "
        "uncertainty (confidence deferral, heads choose the expert)",
        group="routing",
        resume="free",
        choices=ROUTE_MODES,
    )
    expert_cost: Optional[List[float]] = option(
        help="per-expert cost of asking, e.g. 0,0.1,0.2 (a deferred pixel goes to "
        "argmax q_j - cost_j)",
        group="routing",
        resume="free",
    )
    expert_choice: str = option(
        "auto",
        help="who gets a deferred pixel: heads (the routing heads' choice), best (the best "
        "single expert) or auto (the one of the two with the higher validation system Dice "
        "at the budget)",
        group="routing",
        choices=EXPERT_CHOICES,
    )
    threshold: float = option(
        0.5,
        help="unused by training and evaluation, which calibrate a threshold for --budget "
        "(kept so that older configuration files load)",
        group="routing",
        resume="free",
        within=(0.0, 1.0),
    )
    val_hd95: bool = option(
        False,
        help="compute HD95 during validation too (slower)",
        group="rarely used",
        resume="free",
    )
    # ------------------------------------------------------------------ run
    device: str = option("auto", help="auto, cpu, cuda", group="output", resume="free")
    seed: int = option(
        0,
        help="random seed (weights, batches, simulated experts; and the split unless --split-seed)",
        group="schedule",
        resume="fixed",
    )
    seeds: Optional[List[int]] = option(
        help="several seeds, e.g. 1,2,3: one run each, on one split (that of the first "
        "seed, or --split-seed), then mean, std and 95% CI",
        group="schedule",
        resume="this-run",
    )
    workers: int = option(
        0, help="data-loader worker processes", group="rarely used", resume="free"
    )
    progress: bool = option(True, help="show a progress bar", group="output", resume="free")
    out: Optional[str] = option(
        help="output folder (checkpoints, log.jsonl); default: a new runs/<date>-<time>. "
        "A folder that already holds a run needs --resume or --overwrite",
        group="output",
        resume="this-run",
    )
    resume: bool = option(
        False,
        help="continue the run in --out from its last.pt, with its settings (options given "
        "are changes)",
        group="output",
        resume="this-run",
    )
    max_steps: int = option(
        0,
        help="stop each stage after this many optimiser steps (0: no limit); a smoke run "
        "still writes best.pt. Not taken over by --resume",
        group="schedule",
        resume="this-run",
    )
    overwrite: bool = option(
        False,
        help="start again in an --out that holds a run; the old run is moved aside to "
        "OUT.old (one previous run is kept: a run already in OUT.old is deleted)",
        group="output",
        resume="this-run",
    )
    resume_with_changes: bool = option(
        False,
        help="let --resume continue with settings that differ from the checkpoint's (model, "
        "experts and data shape can never change)",
        group="rarely used",
        resume="this-run",
    )

    @property
    def head_kind(self) -> str:
        """The routing heads this configuration builds."""
        if self.heads is not None:
            return self.heads
        return "conv" if self.training == "two-stage" else "linear"

    @property
    def num_siblings(self) -> int:
        """The sibling networks this configuration's model reads: only the two-stage conv
        heads of a method that learns routing read siblings (0 otherwise)."""
        if self.training != "two-stage" or self.head_kind != "conv":
            return 0
        if not REGISTRY[self.method].learns_routing:
            return 0
        return int(self.siblings)

    @property
    def data_split_seed(self) -> int:
        """The seed that draws the train/val/test split (``split_seed``, else ``seed``)."""
        return self.seed if self.split_seed is None else self.split_seed

    @property
    def route_scores(self) -> str:
        """How route() reads correctness estimates from the routing logits."""
        return "sigmoid" if self.surrogate == "ova" else "softmax"

    def loss_options(self) -> Dict[str, Any]:
        """The options given to the loss (``DeferredSegLoss``), by name: the fields declared
        with ``loss=True``; an optional one left unset (None) is left out."""
        opts: Dict[str, Any] = {}
        for f in _FIELDS:
            if f.metadata["loss"]:
                value = getattr(self, f.name)
                if value is not None:
                    opts[f.name] = list(value) if isinstance(value, (list, tuple)) else value
        return opts

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {unknown}; known: {sorted(names)}")
        from .validate import validate_types

        validate_types(cls, values, source)  # types from the field hints (pydantic, strict)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError (FileNotFoundError for a missing ``base_checkpoint``) for a value
        outside its declared choices or bounds, or settings that do not go together."""
        from .validate import check_declared

        check_declared(self)
        if self.sibling_checkpoints is not None:
            if len(self.sibling_checkpoints) != int(self.siblings):
                raise ValueError(
                    f"sibling_checkpoints must name siblings={self.siblings} checkpoints, got "
                    f"{len(self.sibling_checkpoints)}"
                )
            for path in self.sibling_checkpoints:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"sibling_checkpoints: {path!r} does not exist")
        if self.base_checkpoint is not None and not Path(self.base_checkpoint).is_file():
            raise FileNotFoundError(f"base_checkpoint {self.base_checkpoint!r} does not exist")
        if self.layout in FILE_LAYOUTS and not self.data:
            raise ValueError(f"layout {self.layout!r} needs --data DIR")
        if self.spacing is not None and (
            not self.spacing or any(not float(v) > 0 for v in self.spacing)
        ):
            raise ValueError(
                f"spacing must be positive voxel sizes in mm, one per axis, got {self.spacing}"
            )


_FIELDS: Tuple[dataclasses.Field, ...] = dataclasses.fields(TrainConfig)
_undeclared = [f.name for f in _FIELDS if "group" not in f.metadata]
if _undeclared:  # every field is declared with option(): its help, group, resume rule, ...
    raise RuntimeError(f"TrainConfig fields {_undeclared} are not declared with option()")


def option_groups() -> List[Tuple[str, str, Tuple[dataclasses.Field, ...]]]:
    """(title, description, its fields in declaration order) for each of :data:`GROUPS`."""
    return [
        (title, text, tuple(f for f in _FIELDS if f.metadata["group"] == title))
        for title, text in GROUPS
    ]


def option_help() -> Dict[str, str]:
    """The help of every option, by field name."""
    return {f.name: f.metadata["help"] for f in _FIELDS}


def resume_names(*rules: str) -> frozenset:
    """The names of the options whose resume rule is one of ``rules`` (see
    :data:`RESUME_RULES`)."""
    unknown = [r for r in rules if r not in RESUME_RULES]
    if unknown:
        raise ValueError(f"resume rules must be among {list(RESUME_RULES)}, got {unknown}")
    return frozenset(f.name for f in _FIELDS if f.metadata["resume"] in rules)


# ----------------------------------------------------------------------------- the docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _doc_value(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float) and value != 0 and abs(value) < 1e-3:
        # 1e-4, not 0.0001: the docs read numbers with four decimals as measured values
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return str(value)


def _doc_values(meta) -> str:
    """An option's allowed values in the docs: its choices or its bounds."""
    if meta["choices"] is not None:
        return ", ".join(f"`{c}`" for c in meta["choices"])
    if meta["within"] is not None:
        lo, hi = meta["within"]
        return f"[{lo:g}, {hi:g}]"
    if meta["at_least"] is not None:
        return f">= {meta['at_least']:g}"
    if meta["above"] is not None:
        return f"> {meta['above']:g}"
    return ""


def options_markdown() -> str:
    """The option tables of docs/configuration.md, one per group of ``--help``."""
    import typing

    from .validate import describe_type

    hints = typing.get_type_hints(TrainConfig)
    out: List[str] = []
    for title, text, fields in option_groups():
        out += [f"### {title}: {text}", ""]
        out += [
            "| key | option | type | default | values | on `--resume` | meaning |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in fields:
            meta = f.metadata
            cells = (
                f"`{f.name}`",
                f"`{_flag(f.name)}`",
                describe_type(hints[f.name]),
                f"`{_doc_value(f.default)}`",
                _doc_values(meta),
                RESUME_RULES[meta["resume"]],
                meta["help"].replace("|", "\\|"),
            )
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML or JSON config file into a dict (keys with '-' or '_' both work)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    text = p.read_text()
    from .validate import parse_config_text

    values = parse_config_text(text, p)  # syntax errors as file:line:column
    if not isinstance(values, dict):
        raise ValueError(
            f"config file {str(p)!r} must hold a mapping of option: value, "
            f"got {type(values).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in values.items()}


DOC_SECTION = "options"  # the generated part of docs/configuration.md


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m deferredseg.train.config --write-doc docs/configuration.md`` regenerates
    the option tables of that file (``--check`` instead: exit 1 if they are not current)."""
    from .._docgen import doc_command

    return doc_command(
        "python -m deferredseg.train.config",
        str(main.__doc__),
        DOC_SECTION,
        options_markdown,
        "the option tables",
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
