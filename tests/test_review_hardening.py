"""The review server left running: forged cross-site answers, malformed requests, Host and
token handling, two tabs on one task, and the time an answer took (issue 22)."""

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
from review_case import make_review_folder
from starlette.testclient import TestClient

from deferredseg.review import server as server_mod
from deferredseg.review.db import ReviewDB
from deferredseg.review.server import create_app

JSON = {"Content-Type": "application/json"}
CSP = "Content-Security-Policy"


@pytest.fixture()
def folder(tmp_path):
    return make_review_folder(tmp_path)


def _first(client, expert="ana"):
    return client.get(f"/api/experts/{expert}/queue").json()["next"]


# ---------------------------------------------------------------------- 1. cross-site requests
def test_a_page_of_another_origin_cannot_record_an_answer(folder):
    client = TestClient(create_app(folder))
    tid = _first(client)
    url = f"/api/experts/ana/tasks/{tid}/answer"
    body = b'{"action": "rejected"}'
    refused = [
        # the "simple" requests a page elsewhere can send without a preflight
        ({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 415),
        ({"Content-Type": "text/plain;charset=UTF-8"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({}, 415),
        # JSON, but from another origin or site
        ({"Origin": "http://evil.example", **JSON}, 403),
        ({"Origin": "null", **JSON}, 403),
        ({"Origin": "http://testserver.evil.example", **JSON}, 403),
        ({"Sec-Fetch-Site": "cross-site", **JSON}, 403),
        ({"Sec-Fetch-Site": "same-site", **JSON}, 403),
    ]
    for headers, status in refused:
        r = client.post(url, content=body, headers=headers)
        assert r.status_code == status, (headers, r.status_code, r.text)
        assert r.json()["error"] and CSP in r.headers
    db = ReviewDB(folder)
    assert db.answers(tid) == []
    # the review page itself: same origin, JSON
    r = client.post(
        url,
        content=body,
        headers={"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin", **JSON},
    )
    assert r.status_code == 200, r.text
    assert [a["action"] for a in db.answers(tid)] == ["rejected"]


def test_get_changes_nothing_and_opening_is_a_post(folder):
    client = TestClient(create_app(folder))
    tid = _first(client)
    db = ReviewDB(folder)
    for _ in range(2):
        assert client.get(f"/api/experts/ana/tasks/{tid}").status_code == 200
        assert client.get(f"/api/experts/ana/tasks/{tid}/data").status_code == 200
    assert db.task(tid)["opened_at"] is None
    url = f"/api/experts/ana/tasks/{tid}/open"
    assert (
        client.post(url, content=b"{}", headers={"Content-Type": "text/plain"}).status_code == 415
    )
    assert db.task(tid)["opened_at"] is None
    assert client.get(url).status_code == 405
    assert client.post(url, json={}).status_code == 200
    assert db.task(tid)["opened_at"] is not None


# ---------------------------------------------------------------------- 2. malformed requests
def test_malformed_requests_get_a_4xx_with_a_reason_and_the_security_headers(folder):
    client = TestClient(create_app(folder), raise_server_exceptions=False)
    tid = _first(client)
    big = str(2**63)
    huge = "9" * 5000
    for url, status in [
        (f"/api/experts/ana/tasks/{big}", 404),
        (f"/api/experts/ana/tasks/{big}/data", 404),
        (f"/api/experts/ana/tasks/{huge}", 404),
        (f"/api/experts/ana/queue?after={big}", 400),
        (f"/api/experts/ana/queue?after={huge}", 400),
        ("/api/experts/ana/queue?after=-1", 400),
        ("/api/experts/ana/queue?after=x", 400),
    ]:
        r = client.get(url)
        assert r.status_code == status, (url[:60], r.status_code)
        assert CSP in r.headers and "\n" not in r.json()["error"]
    r = client.post(f"/api/experts/ana/tasks/{big}/answer", json={"action": "accepted"})
    assert r.status_code == 404 and CSP in r.headers
    shape = client.get(f"/api/experts/ana/tasks/{tid}").json()["crop_shape"]
    mask = base64.b64encode(bytes(int(np.prod(shape)))).decode()
    url = f"/api/experts/ana/tasks/{tid}/answer"
    for payload, status, words in [
        ({"action": "edited", "mask": mask, "shape": None}, 422, "shape must be"),
        ({"action": "edited", "mask": mask, "shape": 5}, 422, "shape must be"),
        ({"action": "edited", "mask": mask, "shape": ["a", 1]}, 422, "shape must be"),
        ({"action": "edited", "mask": mask, "shape": [1, 2]}, 422, "does not match"),
        ({"action": ["accepted"]}, 422, "action must be"),
        ({"action": "accepted", "base": "x"}, 422, "base must be"),
        ({"action": "accepted", "extra": [[[[[1]]]]]}, 400, "nested too deeply"),
    ]:
        r = client.post(url, json=payload)
        assert r.status_code == status and words in r.json()["error"], (payload, r.text)
        assert CSP in r.headers
    for raw, words in [
        (b"[" * 100_000 + b"]" * 100_000, "too deeply"),
        (b"[" * 100_000, "JSON"),
        (b"\xff\xfe", "JSON"),
        (b"[1, 2]", "JSON object"),
    ]:
        r = client.post(url, content=raw, headers=JSON)
        assert r.status_code == 400 and words in r.json()["error"], (raw[:10], r.text)
        assert CSP in r.headers
    r = client.post(url, content=b"{}", headers={**JSON, "Content-Length": "abc"})
    assert 400 <= r.status_code < 500 and CSP in r.headers
    assert ReviewDB(folder).answers(tid) == []


def test_a_source_scan_moved_after_predict_is_a_410_naming_the_image(folder, tmp_path):
    client = TestClient(create_app(folder), raise_server_exceptions=False)
    tid = _first(client)
    (tmp_path / "images" / "scan1.npy").rename(tmp_path / "moved.npy")
    for url in (f"/api/experts/ana/tasks/{tid}", f"/api/experts/ana/tasks/{tid}/data"):
        r = client.get(url)
        assert r.status_code == 410 and "scan1" in r.json()["error"] and CSP in r.headers


def test_an_unexpected_error_is_a_500_with_the_security_headers(folder, monkeypatch):
    app = create_app(folder)
    client = TestClient(app, raise_server_exceptions=False)

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.db, "overview", broken)
    r = client.get("/api/overview")
    assert r.status_code == 500 and CSP in r.headers and r.headers["X-Content-Type-Options"]
    assert "a bug" not in r.text


# ---------------------------------------------------------------------- 4. Host and tokens
def _served(monkeypatch, folder, capsys=None, **kw):
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **k: seen.update(k, app=app))
    assert server_mod.serve(folder, port=9999, **kw) == 0
    return seen


def test_host_allow_list_holds_the_bound_address_and_refuses_an_empty_host(folder, monkeypatch):
    seen = _served(monkeypatch, folder, host="127.0.0.2")
    client = TestClient(seen["app"])
    assert client.get("/api/overview", headers={"Host": "127.0.0.2:9999"}).status_code == 200
    assert client.get("/api/overview", headers={"Host": "localhost:9999"}).status_code == 200
    for host in ("evil.example:9999", "", "127.0.0.3"):
        r = client.get("/api/overview", headers={"Host": host})
        assert r.status_code == 400 and CSP in r.headers, host
    # off loopback any name may be used, but never none
    seen = _served(monkeypatch, folder, host="0.0.0.0")
    client = TestClient(seen["app"])
    assert client.get("/api/overview", headers={"Host": ""}).status_code == 400
    assert client.get("/api/overview", headers={"Host": "review.lab"}).status_code == 403


@pytest.mark.slow
def test_new_tokens_always_rotates_and_tls_goes_to_uvicorn(folder, monkeypatch, capsys, tmp_path):
    _served(monkeypatch, folder, require_tokens=True)
    old = capsys.readouterr().out
    old_ana = old.split("review/ana?token=")[1].split()[0]
    db = ReviewDB(folder)
    assert db.check_token("ana", old_ana)
    # on loopback without --require-tokens: the tokens are still replaced, and required
    seen = _served(monkeypatch, folder, new_tokens=True)
    out = capsys.readouterr().out
    assert "replaced" in out and out.count("?token=") == 3
    new_ana = out.split("review/ana?token=")[1].split()[0]
    assert not db.check_token("ana", old_ana) and db.check_token("ana", new_ana)
    client = TestClient(seen["app"], base_url="http://127.0.0.1:9999")
    assert client.get("/api/experts/ana/queue").status_code == 403
    assert client.get(f"/api/experts/ana/queue?token={new_ana}").status_code == 200
    # off loopback without TLS: a warning; with TLS: uvicorn gets the files, the links are https
    seen = _served(monkeypatch, folder, host="0.0.0.0")
    assert "clear text" in capsys.readouterr().err and seen["ssl_certfile"] is None
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    seen = _served(
        monkeypatch, folder, host="0.0.0.0", ssl_certfile=str(cert), ssl_keyfile=str(key)
    )
    cap = capsys.readouterr()
    assert (seen["ssl_certfile"], seen["ssl_keyfile"]) == (str(cert), str(key))
    assert "clear text" not in cap.err and "https://0.0.0.0:9999/" in cap.out
    with pytest.raises(ValueError, match="both --ssl-certfile and --ssl-keyfile"):
        server_mod.serve(folder, host="0.0.0.0", ssl_certfile=str(cert))
    r = subprocess.run(
        [sys.executable, "-m", "deferredseg", "serve", "--help"], capture_output=True, text=True
    )
    assert "--ssl-certfile" in r.stdout and "--ssl-keyfile" in r.stdout


def test_unknown_experts_and_other_queues_answer_alike_without_a_token(folder):
    ReviewDB(folder).issue_tokens()
    client = TestClient(create_app(folder, require_tokens=True))
    seen = set()
    for name in ("ana", "nobody", "ben", "x" * 64):
        for url in (f"/api/experts/{name}/queue", f"/api/experts/{name}/tasks/1"):
            r = client.get(url, headers={"X-Review-Token": "wrong"})
            seen.add((r.status_code, r.text))
        r = client.get(f"/review/{name}")
        seen.add((r.status_code, "page"))
    assert seen == {
        (
            403,
            json.dumps(
                {"error": "this link's token does not open this queue"}, separators=(",", ":")
            ),
        ),
        (200, "page"),
    }


# ---------------------------------------------------------------------- 6. two tabs on one task
def test_a_stale_answer_gets_409_with_the_current_one(folder):
    client = TestClient(create_app(folder))
    tid = _first(client)
    url = f"/api/experts/ana/tasks/{tid}/answer"
    tab1 = client.get(f"/api/experts/ana/tasks/{tid}").json()
    tab2 = client.get(f"/api/experts/ana/tasks/{tid}").json()
    assert tab1["version"] is None
    r = client.post(url, json={"action": "accepted", "base": tab1["version"]})
    assert r.status_code == 200
    first = r.json()["answer"]
    r = client.post(url, json={"action": "rejected", "base": tab2["version"]})
    assert r.status_code == 409, r.text
    assert r.json()["current"] == {"answer": first, "action": "accepted"}
    assert "answered meanwhile" in r.json()["error"] and CSP in r.headers
    db = ReviewDB(folder)
    assert [a["action"] for a in db.answers(tid)] == ["accepted"]
    # sent again knowingly, on the current version
    assert client.get(f"/api/experts/ana/tasks/{tid}").json()["version"] == first
    r = client.post(url, json={"action": "rejected", "base": first})
    assert r.status_code == 200
    assert [a["action"] for a in db.answers(tid)] == ["accepted", "rejected"]
    # an edit that loses the race leaves no mask file behind
    shape = tab2["crop_shape"]
    mask = base64.b64encode(bytes(int(np.prod(shape)))).decode()
    r = client.post(url, json={"action": "edited", "mask": mask, "base": first})
    assert r.status_code == 409
    assert not list((folder / "answers").rglob("*.npy"))


# ---------------------------------------------------------------------- 7. time per expert
def test_a_re_answer_counts_from_its_own_opening(folder, monkeypatch):
    import deferredseg.review.db as dbmod

    clock = [1000.0]
    monkeypatch.setattr(dbmod.time, "time", lambda: clock[0])
    client = TestClient(create_app(folder, merge_on_answer=False))
    tid = _first(client)
    url = f"/api/experts/ana/tasks/{tid}"
    assert client.post(url + "/open", json={}).status_code == 200
    clock[0] += 5
    assert client.post(url + "/answer", json={"action": "accepted"}).status_code == 200
    clock[0] += 600  # the expert does something else, then comes back to this task
    assert client.post(url + "/open", json={}).status_code == 200
    clock[0] += 3
    assert client.post(url + "/answer", json={"action": "rejected"}).status_code == 200
    clock[0] += 50  # a third answer without opening the task again: its time is not known
    assert client.post(url + "/answer", json={"action": "accepted"}).status_code == 200
    db = ReviewDB(folder)
    assert [a["seconds"] for a in db.answers(tid)] == [5.0, 3.0, None]
    from deferredseg.review.merge import build_report

    ana = [e for e in build_report(db)["experts"] if e["expert"] == "ana"][0]
    assert ana["seconds"] == 8.0
