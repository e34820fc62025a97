"""The continual protocol with baselines: casam, naive and sam on two synthetic tasks.

One module-scoped run (tiny SAM, few images, two epochs, one mask per image) of
``run_sequence`` with all three methods and one unseen set backs every test here. The
images repeat tests/test_train_tasks.py's seeds, so the session's embedding cache already
holds most of them.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_support import one_error_line
from safetensors.torch import load_file

from casam_bundle import Bundle
from casam_core.files import atomic_write_json, read_json
from casam_core.names import IDENTITY
from trainer.cli import main
from trainer.evaluate import SetResult
from trainer.methods import METHODS, parse_methods
from trainer.report import percent
from trainer.sequence import run_sequence, zero_shot_row
from trainer.synthetic import write_synthetic_task
from trainer.train_task import TrainConfig
from trainer.session import SessionOptions
from trainer.vae_training import single_thread

# lr 1e-3 with batch 2: enough steps for one layer to move visibly between tasks in 2 epochs.
CONFIG = TrainConfig(epochs=2, batch_size=2, lr=1e-3, masks_per_image=1, vae_epochs=60)
N_TRAIN, N_TEST = 4, 4
TASKS = ("stripes", "dots")


def make_task(root: Path, style: str, count: int, seed: int) -> Path:
    write_synthetic_task(root, style, count, seed=seed)
    stems = sorted(p.stem for p in (root / "images").iterdir())
    atomic_write_json(root / "split.json", {"train": stems[:N_TRAIN], "test": stems[N_TRAIN:]})
    return root


@pytest.fixture(scope="module")
def protocol(tmp_path_factory, tiny_sam):
    base = tmp_path_factory.mktemp("sequence")
    cache = tmp_path_factory.getbasetemp() / "embedding_cache"
    tasks = [(s, str(make_task(base / s, s, N_TRAIN + N_TEST, seed=3))) for s in TASKS]
    write_synthetic_task(base / "plasma", "plasma", 4, seed=9)
    out = base / "out"
    with single_thread():  # small runs on busy cores: thread hand-offs cost more than they give
        report = run_sequence(base / "bundle", tasks, out, methods=["casam", "naive", "sam"],
                              ood=[("plasma", str(base / "plasma"))], config=CONFIG,
                              session=SessionOptions(sam="tiny", device="cpu", cache_dir=cache, quiet=True,
                                                     frozen_sam=tiny_sam))
    return {"base": base, "out": out, "report": report, "json": read_json(out / "sequence.json")}


def test_casam_task_one_is_unchanged_by_task_two(protocol):
    results = protocol["json"]["results"]
    casam = results["casam"]["iou_matrix"]
    # CA-SAM's task-1 layer never changes and its images keep their route: the same number.
    assert casam[0][1] == casam[0][0] and casam[1][1] is not None
    assert results["casam"]["iou"]["ff"] == 0.0 and results["casam"]["biou"]["ff"] == 0.0
    # Plain SAM learns nothing, so it cannot forget either.
    sam = results["sam"]["iou_matrix"]
    assert sam[0][0] == sam[0][1] and results["sam"]["iou"]["ff"] == 0.0


def test_naive_forgets_task_one_more_than_casam(protocol):
    results = protocol["json"]["results"]
    naive, casam = results["naive"]["iou_matrix"], results["casam"]["iou_matrix"]
    assert naive[0][0] == casam[0][0]  # stage 1 is the same training for both
    naive_drop = naive[0][0] - naive[0][1]
    assert naive_drop > casam[0][0] - casam[0][1], naive
    assert results["naive"]["iou"]["ff"] == pytest.approx(naive_drop)


def test_every_method_saw_the_same_tasks_and_splits(protocol):
    data = protocol["json"]
    assert data["tasks"] == list(TASKS) and data["methods"] == ["casam", "naive", "sam"]
    assert data["test_sizes"] == [N_TEST, N_TEST]
    assert data["trained"] == {"casam": list(TASKS), "naive": list(TASKS)}
    for m in data["methods"]:
        iou = data["results"][m]["iou_matrix"]
        assert iou[1][0] is None and None not in (iou[0][0], iou[0][1], iou[1][1])
        csv = (protocol["out"] / f"{m}_iou_matrix.csv").read_text().splitlines()
        assert len(csv) == 3 and csv[1].startswith("stripes,") and float(csv[1].split(",")[1]) == pytest.approx(iou[0][0], abs=1e-6)
        assert (protocol["out"] / f"{m}_biou_matrix.csv").is_file()


def test_naive_weights_live_under_out_never_in_the_bundle(protocol):
    out, bundle_dir = protocol["out"], protocol["base"] / "bundle"
    assert Bundle.open(bundle_dir).task_names == list(TASKS)
    assert not [p for p in bundle_dir.rglob("*") if "naive" in p.name]
    stages = [out / "naive" / f"stage{t + 1}_{n}.safetensors" for t, n in enumerate(TASKS)]
    first, second = (load_file(str(p)) for p in stages)
    assert first.keys() == second.keys()
    assert any(not np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)  # stage 2 moved the layer
    # Stage 1 of naive is CA-SAM's task 1 (same seeded init, batches, prompts): reused, not retrained.
    casam_first = load_file(str(bundle_dir / "tasks" / TASKS[0] / "alignment.safetensors"))
    assert all(np.array_equal(first[k].numpy(), casam_first[k].numpy()) for k in first)
    assert {f"naive/{p.name}" for p in stages} <= set(protocol["json"]["files"])


def test_zero_shot_drop_is_against_sam_on_the_same_images(protocol):
    (row,) = protocol["json"]["zero_shot"]
    assert row["set"] == "plasma" and row["count"] == 4
    sam = row["methods"]["sam"]
    for m, entry in row["methods"].items():
        assert entry["iou_drop"] == sam["iou"] - entry["iou"] and entry["biou_drop"] == sam["biou"] - entry["biou"]
    assert sam["iou_drop"] == 0.0
    routing = protocol["json"]["routing"]
    counts = routing["confusion"][routing["rows"].index("plasma")]
    assert row["rejection_rate"] == counts[routing["columns"].index(IDENTITY)] / 4
    if row["rejection_rate"] == 1.0:  # every image on the identity route: CA-SAM is plain SAM there
        assert row["methods"]["casam"]["iou"] == sam["iou"]


def _result(name: str, stems: list[str], ious: list[float], routes: list[str]) -> SetResult:
    per_image = [{"stem": s, "route": r, "iou": v, "biou": v / 2} for s, r, v in zip(stems, routes, ious)]
    return SetResult(name, len(stems), float(np.mean(ious)), float(np.mean(ious)) / 2, routes, None, per_image)


def test_zero_shot_row_by_hand():
    stems = ["a", "b", "c", "d"]
    sam = _result("x", stems, [0.5, 0.3, 0.2, 0.6], [IDENTITY] * 4)  # IoU 0.4, BIoU 0.2
    casam = _result("x", stems, [0.5, 0.3, 0.1, 0.6], [IDENTITY, IDENTITY, "t1", IDENTITY])  # 0.375
    naive = _result("x", stems, [0.1, 0.1, 0.1, 0.1], ["naive"] * 4)  # 0.1
    row = zero_shot_row("x", {"sam": sam, "casam": casam, "naive": naive})
    assert row["count"] == 4
    assert row["methods"]["casam"]["iou_drop"] == pytest.approx(0.4 - 0.375)
    assert row["methods"]["casam"]["biou_drop"] == pytest.approx(0.2 - 0.1875)
    assert row["methods"]["naive"]["iou_drop"] == pytest.approx(0.3)
    assert row["methods"]["sam"]["iou_drop"] == 0.0
    assert row["rejection_rate"] == 0.75
    assert zero_shot_row("x", {"casam": casam})["methods"]["casam"]["iou_drop"] is None  # no reference, no drop
    with pytest.raises(ValueError, match="different images"):
        zero_shot_row("x", {"sam": sam, "casam": _result("x", ["a", "b", "c", "e"], [0.5] * 4, [IDENTITY] * 4)})


def test_report_html_is_self_contained_and_matches_sequence_json(protocol):
    page = (protocol["out"] / "report.html").read_text(encoding="utf-8")
    data = protocol["json"]
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == 4  # heatmaps, curves, VAE score histograms, routing confusion
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in page and "http://" not in page and "https://" not in page
    text = html.unescape(page)
    for name in list(TASKS) + ["plasma"] + data["methods"] + [METHODS[m].label for m in data["methods"]]:
        assert name in text, name
    cells = dict(re.findall(r'<td data-key="([^"]+)">([^<]*)</td>', page))
    assert len(cells) == 3 * 2 * 3
    for m in data["methods"]:
        for kind in ("iou", "biou"):
            for key in ("last", "avg", "ff"):
                assert cells[f"{m}.{kind}.{key}"] == percent(data["results"][m][kind][key])
                assert float(cells[f"{m}.{kind}.{key}"]) == pytest.approx(100 * data["results"][m][kind][key], abs=0.005)


def test_methods_come_from_the_table_and_bad_ones_fail_cleanly(tmp_path):
    assert parse_methods("sam, casam,sam") == ["sam", "casam"]
    help_text = CliRunner().invoke(main, ["sequence", "--help"]).output
    for name in METHODS:
        assert name in help_text
    runner = CliRunner()
    result = runner.invoke(main, ["sequence", "--bundle", str(tmp_path / "b"), "--tasks", f"a={tmp_path}",
                                  "--methods", "casam,lwf", "--sam", "tiny"])
    line = one_error_line(result)
    assert "'lwf'" in line and "casam, naive, sam" in line, line
    result = runner.invoke(main, ["sequence", "--tasks", f"a={tmp_path}", "--methods", "casam", "--sam", "tiny"])
    assert "--bundle" in one_error_line(result)
    assert not (tmp_path / "b").exists()
