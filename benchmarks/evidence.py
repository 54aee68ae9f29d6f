"""The evidence table: does deferral make the final segmentation better, and which deferral?

    python benchmarks/evidence.py                  # the README's table (CPU, about an hour)
    python benchmarks/evidence.py --quick          # a tiny run that checks the pipeline

For each seed, the hard synthetic benchmark (``deferredseg.data.benchmark``:
faint, tiny and blurred objects, unlabelled look-alikes, varying noise) is
written once per expert panel (A same-accuracy, B complementary, C content,
D structured; the images are the same in every panel of a seed). One base
segmentor is trained per seed (the ``model-only`` method) and reused by every
two-stage method, so between those methods only the routing differs:

- base segmentor alone;
- confidence deferral: the base's least confident pixels to the best single expert;
- confidence deferral to the expert the correctness heads choose (the improved
  default's heads, ranked by the base's uncertainty);
- single-expert L2D (Mozannar and Sontag), its defer head on the frozen base;
- DeferredSeg as released: paper surrogate, band balance, gate on the router's
  decision, inference by the router's argmax (its own deferral rate);
- DeferredSeg faithful two-stage: softmax surrogate, gate on the router's
  decision, deferral by the gate at the budget;
- the improved default: one-vs-all correctness heads, a gate trained on "the
  model is wrong and the chosen expert is right", deferral by the gate;
- the improved default deferring by its expected gain instead of its gate;
- on panel A, the coherence and balance ablations of the improved default;
- the drop-in loss in a plain PyTorch loop (``examples/own_training_loop.py``: a
  MONAI UNet trained jointly with ``DeferredSegLoss`` at its defaults, its policy
  calibrated on validation);
- bolt-on deferral (``deferredseg.bolt_on.add_deferral``) on the seed's trained base
  segmentor, taken as a plain segmentation network;
- the budgeted oracle: the base's wrong pixels, up to the budget and the least
  confident first, to a reader who is right there (the ceiling at that budget);
- with ``--joint``, the improved objective trained jointly (panel C).

Every method that uses a budget is evaluated at 5, 10 and 20% with the
threshold chosen on the validation split, and at the threshold that defers
exactly that share of the test pixels (matched rates). Paired 95% confidence
intervals over seeds decide the claims. Writes benchmarks/results/evidence.json,
evidence.md (every table) and docs/images/evidence.png (system Dice against budget,
one panel per expert panel), and replaces the short table between the evidence
markers of README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from deferredseg.data.anatomy import write_anatomy_benchmark  # noqa: E402
from deferredseg.data.benchmark import PANEL_NAMES as SYNTHETIC_NAMES  # noqa: E402
from deferredseg.data.benchmark import write_benchmark  # noqa: E402
from deferredseg.stats import ci95  # noqa: E402
from deferredseg.train.config import TrainConfig  # noqa: E402
from deferredseg.train.evaluation import evaluate, evaluate_outputs  # noqa: E402
from deferredseg.train.loop import train  # noqa: E402
from deferredseg.train.two_stage import sibling_seed  # noqa: E402

BUDGETS = (0.05, 0.10, 0.20)
SYNTHETIC = ("A", "B", "C", "D")
# real anatomy (deferredseg.data.anatomy): panel -> (reader panel, dimensions)
ANATOMY = {"depth-2d": ("depth", 2), "thickness-2d": ("thickness", 2), "depth-3d": ("depth", 3)}
PANELS = SYNTHETIC + tuple(ANATOMY)
PANEL_NAMES = dict(
    SYNTHETIC_NAMES,
    **{p: f"MNI152 grey matter, {r} readers, {d}D" for p, (r, d) in ANATOMY.items()},
)
SIBLINGS = 2  # the default's sibling networks (TrainConfig.siblings)


def family(panel: str) -> str:
    """The panels of a family share their images (so one base segmentor per seed)."""
    return "synthetic" if panel in SYNTHETIC else f"anatomy{ANATOMY[panel][1]}d"


def write_panel(root: Path, panel: str, seed: int, args) -> None:
    if panel in SYNTHETIC:
        write_benchmark(root, panel, num_cases=args.cases, size=args.size, seed=seed)
    else:
        reader_panel, dims = ANATOMY[panel]
        if dims == 2:
            sizes = dict(num_cases=args.anatomy_cases, size=args.anatomy_size)
        else:
            sizes = dict(num_cases=args.anatomy_crops, size=args.anatomy_crop_size)
        write_anatomy_benchmark(root, reader_panel, seed=seed, dims=dims, **sizes)


START, END = "<!-- evidence:start -->", "<!-- evidence:end -->"
RELEASED_BAND = ([0.15, 0.20, 0.18, 0.0], [0.35, 0.30, 0.31, 1.0])  # the released code's, E = 3

# name -> (label, how it is trained, evaluation overrides)
LABELS = {
    "base": "base segmentor alone",
    "confidence": "confidence deferral to the best single expert",
    "confidence-heads": "confidence deferral to the heads' chosen expert",
    "l2d": "single-expert L2D (two-stage)",
    "released": "DeferredSeg as released (router argmax)",
    "faithful": "DeferredSeg faithful two-stage (gate)",
    "improved": "DeferredSeg default (gate; heads read 2 sibling networks)",
    "improved-solo": "DeferredSeg default without siblings (heads read the model alone)",
    "improved-gain": "improved, deferring by expected gain",
    "no-coherence": "improved without coherence",
    "no-balance": "improved without balance",
    "joint": "improved objective, joint training",
    "plain-loop": "drop-in loss in a plain loop (joint, defaults)",
    "bolt-on": "bolt-on deferral on the trained base (add_deferral)",
    "oracle": "budgeted oracle (wrong pixels to a reader right there)",
}
# the lines of the figure and the rows of the README's short table
HEADLINE = ("base", "confidence", "improved", "improved-solo", "plain-loop", "bolt-on", "oracle")
PLAIN_LOOP_STEPS = 300  # about the base segmentor's optimiser steps (12 epochs of 150 cases)


def base_config(quick: bool, backend: str) -> TrainConfig:
    if quick:
        return TrainConfig(
            layout="multirater",
            target="label",
            features=8,
            epochs=1,
            head_epochs=1,
            batch_size=8,
            progress=False,
            backend=backend,
        )
    # the base segmentor's schedule; the heads' (head_epochs, head_lr) are the defaults
    return TrainConfig(
        layout="multirater",
        target="label",
        features=16,
        epochs=12,
        batch_size=8,
        lr=3e-3,
        progress=False,
        backend=backend,
    )


def head_variants(panel: str, num_experts: int, siblings: List[str]) -> Dict[str, dict]:
    """The two-stage routing variants trained on each panel (config overrides). The paper's
    variants, the ablations and ``improved-solo`` read the model alone (``siblings=0``);
    the default reads the seed's trained siblings."""
    solo = dict(siblings=0)
    default = dict(siblings=len(siblings), sibling_checkpoints=list(siblings))
    if panel not in SYNTHETIC:
        return {"improved": default, "improved-solo": solo}
    faithful = dict(
        solo, surrogate="softmax", gate_target="router", gate_mse=0.5, gate_sparsity=0.1
    )
    released = dict(faithful, surrogate="paper", route_mode="router")
    if num_experts == 3:
        released.update(balance="band", balance_low=RELEASED_BAND[0], balance_high=RELEASED_BAND[1])
    v = {
        "released": released,
        "faithful": faithful,
        "improved": default,
        "improved-solo": solo,
        "l2d": dict(solo, method="l2d-single"),
    }
    if panel == "A":  # ablations of the default without siblings (compared with improved-solo)
        v["no-coherence"] = dict(solo, lambda_coherence=0.0)
        v["no-balance"] = dict(solo, lambda_balance=0.0)
    return v


