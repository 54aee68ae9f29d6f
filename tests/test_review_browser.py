"""The review page in a real browser: headless Chromium driven by Playwright.

Starts `deferredseg serve` on a free local port with tokens, opens expert ana's
personal link, accepts one task, edits another with the brush, rejects the
third, and checks the database and the merged mask; checks that ana's token
does not open ben's tasks and that a path-traversal id is refused. The
screenshot of the page goes to docs/images/review-page.png when
DEFERREDSEG_DOCS_SCREENSHOT=1 (the one in the docs was taken so).

A page of another origin cannot record an answer (the forms and fetches a browser sends
without asking first), and a second tab on an answered task is told so (409).

Chromium is Debian's package (`make browser` installs it where missing); CI
fails, rather than skips, when it is not there.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from review_case import get as _get
from review_case import make_review_folder, make_review_folder_3d
from review_case import start_server as _start

ROOT = Path(__file__).resolve().parents[1]


def _chromium():
    for name in (os.environ.get("DEFERREDSEG_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("the browser test needs Debian's chromium package: run `make browser`")
    pytest.skip("chromium is not installed (make browser installs it)", allow_module_level=True)

playwright = pytest.importorskip("playwright.sync_api")

# a server subprocess and a headless Chromium per test
pytestmark = pytest.mark.slow


@pytest.fixture()
def server(tmp_path):
    proc, base, links = _start(make_review_folder(tmp_path), "--require-tokens")
    try:
        yield tmp_path / "out", base, links
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _launch(p):
    return p.chromium.launch(
        executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
    )


def test_review_page_accept_edit_reject_in_chromium(server, tmp_path):
    from deferredseg.review.db import ReviewDB
    from deferredseg.review.merge import fuse

    out, base, links = server
    ana_token = links["ana"].split("token=")[1]
    with playwright.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(links["ana"])
            page.wait_for_selector("body[data-state=ready]")
            assert "3 left of 3" in page.inner_text("#counts")
            t1 = int(page.get_attribute("body", "data-task"))
            page.keyboard.press("a")  # accept
            page.wait_for_selector(f"body[data-state=ready]:not([data-task='{t1}'])")
            t2 = int(page.get_attribute("body", "data-task"))
            assert "2 left of 3" in page.inner_text("#counts")
            # brush stroke through the middle of the region of task 2
            meta = json.loads(_get(f"{base}/api/experts/ana/tasks/{t2}", ana_token)[1])
            (r0, r1), (c0, c1) = meta["bbox"]
            (k0, _), (l0, _) = meta["crop"]
            box = page.locator("#canvas").bounding_box()
            scale = box["width"] / meta["crop_shape"][1]
            row = (r0 + r1) / 2 - k0
            page.keyboard.press("b")
            page.mouse.move(box["x"] + (c0 - l0 + 1.5) * scale, box["y"] + row * scale)
            page.mouse.down()
            page.mouse.move(box["x"] + (c1 - l0 - 1.5) * scale, box["y"] + row * scale, steps=8)
            page.mouse.up()
            shot = tmp_path / "review-page.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            if os.environ.get("DEFERREDSEG_DOCS_SCREENSHOT") == "1":
                (ROOT / "docs" / "images").mkdir(exist_ok=True)
                shutil.copy(shot, ROOT / "docs" / "images" / "review-page.png")
            page.keyboard.press("s")  # save the edit
            page.wait_for_selector(f"body[data-state=ready]:not([data-task='{t2}'])")
            t3 = int(page.get_attribute("body", "data-task"))
            page.keyboard.press("r")  # reject
            page.wait_for_selector("body[data-state=empty]")
            assert page.is_visible("#empty")

            # ana's token does not open ben's page, nor ben's tasks by id
            page.goto(links["ana"].replace("/review/ana", "/review/ben"))
            page.wait_for_selector("body[data-state=error]")
            assert "403" in page.inner_text("#message")
            # the overview, with its own token, shows the progress
            page.goto(links[""])
            page.wait_for_selector("body[data-state=ready]")
            assert "ana" in page.inner_text("#experts") and "3" in page.inner_text("#experts")
            assert errors == []
        finally:
            browser.close()

    db = ReviewDB(out, create=False)
    ben_task = db.next_task(1)
    assert _get(f"{base}/api/experts/ben/tasks/{ben_task}", ana_token)[0] == 403
    assert _get(f"{base}/api/experts/ana/tasks/{ben_task}", ana_token)[0] == 404
    assert _get(f"{base}/api/experts/ana/tasks/{ben_task}/data", ana_token)[0] == 404
    for bad in ("..%2F..%2Freview.db", "%2E%2E%2Fregions", "1%00"):
        status, body = _get(f"{base}/api/experts/ana/tasks/{bad}", ana_token)
        assert status == 404 and b"SQLite" not in body
    assert _get(f"{base}/static/..%2F..%2Freview.db")[0] == 404
    # a request naming another host (a rebound domain name) is refused
    assert _get(f"{base}/api/experts/ana/queue", ana_token, host="evil.example:8765")[0] == 400
    assert _get(f"{base}/api/experts/ana/queue", ana_token)[0] == 200

    # the database: one answer per task, of the right kind, from ana
    acts = {t: [a["action"] for a in db.answers(t)] for t in (t1, t2, t3)}
    assert acts == {t1: ["accepted"], t2: ["edited"], t3: ["rejected"]}
    edit = db.load_answer_mask(db.latest_answer(t2))
    t2row = db.task(t2)
    assert edit.shape == tuple(b - a for a, b in json.loads(t2row["bbox"]))
    assert edit.sum() >= 3  # the stroke
    # the merged mask equals the fusion of the model's mask and the answers
    model = np.load(out / "model" / "scan1.npy")
    regions = np.load(out / "regions" / "scan1.npy")
    answers = [
        {
            "region": db.task(t)["region"],
            "bbox": json.loads(db.task(t)["bbox"]),
            "action": db.latest_answer(t)["action"],
            "mask": db.load_answer_mask(db.latest_answer(t)),
        }
        for t in (t1, t2, t3)
    ]
    final = np.load(out / "final" / "scan1.npy")
    np.testing.assert_array_equal(final, fuse(model, regions, answers))
    in_t2 = regions == t2row["region"]
    assert final[in_t2].sum() == edit.sum() > model[in_t2].sum()


def test_review_page_scrolls_the_slices_of_a_3d_task(tmp_path):
    from deferredseg.review.db import ReviewDB

    out = make_review_folder_3d(tmp_path)
    proc, base, links = _start(out)  # 127.0.0.1 without tokens: plain links
    try:
        with playwright.sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page()
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(links["ana"])
                page.wait_for_selector("body[data-state=ready]")
                assert page.is_visible("#slicebar")
                first = page.inner_text("#sliceval")
                assert (
                    first == "3 / 8"
                )  # the crop holds every slice; it opens on the region's first
                page.keyboard.press("ArrowUp")
                assert page.inner_text("#sliceval") == "4 / 8"
                page.mouse.move(10, 10)
                box = page.locator("#canvas").bounding_box()
                page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                page.mouse.wheel(0, 100)
                page.wait_for_selector("#sliceval:text-is('5 / 8')")
                page.keyboard.press("b")  # paint in the middle of the crop on slice 5 (index 4)
                page.mouse.down()
                page.mouse.up()
                page.keyboard.press("s")
                page.wait_for_selector("body[data-state=empty]")
                assert errors == []
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    db = ReviewDB(out, create=False)
    (t,) = [t for t in db.iter_tasks() if t["expert"] == "ana"]
    a = db.latest_answer(t["id"])
    mask = db.load_answer_mask(a)
    assert a["action"] == "edited" and mask.shape == (8, 8, 4)
    model = np.load(out / "model" / "vol1.npy")[4:12, 4:12, 2:6]
    # the stroke added labels on slice index 4 (index 2 of the box) only
    assert mask[:, :, 2].sum() > model[:, :, 2].sum()
    np.testing.assert_array_equal(mask[:, :, [0, 1, 3]], model[:, :, [0, 1, 3]])


_ATTACK = """<!doctype html><html><body>
<form id="f" method="POST" enctype="text/plain" action="{target}">
<input name='{{"action":"rejected","x":"' value='"}}'></form>
<script>
(async () => {{
  const results = [];
  const tries = [
    {{ mode: "no-cors", headers: {{ "Content-Type": "text/plain" }} }},
    {{ mode: "no-cors", headers: {{ "Content-Type": "application/x-www-form-urlencoded" }} }},
    {{ mode: "cors", headers: {{ "Content-Type": "application/json" }} }},
  ];
  for (const t of tries) {{
    try {{
      const r = await fetch("{target}", Object.assign(
        {{ method: "POST", body: JSON.stringify({{ action: "rejected" }}) }}, t));
      results.push(t.mode + ":" + r.status);
    }} catch (e) {{ results.push(t.mode + ":blocked"); }}
  }}
  document.title = "fetched " + results.join(",");
  document.getElementById("f").submit();
}})();
</script></body></html>"""


def test_a_page_of_another_origin_cannot_record_an_answer_in_chromium(tmp_path):
    """The default setup (127.0.0.1, no tokens): a page the expert visits elsewhere tries the
    requests a browser sends without asking the server first, and a JSON one."""
    import http.server
    import threading

    from deferredseg.review.db import ReviewDB

    out = make_review_folder(tmp_path)
    proc, base, links = _start(out)
    db = ReviewDB(out, create=False)
    tid = db.next_task(0)
    target = f"{base}/api/experts/ana/tasks/{tid}/answer"
    page_html = _ATTACK.format(target=target).encode()

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page_html)

        def log_message(self, *a):
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with playwright.sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page()
                seen = []
                page.on("response", lambda r: seen.append((r.url, r.status)))
                page.goto(f"http://localhost:{evil.server_address[1]}/")
                page.wait_for_url(target, timeout=20_000)  # the form went to the server
                page.wait_for_load_state()
                statuses = [s for u, s in seen if u == target]
                assert statuses and all(s in (403, 415) for s in statuses), seen
                # the expert's own page still answers; a second tab on the same task is told
                # that it was answered meanwhile, and its answer is not recorded
                page.goto(links["ana"])
                page.wait_for_selector("body[data-state=ready]")
                tab2 = browser.new_page()
                tab2.goto(links["ana"])
                tab2.wait_for_selector("body[data-state=ready]")
                first = int(page.get_attribute("body", "data-task"))
                assert int(tab2.get_attribute("body", "data-task")) == first
                page.keyboard.press("a")
                page.wait_for_selector(f"body[data-state=ready]:not([data-task='{first}'])")
                tab2.keyboard.press("r")
                tab2.wait_for_selector("body[data-state=conflict]")
                assert "answered meanwhile (accepted)" in tab2.inner_text("#message")
            finally:
                browser.close()
    finally:
        evil.shutdown()
        proc.terminate()
        proc.wait(timeout=20)
    assert first == tid
    assert [a["action"] for a in db.answers(tid)] == ["accepted"]  # nothing forged before
    assert db.task(tid)["opened_at"] is not None  # the page recorded its opening by POST


def test_an_empty_queue_hides_the_editor_and_the_box_names_its_axes(tmp_path):
    from deferredseg.review.db import ReviewDB

    out = make_review_folder(tmp_path)
    db = ReviewDB(out)
    db.add_answer(db.next_task(1), 1, "accepted")  # ben's only task
    proc, base, links = _start(out)
    try:
        with playwright.sync_playwright() as p:
            browser = _launch(p)
            try:
                page = browser.new_page()
                page.goto(links["ben"])
                page.wait_for_selector("body[data-state=empty]")
                assert page.is_visible("#empty") and not page.is_visible("#main")
                assert not page.is_visible("#label")
                page.goto(links["ana"])
                page.wait_for_selector("body[data-state=ready]")
                assert "box: rows 2-9, columns 2-9" in page.inner_text("#taskinfo")
                page.goto(links[""])
                page.wait_for_selector("body[data-state=ready]")
                rows = page.inner_text("#experts")
                assert "0 %" in rows and "100 %" in rows
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
