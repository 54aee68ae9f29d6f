"""CPU benchmark of `deferredseg predict` and of the review server.

1. predict: images per second on the CPU for 256x256 2D images and one 128^3
   volume with a small MONAI UNet (DeferredSegmentor, features 16, E = 5), and
   the share of the time spent in the network, in routing and in task
   extraction (plus reading and writing). The weights are untrained and the
   threshold 0.5, so about half of the pixels are deferred: a heavy case for
   routing and task extraction.
2. serve: the latency of a task page (queue + task + crop data, the three
   requests the page makes) and of an answer (which also merges the image and
   rewrites the report in the background) with 10,000 tasks in the database, through uvicorn on
   127.0.0.1.

    python benchmarks/bench_predict.py [--images 16] [--requests 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _checkpoint(path: Path, dims: int, size: int) -> Path:
    from deferredseg.train.builders import build_model
    from deferredseg.train.checkpoint import save_checkpoint
    from deferredseg.train.config import TrainConfig

    cfg = TrainConfig(spatial_dims=dims, image_size=size, features=16, backend="auto", device="cpu")
    torch.manual_seed(0)
    model = build_model(cfg, 1, 5)
    save_checkpoint(
        path,
        {
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "num_experts": 5,
            "in_channels": 1,
            "best_expert": 0,
            "expert_names": [f"e{j}" for j in range(5)],
        },
    )
    return path


def bench_predict(root: Path, dims: int, size: int, n: int) -> dict:
    from monai.data import create_test_image_2d, create_test_image_3d

    from deferredseg.review.intake import predict

    ck = _checkpoint(root / f"ck{dims}d.pt", dims, size)
    images = root / f"images{dims}d"
    images.mkdir()
    rs = np.random.RandomState(0)
    for i in range(n):
        img = (
            create_test_image_2d(size, size, random_state=rs)[0]
            if dims == 2
            else create_test_image_3d(size, size, size, random_state=rs)[0]
        )
        np.save(images / f"img{i:03d}.npy", img.astype(np.float32))
    t0 = time.perf_counter()
    s = predict(ck, images, root / f"out{dims}d", threshold=0.5, device="cpu", progress=False)
    total = time.perf_counter() - t0
    assert len(s.done) == n and not s.failed, s.failed
    sec = s.seconds
    return {
        "case": f"{'x'.join([str(size)] * dims)} ({dims}D)",
        "images": n,
        "images_per_s": n / total,
        "total_s": total,
        "tasks": s.tasks,
        **{f"{k}_share": v / total for k, v in sec.items()},
        "route_plus_tasks_vs_network": (sec["route"] + sec["tasks"]) / max(sec["network"], 1e-9),
    }


def _many_tasks(root: Path, images: int = 10, side: int = 320) -> Path:
    """A review folder with images x 1024 small regions (10,240 tasks), no model needed."""
    from deferredseg.data.files import InputMeta, file_fingerprint, write_like
    from deferredseg.fileio import atomic_save_npy
    from deferredseg.review.db import ReviewDB
    from deferredseg.review.tasks import extract_tasks

    out = root / "review"
    db = ReviewDB(out)
    db.ensure_experts([f"e{j}" for j in range(5)])
    db.set_meta({"num_classes": 1, "num_labels": 2, "spatial_dims": 2, "in_channels": 1})
    (root / "src").mkdir()
    rs = np.random.RandomState(1)
    for i in range(images):
        a = np.full((side, side), -1, np.int8)
        k = 0
        for y in range(2, side - 4, 10):
            for x in range(2, side - 4, 10):
                a[y : y + 4, x : x + 4] = k % 5
                k += 1
        src = root / "src" / f"img{i}.npy"
        np.save(src, rs.rand(side, side).astype(np.float32))
        meta = InputMeta(ext=".npy")
        write_like(out / "model" / f"img{i}", (rs.rand(side, side) > 0.5).astype(np.uint8), meta)
        regions, tasks, dropped = extract_tasks(a, 5)
        atomic_save_npy(out / "regions" / f"img{i}.npy", regions)
        db.add_image(
            f"img{i}",
            str(src),
            ".npy",
            file_fingerprint(src),
            (side, side),
            side * side,
            int((a >= 0).sum()),
            dropped,
            tasks,
        )
    return out


def bench_serve(root: Path, requests: int) -> dict:
    import socket

    import uvicorn

    from deferredseg.review.db import ReviewDB
    from deferredseg.review.server import create_app

    out = _many_tasks(root)
    n_tasks = ReviewDB(out).conn().execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(out), host="127.0.0.1", port=port, log_level="warning")
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}/api/experts/e2"

    def get(url, data=None):
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as r:
            return r.read()

    page, answer = [], []
    try:
        for i in range(requests + 3):
            t0 = time.perf_counter()
            nxt = json.loads(get(base + "/queue"))["next"]
            get(f"{base}/tasks/{nxt}")
            get(f"{base}/tasks/{nxt}/data")
            t1 = time.perf_counter()
            get(f"{base}/tasks/{nxt}/answer", json.dumps({"action": "accepted"}).encode())
            t2 = time.perf_counter()
            if i >= 3:  # warm-up: first reads of each image
                page.append(t1 - t0)
                answer.append(t2 - t1)
    finally:
        server.should_exit = True
        th.join(timeout=10)
    q = lambda v, p: float(np.percentile(v, p)) * 1000  # noqa: E731
    return {
        "tasks_in_db": int(n_tasks),
        "requests": requests,
        "task_page_ms_median": q(page, 50),
        "task_page_ms_p90": q(page, 90),
        "answer_ms_median": q(answer, 50),
        "answer_ms_p90": q(answer, 90),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=16, help="256x256 images to predict")
    p.add_argument("--volumes", type=int, default=1, help="128^3 volumes to predict")
    p.add_argument("--requests", type=int, default=50, help="task pages and answers to time")
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [bench_predict(root, 2, 256, a.images), bench_predict(root, 3, 128, a.volumes)]
        srv = bench_serve(root, a.requests)
    print(
        f"predict on the CPU ({torch.get_num_threads()} threads), untrained UNet "
        "(features 16), E = 5:\n"
    )
    print(
        "| images | count | images/s | network | routing | task extraction | read + write | "
        "(routing + tasks) / network |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['images']} | {r['images_per_s']:.2f} | {r['network_share']:.1%} | "
            f"{r['route_share']:.1%} | {r['tasks_share']:.1%} | "
            f"{r['load_share'] + r['write_share']:.1%} | {r['route_plus_tasks_vs_network']:.1%} |"
        )
    print(
        f"\nreview server, {srv['tasks_in_db']} tasks in the database, {srv['requests']} requests:"
    )
    print(
        f"task page (queue + task + data): median {srv['task_page_ms_median']:.1f} ms, "
        f"p90 {srv['task_page_ms_p90']:.1f} ms"
    )
    print(
        "answer (with the merge of its image; the report follows in the background): median "
        f"{srv['answer_ms_median']:.1f} ms, "
        f"p90 {srv['answer_ms_p90']:.1f} ms"
    )
    if a.json:
        Path(a.json).write_text(json.dumps({"predict": rows, "serve": srv}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