def evaluate_all(
    ck: Path, overrides: Optional[dict], budgets, cache: Optional[Path] = None
) -> Dict[str, dict]:
    """Metrics at each budget (val threshold and matched test rate), or the router's own rate.

    With ``cache``, results are kept in that JSON file and reused while the
    checkpoint is older than it (runs can be resumed and split over processes).
    """
    if cache is not None and cache.exists() and cache.stat().st_mtime > ck.stat().st_mtime:
        return json.loads(cache.read_text())
    out = {}
    for b in budgets:
        m = evaluate(
            ck,
            budget=b,
            overrides=overrides,
            figures=False,
            with_hd95=False,
            matched=True,
            sweep=False,
        )
        m.pop("risk_coverage", None)
        out[f"{b:g}"] = m
        if m.get("route_mode") == "router" or m.get("budget") is None:
            break  # no budget: one evaluation says everything
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out, default=str))
    return out


def run(args) -> Dict:
    out_root = Path(args.out)
    results: Dict = {
        "budgets": list(BUDGETS),
        "seeds": args.seeds,
        "panels": args.panels,
        "cases": args.cases,
        "size": args.size,
        "anatomy": {
            k: getattr(args, f"anatomy_{k}")
            for k in ("cases", "size", "crops", "crop_size", "epochs")
        },
        "runs": {},
        "panel_info": {},
    }
    t0 = time.time()
    cfg0 = base_config(args.quick, args.backend)

    def log(msg):
        print(f"[{time.time() - t0:6.0f} s] {msg}", flush=True)

    for seed in args.seeds:
        data = {}
        for p in args.panels:
            root = out_root / "data" / f"seed{seed}" / p
            if not (root / "benchmark.json").exists():
                write_panel(root, p, seed, args)
            data[p] = root
            results["panel_info"][f"{seed}/{p}"] = json.loads((root / "benchmark.json").read_text())
        log(f"seed {seed}: data written")

        def cfg_for(panel, name, **kw):
            if panel not in SYNTHETIC:
                kw = dict(dict(epochs=args.anatomy_epochs), **kw)
            return dataclasses.replace(
                cfg0,
                data=str(data[panel]),
                split_file=str(data[panel] / "split.json"),
                seed=seed,
                out=str(out_root / f"seed{seed}" / panel / name),
                **kw,
            )

        bases: Dict[str, Path] = {}  # family -> the base segmentor's checkpoint
        siblings: Dict[str, List[str]] = {}  # family -> its siblings' checkpoints
        for p in args.panels:
            fam = family(p)
            if fam in bases:
                continue
            suffix = "" if fam == "synthetic" else f"-{fam}"
            base_cfg = cfg_for(p, "base", method="model-only")
            runs = [("base", None)] + [
                (f"sibling{k}", sibling_seed(base_cfg, k)) for k in range(1, SIBLINGS + 1)
            ]
            paths = []
            for name, model_seed in runs:
                d = out_root / f"seed{seed}" / f"{name}{suffix}"
                if not (d / "best.pt").exists():
                    train(dataclasses.replace(base_cfg, out=str(d), model_seed=model_seed))
                paths.append(d / "best.pt")
            bases[fam], siblings[fam] = paths[0], [str(q) for q in paths[1:]]
            log(f"seed {seed}: {fam} base segmentor and {SIBLINGS} siblings trained")
        for p in args.panels:
            base_ck = bases[family(p)]
            E = len(results["panel_info"][f"{seed}/{p}"]["experts"])
            key = f"{seed}/{p}"
            evals = out_root / f"seed{seed}" / p / "evals"
            results["runs"][f"{key}/base"] = evaluate_all(
                base_ck,
                dict(data=str(data[p]), split_file=str(data[p] / "split.json")),
                (0.1,),
                evals / "base.json",
            )
            results["runs"][f"{key}/confidence"] = evaluate_all(
                base_ck,
                dict(
                    method="confidence", data=str(data[p]), split_file=str(data[p] / "split.json")
                ),
                BUDGETS,
                evals / "confidence.json",
            )
            for name, ov in head_variants(p, E, siblings[family(p)]).items():
                cfg = cfg_for(p, name, base_checkpoint=str(base_ck), **ov)
                if not (Path(cfg.out) / "best.pt").exists():
                    train(cfg)
                ck = Path(cfg.out) / "best.pt"
                results["runs"][f"{key}/{name}"] = evaluate_all(
                    ck, None, BUDGETS, evals / f"{name}.json"
                )
                if name == "improved":
                    results["runs"][f"{key}/confidence-heads"] = evaluate_all(
                        ck, dict(route_mode="uncertainty"), BUDGETS, evals / "confidence-heads.json"
                    )
                    results["runs"][f"{key}/improved-gain"] = evaluate_all(
                        ck, dict(route_mode="gain"), BUDGETS, evals / "improved-gain.json"
                    )
            split_data = cfg_for(p, "x")
            results["runs"][f"{key}/oracle"] = cached(
                evals / "oracle.json", lambda: oracle_rows(base_ck, split_data, BUDGETS)
            )
            if p in SYNTHETIC:  # the drop-in paths, on the synthetic panels
                results["runs"][f"{key}/plain-loop"] = cached(
                    evals / "plain-loop.json",
                    lambda: plain_loop_rows(data[p], seed, BUDGETS, args.quick),
                )
                results["runs"][f"{key}/bolt-on"] = cached(
                    evals / "bolt-on.json",
                    lambda: bolt_on_rows(base_ck, split_data, BUDGETS, args.quick),
                )
            if args.joint and p == "C":
                cfg = cfg_for(p, "joint", training="joint")
                if not (Path(cfg.out) / "best.pt").exists():
                    train(cfg)
                results["runs"][f"{key}/joint"] = evaluate_all(
                    Path(cfg.out) / "best.pt", None, BUDGETS, evals / "joint.json"
                )
            log(f"seed {seed}: panel {p} done")
    return results


