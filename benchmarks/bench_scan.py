"""Time of the pre-flight data scan (`deferredseg train`'s check of every file before step 1).

Writes a multirater set of N PNG cases (default 2,000) of 256x256 pixels with 3 raters
(grey images, 0/255 masks) into a folder (kept between runs with --data), then times
:func:`deferredseg.data.scan.scan_dataset` over every split with contents (values,
channels, sizes, NaN) and, for comparison, with headers only. The target is under 30 s
for 2,000 cases on a 2-core machine; docs/data.md gives the measured time.

    python benchmarks/bench_scan.py [--cases 2000] [--size 256] [--data DIR] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's deferredseg


def write_set(root: Path, cases: int, size: int, raters: int = 3) -> None:
    """The set, written once (a folder that holds it already is reused)."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{cases} {size} {raters}":
        return
    rs = np.random.RandomState(0)
    for i in range(cases):
        img = (rs.rand(size, size) * 255).astype(np.uint8)
        truth = np.zeros((size, size), np.uint8)
        c = rs.randint(size // 4, 3 * size // 4, 2)
        truth[c[0] - size // 8 : c[0] + size // 8, c[1] - size // 8 : c[1] + size // 8] = 255
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "images" / f"case{i:05d}.png")
        for r in range(raters):
            m = truth.copy()
            m[rs.randint(0, size), :] ^= 255  # a rater's own mistakes
            (root / "raters" / f"r{r}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(m).save(root / "raters" / f"r{r}" / f"case{i:05d}.png")
    done.write_text(f"{cases} {size} {raters}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--data", help="folder for the set (default: a temporary one)")
    ap.add_argument("--workers", type=int, default=None, help="threads (default: CPUs, max 8)")
    args = ap.parse_args()

    from deferredseg.data.scan import scan_dataset

    tmp = None
    if args.data:
        root = Path(args.data)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-scan-")
        root = Path(tmp.name)
    t0 = time.perf_counter()
    write_set(root, args.cases, args.size)
    print(
        f"set: {root} ({args.cases} cases, {args.size}x{args.size}, 3 raters) "
        f"written in {time.perf_counter() - t0:.1f} s"
    )
    files = args.cases * 4
    for contents in (False, True):
        t0 = time.perf_counter()
        res = scan_dataset("multirater", root, contents=contents, workers=args.workers)
        dt = time.perf_counter() - t0
        what = "headers and contents" if contents else "headers only"
        print(
            f"scan ({what}): {len(res.ids)} cases, {files} files in {dt:.1f} s "
            f"({files / dt:.0f} files/s, {os.cpu_count()} CPUs, workers "
            f"{args.workers or 'default'})"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
