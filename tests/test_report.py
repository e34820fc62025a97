"""report.html from a hand-made sequence.json: self-contained, escaped, numbers as in the JSON.

No training here: the page is a pure function of the report dict, so its rules are
checked on a small dict whose numbers are known (tests/test_sequence.py checks a page
from a real run).
"""

from __future__ import annotations

import re

from casam_core.metrics import continual_metrics
from trainer.report import percent, render_report

NAN = float("nan")


def hand_report(with_routing: bool = True) -> dict:
    tasks = ["a", "b.2"]
    matrices = {"casam": [[0.5, 0.5], [None, 0.25]], "naive": [[0.5, 0.125], [None, 0.375]]}
    results = {}
    for m, label in (("casam", "CA-SAM"), ("naive", "SAM + AL (naive)")):
        filled = [[NAN if v is None else v for v in row] for row in matrices[m]]
        metrics = continual_metrics(filled, [2, 2])
        results[m] = {"label": label, "iou_matrix": matrices[m], "biou_matrix": matrices[m], "iou": metrics, "biou": metrics}
    report = {"tasks": tasks, "test_sizes": [2, 2], "methods": ["casam", "naive"], "reference": "sam", "results": results,
              "zero_shot": [{"set": "u", "count": 3, "rejection_rate": 2 / 3, "methods": {
                  "casam": {"iou": 0.3, "biou": 0.2, "iou_drop": None, "biou_drop": None},
                  "naive": {"iou": 0.1, "biou": 0.1, "iou_drop": None, "biou_drop": None}}}],
              "ood": [{"name": "u", "path": "/x/<u>", "count": 3}],
              "sam": {"model": "tiny", "checkpoint_sha256": "untrained-tiny-seed-0", "untrained": True}}
    if with_routing:
        report["routing"] = {
            "rows": ["a", "b.2", "u"], "columns": ["a", "b.2", "identity"], "confusion": [[2, 0, 0], [0, 1, 1], [0, 1, 2]],
            "vae_scores": {t: {"threshold": 5.0, "held_out": [1.0, 2.0, 4.0],
                               "sets": {"a": [1.5, 3.0], "b.2": [9.0, 30.0], "u": [50.0, 80.0, 4.5]}} for t in tasks}}
    return report


def test_page_embeds_figures_and_shows_the_json_numbers():
    report = hand_report()
    page = render_report(report)
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "src=\"http" not in page and "href=" not in page
    cells = dict(re.findall(r'<td data-key="([^"]+)">([^<]*)</td>', page))
    # naive: per-stage [0.5, 0.25], Last 0.25, Avg 0.375, FF 0.5 − 0.125 = 0.375 (by hand)
    assert cells["naive.iou.last"] == "25.00" and cells["naive.iou.avg"] == "37.50" and cells["naive.iou.ff"] == "37.50"
    assert cells["casam.iou.ff"] == "0.00" and cells["casam.iou.last"] == "37.50"
    assert "66.67" in page  # rejection rate 2/3
    assert "random, untrained weights" in page
    for name in ("a", "b.2", "CA-SAM", "SAM + AL (naive)", "casam", "naive"):
        assert name in page


def test_page_without_casam_has_no_routing_figures_and_escapes_text():
    report = hand_report(with_routing=False)
    report["sam"]["untrained"] = False
    page = render_report(report)
    assert page.count("data:image/png;base64,") == 2 and "not among the methods" in page
    assert "random, untrained weights" not in page
    assert "SAM + AL (naive)" in page and "<u>" not in page  # labels and paths are escaped


def test_percent_formatting():
    assert percent(0.123456) == "12.35" and percent(None) == "–" and percent(NAN) == "–"
    assert percent(1.0) == "100.00" and percent(-0.0125) == "-1.25"
