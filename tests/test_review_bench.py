"""The review server's fault and load script (benchmarks/bench_review.py) at a small size:
answers from several clients, kill -9 of the server mid-burst and a restart, CLI merges
during the burst; nothing acknowledged lost, integrity ok, final/ equal to a fresh merge,
no 5xx."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fault_and_load_script_holds_at_a_small_size(tmp_path):
    numbers = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_review.py")]
        + ["--answers", "60", "--concurrency", "4", "--kills", "1", "--merges", "2"]
        + ["--images", "2", "--side", "48", "--max-seconds", "180"]
        + ["--out", str(tmp_path / "work"), "--json", str(numbers)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(numbers.read_text())
    assert r["answers_acknowledged"] == 60 and r["lost"] == 0 and r["final_stale"] == 0
    assert r["kills"] == 1 and r["cli_merges"] == 2 and r["integrity_check"] == "ok"
    assert set(r["statuses"]) == {"200"} and r["failures"] == []
    assert "p50" in p.stdout and "p99" in p.stdout
    # bad sizes are refused with a reason, before anything starts
    bad = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_review.py"), "--concurrency", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--concurrency must be at least 1, got 0" in bad.stderr