# ------------------------------------------------------------------------------------ new rows
def _example():
    """examples/own_training_loop.py as a module: its plain loop is the row's training."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "own_training_loop", ROOT / "examples" / "own_training_loop.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cached(path: Path, compute) -> Dict[str, dict]:
    """``compute()``'s per-budget results, kept in ``path`` (runs can be resumed)."""
    if path.exists():
        return json.loads(path.read_text())
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, default=str))
    return out


def _per_budget(policy, val, test, budgets) -> Dict[str, dict]:
    out = {}
    for b in budgets:
        m, _ = evaluate_outputs(policy, val, test, b, matched=True, sweep=False)
        m.pop("risk_coverage", None)
        out[f"{b:g}"] = m
    return out


def _base_outputs(base_ck: Path, cfg: TrainConfig):
    """The trained base's network, configuration and (val, test) packed outputs."""
    from deferredseg.train.builders import build_data
    from deferredseg.train.evaluation import network_outputs
    from deferredseg.train.runtime import load_trained

    dev = torch.device("cpu")
    model, bcfg, ck = load_trained(
        base_ck, dev, dict(data=cfg.data, split_file=cfg.split_file, layout=cfg.layout)
    )
    E = build_data(bcfg, "val").info.num_experts
    outs = {
        s: network_outputs(model, build_data(bcfg, s), bcfg, E, 0, dev) for s in ("val", "test")
    }
    return model, bcfg, E, outs


