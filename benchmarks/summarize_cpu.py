"""Summary of several runs of bench_loss_cpu.py from its CSV.

For every (shape, mode) the runs made since ``--since`` (an ISO date or time, as the
CSV's ``date`` column) on one machine are put side by side: each implementation's
median time and the kernel's speed-up over eager and over torch.compile, as the
median over the runs and their range. A run is one invocation of the benchmark
(one ``date`` value).

    python benchmarks/summarize_cpu.py --since 2026-11-26T22:30
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
from collections import defaultdict
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path: str, since: str, machine: str | None) -> List[dict]:
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["date"] >= since]
    if machine is not None:
        rows = [r for r in rows if r["machine"] == machine]
    return rows


def summarize(rows: List[dict]) -> List[dict]:
    # (shape, mode) -> run date -> impl -> median ms
    runs: Dict[Tuple[str, str], Dict[str, Dict[str, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for r in rows:
        runs[(r["shape"], r["mode"])][r["date"]][r["impl"]] = float(r["median_ms"])
    out = []
    for (shape, mode), by_run in runs.items():
        complete = [v for v in by_run.values() if "cpu_kernel" in v and "eager" in v]
        if not complete:
            continue
        entry = dict(shape=shape, mode=mode, runs=len(complete))
        for impl in ("eager", "compile", "cpu_kernel"):
            vals = [v[impl] for v in complete if impl in v]
            if vals:
                entry[impl] = (statistics.median(vals), min(vals), max(vals))
        for impl in ("eager", "compile"):
            ratios = [v[impl] / v["cpu_kernel"] for v in complete if impl in v]
            if ratios:
                entry["vs_" + impl] = (statistics.median(ratios), min(ratios), max(ratios))
        out.append(entry)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "loss_cpu.csv"))
    ap.add_argument("--since", default="", help="first date to include (ISO, as in the CSV)")
    ap.add_argument("--machine", default=None, help="only rows of this machine name")
    args = ap.parse_args()
    rows = load(args.csv, args.since, args.machine)
    if not rows:
        raise SystemExit(f"no rows in {args.csv} since {args.since!r}")
    fmt = lambda t, unit: f"{t[0]:.2f}{unit} ({t[1]:.2f}-{t[2]:.2f})"  # noqa: E731
    print(
        "| shape | mode | runs | eager | torch.compile | C++ CPU kernel | kernel vs eager "
        "| kernel vs compile |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for e in summarize(rows):
        cells = [fmt(e[k], " ms") if k in e else "-" for k in ("eager", "compile", "cpu_kernel")]
        cells += [fmt(e[k], "x") if k in e else "-" for k in ("vs_eager", "vs_compile")]
        print(f"| {e['shape']} | {e['mode']} | {e['runs']} | " + " | ".join(cells) + " |")
    print("\nmedian over the runs (range); each run's value is its own median of interleaved calls")


if __name__ == "__main__":
    main()
