"""``deferredseg review-demo``: the whole loop on synthetic data.

Trains DeferredSeg (as ``deferredseg demo`` does), draws new synthetic images
the model has never seen (one of them larger than the training images, so it
goes through sliding windows), runs ``predict`` at a 10 % deferral budget,
then, with ``simulate_experts``, starts the review server and lets each
simulated expert answer their own queue through the same HTTP API the review
page uses (accepting a proposal that matches their own labels on the region,
editing it to their labels otherwise), merges, and prints the model-only Dice
against the Dice of the merged masks.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import uvicorn

from ..data.datasets import _synthetic_cases
from ..data.files import read_like
from ..metrics import per_image_scores
from ..predict import describe_routing
from ..train.builders import expert_panel
from ..train.config import TrainConfig
from ..train.loop import train
from .intake import predict
from .merge import merge
from .server import create_app

BUDGET = 0.10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, payload: Optional[dict] = None):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        body = r.read()
        return json.loads(body) if r.headers.get_content_type() == "application/json" else body


def simulated_expert(base: str, name: str, labels: Dict[str, np.ndarray]) -> Dict[str, int]:
    """Answer every task of ``name``'s queue through the HTTP API with the expert's own labels."""
    api = f"{base}/api/experts/{name}"
    counts = {"accepted": 0, "edited": 0}
    nxt = _call(f"{api}/queue")["next"]
    while nxt is not None:
        t = _call(f"{api}/tasks/{nxt}")
        _call(f"{api}/tasks/{nxt}/open", {})  # as the page does: the answer's time counts from here
        shape = tuple(t["crop_shape"])
        n = int(np.prod(shape))
        raw = _call(f"{api}/tasks/{nxt}/data")
        proposal = np.frombuffer(raw, np.uint8, n, 4 * n).reshape(shape)
        region = np.frombuffer(raw, np.uint8, n, 5 * n).reshape(shape).astype(bool)
        mine = labels[t["image"]][tuple(slice(a, b) for a, b in t["crop"])].astype(np.uint8)
        if np.array_equal(mine[region], proposal[region]):
            res = _call(f"{api}/tasks/{nxt}/answer", {"action": "accepted"})
            counts["accepted"] += 1
        else:
            res = _call(
                f"{api}/tasks/{nxt}/answer",
                {"action": "edited", "mask": base64.b64encode(mine.tobytes()).decode()},
            )
            counts["edited"] += 1
        nxt = res["next"]
    return counts


def _dice(pred: np.ndarray, target: np.ndarray, num_labels: int) -> float:
    s = per_image_scores(
        torch.as_tensor(pred.astype(np.int64))[None],
        torch.as_tensor(target.astype(np.int64))[None],
        num_labels,
        with_hd95=False,
    )
    return float(s["dice"][0])


def _review_demo_config(root: Path, device: str, seed: int, quick: bool):
    """Synthetic MONAI images with the five structured simulated experts, whose labels the
    demo can draw again for new images (the review loop's simulated experts)."""
    size = (
        dict(num_images=12, image_size=32, features=8, epochs=1, head_epochs=2)
        if quick
        else dict(num_images=48, image_size=64, features=16, epochs=12, head_epochs=8)
    )
    return TrainConfig(
        out=str(root / "train"),
        batch_size=4,
        lr=3e-3,
        device=device,
        seed=seed,
        progress=not quick,
        overwrite=True,
        **size,
    )


def run_review_demo(
    out: str = "deferredseg-review-demo",
    simulate_experts: bool = False,
    quick: bool = False,
    num_images: Optional[int] = None,
    device: str = "cpu",
    seed: int = 0,
) -> int:
    root = Path(out)
    cfg = _review_demo_config(root, device, seed, quick)
    t0 = time.perf_counter()
    ck = Path(cfg.out) / "best.pt"
    if ck.is_file():
        print(f"using the trained model {ck}")
    else:
        print(
            f"training DeferredSeg ({cfg.epochs} epochs, {cfg.num_images} synthetic "
            f"{cfg.image_size}x{cfg.image_size} images, 5 structured experts) on {device} ..."
        )
        train(cfg)
    num_labels = max(cfg.num_classes, 2)
    n = num_images or (4 if quick else 12)
    # new images, unseen in training (their own ids and seed); the last one twice as large
    images, truth = root / "new_images", root / "ground_truth"
    images.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    panel = expert_panel(cfg, num_labels, cfg.seed)
    expert_labels: Dict[str, Dict[str, np.ndarray]] = {name: {} for name in panel.names}
    gts: Dict[str, np.ndarray] = {}
    for i in range(n):
        size = cfg.image_size * (2 if i == n - 1 else 1)
        (case,) = _synthetic_cases([f"new_{i:03d}"], seed + 7919, 2, size, num_labels, 4, None, 0.2)
        if not (images / f"{case['id']}.npy").exists():  # a rerun keeps the predicted files
            np.save(images / f"{case['id']}.npy", case["image"][0])
            np.save(truth / f"{case['id']}.npy", case["label"])
        gts[case["id"]] = case["label"]
        labs = panel(torch.as_tensor(case["label"])[None], ids=[case["id"]])[0].numpy()
        for j, name in enumerate(panel.names):
            expert_labels[name][case["id"]] = labs[j]
    review = root / "review"
    s = predict(ck, images, review, budget=BUDGET, device=device, progress=False)
    print(
        f"predicted {len(s.done)} new image(s) ({len(s.skipped)} done before): {s.tasks} review "
        f"task(s) at {describe_routing(s.routing)}"
    )
    if s.failed:
        for f, err in s.failed:
            print(f"  failed: {f}: {err}")
        return 1
    if not simulate_experts:
        print(
            f"\nnext: `deferredseg serve {review}` and open the experts' links, then "
            f"`deferredseg merge {review}` (or rerun with --simulate-experts)"
        )
        return 0

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(review), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(400):
        if server.started:
            break
        time.sleep(0.05)
    results: Dict[str, Dict[str, int]] = {}
    errors: List[str] = []

    def answer(name: str) -> None:
        try:
            results[name] = simulated_expert(base, name, expert_labels[name])
        except Exception as err:
            errors.append(f"{name}: {type(err).__name__}: {err}")

    try:
        workers = [threading.Thread(target=answer, args=(name,)) for name in panel.names]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    if errors:
        print("simulated experts failed: " + "; ".join(errors))
        return 1
    rep = merge(review)
    ids = sorted(gts)
    model_d = [_dice(read_like(review / "model" / f"{i}.npy")[0], gts[i], num_labels) for i in ids]
    final_d = [_dice(read_like(review / "final" / f"{i}.npy")[0], gts[i], num_labels) for i in ids]
    deferred = np.mean([im["deferred_share"] for im in rep["images"]])
    print(
        "\nsimulated experts answered through the HTTP API: "
        + ", ".join(
            f"{k} {v['accepted']} accepted / {v['edited']} edited" for k, v in results.items()
        )
    )
    print(
        f"\n| {len(ids)} new images | Dice |\n|---|---|\n| model alone | "
        f"{np.nanmean(model_d):.4f} |\n"
        f"| merged after review ({deferred:.1%} of the pixels deferred) | "
        f"{np.nanmean(final_d):.4f} |"
    )
    print(
        f"\nfinal masks: {review / 'final'}; report: {review / 'report.md'}; "
        f"time {time.perf_counter() - t0:.0f} s"
    )
    return 0