def oracle_rows(base_ck: Path, cfg: TrainConfig, budgets) -> Dict[str, dict]:
    """The budgeted oracle: the base's wrong pixels where some reader is right, the least
    confident first, up to the budget, labelled right; the rest keeps the base's labels."""
    from deferredseg.metrics import per_image_scores
    from deferredseg.policy import IGNORE_INDEX, ScoreHistogram, uncertainty

    _, bcfg, E, outs = _base_outputs(base_ck, cfg)
    K = bcfg.num_classes

    def fixable_pixels():
        """Per test batch: the base's labels, the target, and the wrong pixels some reader
        has right with the base's uncertainty (as a logit) there."""
        for logits, target, experts, *_ in outs["test"]():
            z = logits[:, :K]
            valid = target != IGNORE_INDEX
            pred = (z[:, 0] > 0).long() if K == 1 else z.argmax(1)
            fixable = valid & (pred != target) & (experts == target.unsqueeze(1)).any(1)
            u = torch.logit(uncertainty(z, K).clamp(1e-7, 1 - 1e-7))
            yield pred, target, valid, fixable, u

    hist, valid_total = ScoreHistogram(), 0
    for _, _, valid, fixable, u in fixable_pixels():
        hist.add(u[fixable])
        valid_total += int(valid.sum())
    out = {}
    for b in budgets:
        share = min(1.0, b * valid_total / max(hist.total, 1))
        i, _ = hist.cut(share)
        cut = hist.edge(i) if i < hist.BINS else float("inf")
        dice, deferred = [], 0
        for pred, target, _, fixable, u in fixable_pixels():
            take = fixable & (u >= cut)
            deferred += int(take.sum())
            final = torch.where(take, target, pred)
            dice += per_image_scores(final, target, max(K, 2), None, IGNORE_INDEX, False)["dice"]
        finite = [d for d in dice if d == d]
        rate = deferred / max(valid_total, 1)
        m = {"system_dice": sum(finite) / len(finite), "deferral_rate": rate}
        out[f"{b:g}"] = {
            **m,
            "matched_system_dice": m["system_dice"],
            "matched_deferral_rate": rate,
        }
    return out


def bolt_on_rows(base_ck: Path, cfg: TrainConfig, budgets, quick: bool) -> Dict[str, dict]:
    """Bolt-on deferral on the seed's base segmentor, taken as a plain segmentation network
    (its backbone and segmentation head), heads selected at the training budget."""
    from monai.data import DataLoader

    from deferredseg.bolt_on import add_deferral
    from deferredseg.train.builders import build_data

    model, bcfg, E, _ = _base_outputs(base_ck, cfg)
    network = torch.nn.Sequential(model.backbone, model.seg_head)
    loaders = {
        s: DataLoader(build_data(bcfg, s), batch_size=8, shuffle=False)
        for s in ("train", "val", "test")
    }
    deferral = add_deferral(
        network,
        loaders["train"],
        loaders["val"],
        num_classes=bcfg.num_classes,
        num_experts=E,
        budget=0.1,
        head_epochs=1 if quick else TrainConfig.head_epochs,
        seed=bcfg.seed,
    )
    ex = _example()
    val, test = (ex.outputs(deferral, loaders[s].dataset) for s in ("val", "test"))
    return _per_budget(deferral.policy, val, test, budgets)


def plain_loop_rows(root: Path, seed: int, budgets, quick: bool) -> Dict[str, dict]:
    """The drop-in loss at its defaults in the example's plain loop, calibrated per budget."""
    ex = _example()
    train_ds, val_ds, test_ds, E = ex.splits(root)
    steps = 20 if quick else PLAIN_LOOP_STEPS
    model, criterion = ex.train_plain_loop(train_ds, E, steps, seed)
    return _per_budget(
        criterion.policy(), ex.outputs(model, val_ds), ex.outputs(model, test_ds), budgets
    )


# ------------------------------------------------------------------------------------ summary
def value(results, seed, panel, method, budget, key):
    r = results["runs"].get(f"{seed}/{panel}/{method}")
    if r is None:
        return None
    m = r.get(f"{budget:g}") or next(iter(r.values()))
    if key.startswith("matched_") and m.get(key) is None and m.get("deferral_rate") == 0:
        return m.get(key[len("matched_") :])  # the base segmentor never defers: any rate is its own
    return m.get(key)


