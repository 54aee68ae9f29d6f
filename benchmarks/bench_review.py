"""Fault and load check of the review server (`deferredseg serve`), on loopback only.

    python benchmarks/bench_review.py [--answers 1000] [--concurrency 16] [--edit-share 0.9]
                                      [--kills 1] [--merges 4] [--max-seconds 300]

Builds a review folder of synthetic images (no model needed), starts the real server on
127.0.0.1, and sends ``--answers`` answers from ``--concurrency`` clients (a share of them
edits with a mask, the rest accept or reject; tasks are answered again and again, so edits
of edits). During the burst it kills the server with SIGKILL ``--kills`` times and restarts
it, and runs ``deferredseg merge`` ``--merges`` times in other processes. Then it checks:

- every acknowledged answer (HTTP 200) is in the database, with its action and mask;
- ``PRAGMA integrity_check`` is ok and no temporary file is left;
- every ``final/`` file equals a fresh merge of the database;
- no response was a 5xx (a request cut by the kill is retried, never counted as sent);

and prints the throughput and the p50 / p99 latency of the acknowledged answers.
Everything is bounded: the number of answers, and the time (``--max-seconds``; the burst
stops there and the checks still run). Exit status 0 when every check holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deferredseg.data.files import InputMeta, file_fingerprint, write_like  # noqa: E402
from deferredseg.fileio import atomic_save_npy  # noqa: E402
from deferredseg.review.db import ReviewDB  # noqa: E402
from deferredseg.review.merge import fuse  # noqa: E402
from deferredseg.review.server import CROP_MARGIN  # noqa: E402
from deferredseg.review.tasks import extract_tasks  # noqa: E402

HOST = "127.0.0.1"  # loopback only: there is no option to aim this elsewhere
EXPERTS = ["r0", "r1", "r2", "r3"]


def build_folder(out: Path, images: int, side: int, seed: int) -> None:
    """``images`` synthetic images, each with a grid of square regions spread over the
    experts, written as ``predict`` writes a folder."""
    rng = np.random.RandomState(seed)
    src = out.parent / "images"
    src.mkdir(parents=True, exist_ok=True)
    db = ReviewDB(out)
    db.ensure_experts(EXPERTS)
    db.set_meta({"num_classes": 1, "num_labels": 2, "spatial_dims": 2, "in_channels": 1})
    meta = InputMeta(ext=".npy")
    step = 16
    for i in range(images):
        image_id = f"img{i:03d}"
        image = (100 + 40 * rng.rand(side, side)).astype(np.float32)
        np.save(src / f"{image_id}.npy", image)
        model = (rng.rand(side, side) > 0.5).astype(np.uint8)
        assignment = np.full((side, side), -1, np.int8)
        k = 0
        for r in range(2, side - 10, step):
            for c in range(2, side - 10, step):
                assignment[r : r + 10, c : c + 10] = k % len(EXPERTS)
                k += 1
        write_like(out / "model" / image_id, model, meta)
        regions, tasks, dropped = extract_tasks(assignment, len(EXPERTS), 1, 0)
        atomic_save_npy(out / "regions" / f"{image_id}.npy", regions)
        source = src / f"{image_id}.npy"
        db.add_image(
            image_id,
            str(source.resolve()),
            ".npy",
            file_fingerprint(source),
            model.shape,
            model.size,
            int((assignment >= 0).sum()),
            dropped,
            tasks,
        )
    db.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Server:
    """`deferredseg serve OUT` on 127.0.0.1:port, started, killed and restarted."""

    def __init__(self, out: Path, port: int):
        self.out, self.port = out, port
        self.proc: Optional[subprocess.Popen] = None
        self.log = open(out.parent / "server.log", "ab")

    def start(self, timeout: float = 60.0) -> float:
        t0 = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deferredseg", "serve", str(self.out)]
            + ["--host", HOST, "--port", str(self.port)],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see server.log")
            try:
                c = http.client.HTTPConnection(HOST, self.port, timeout=2)
                c.request("GET", "/static/style.css")
                if c.getresponse().status == 200:
                    c.close()
                    return time.time() - t0
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(args: argparse.Namespace) -> int:
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-review-"))
    out = work / "out"
    build_folder(out, args.images, args.side, args.seed)
    db = ReviewDB(out, create=False)
    tasks = list(db.iter_tasks())
    shapes = json.loads(db.image(tasks[0]["image_id"])["shape"])
    plan: List[Tuple[str, int, List[List[int]], List[List[int]]]] = []
    for t in tasks:
        bbox = json.loads(t["bbox"])
        crop = [
            [max(0, a - CROP_MARGIN), min(n, b + CROP_MARGIN)] for (a, b), n in zip(bbox, shapes)
        ]
        plan.append((t["expert"], int(t["id"]), bbox, crop))
    server = Server(out, free_port())
    server.start()

    lock = threading.Lock()
    sent = {"next": 0}
    acked: List[Dict] = []  # answers the server acknowledged
    latencies: List[float] = []
    statuses: Dict[int, int] = {}
    retried = {"n": 0}
    deadline = time.time() + args.max_seconds

    def take() -> Optional[int]:
        with lock:
            if sent["next"] >= args.answers or time.time() > deadline:
                return None
            sent["next"] += 1
            return sent["next"] - 1

    def client(seed: int) -> None:
        rng = random.Random(seed)
        conn: Optional[http.client.HTTPConnection] = None
        while True:
            k = take()
            if k is None:
                break
            expert, tid, bbox, crop = plan[(k * 7919 + seed) % len(plan)]
            if rng.random() < args.edit_share:
                shape = [b - a for a, b in crop]
                mask = np.frombuffer(rng.randbytes(int(np.prod(shape))), np.uint8) & 1
                body = {"action": "edited", "mask": base64.b64encode(mask.tobytes()).decode()}
            else:
                mask = None
                body = {"action": rng.choice(["accepted", "rejected"])}
            data = json.dumps(body).encode()
            while time.time() < deadline + 60:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(HOST, server.port, timeout=60)
                    t0 = time.perf_counter()
                    conn.request(
                        "POST",
                        f"/api/experts/{expert}/tasks/{tid}/answer",
                        body=data,
                        headers={"Content-Type": "application/json"},
                    )
                    r = conn.getresponse()
                    payload = r.read()
                    dt = time.perf_counter() - t0
                except (OSError, http.client.HTTPException):
                    # cut by the kill: not acknowledged, so sent again once the server is back
                    conn = None
                    with lock:
                        retried["n"] += 1
                    time.sleep(0.1)
                    continue
                with lock:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 200:
                        latencies.append(dt)
                        res = json.loads(payload)
                        acked.append(
                            {
                                "answer": res["answer"],
                                "task": tid,
                                "action": body["action"],
                                "bbox": bbox,
                                "crop": crop,
                                "mask": mask,
                            }
                        )
                break
        if conn is not None:
            conn.close()

    merges: List[Tuple[int, float]] = []
    merge_threads: List[threading.Thread] = []

    def merge_once() -> None:
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, "-m", "deferredseg", "merge", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=max(args.max_seconds, 60),
        )
        if p.returncode != 0:
            print(p.stdout + p.stderr, file=sys.stderr)
        merges.append((p.returncode, time.time() - t0))

    restarts: List[float] = []

    def controller() -> None:
        events = sorted(
            [(args.answers * (i + 1) / (args.kills + 1), "kill") for i in range(args.kills)]
            + [
                (args.answers * (i + 0.5) / max(args.merges, 1), "merge")
                for i in range(args.merges)
            ]
        )
        for at, what in events:
            while len(acked) < at and time.time() < deadline and any(w.is_alive() for w in workers):
                time.sleep(0.01)
            if time.time() > deadline or not any(w.is_alive() for w in workers):
                return
            if what == "kill":
                server.kill()  # mid-burst: requests are in flight
                restarts.append(server.start())
            else:
                m = threading.Thread(target=merge_once)
                m.start()
                merge_threads.append(m)

    workers = [threading.Thread(target=client, args=(s,)) for s in range(args.concurrency)]
    t_start = time.time()
    for w in workers:
        w.start()
    ctl = threading.Thread(target=controller)
    ctl.start()
    for w in workers:
        w.join()
    burst = time.time() - t_start
    ctl.join()
    for m in merge_threads:  # CLI merges still running
        m.join()
    server.stop()

    # ------------------------------------------------------------------ checks
    failures: List[str] = []
    # before opening the database (which removes what dead writers left): the last server
    # stopped cleanly and the killed ones' files went at the restarts
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    if leftovers:
        failures.append(f"{len(leftovers)} temporary file(s) left, e.g. {leftovers[0]}")
    db = ReviewDB(out, create=False)  # as a restart would open it
    c = db.conn()
    if c.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
        failures.append("PRAGMA integrity_check is not ok")
    rows = {int(r["id"]): r for r in c.execute("SELECT * FROM answers")}
    lost = 0
    for a in acked:
        row = rows.get(int(a["answer"]))
        if row is None or int(row["task_id"]) != a["task"] or row["action"] != a["action"]:
            lost += 1
            continue
        if a["mask"] is not None:
            shape = [b - a_ for a_, b in a["crop"]]
            full = a["mask"].reshape(shape)
            box = tuple(slice(b[0] - cr[0], b[1] - cr[0]) for b, cr in zip(a["bbox"], a["crop"]))
            if not np.array_equal(db.load_answer_mask(row), full[box]):
                lost += 1
    if lost:
        failures.append(f"{lost} acknowledged answer(s) missing or different in the database")
    stale = 0
    for image_id in db.image_ids():
        model = np.load(out / "model" / f"{image_id}.npy")
        regions = np.load(out / "regions" / f"{image_id}.npy")
        answered, _, _ = db.image_answers(image_id)
        fresh = fuse(
            model,
            regions,
            [
                {
                    "region": r["region"],
                    "bbox": json.loads(r["bbox"]),
                    "action": r["action"],
                    "mask": db.load_answer_mask(r),
                }
                for r in answered
            ],
        )
        final = out / "final" / f"{image_id}.npy"
        if not final.exists() or not np.array_equal(np.load(final), fresh):
            stale += 1
    if stale:
        failures.append(f"{stale} final/ file(s) differ from a fresh merge")
    errors5 = sum(n for s, n in statuses.items() if s >= 500)
    if errors5:
        failures.append(f"{errors5} response(s) were 5xx: {statuses}")
    others = {s: n for s, n in statuses.items() if s != 200 and s < 500}
    if others:
        failures.append(f"unexpected 4xx: {others}")
    bad_merges = [rc for rc, _ in merges if rc != 0]
    if bad_merges:
        failures.append(f"{len(bad_merges)} CLI merge(s) failed")
    if len(acked) < args.answers and time.time() <= deadline:
        failures.append(f"only {len(acked)} of {args.answers} answers acknowledged")

    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    result = {
        "answers_acknowledged": len(acked),
        "answers_asked": args.answers,
        "concurrency": args.concurrency,
        "edit_share": args.edit_share,
        "images": args.images,
        "tasks": len(plan),
        "kills": len(restarts),
        "restart_s": [round(r, 2) for r in restarts],
        "cli_merges": len(merges),
        "requests_retried_after_kill": retried["n"],
        "seconds": round(burst, 2),
        "answers_per_s": round(len(acked) / burst, 1) if burst else 0.0,
        # the server's own pace: the burst without the restarts' down time
        "answers_per_s_up": round(len(acked) / max(burst - sum(restarts), 1e-9), 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "lost": lost,
        "final_stale": stale,
        "integrity_check": "ok" if not any("integrity" in f for f in failures) else "failed",
        "failures": failures,
    }
    print(
        f"{len(acked)} answers acknowledged in {burst:.1f} s at concurrency {args.concurrency} "
        f"({args.edit_share:.0%} edits): {result['answers_per_s']} answers/s "
        f"({result['answers_per_s_up']} while up), p50 "
        f"{result['p50_ms']} ms, p99 {result['p99_ms']} ms; {len(restarts)} kill -9 + restart, "
        f"{len(merges)} CLI merges, {retried['n']} requests cut or refused and sent again; "
        f"lost {lost}, final/ stale {stale}, 5xx {errors5}, "
        f"integrity_check {result['integrity_check']}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--answers", type=int, default=1000, help="answers to send (default 1000)")
    p.add_argument("--concurrency", type=int, default=16, help="clients at once (default 16)")
    p.add_argument("--edit-share", type=float, default=0.9, help="share of edits (default 0.9)")
    p.add_argument("--kills", type=int, default=1, help="kill -9 and restarts (default 1)")
    p.add_argument("--merges", type=int, default=4, help="CLI merges during the burst (4)")
    p.add_argument("--images", type=int, default=8, help="synthetic images (default 8)")
    p.add_argument("--side", type=int, default=96, help="their side in pixels (default 96)")
    p.add_argument("--max-seconds", type=float, default=300, help="bound on the burst (300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="work folder (default: a new temporary one)")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    for name in ("answers", "concurrency", "images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0.0 <= args.edit_share <= 1.0:
        p.error(f"--edit-share must be in [0, 1], got {args.edit_share}")
    if args.side < 24:
        p.error(f"--side must be at least 24, got {args.side}")
    if args.kills < 0 or args.merges < 0:
        p.error("--kills and --merges must be >= 0")
    if args.max_seconds <= 0 or args.max_seconds > 3600:
        p.error(f"--max-seconds must be in (0, 3600], got {args.max_seconds}")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
