"""Prompts for many images (--prompts, --boxes-from-masks) and scoring a deployment on
labelled cases (IoU/BIoU per image, per route, overall; routing accuracy)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_infer import cli
from casam_infer.cli import main
from casam_core.metrics import image_scores
from casam_core.structures import tight_box
from runtime_support import one_error_line
from volume_support import save_nifti, sphere_volume

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Two images whose objects sit in different places, with their masks (one a label map)."""
    root = tmp_path_factory.mktemp("labelled")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:96, 0:128]
    one = ((xx - 30) ** 2 + (yy - 30) ** 2 < 15 ** 2).astype(np.uint8)
    two = np.zeros((96, 128), np.uint8)
    two[50:80, 70:110] = 1
    two[10:30, 10:40] = 2
    for name, mask in (("one", one), ("two", two)):
        image = (rng.integers(0, 60, (96, 128)) + 150 * (mask > 0)).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask * 100).save(root / "masks" / f"{name}.png")
    return root


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_boxes_from_masks_score_each_image_with_the_trainers_metrics(engines, labelled, tmp_path):
    out = tmp_path / "out"
    result = invoke(labelled / "images", "--boxes-from-masks", labelled / "masks", "--expect-task", "alpha",
                    "--engines", engines, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "evaluation.json").read_text())
    assert "evaluation: IoU" in result.stdout and "routing accuracy" in result.stdout
    by_image = {r["image"]: r for r in report["images"]}
    routes = []
    for name, structures in (("one", [100]), ("two", [100, 200])):
        record = json.loads((out / f"{name}.json").read_text())
        truth = np.asarray(Image.open(labelled / "masks" / f"{name}.png"))
        gts = np.stack([truth == v for v in structures])
        assert [p["box"] for p in record["prompts"]] == [tight_box(g).tolist() for g in gts]  # one box per structure
        preds = np.stack([np.asarray(Image.open(out / p["mask"])) > 0 for p in record["prompts"]])
        expected = image_scores(preds, gts)
        assert (by_image[f"{name}.png"]["iou"], by_image[f"{name}.png"]["biou"]) == pytest.approx(expected, abs=1e-12)
        routes.append(record["route"])
    assert report["overall"]["n"] == 2
    assert report["overall"]["iou"] == pytest.approx(np.mean([r["iou"] for r in report["images"]]), abs=1e-12)
    assert sum(v["n"] for v in report["per_route"].values()) == 2 and set(report["per_route"]) == set(routes)
    assert report["routing_accuracy"] == pytest.approx(routes.count("alpha") / 2)


def test_prompts_file_gives_each_image_its_own_boxes(engines, labelled, tmp_path):
    table = {"one.png": {"boxes": [[15, 15, 46, 46]]}, "two.png": {"boxes": [[70, 50, 110, 80], [10, 10, 40, 30]]}}
    (tmp_path / "prompts.json").write_text(json.dumps(table))
    out = tmp_path / "out"
    result = invoke(labelled / "images", "--prompts", tmp_path / "prompts.json", "--engines", engines, "--out", out)
    assert result.exit_code == 0, result.output
    for name, entry in table.items():
        record = json.loads((out / f"{name[:-4]}.json").read_text())
        assert [p["box"] for p in record["prompts"]] == entry["boxes"]
    (tmp_path / "prompts.csv").write_text("image,x0,y0,x1,y1\none.png,15,15,46,46\n")
    result = invoke(labelled / "images", "--prompts", tmp_path / "prompts.csv", "--engines", engines, "--out", out)
    assert one_error_line(result).endswith("has no prompts for two.png")
    (tmp_path / "bad.json").write_text(json.dumps({"one.png": {"boxes": [[1, 2, 3]]}}))
    result = invoke(labelled / "images", "--prompts", tmp_path / "bad.json", "--engines", engines, "--out", out)
    assert "expected lists of 4 finite numbers" in one_error_line(result)



def test_a_mask_folder_lacking_an_input_is_refused_before_any_engine_loads(engines, labelled, tmp_path, monkeypatch):
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(labelled / "masks" / "one.png", masks / "one.png")
    monkeypatch.setattr(cli, "open_pipeline", lambda *a, **k: pytest.fail("engines loaded before the masks were checked"))
    result = invoke(labelled / "images", "--boxes-from-masks", masks, "--engines", engines, "--out", tmp_path / "out")
    assert one_error_line(result) == f"casam-infer: error: --boxes-from-masks {masks} has no mask for two.png"
    assert not (tmp_path / "out").exists()


def test_an_error_that_ends_the_run_midway_starts_its_own_line_below_the_progress_bar(engines, labelled, tmp_path):
    """An empty mask for the second image ends the run at that image's turn (the mask is
    read then), while the progress bar (two images, no --quiet) is drawn: the error must
    not be glued onto the bar."""
    masks = tmp_path / "masks"
    masks.mkdir()
    shutil.copy(labelled / "masks" / "one.png", masks / "one.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "two.png")
    result = invoke(labelled / "images", "--boxes-from-masks", masks, "--engines", engines, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    *bar, error, end = result.stderr.split("\n")
    assert end == "" and error == f"casam-infer: error: mask {masks / 'two.png'} is empty: no structure to prompt for", \
        result.stderr
    assert bar and "casam-infer:" in bar[-1] and "image/s" in bar[-1], result.stderr  # the bar, on its own line


def test_label_volume_gives_3d_boxes_and_slice_wise_scores(engines, tmp_path):
    volume, label = sphere_volume((48, 48, 5), (24, 24, 1.5), radius_mm=8.0, spacing=(1.0, 1.0, 4.0))  # slice 4 empty
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    save_nifti(tmp_path / "images" / "ball.nii.gz", volume, np.eye(4))
    save_nifti(tmp_path / "labels" / "ball.nii.gz", label * 3, np.eye(4))  # label value 3
    out = tmp_path / "out"
    result = invoke(tmp_path / "images" / "ball.nii.gz", "--boxes-from-masks", tmp_path / "labels", "--box-jitter", 2,
                    "--engines", engines, "--out", out, "--task", "identity")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "ball.json").read_text())
    truth_slices = np.flatnonzero(label.any(axis=(0, 1)))
    assert [s["index"] for s in record["slices"]] == truth_slices.tolist()  # the label's z-range, every slice
    start = (truth_slices[0] + truth_slices[-1]) // 2  # a 3-D box starts on its middle slice, then propagates
    box = next(s for s in record["slices"] if s["index"] == start)["prompts"][0]["box"]
    tight = tight_box(label.any(axis=2))
    assert np.all(np.abs(np.asarray(box) - tight) <= 2.0) and not np.array_equal(box, tight)  # jittered by ≤ 2 px
    predicted = np.asarray(nib.load(str(out / "ball_mask.nii.gz")).dataobj) == 1
    ious = [image_scores(predicted[None, :, :, k], label[None, :, :, k] == 1)[0]
            for k in range(4) if predicted[:, :, k].any() or label[:, :, k].any()]
    assert record["evaluation"]["iou"] == pytest.approx(float(np.mean(ious)), abs=1e-12)