def paired(results, panel, a, b, budget, key) -> Dict:
    diffs = []
    for s in results["seeds"]:
        va, vb = value(results, s, panel, a, budget, key), value(results, s, panel, b, budget, key)
        if va is not None and vb is not None:
            diffs.append(va - vb)
    return ci95(diffs)


def fmt(s: Dict, spec: str = ".3f") -> str:
    if s.get("mean") is None:
        return "n/a"
    ci = f" ± {s['ci95']:{spec}}" if s.get("ci95") is not None else ""
    return f"{s['mean']:{spec}}{ci}"


def methods_of(results, panel) -> List[str]:
    s = results["seeds"][0]
    return [m for m in LABELS if f"{s}/{panel}/{m}" in results["runs"]]


def verdict(d: Dict, sign: int = +1, margin: float = 0.0) -> str:
    if d.get("mean") is None or d.get("ci95") is None:
        return "not tested (too few seeds)"
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    ok = (lo > margin) if sign > 0 else (hi < margin)
    return f"{'holds' if ok else 'does NOT hold'}: {d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def describe(results: Dict, env: str) -> str:
    anatomy = ""
    a = results.get("anatomy")
    if a and any(p in ANATOMY for p in results["panels"]):
        anatomy = (
            f"Real anatomy (`deferredseg.data.anatomy`: MNI152 grey matter with per-case "
            f"scanner effects): {a['cases']} 2D slices of {a['size']}x{a['size']} and "
            f"{a['crops']} 3D crops of {a['crop_size']}^3 per seed, split by blocks that never "
            f"neighbour, the base segmentor and its siblings trained {a['epochs']} epochs. "
        )
    return (
        f"Hard synthetic benchmark (`deferredseg.data.benchmark`), {results['cases']} cases of "
        f"{results['size']}x{results['size']} per seed, splits 60/20/20, seeds {results['seeds']}. "
        + anatomy
        + "Mean ± 95% CI half-width (t) over seeds. Thresholds chosen on validation; "
        '"matched" is the Dice at the threshold that defers exactly the budget of the test '
        f"pixels. Produced by `python benchmarks/evidence.py` ({env})."
    )


def tables(results: Dict) -> List[str]:
    """Every method's system Dice and rate at every budget, one table per panel."""
    seeds = results["seeds"]
    L: List[str] = []
    for p in results["panels"]:
        info = [results["panel_info"][f"{s}/{p}"] for s in seeds]
        best = ci95([i["best_expert_dice"] for i in info])
        oracle = ci95([i["oracle_dice"] for i in info])
        L += [
            f"**Panel {p} ({PANEL_NAMES[p]})**: best single expert Dice {fmt(best)}, per-pixel "
            f"oracle {fmt(oracle)}.",
            "",
            "| method | "
            + " | ".join(f"Dice @{b:.0%} (rate) | matched @{b:.0%}" for b in BUDGETS)
            + " | AUROC score / uncertainty |",
            "|---|" + "---|---|" * len(BUDGETS) + "---|",
        ]
        for m in methods_of(results, p):
            cells = []
            for b in BUDGETS:
                d = ci95([value(results, s, p, m, b, "system_dice") for s in seeds])
                r = ci95([value(results, s, p, m, b, "deferral_rate") for s in seeds])
                md = ci95([value(results, s, p, m, b, "matched_system_dice") for s in seeds])
                cells += [f"{fmt(d)} ({fmt(r, '.2f')})", fmt(md)]
            a1 = ci95([value(results, s, p, m, 0.1, "auroc_model_wrong_score") for s in seeds])
            a2 = ci95(
                [value(results, s, p, m, 0.1, "auroc_model_wrong_uncertainty") for s in seeds]
            )
            L.append(
                f"| {LABELS[m]} | "
                + " | ".join(cells)
                + f" | {fmt(a1, '.2f')} / {fmt(a2, '.2f')} |"
            )
        L.append("")
    return L


def short_table(results: Dict) -> List[str]:
    """The README's table: matched system Dice at 10%, one column per panel."""
    seeds, panels = results["seeds"], results["panels"]
    L = [
        "| at a 10% budget (matched test rate) | "
        + " | ".join(f"panel {p} ({PANEL_NAMES[p]})" for p in panels)
        + " |",
        "|---|" + "---|" * len(panels),
    ]
    for m in HEADLINE:
        if not any(f"{seeds[0]}/{p}/{m}" in results["runs"] for p in panels):
            continue
        cells = [
            fmt(ci95([value(results, s, p, m, 0.1, "matched_system_dice") for s in seeds]))
            for p in panels
        ]
        L.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return L


