"""``deferredseg serve OUT``: the review web application (Starlette + uvicorn).

Pages (static HTML/JS shipped in ``deferredseg/review/static``, no build step):

- ``/review/<expert>``: the expert's own queue, one task at a time (accept,
  edit with brush and eraser, reject);
- ``/``: the overview of every expert's workload and the complete images.

JSON API used by the pages (and by the simulated experts of ``review-demo``):

- ``GET  /api/overview``
- ``GET  /api/experts/<expert>/queue[?after=<task id>]``: counts and the next task
- ``GET  /api/experts/<expert>/tasks/<id>``: the task (crop box, shape, labels, its latest
  answer and ``version``, that answer's id)
- ``POST /api/experts/<expert>/tasks/<id>/open``: the expert opened the task (its answer's
  time counts from here; a GET changes nothing)
- ``GET  /api/experts/<expert>/tasks/<id>/data``: the crop as bytes: the image
  (float32), the model's proposal (uint8) and the region (uint8, 1 inside), each
  ``prod(crop_shape)`` values in C order
- ``POST /api/experts/<expert>/tasks/<id>/answer``: ``{"action": "accepted" |
  "rejected" | "edited", "mask": base64 of uint8 labels of the crop (edited only),
  "base": the task's version the answer was made on}``; a stale ``base`` gets 409 and
  the current answer

Security: the server binds to 127.0.0.1 unless told otherwise, and any other
address requires the per-expert tokens (random, printed once, stored as
hashes); ``--require-tokens`` asks for them on 127.0.0.1 too. A token opens its
expert's queue only (the overview has its own). Expert names must be
registered experts, task ids integers of that expert's tasks, answers at most
``max_upload`` bytes, and a mask must have the crop's shape and labels in
``[0, num_labels)``: anything else is refused with a 4xx and a message saying why
(every response, errors included, carries the security headers).

Cross-site requests: a request that changes state (POST) must say
``Content-Type: application/json`` (which a page on another origin cannot send
without a CORS preflight that this server never grants) and must not come from
another origin (``Origin``, ``Sec-Fetch-Site``); a GET never changes state. The
Host header must be one of the allowed names (the bound address among them) and
never empty, so a rebound domain name does not reach the server.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import json
import re
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..data.files import load_input, read_like
from .db import ACTIONS, ReviewDB, StaleAnswer
from .merge import merge_image, remerge_stale, write_report

__all__ = ["create_app", "serve", "STATIC", "CROP_MARGIN"]

STATIC = Path(__file__).resolve().parent / "static"
CROP_MARGIN = 8  # pixels of context around a region's box on each side
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_ID = re.compile(r"^[0-9]{1,18}$")  # below 2**63, SQLite's integers
MAX_JSON_DEPTH = 4  # an answer is {"action", "mask", "shape": [..], "base"}
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


def _host_name(host: str) -> str:
    """The name part of a Host header (no port; an IPv6 address keeps its brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.split(":", 1)[0]


def _json_depth(value: Any, limit: int) -> int:
    """The nesting depth of a parsed JSON value, counted up to ``limit + 1``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if d > limit:
                return d
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


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
        row = self.db.image(image_id)
        C = int(self.db.get_meta("in_channels", 1))
        sd = int(self.db.get_meta("spatial_dims", len(json.loads(row["shape"]))))
        if not Path(row["source"]).is_file():
            raise HTTPException(
                410,
                f"the source scan of image {image_id!r} is no longer where predict read it; "
                "put it back to review this task",
            )
        try:
            x, _ = load_input(row["source"], C, sd)
        except ValueError:
            raise HTTPException(410, f"the source scan of image {image_id!r} can no longer be read")
        image = x.mean(axis=0) if C > 1 else x[0]
        try:
            model = np.asarray(read_like(self.db.out / "model" / f"{image_id}{row['ext']}")[0])
            regions = np.load(self.db.out / "regions" / f"{image_id}.npy", allow_pickle=False)
        except FileNotFoundError:
            raise HTTPException(
                410, f"the model's mask or regions of image {image_id!r} are missing"
            )
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


class _HostCheck:
    """ASGI middleware: refuses an empty Host header, and one not in ``allowed`` (if given)."""

    def __init__(self, app, allowed: Optional[Sequence[str]] = None):
        self.app = app
        self.allowed = None if allowed is None else {_host_name(h) for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = _host_name(Headers(scope=scope).get("host", ""))
        why = None
        if not host:
            why = "a request needs a Host header"
        elif self.allowed is not None and host not in self.allowed:
            why = f"Invalid host header: {host!r} is not one of {sorted(self.allowed)}"
        if why is None:
            return await self.app(scope, receive, send)
        await JSONResponse({"error": why}, status_code=400)(scope, receive, send)


class _App(Starlette):
    """Starlette with the security headers outside its error handling: a 500 has them too."""

    def build_middleware_stack(self):
        return _SecurityHeaders(super().build_middleware_stack())


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

    ``allowed_hosts``: the Host headers accepted (None: any non-empty one); :func:`serve` on
    a loopback address accepts only loopback names and the bound address, so that a web
    page elsewhere cannot reach the server through a rebound domain name.

    At creation, every image with answers newer than its ``final/`` file is merged again
    (a server killed between recording an answer and merging it).
    """
    db = ReviewDB(out, create=False)  # removes the temporaries of writers that are gone
    if require_tokens and not db.has_tokens():
        raise ValueError(
            f"tokens are required but {out} has none yet; `deferredseg serve` issues them"
        )
    num_labels = int(db.get_meta("num_labels", 2))
    arrays = _Arrays(db)
    remerged = remerge_stale(db)

    def report() -> None:
        write_report(db)

    # the report sums over every task: written in the background, at most once a second
    reporter = _Debounced(report)
    if remerged:
        reporter.request()

    def fail(status: int, message: str):
        raise HTTPException(status_code=status, detail=message)

    def token_of(request: Request) -> Optional[str]:
        return request.headers.get("x-review-token") or request.query_params.get("token")

    def expert_of(request: Request):
        name = request.path_params["expert"]
        if require_tokens:
            # an unknown name and another expert's queue answer alike: no listing of names
            if not _NAME.match(name) or not db.check_token(name, token_of(request)):
                fail(403, "this link's token does not open this queue")
            return db.expert_by_name(name)
        if not _NAME.match(name):
            fail(404, "no such expert")
        row = db.expert_by_name(name)
        if row is None:
            fail(404, f"no expert {name!r}")
        return row

    def task_of(request: Request, expert) -> Any:
        raw = request.path_params["task_id"]
        t = db.task(int(raw)) if _ID.match(raw) else None
        if t is None or int(t["expert_id"]) != int(expert["id"]):
            shown = raw if len(raw) <= 24 else raw[:24] + "..."
            fail(404, f"no task {shown!r} in {expert['name']!r}'s queue")
        return t

    def same_origin_json(request: Request) -> None:
        """A state-changing request: JSON, and not sent by a page of another origin."""
        ctype = request.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            fail(
                415,
                f"a request that changes state must be Content-Type: application/json, "
                f"got {ctype[:60]!r}",
            )
        site = request.headers.get("sec-fetch-site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            fail(403, f"refused: a request from another site (Sec-Fetch-Site: {site[:30]})")
        origin = request.headers.get("origin")
        if origin is not None:
            host = request.headers.get("host", "").strip().lower()
            netloc = origin.strip().lower().split("://", 1)[-1].rstrip("/")
            if "://" not in origin or netloc != host:
                fail(403, f"refused: a request from another origin ({origin[:80]!r})")

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
            "version": None if last is None else int(last["id"]),
        }

    # ------------------------------------------------------------------ pages
    def overview_page(request: Request):
        return FileResponse(STATIC / "overview.html", media_type="text/html")

    def review_page(request: Request):
        name = request.path_params["expert"]
        # with tokens the (data-free) page is the same for any name: its API calls need the token
        if not _NAME.match(name) or (not require_tokens and db.expert_by_name(name) is None):
            fail(404, "no such expert")
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
        after = request.query_params.get("after", "0")
        if not _ID.match(after):
            fail(400, f"after must be a task id (an integer below 10**18), got {after[:24]!r}")
        return JSONResponse(
            {
                "expert": e["name"],
                "counts": db.queue_counts(int(e["id"])),
                "next": db.next_task(int(e["id"]), int(after)),
            }
        )

    def api_task(request: Request):
        e = expert_of(request)
        return JSONResponse(task_view(task_of(request, e)))

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
        if not isinstance(action, str) or action not in ACTIONS:
            fail(422, f"action must be one of {list(ACTIONS)}, got {str(action)[:40]!r}")
        base = payload.get("base", ...)
        if base is not ... and base is not None and (type(base) is not int or base < 0):
            fail(422, f"base must be the id of the answer seen (or null), got {str(base)[:40]}")
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
            if "shape" in payload:
                shape = payload["shape"]
                if not isinstance(shape, list) or [type(v) for v in shape] != [int] * len(shape):
                    fail(422, f"shape must be a list of integers, got {str(shape)[:40]}")
                if shape != list(crop_shape):
                    fail(
                        422,
                        f"mask shape {shape} does not match the task's crop {list(crop_shape)}",
                    )
            full = np.frombuffer(raw, dtype=np.uint8).reshape(crop_shape)
            if full.size and int(full.max()) >= num_labels:
                fail(422, f"mask labels must be in [0, {num_labels}), found {int(full.max())}")
            # stored: the region's box within the crop
            off = [b[0] - c[0] for b, c in zip(view["bbox"], view["crop"])]
            mask = full[
                tuple(slice(o, o + (b[1] - b[0])) for o, b in zip(off, view["bbox"]))
            ].copy()
        kw = {} if base is ... else {"base": base}
        try:
            answer_id = db.add_answer(int(t["id"]), int(e["id"]), action, mask, **kw)
        except StaleAnswer as stale:
            raise _Conflict(stale)
        if merge_on_answer:
            merge_image(db, t["image_id"])  # under the folder's lock, as `deferredseg merge`
            reporter.request()
        return {
            "answer": answer_id,
            "task": int(t["id"]),
            "action": action,
            "counts": db.queue_counts(int(e["id"])),
            "next": db.next_task(int(e["id"]), int(t["id"])),
        }

    async def read_json(request: Request) -> Dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            fail(400, f"Content-Length must be a number of bytes, got {declared[:20]!r}")
        if declared is not None and int(declared) > max_upload:
            fail(413, f"a request may have at most {max_upload} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_upload:
                fail(413, f"a request may have at most {max_upload} bytes")
        try:
            payload = json.loads(bytes(body)) if body else {}
        except RecursionError:
            fail(400, f"the body is JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        except ValueError:
            fail(400, "the body must be JSON")
        if not isinstance(payload, dict):
            fail(400, "the body must be a JSON object")
        if _json_depth(payload, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
            fail(400, f"the body is JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        return payload

    async def api_open(request: Request):
        same_origin_json(request)
        e = await run_in_threadpool(expert_of, request)
        t = await run_in_threadpool(task_of, request, e)
        await read_json(request)
        await run_in_threadpool(db.mark_opened, int(t["id"]))
        return JSONResponse({"task": int(t["id"]), "opened": True})

    async def api_answer(request: Request):
        same_origin_json(request)
        e = await run_in_threadpool(expert_of, request)
        t = await run_in_threadpool(task_of, request, e)
        payload = await read_json(request)
        try:
            return JSONResponse(await run_in_threadpool(_answer, e, t, payload))
        except _Conflict as c:
            s = c.stale
            return JSONResponse(
                {
                    "error": f"{s}; this page showed an older version: look at the current "
                    "answer before sending yours again",
                    "task": s.task_id,
                    "current": s.current,
                },
                status_code=409,
            )

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(
            {"error": str(exc.detail).splitlines()[0] if exc.detail else "error"},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def server_error(request: Request, exc: Exception):
        return JSONResponse({"error": "internal error (see the server's log)"}, status_code=500)

    routes = [
        Route("/", overview_page),
        Route("/review/{expert}", review_page),
        Route("/api/overview", api_overview),
        Route("/api/experts/{expert}/queue", api_queue),
        Route("/api/experts/{expert}/tasks/{task_id}", api_task),
        Route("/api/experts/{expert}/tasks/{task_id}/data", api_task_data),
        Route("/api/experts/{expert}/tasks/{task_id}/open", api_open, methods=["POST"]),
        Route("/api/experts/{expert}/tasks/{task_id}/answer", api_answer, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        reporter.flush()  # the last answers' report before the server stops

    app = _App(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
        middleware=[Middleware(_HostCheck, allowed=allowed_hosts)],
    )
    app.state.db = db
    app.state.flush_report = reporter.flush
    app.state.remerged = remerged
    return app


class _Conflict(Exception):
    def __init__(self, stale: StaleAnswer):
        self.stale = stale


def serve(
    out: Union[str, Path],
    host: str = "127.0.0.1",
    port: int = 8765,
    require_tokens: bool = False,
    new_tokens: bool = False,
    max_upload: int = 4 * 1024 * 1024,
    ssl_certfile: Optional[str] = None,
    ssl_keyfile: Optional[str] = None,
) -> int:
    """Run the review application until interrupted; prints each expert's link."""
    import uvicorn

    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise ValueError(
            "TLS needs both --ssl-certfile and --ssl-keyfile, got "
            f"certfile={ssl_certfile!r}, keyfile={ssl_keyfile!r}"
        )
    for f in (ssl_certfile, ssl_keyfile):
        if f and not Path(f).is_file():
            raise FileNotFoundError(f"no TLS file {f}")
    db = ReviewDB(out, create=False)
    if not _is_loopback(host) and not require_tokens:
        print(f"binding to {host}: tokens are required", flush=True)
        require_tokens = True
    if new_tokens and not require_tokens:
        print("--new-tokens: every token is replaced, and required on this run", flush=True)
        require_tokens = True
    if require_tokens and not _is_loopback(host) and not ssl_certfile:
        print(
            f"warning: serving on {host} without TLS: the tokens in the links travel in clear "
            "text; pass --ssl-certfile and --ssl-keyfile (or serve on 127.0.0.1 behind an SSH "
            "tunnel)",
            file=sys.stderr,
            flush=True,
        )
    scheme = "https" if ssl_certfile else "http"
    base = f"{scheme}://{host if ':' not in host else '[' + host + ']'}:{port}"
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
            print(f"  overview: {base}/ (token issued before)", flush=True)
    else:
        for e in db.experts():
            print(f"  expert {e['name']}: {base}/review/{e['name']}", flush=True)
        print(f"  overview: {base}/", flush=True)
    hosts = None
    if _is_loopback(host):
        hosts = ["127.0.0.1", "localhost", "::1", host, f"[{host}]" if ":" in host else host]
    app = create_app(out, require_tokens=require_tokens, max_upload=max_upload, allowed_hosts=hosts)
    if app.state.remerged:
        print(
            f"merged again {len(app.state.remerged)} image(s) whose answers were newer than "
            "their final/ file",
            flush=True,
        )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    return 0
