"""`deferredseg review-demo --simulate-experts`: the loop end to end through the HTTP API."""

import json

import numpy as np
import pytest

from deferredseg.cli import main
from deferredseg.review.db import ReviewDB


@pytest.mark.slow
def test_review_demo_closes_the_loop(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(["review-demo", "--quick", "--simulate-experts", "--out", str(out), "--images", "3"])
        == 0
    )
    text = capsys.readouterr().out
    assert "model alone" in text and "merged after review" in text
    review = out / "review"
    db = ReviewDB(review, create=False)
    tasks = list(db.iter_tasks())
    assert tasks, "a 10 % budget defers something"
    assert all(db.latest_answer(t["id"]) is not None for t in tasks)  # every task answered
    rep = json.loads((review / "report.json").read_text())
    assert len(rep["images"]) == 3 and all(i["complete"] for i in rep["images"])
    assert sum(e["done"] for e in rep["experts"]) == len(tasks)
    # the merged mask takes each expert's labels on their regions
    for t in tasks:
        a = db.latest_answer(t["id"])
        if a["action"] != "edited":
            continue
        final = np.load(review / "final" / f"{t['image_id']}.npy")
        regions = np.load(review / "regions" / f"{t['image_id']}.npy")
        box = tuple(slice(s, e) for s, e in json.loads(t["bbox"]))
        sel = regions[box] == t["region"]
        np.testing.assert_array_equal(final[box][sel], db.load_answer_mask(a)[sel])
    # the big image went through sliding windows and kept its size
    assert np.load(review / "final" / "new_002.npy").shape == (64, 64)
