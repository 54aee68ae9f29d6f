"""Start-up time of the command line: ``deferredseg --help`` and ``deferredseg train --help``.

Each is run REPEATS times in a fresh interpreter (``python -m deferredseg``, this
checkout); the best and the median wall times are printed. ``deferredseg --help``
should take under 1 s: it imports no torch (the command list is built from the standard
library alone); ``train --help`` imports torch and the kernels to list the options.

    python benchmarks/bench_help.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(args, repeats: int):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "deferredseg", *args],
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    n = ap.parse_args().repeats
    for args in (["--help"], ["train", "--help"]):
        best, med = wall(args, n)
        print(f"deferredseg {' '.join(args)}: best {best:.2f} s, median {med:.2f} s ({n} runs)")


if __name__ == "__main__":
    main()