def targets(results: Dict, previous: Optional[Dict]) -> List[str]:
    """The claims of the README, each with its paired CI over seeds and a verdict."""
    seeds = results["seeds"]
    key = "matched_system_dice"
    L = ["Targets (paired over seeds, system Dice at matched test deferral rates):", ""]
    for p in results["panels"]:
        # panel C and the 2D real-anatomy panels at 5% and 10%: the default must beat
        # confidence deferral to the best single expert (CI above 0); elsewhere be no worse
        # than it by more than 0.002 (CI lower bound)
        parts = []
        for b in BUDGETS:
            must_beat = p == "C" or (is_anatomy_2d(p) and b <= 0.1)
            d = paired(results, p, "improved", "confidence", b, key)
            parts.append(
                f"@{b:.0%} ({'> 0' if must_beat else '>= -0.002'}) "
                f"{verdict(d, margin=0.0 if must_beat else -0.002)}"
            )
        L.append(f"- {p}: default vs confidence deferral to the best expert: " + "; ".join(parts))
    for p in results["panels"]:
        if f"{seeds[0]}/{p}/plain-loop" not in results["runs"]:
            continue
        rates = [
            value(results, s, p, "plain-loop", b, "deferral_rate") / b
            for s in seeds
            for b in BUDGETS
        ]
        gains = [
            verdict(
                ci95(
                    [
                        value(results, s, p, "plain-loop", b, "system_dice")
                        - value(results, s, p, "plain-loop", b, "model_dice")
                        for s in seeds
                    ]
                )
            )
            for b in BUDGETS
        ]
        ok = all(0.5 <= r <= 1.5 for r in rates)
        L.append(
            f"- {p}: drop-in loss in a plain loop defers within [0.5, 1.5] x the budget "
            f"({'holds' if ok else 'does NOT hold'}: {min(rates):.2f}-{max(rates):.2f} x) and "
            "beats its own model alone: "
            + "; ".join(f"@{b:.0%} {g}" for b, g in zip(BUDGETS, gains))
        )
    for p in results["panels"]:
        if f"{seeds[0]}/{p}/bolt-on" not in results["runs"]:
            continue
        parts = []
        for b in BUDGETS:
            d = paired(results, p, "bolt-on", "improved-solo", b, key)
            ok = d.get("mean") is not None and abs(d["mean"]) <= 0.005
            parts.append(f"@{b:.0%} {'holds' if ok else 'does NOT hold'}: {d['mean']:+.4f}")
        L.append(
            f"- {p}: bolt-on deferral matches `deferredseg train` without siblings on the same "
            "base (the heads it trains; |mean difference| <= 0.005): " + "; ".join(parts)
        )
    for kind, fam in (("synthetic", True), ("real-anatomy", False)):
        val_dev, test_dev = [], []
        for k, r in results["runs"].items():
            if k.split("/")[-1] not in ("improved", "plain-loop", "bolt-on"):
                continue
            if (k.split("/")[1] in SYNTHETIC) != fam:
                continue
            for b in BUDGETS:
                m = r.get(f"{b:g}") or {}
                cal = (m.get("policy") or {}).get("calibration") or {}
                if "rate" in cal:
                    val_dev.append(abs(cal["rate"] - b))
                if m.get("deferral_rate") is not None and m.get("budget") is not None:
                    test_dev.append(abs(m["deferral_rate"] - b))
        if val_dev:
            L.append(
                f"- calibration on the {kind} panels (default, plain loop, bolt-on; every "
                f"seed, panel and budget): validation rate within 0.5 points of the budget: "
                f"{'holds' if max(val_dev) <= 0.005 else 'does NOT hold'} (largest deviation "
                f"{max(val_dev) * 100:.2f} points); test rate within 2 points: "
                f"{'holds' if max(test_dev) <= 0.02 else 'does NOT hold'} (largest "
                f"{max(test_dev) * 100:.2f} points)"
            )
    if previous is not None:
        for p in [p for p in results["panels"] if p in previous["panels"]]:
            parts = []
            for b in BUDGETS:
                diffs = []
                for s in seeds:
                    now = value(results, s, p, "improved", b, key)
                    before = value(previous, s, p, "improved", b, key)
                    if now is not None and before is not None:
                        diffs.append(now - before)
                d = ci95(diffs)
                if d.get("mean") is not None and d.get("ci95") is not None:
                    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
                    ok = hi >= 0  # no regression beyond the noise: the CI reaches 0 or above
                    parts.append(
                        f"@{b:.0%} {'holds' if ok else 'does NOT hold'}: {d['mean']:+.4f} "
                        f"[{lo:+.4f}, {hi:+.4f}]"
                    )
            L.append(
                f"- {p}: the default now vs the previous evidence "
                "(benchmarks/results/evidence_previous.json; no regression beyond the noise): "
                + "; ".join(parts)
            )
    for p in results["panels"]:
        sc = [value(results, s, p, "improved", 0.1, "auroc_model_wrong_score") for s in seeds]
        un = [value(results, s, p, "improved", 0.1, "auroc_model_wrong_uncertainty") for s in seeds]
        d = ci95([x - y for x, y in zip(sc, un) if x is not None and y is not None])
        margin, want = (
            (0.0, "better: CI above 0")
            if is_anatomy_2d(p)
            else (-0.005, "at least as good: CI lower bound above -0.005")
        )
        L.append(
            f"- {p}: AUROC of the default's score for the model's wrong pixels minus the "
            f"segmentation head's uncertainty's ({want}): {verdict(d, margin=margin)}"
        )
    if "A" in results["panels"]:
        L += [
            "",
            "Coherence and balance on panel A (improved default, 10% budget, matched rates):",
            "",
        ]
        for name, k, sign, text in (
            (
                "no-coherence",
                "matched_deferral_components_per_image",
                -1,
                "coherence reduces deferral regions per image",
            ),
            ("no-coherence", "matched_system_dice", +1, "coherence raises system Dice"),
            ("no-balance", "matched_system_dice", +1, "balance raises system Dice"),
        ):
            d = paired(results, "A", "improved-solo", name, 0.1, k)
            L.append(f"- {text}: {verdict(d, sign)}")
    return L


