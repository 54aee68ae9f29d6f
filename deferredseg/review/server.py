"""``deferredseg serve OUT``: the review web application (Starlette + uvicorn).

Pages (static HTML/JS shipped in ``deferredseg/review/static``, no build step):

- ``/review/<expert>``: the expert's own queue, one task at a time (accept,
  edit with brush and eraser, reject);
- ``/``: the overview of every expert's workload and the complete images.

JSON API used by the pages (and by the simulated experts of ``review-demo``):

- ``GET  /api/overview``
- ``GET  /api/experts/<expert>/queue[?after=<task id>]``: counts and the next task
- ``GET  /api/experts/<expert>/tasks/<id>``: the task (crop box, shape, labels, answers)
- ``GET  /api/experts/<expert>/tasks/<id>/data``: the crop as bytes: the image
  (float32), the model's proposal (uint8) and the region (uint8, 1 inside), each
  ``prod(crop_shape)`` values in C order
- ``POST /api/experts/<expert>/tasks/<id>/answer``: ``{"action": "accepted" |
  "rejected" | "edited", "mask": base64 of uint8 labels of the crop (edited only)}``

Security: the server binds to 127.0.0.1 unless told otherwise, and any other
address requires the per-expert tokens (random, printed once, stored as
hashes); ``--require-tokens`` asks for them on 127.0.0.1 too. A token opens its
expert's queue only (the overview has its own). Expert names must be
registered experts, task ids integers of that expert's tasks, answers at most
``max_upload`` bytes, and a mask must have the crop's shape and labels in
``[0, num_labels)``: anything else is refused with a message saying why.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .db import ACTIONS, ReviewDB

__all__ = ["create_app", "serve", "STATIC", "CROP_MARGIN"]

STATIC = Path(__file__).resolve().parent / "static"
CROP_MARGIN = 8  # pixels of context around a region's box on each side
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the personal links carry tokens
    "Cache-Control": "no-store",
}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Arrays:
    """The arrays of recently used images (raw image, model labels, regions), a few at a time."""

    def __init__(self, db: ReviewDB, keep: int = 8):
        self.db, self.keep = db, keep
        self._cache: "OrderedDict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            if image_id in self._cache:
                self._cache.move_to_end(image_id)
                return self._cache[image_id]
        from ..data.files import load_input, read_like

        row = self.db.image(image_id)
        C = int(self.db.get_meta("in_channels", 1))
        sd = int(self.db.get_meta("spatial_dims", len(json.loads(row["shape"]))))
        x, _ = load_input(row["source"], C, sd)
        image = x.mean(axis=0) if C > 1 else x[0]
        model = np.asarray(read_like(self.db.out / "model" / f"{image_id}{row['ext']}")[0])
        regions = np.load(self.db.out / "regions" / f"{image_id}.npy", allow_pickle=False)
        item = (image.astype(np.float32), model.astype(np.uint8), regions)
        with self._lock:
            self._cache[image_id] = item
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return item


class _SecurityHeaders:
    """ASGI middleware: the security headers on every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in _SECURITY_HEADERS.items():
                    if k not in headers:
                        headers[k] = v
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Debounced:
    """Runs ``fn`` in a background thread at most once per ``delay`` seconds after requests."""

    def __init__(self, fn, delay: float = 1.0):
        self.fn, self.delay = fn, delay
        self.pending = threading.Event()
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None

    def request(self) -> None:
        self.pending.set()
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, daemon=True, name="report-writer")
                self.thread.start()

    def _loop(self) -> None:
        while True:
            self.pending.wait()
            time.sleep(self.delay)
            self.flush()

    def flush(self) -> None:
        """Run ``fn`` now if a request is pending."""
        with self.lock:
            if self.pending.is_set():
                self.pending.clear()
                self.fn()


def _crop_box(bbox, shape) -> Tuple[Tuple[int, int], ...]:
    return tuple(
        (max(0, int(a) - CROP_MARGIN), min(int(n), int(b) + CROP_MARGIN))
        for (a, b), n in zip(bbox, shape)
    )


