"""The evidence table: every method on the synthetic multi-rater set, 2D and 3D, several seeds.

    python benchmarks/evidence.py                 # the README's table (CPU, tens of minutes)
    python benchmarks/evidence.py --quick         # a tiny run that checks the pipeline

Each (dimension, seed) trains the full DeferredSeg objective, the same without
the coherence term and without the balance term, the base segmentor alone, and
single-expert learning to defer; the confidence-threshold baseline reuses the
base segmentor's weights. Every deferring method is evaluated on the test split
at the same deferral budget (the threshold is chosen on the validation split).
The script writes benchmarks/results/evidence.json, evidence.md and
risk_coverage.png, and replaces the table between the evidence markers of
README.md. Claims are printed as supported only when the 95% confidence interval
of the paired difference over seeds excludes zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deferredseg.cli import ci95  # noqa: E402
from deferredseg.train.config import TrainConfig  # noqa: E402
from deferredseg.train.loop import evaluate, train  # noqa: E402

TRAINED = ("deferredseg", "no-coherence", "no-balance", "model-only", "l2d-single")
ROWS = ("model-only", "confidence", "l2d-single", "no-coherence", "no-balance", "deferredseg")
LABELS = {"model-only": "base segmentor alone", "confidence": "confidence-threshold deferral",
          "l2d-single": "single-expert L2D (Mozannar-Sontag)",
          "no-coherence": "DeferredSeg without coherence", "no-balance": "DeferredSeg without balance",
          "deferredseg": "DeferredSeg (full)"}
START, END = "<!-- evidence:start -->", "<!-- evidence:end -->"


def base_config(dims: int, quick: bool) -> TrainConfig:
    if quick:
        return TrainConfig(spatial_dims=dims, image_size=16 if dims == 3 else 24, num_images=12,
                           features=4, epochs=1, batch_size=4, progress=False)
    if dims == 2:
        return TrainConfig(spatial_dims=2, image_size=64, num_images=48, features=16, epochs=12,
                           batch_size=4, lr=3e-3, progress=False)
    return TrainConfig(spatial_dims=3, image_size=32, num_images=32, features=8, epochs=10,
                       batch_size=2, lr=3e-3, progress=False)


def workload_cv(shares: List[float]) -> float:
    """Coefficient of variation of the experts' shares of the deferred pixels (0: even)."""
    mean = sum(shares) / len(shares)
    if mean == 0:
        return float("nan")
    return statistics.pstdev(shares) / mean


def run(args) -> Dict:
    out_root = Path(args.out)
    results: Dict = {"budget": args.budget, "seeds": args.seeds, "dims": args.dims, "runs": {}}
    t0 = time.time()
    for dims in args.dims:
        for seed in args.seeds:
            for method in TRAINED:
                cfg = dataclasses.replace(base_config(dims, args.quick), method=method, seed=seed,
                                          out=str(out_root / f"{dims}d" / f"seed{seed}" / method),
                                          backend=args.backend)
                train(cfg)
                ck = Path(cfg.out) / "best.pt"
                evals = {method: dict(checkpoint=ck, overrides=None)}
                if method == "model-only":
                    evals["confidence"] = dict(checkpoint=ck, overrides={"method": "confidence"})
                for name, ev in evals.items():
                    m = evaluate(ev["checkpoint"], budget=args.budget, overrides=ev["overrides"],
                                 figures=False, with_hd95=(dims == 2))
                    m["workload_cv"] = workload_cv(m["expert_share"]) if m["deferral_rate"] else None
                    results["runs"][f"{dims}d/{seed}/{name}"] = m
                print(f"[{time.time() - t0:6.0f} s] {dims}D seed {seed} {method} done", flush=True)
    return results


def summarise(results: Dict) -> Dict:
    table: Dict = {}
    for dims in results["dims"]:
        for name in ROWS:
            runs = [results["runs"][f"{dims}d/{s}/{name}"] for s in results["seeds"]]
            table[f"{dims}d/{name}"] = {k: ci95([r.get(k) for r in runs]) for k in (
                "system_dice", "model_dice", "deferral_rate", "deferral_components_per_image",
                "workload_cv", "system_hd95", "risk_coverage_auc")}
    return table


def paired(results: Dict, dims: int, a: str, b: str, key: str) -> Dict:
    """Mean and 95% CI of (a - b) over seeds for metric ``key``."""
    diffs = []
    for s in results["seeds"]:
        va = results["runs"][f"{dims}d/{s}/{a}"].get(key)
        vb = results["runs"][f"{dims}d/{s}/{b}"].get(key)
        if va is not None and vb is not None:
            diffs.append(va - vb)
    return ci95(diffs)