def is_anatomy_2d(panel: str) -> bool:
    return panel in ANATOMY and ANATOMY[panel][1] == 2


def headroom(results: Dict) -> List[str]:
    """How far each method closes the gap between confidence deferral and the budgeted
    oracle, how well its score ranks the model's wrong pixels, and how many of the
    confidently wrong pixels (confidence above 0.5) it defers; matched test rates."""
    seeds = results["seeds"]
    methods = ("confidence", "improved-solo", "improved", "oracle")
    L = [
        "Share of the headroom captured: (method - confidence deferral) / (budgeted oracle - "
        "confidence deferral), system Dice at matched test rates, mean over seeds; AUROC of "
        "each score for the model's wrong pixels; share of the confidently wrong pixels "
        "(confidence above 0.5, i.e. |2p - 1| > 0.5) deferred at the budget (threshold from "
        "the validation split).",
        "",
        "| panel | method | AUROC (model wrong) | "
        + " | ".join(f"headroom @{b:.0%} | confidently wrong deferred @{b:.0%}" for b in BUDGETS)
        + " |",
        "|---|---|---|" + "---|---|" * len(BUDGETS),
    ]
    for p in results["panels"]:
        if f"{seeds[0]}/{p}/oracle" not in results["runs"]:
            continue
        for m in methods:
            if f"{seeds[0]}/{p}/{m}" not in results["runs"]:
                continue
            if m == "oracle":
                auc = "-"
            else:
                k = (
                    "auroc_model_wrong_uncertainty"
                    if m == "confidence"
                    else "auroc_model_wrong_score"
                )
                aucs = [value(results, s, p, m, 0.1, k) for s in seeds]
                auc = fmt(ci95([x for x in aucs if x is not None]), ".4f")
            cells = []
            for b in BUDGETS:
                shares = []
                for s in seeds:
                    c = value(results, s, p, "confidence", b, "matched_system_dice")
                    o = value(results, s, p, "oracle", b, "matched_system_dice")
                    v = value(results, s, p, m, b, "matched_system_dice")
                    if None not in (c, o, v) and o - c > 1e-9:
                        shares.append((v - c) / (o - c))
                cells.append(f"{sum(shares) / len(shares):.0%}" if shares else "-")
                cw = [value(results, s, p, m, b, "confident_wrong_deferred") for s in seeds]
                cw = [x for x in cw if x is not None]
                cells.append(f"{sum(cw) / len(cw):.1%}" if cw and m != "oracle" else "-")
            L.append(f"| {p} | {LABELS[m]} | {auc} | " + " | ".join(cells) + " |")
    L.append("")
    for p in results["panels"]:
        shares = [value(results, s, p, "confidence", 0.1, "confident_wrong_share") for s in seeds]
        shares = [x for x in shares if x is not None]
        if shares:
            L.append(
                f"- {p}: {sum(shares) / len(shares):.0%} of the base segmentor's wrong test pixels "
                "are confidently wrong (mean over seeds)"
            )
    return L


def expert_choices(results: Dict) -> List[str]:
    """Which expert choice the default's calibration kept, per panel and budget."""
    seeds = results["seeds"]
    L = []
    for p in results["panels"]:
        parts = []
        for b in BUDGETS:
            picks = []
            for s in seeds:
                m = (results["runs"].get(f"{s}/{p}/improved") or {}).get(f"{b:g}") or {}
                picks.append((m.get("policy") or {}).get("chosen"))
            n = sum(c == "best" for c in picks)
            parts.append(f"@{b:.0%} best single expert in {n} of {len(picks)} seeds")
        L.append(f"- {p}: " + "; ".join(parts))
    return L