def create_app(
    out: Union[str, Path],
    require_tokens: bool = False,
    max_upload: int = 4 * 1024 * 1024,
    merge_on_answer: bool = True,
    allowed_hosts: Optional[Sequence[str]] = None,
) -> Starlette:
    """The review application of the prediction folder ``out``.

    ``allowed_hosts``: the Host headers accepted (None: any); :func:`serve` on a
    loopback address accepts only loopback names, so that a web page elsewhere
    cannot reach the server through a rebound domain name.
    """
    db = ReviewDB(out, create=False)
    if require_tokens and not db.has_tokens():
        raise ValueError(
            f"tokens are required but {out} has none yet; `deferredseg serve` issues them"
        )
    num_labels = int(db.get_meta("num_labels", 2))
    arrays = _Arrays(db)
    merge_lock = threading.Lock()

    def report() -> None:
        from .merge import write_report

        write_report(db)

    # the report sums over every task: written in the background, at most once a second
    reporter = _Debounced(report)

    def fail(status: int, message: str):
        raise HTTPException(status_code=status, detail=message)

    def token_of(request: Request) -> Optional[str]:
        return request.headers.get("x-review-token") or request.query_params.get("token")

    def expert_of(request: Request):
        name = request.path_params["expert"]
        if not _NAME.match(name):
            fail(404, "no such expert")
        row = db.expert_by_name(name)
        if row is None:
            fail(404, f"no expert {name!r}")
        if require_tokens and not db.check_token(name, token_of(request)):
            fail(403, f"this link's token does not open {name!r}'s queue")
        return row

    def task_of(request: Request, expert) -> Any:
        t = db.task(request.path_params["task_id"])
        if t is None or int(t["expert_id"]) != int(expert["id"]):
            fail(404, f"no task {request.path_params['task_id']} in {expert['name']!r}'s queue")
        return t

    def task_view(t) -> Dict[str, Any]:
        row = db.image(t["image_id"])
        shape = json.loads(row["shape"])
        bbox = json.loads(t["bbox"])
        crop = _crop_box(bbox, shape)
        image = arrays.get(t["image_id"])[0][tuple(slice(a, b) for a, b in crop)]
        lo, hi = np.percentile(image, [1, 99]).tolist() if image.size else [0.0, 1.0]
        last = db.latest_answer(t["id"])
        return {
            "id": int(t["id"]),
            "expert": t["expert"],
            "image": t["image_id"],
            "image_shape": shape,
            "bbox": bbox,
            "area": int(t["area"]),
            "crop": crop,
            "crop_shape": [b - a for a, b in crop],
            "num_labels": num_labels,
            "intensity": {
                "min": float(image.min()),
                "max": float(image.max()),
                "lo": float(lo),
                "hi": float(hi),
            },
            "answer": None if last is None else last["action"],
        }

    # ------------------------------------------------------------------ pages
    def overview_page(request: Request):
        return FileResponse(STATIC / "overview.html", media_type="text/html")

    def review_page(request: Request):
        name = request.path_params["expert"]
        if not _NAME.match(name) or db.expert_by_name(name) is None:
            fail(404, f"no expert {name!r}")
        return FileResponse(STATIC / "review.html", media_type="text/html")

    # ------------------------------------------------------------------ API
    def api_overview(request: Request):
        if require_tokens and not db.check_token(None, token_of(request)):
            fail(403, "the overview needs its own token")
        data = db.overview()
        if not require_tokens:
            data["links"] = {e["name"]: f"/review/{e['name']}" for e in data["experts"]}
        return JSONResponse(data)

    def api_queue(request: Request):
        e = expert_of(request)
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            fail(400, "after must be a task id (an integer)")
        return JSONResponse(
            {
                "expert": e["name"],
                "counts": db.queue_counts(int(e["id"])),
                "next": db.next_task(int(e["id"]), after),
            }
        )

    def api_task(request: Request):
        e = expert_of(request)
        t = task_of(request, e)
        db.mark_opened(int(t["id"]))
        return JSONResponse(task_view(t))

    def api_task_data(request: Request):
        e = expert_of(request)
        t = task_of(request, e)
        image, model, regions = arrays.get(t["image_id"])
        row = db.image(t["image_id"])
        sl = tuple(
            slice(a, b) for a, b in _crop_box(json.loads(t["bbox"]), json.loads(row["shape"]))
        )
        parts = [
            np.ascontiguousarray(image[sl], dtype="<f4").tobytes(),
            np.ascontiguousarray(model[sl], dtype=np.uint8).tobytes(),
            np.ascontiguousarray(regions[sl] == int(t["region"]), dtype=np.uint8).tobytes(),
        ]
        return Response(b"".join(parts), media_type="application/octet-stream")

    def _answer(e, t, payload: Dict[str, Any]) -> Dict[str, Any]:
        action = payload.get("action")
        if action not in ACTIONS:
            fail(422, f"action must be one of {list(ACTIONS)}, got {action!r}")
        mask = None
        if action == "edited":
            view = task_view(t)
            crop_shape = tuple(view["crop_shape"])
            encoded = payload.get("mask")
            if not isinstance(encoded, str):
                fail(422, "an edited answer needs 'mask': base64 of uint8 labels of the crop")
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                fail(422, "mask is not valid base64")
            n = int(np.prod(crop_shape))
            if len(raw) != n:
                fail(422, f"mask has {len(raw)} values, the task's crop {list(crop_shape)} has {n}")
            if "shape" in payload and list(payload["shape"]) != list(crop_shape):
                fail(
                    422,
                    f"mask shape {payload['shape']} does not match the task's crop "
                    f"{list(crop_shape)}",
                )
            full = np.frombuffer(raw, dtype=np.uint8).reshape(crop_shape)
            if full.size and int(full.max()) >= num_labels:
                fail(422, f"mask labels must be in [0, {num_labels}), found {int(full.max())}")
            # stored: the region's box within the crop
            off = [b[0] - c[0] for b, c in zip(view["bbox"], view["crop"])]
            mask = full[
                tuple(slice(o, o + (b[1] - b[0])) for o, b in zip(off, view["bbox"]))
            ].copy()
        answer_id = db.add_answer(int(t["id"]), int(e["id"]), action, mask)
        if merge_on_answer:
            from .merge import merge_image

            with merge_lock:
                merge_image(db, t["image_id"])
            reporter.request()
        return {
            "answer": answer_id,
            "task": int(t["id"]),
            "action": action,
            "counts": db.queue_counts(int(e["id"])),
            "next": db.next_task(int(e["id"]), int(t["id"])),
        }

    async def api_answer(request: Request):
        e = await run_in_threadpool(expert_of, request)
        t = await run_in_threadpool(task_of, request, e)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_upload):
            fail(413, f"an answer may have at most {max_upload} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload:
                fail(413, f"an answer may have at most {max_upload} bytes")
        try:
            payload = json.loads(bytes(body))
        except ValueError:
            fail(400, "the answer must be JSON")
        if not isinstance(payload, dict):
            fail(400, "the answer must be a JSON object")
        return JSONResponse(await run_in_threadpool(_answer, e, t, payload))

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    routes = [
        Route("/", overview_page),
        Route("/review/{expert}", review_page),
        Route("/api/overview", api_overview),
        Route("/api/experts/{expert}/queue", api_queue),
        Route("/api/experts/{expert}/tasks/{task_id:int}", api_task),
        Route("/api/experts/{expert}/tasks/{task_id:int}/data", api_task_data),
        Route("/api/experts/{expert}/tasks/{task_id:int}/answer", api_answer, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        reporter.flush()  # the last answers' report before the server stops

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
        middleware=[Middleware(_SecurityHeaders)]
        + (
            [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
            if allowed_hosts
            else []
        ),
    )
    app.state.db = db
    app.state.flush_report = reporter.flush
    return app


def serve(
    out: Union[str, Path],
    host: str = "127.0.0.1",
    port: int = 8765,
    require_tokens: bool = False,
    new_tokens: bool = False,
    max_upload: int = 4 * 1024 * 1024,
) -> int:
    """Run the review application until interrupted; prints each expert's link."""
    import uvicorn

    db = ReviewDB(out, create=False)
    if not _is_loopback(host) and not require_tokens:
        print(f"binding to {host}: tokens are required", flush=True)
        require_tokens = True
    base = f"http://{host if ':' not in host else '[' + host + ']'}:{port}"
    if require_tokens:
        tokens = db.issue_tokens(replace=new_tokens)
        if tokens:
            print("personal links (printed this once; only hashes are kept):", flush=True)
        for e in db.experts():
            if e["name"] in tokens:
                print(
                    f"  expert {e['name']}: {base}/review/{e['name']}?token={tokens[e['name']]}",
                    flush=True,
                )
            else:
                print(
                    f"  expert {e['name']}: {base}/review/{e['name']} (token issued before; "
                    f"--new-tokens replaces them all)",
                    flush=True,
                )
        if "" in tokens:
            print(f"  overview: {base}/?token={tokens['']}", flush=True)
    else:
        for e in db.experts():
            print(f"  expert {e['name']}: {base}/review/{e['name']}", flush=True)
        print(f"  overview: {base}/", flush=True)
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]"] if _is_loopback(host) else None
    app = create_app(out, require_tokens=require_tokens, max_upload=max_upload, allowed_hosts=hosts)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
