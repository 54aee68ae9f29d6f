"""The review server's API through Starlette's test client: queues, answers, security."""

import base64
import json
import time

import numpy as np
import pytest
from review_case import SIDE, make_review_folder
from starlette.testclient import TestClient

from deferredseg.review.db import ReviewDB
from deferredseg.review.server import CROP_MARGIN, create_app


@pytest.fixture()
def folder(tmp_path):
    return make_review_folder(tmp_path)


def test_queue_task_data_and_answers_update_db_and_merged_mask(folder):
    app = create_app(folder)
    client = TestClient(app)
    q = client.get("/api/experts/ana/queue").json()
    assert q["counts"] == {"total": 3, "done": 0, "left": 3}
    t = client.get(f"/api/experts/ana/tasks/{q['next']}").json()
    assert t["bbox"] == [[2, 10], [2, 10]] and t["crop"] == [
        [0, 10 + CROP_MARGIN],
        [0, 10 + CROP_MARGIN],
    ]
    shape = t["crop_shape"]
    n = shape[0] * shape[1]
    data = client.get(f"/api/experts/ana/tasks/{t['id']}/data").content
    assert len(data) == 6 * n
    img = np.frombuffer(data[: 4 * n], "<f4").reshape(shape)
    region = np.frombuffer(data[5 * n :], np.uint8).reshape(shape)
    assert img.shape == tuple(shape) and region.sum() == 64
    # edit: label the whole crop 1; only the region's pixels count
    mask = np.ones(shape, np.uint8)
    r = client.post(
        f"/api/experts/ana/tasks/{t['id']}/answer",
        json={"action": "edited", "mask": base64.b64encode(mask.tobytes()).decode()},
    )
    assert r.status_code == 200, r.text
    assert r.json()["counts"]["done"] == 1 and r.json()["next"] != t["id"]
    final = np.load(folder / "final" / "scan1.npy")  # merged as the answer arrived
    assert final[2:10, 2:10].all() and final.shape == (SIDE, SIDE)
    model = np.load(folder / "model" / "scan1.npy")
    np.testing.assert_array_equal(final[12:, :], model[12:, :])
    app.state.flush_report()  # otherwise written in the background within a second
    rep = json.loads((folder / "report.json").read_text())
    assert rep["experts"][0]["edited"] == 1
    nxt = r.json()["next"]
    s2 = client.get(f"/api/experts/ana/tasks/{nxt}").json()["crop_shape"]
    n = s2[0] * s2[1]
    # wrong shape, bad label, bad action, not JSON: refused with a message
    for payload, status, words in [
        ({"action": "edited", "mask": base64.b64encode(b"\x01" * (n - 1)).decode()}, 422, "values"),
        (
            {"action": "edited", "mask": base64.b64encode(b"\x07" * n).decode()},
            422,
            "labels must be in",
        ),
        ({"action": "edited", "mask": "%%%"}, 422, "base64"),
        ({"action": "approve"}, 422, "action must be one of"),
    ]:
        r = client.post(f"/api/experts/ana/tasks/{nxt}/answer", json=payload)
        assert r.status_code == status and words in r.json()["error"], r.text
    r = client.post(
        f"/api/experts/ana/tasks/{t['id']}/answer",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400


def test_expert_cannot_touch_another_experts_task_and_ids_are_validated(folder):
    db = ReviewDB(folder)
    toks = db.issue_tokens()
    client = TestClient(create_app(folder, require_tokens=True, max_upload=1000))
    ben_task = db.next_task(1)
    ana_task = db.next_task(0)
    h_ana = {"X-Review-Token": toks["ana"]}
    # no token, the wrong token, another expert's task
    assert client.get("/api/experts/ana/queue").status_code == 403
    assert client.get("/api/experts/ben/queue", headers=h_ana).status_code == 403
    assert client.get(f"/api/experts/ben/tasks/{ben_task}", headers=h_ana).status_code == 403
    r = client.get(f"/api/experts/ana/tasks/{ben_task}", headers=h_ana)
    assert r.status_code == 404 and "ana" in r.json()["error"]
    r = client.post(
        f"/api/experts/ana/tasks/{ben_task}/answer", headers=h_ana, json={"action": "accepted"}
    )
    assert r.status_code == 404 and db.answers(ben_task) == []
    # the token in the link works too; the overview needs its own token
    assert client.get(f"/api/experts/ana/queue?token={toks['ana']}").status_code == 200
    assert client.get("/api/overview", headers=h_ana).status_code == 403
    assert client.get("/api/overview", headers={"X-Review-Token": toks[""]}).status_code == 200
    # path traversal and malformed ids
    for url in [
        "/api/experts/ana/tasks/..%2F..%2Freview.db",
        "/api/experts/ana/tasks/1.5",
        "/api/experts/..%2F..%2Fetc/queue",
        "/static/..%2F..%2Fdb.py",
        "/static/../server.py",
        "/review/..%2Fana",
        "/api/experts/ana/tasks/-1",
    ]:
        r = client.get(url, headers=h_ana)
        assert r.status_code in (403, 404), (url, r.status_code)
        assert b"sqlite" not in r.content.lower() and b"import" not in r.content
    # uploads are size limited
    r = client.post(
        f"/api/experts/ana/tasks/{ana_task}/answer",
        headers={**h_ana, "Content-Type": "application/json"},
        content=b"x" * 5000,
    )
    assert r.status_code == 413 and "at most 1000 bytes" in r.json()["error"]
    assert client.get("/static/review.js").status_code == 200
    r = client.get("/review/ana")
    assert r.status_code == 200 and "Content-Security-Policy" in r.headers


def test_binding_elsewhere_requires_tokens(folder, monkeypatch, capsys):
    import uvicorn

    from deferredseg.review import server

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    assert server.serve(folder, host="0.0.0.0", port=9999) == 0
    out = capsys.readouterr().out
    assert "tokens are required" in out and out.count("?token=") == 3
    assert seen["host"] == "0.0.0.0"
    assert ReviewDB(folder).has_tokens()
    # printed once: a second start prints no token
    server.serve(folder, host="0.0.0.0", port=9999)
    assert "?token=" not in capsys.readouterr().out


def test_report_follows_the_answers_by_the_time_the_server_stops(folder):
    with TestClient(create_app(folder)) as client:  # runs the lifespan: shutdown flushes the report
        tid = client.get("/api/experts/ben/queue").json()["next"]
        assert (
            client.post(
                f"/api/experts/ben/tasks/{tid}/answer", json={"action": "rejected"}
            ).status_code
            == 200
        )
    rep = json.loads((folder / "report.json").read_text())
    ben = [e for e in rep["experts"] if e["expert"] == "ben"][0]
    assert (ben["done"], ben["rejected"]) == (1, 1)
    assert rep["images"][0]["rejected_share"] == pytest.approx(64 / 256)


@pytest.mark.slow
def test_server_killed_while_answers_arrive_leaves_whole_files_and_rows(folder):
    """SIGKILL the real server while two clients keep editing; restart and compare."""
    import http.client
    import signal
    import threading
    import urllib.request

    from review_case import start_server

    proc, base, _ = start_server(folder)
    db = ReviewDB(folder)
    tasks = {
        name: [t["id"] for t in db.iter_tasks() if t["expert"] == name] for name in ("ana", "ben")
    }
    stop = threading.Event()
    sent = []

    def client(name):
        i = 0
        while not stop.is_set():
            tid = tasks[name][i % len(tasks[name])]
            try:
                shape = json.loads(
                    urllib.request.urlopen(
                        f"{base}/api/experts/{name}/tasks/{tid}", timeout=30
                    ).read()
                )["crop_shape"]
                mask = np.full(shape, i % 2, np.uint8)
                body = json.dumps(
                    {"action": "edited", "mask": base64.b64encode(mask.tobytes()).decode()}
                )
                req = urllib.request.Request(
                    f"{base}/api/experts/{name}/tasks/{tid}/answer",
                    data=body.encode(),
                    headers={"Content-Type": "application/json"},
                )
                urllib.request.urlopen(req, timeout=30).read()
                sent.append((name, tid))
            except (OSError, http.client.HTTPException):
                return  # the server is gone (a response cut short is an IncompleteRead)
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in ("ana", "ben")]
    try:
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while len(sent) < 20 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        proc.wait(timeout=20)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert len(sent) >= 20
    db.close()
    db = ReviewDB(folder, create=False)  # the restart
    c = db.conn()
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = c.execute("SELECT * FROM answers ORDER BY id").fetchall()
    assert len(rows) >= len(sent)  # every acknowledged answer is there (one more may be)
    for a in rows:
        m = db.load_answer_mask(a)
        bbox = json.loads(db.task(a["task_id"])["bbox"])
        assert m.shape == tuple(e - s for s, e in bbox) and set(np.unique(m)) <= {0, 1}
    assert not [p for p in (folder / "answers").rglob("*") if ".tmp-" in p.name]
    # the restarted server shows the same state
    client2 = TestClient(create_app(folder))
    ov = client2.get("/api/overview").json()
    assert [(e["name"], e["done"]) for e in ov["experts"]] == [("ana", 3), ("ben", 1)]