def markdown(results: Dict, env: str, previous: Optional[Dict] = None) -> str:
    """benchmarks/results/evidence.md: every table and every target."""
    L = [describe(results, env), ""] + tables(results) + targets(results, previous)
    L += [""] + headroom(results)
    L += ["", "The default's expert choice (`expert_choice=auto`) as calibrated:", ""]
    L += expert_choices(results)
    return "\n".join(L) + "\n"


def readme_block(results: Dict, env: str, previous: Optional[Dict] = None) -> str:
    """The README's part: the figure, the short table at 10% and the targets."""
    L = [
        describe(results, env),
        "",
        "![System Dice against the deferral budget](docs/images/evidence.png)",
        "",
    ]
    L += short_table(results)
    L += ["", "Every table: [benchmarks/results/evidence.md](benchmarks/results/evidence.md).", ""]
    L += targets(results, previous)
    L += [""] + headroom(results)
    return "\n".join(L) + "\n"


def figure(results: Dict, path: Path) -> None:
    """System Dice (matched test rate) against the budget, one panel per expert panel, each
    headline method a line with its 95% CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds, panels = results["seeds"], results["panels"]
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    height = (3.4 if len(panels) >= 3 else 5.5) * rows
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, height), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, p in zip(axes.flat, panels):
        for m in HEADLINE:
            if f"{seeds[0]}/{p}/{m}" not in results["runs"]:
                continue
            stats = [
                ci95([value(results, s, p, m, b, "matched_system_dice") for s in seeds])
                for b in BUDGETS
            ]
            if any(st.get("mean") is None for st in stats):
                continue
            x = [b * 100 for b in BUDGETS]
            mean = [st["mean"] for st in stats]
            half = [st.get("ci95") or 0.0 for st in stats]
            style = "--" if m in ("base", "oracle") else "-"
            (line,) = ax.plot(
                x, mean, style, marker="o", ms=3, label=LABELS[m], color=f"C{HEADLINE.index(m)}"
            )
            ax.fill_between(
                x,
                [a - h for a, h in zip(mean, half)],
                [a + h for a, h in zip(mean, half)],
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_title(f"panel {p}\n({PANEL_NAMES[p]})", fontsize=9)
        ax.set_xlabel("deferral budget (% of pixels)")
        ax.set_xticks([b * 100 for b in BUDGETS])
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("system Dice (matched test rate)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = 3 if len(panels) >= 3 else 1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    legend = (0.18 if ncol == 3 else 0.45) / rows
    fig.tight_layout(rect=(0, legend, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3, 4, 5]
    )
    p.add_argument("--panels", type=lambda s: s.split(","), default=list(PANELS))
    p.add_argument("--cases", type=int, default=250)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--anatomy-cases", type=int, default=160, help="2D real-anatomy slices")
    p.add_argument("--anatomy-size", type=int, default=64, help="their side (pixels of 2 mm)")
    p.add_argument("--anatomy-crops", type=int, default=40, help="3D real-anatomy crops")
    p.add_argument("--anatomy-crop-size", type=int, default=24, help="their side (voxels)")
    p.add_argument(
        "--anatomy-epochs", type=int, default=6, help="the base segmentor's epochs on them"
    )
    p.add_argument(
        "--joint", action="store_true", help="also train the improved objective jointly (panel C)"
    )
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=str(ROOT / "build" / "evidence"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes; does not touch README.md")
    p.add_argument("--from-json", help="re-write the table and README from an evidence.json")
    p.add_argument(
        "--partial",
        action="store_true",
        help="a part of the run (some panels or seeds, e.g. in parallel processes sharing "
        "--out): write only under --results, not README.md or the figure",
    )
    args = p.parse_args(argv)
    import torch

    if args.quick:  # tiny sizes, one epoch (the quick base_config's) on every data set
        args.cases, args.size = 30, 32
        args.anatomy_cases, args.anatomy_size, args.anatomy_epochs = 30, 48, 1
        args.anatomy_crops, args.anatomy_crop_size = 20, 24
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results, env = saved["results"], saved["env"]
    else:
        results = run(args)
        env = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    prev_path = res / "evidence_previous.json"
    previous = json.loads(prev_path.read_text())["results"] if prev_path.exists() else None
    md = markdown(results, env, previous)
    suffix = "_quick" if args.quick else ""
    if args.partial:
        suffix = "_partial"
    figure(
        results,
        res / f"evidence{suffix}.png"
        if args.quick or args.partial
        else ROOT / "docs/images/evidence.png",
    )
    (res / f"evidence{suffix}.json").write_text(
        json.dumps({"results": results, "env": env}, indent=1, default=str)
    )
    (res / f"evidence{suffix}.md").write_text(md)
    print(md)
    if not args.quick and not args.partial:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            _, tail = rest.split(END, 1)
            block = readme_block(results, env, previous)
            readme.write_text(f"{head}{START}\n{block}{END}{tail}")
            print("README.md updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