def claims(results: Dict) -> List[str]:
    lines = []
    checks = [
        ("deferral raises system Dice over the base segmentor alone", "deferredseg", "system_dice",
         "model-only", "system_dice", +1),
        ("DeferredSeg beats confidence-threshold deferral at the same budget", "deferredseg",
         "system_dice", "confidence", "system_dice", +1),
        ("the coherence term reduces fragmentation of deferral regions", "deferredseg",
         "deferral_components_per_image", "no-coherence", "deferral_components_per_image", -1),
        ("the balance term evens the experts' workload (lower CV of shares)", "deferredseg",
         "workload_cv", "no-balance", "workload_cv", -1),
    ]
    for dims in results["dims"]:
        for text, a, key, b, _, sign in checks:
            d = paired(results, dims, a, b, key)
            if d["mean"] is None or d["ci95"] is None:
                verdict = "not tested (too few values)"
            else:
                lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
                supported = (lo > 0) if sign > 0 else (hi < 0)
                verdict = ("supported" if supported else "NOT supported") + \
                    f": difference {d['mean']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}]"
            lines.append(f"- {dims}D: {text}: {verdict}")
    return lines


def fmt(s: Dict, spec: str = ".3f") -> str:
    if s["mean"] is None:
        return "n/a"
    ci = f" ± {s['ci95']:{spec}}" if s["ci95"] is not None else ""
    return f"{s['mean']:{spec}}{ci}"


def markdown(results: Dict, table: Dict, env: str) -> str:
    lines = [f"Synthetic multi-rater set (MONAI `create_test_image_2d/3d`, 5 structured experts), "
             f"seeds {results['seeds']}, mean ± 95% CI half-width (t), deferral budget "
             f"{results['budget']:.0%} of the test pixels (threshold chosen on validation). "
             f"Produced by `python benchmarks/evidence.py` ({env}).", ""]
    for dims in results["dims"]:
        lines += [f"**{dims}D**", "",
                  "| method | system Dice | deferral rate | deferral regions / image | "
                  "workload CV | risk-coverage AUC |",
                  "|---|---|---|---|---|---|"]
        for name in ROWS:
            s = table[f"{dims}d/{name}"]
            lines.append(f"| {LABELS[name]} | {fmt(s['system_dice'])} | {fmt(s['deferral_rate'])} | "
                         f"{fmt(s['deferral_components_per_image'], '.1f')} | {fmt(s['workload_cv'])} | "
                         f"{fmt(s['risk_coverage_auc'])} |")
        lines.append("")
    lines += ["What the confidence intervals support (paired over seeds):", ""] + claims(results)
    return "\n".join(lines) + "\n"


def plot(results: Dict, path: Path) -> None:
    from deferredseg.train.figures import plot_risk_coverage

    dims = results["dims"][0]
    seed = results["seeds"][0]
    curves = {LABELS[n]: results["runs"][f"{dims}d/{seed}/{n}"]["risk_coverage"]
              for n in ROWS if n != "model-only"}
    points = {LABELS[n]: (results["runs"][f"{dims}d/{seed}/{n}"]["deferral_rate"],
                          results["runs"][f"{dims}d/{seed}/{n}"]["system_dice"]) for n in ROWS}
    plot_risk_coverage(curves, path, points)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3])
    p.add_argument("--dims", type=lambda s: [int(v) for v in s.split(",")], default=[2, 3])
    p.add_argument("--budget", type=float, default=0.10)
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=str(ROOT / "build" / "evidence"))
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes; does not touch README.md")
    p.add_argument("--from-json", help="re-write the table, plot and README from an evidence.json "
                                       "written by an earlier run, without training")
    args = p.parse_args(argv)
    import platform

    import torch

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        results = saved["results"]
        env = saved.get("env") or f"{platform.machine()}, torch {torch.__version__}"
    else:
        results = run(args)
        env = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " \
              f"torch {torch.__version__}"
    table = summarise(results)
    md = markdown(results, table, env)
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (res / f"evidence{suffix}.json").write_text(json.dumps(
        {"results": results, "table": table, "env": env}, indent=1, default=str))
    (res / f"evidence{suffix}.md").write_text(md)
    plot(results, res / f"risk_coverage{suffix}.png")
    print(md)
    if not args.quick:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            _, tail = rest.split(END, 1)
            figure = "![risk-coverage](benchmarks/results/risk_coverage.png)\n"
            readme.write_text(f"{head}{START}\n{md}\n{figure}{END}{tail}")
            print("README.md updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
