"""casam-infer --boxes-from-masks DIR --clicks N: the challenge's protocol through the
interactive sessions, written to evaluation.json; and each of its refusals, checked before
any engine loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import need
from casam_core.ownership import LEDGER_NAME
from casam_infer import cli
from casam_infer.cli import main
from runtime.sessions.clicks import auc, auc_all
from runtime_support import one_error_line


@pytest.fixture(autouse=True)
def _scipy():
    need("scipy", "eval")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def picture(path: Path, seed: int, size=(96, 128)) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    image[20:60, 30:90] = 220
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


@pytest.fixture
def cases(tmp_path) -> tuple[Path, Path]:
    """Two images; b's mask has two structures (palette indices 1 and 2)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    masks.mkdir()
    picture(images / "a.png", 1)
    picture(images / "b.png", 2)
    a = np.zeros((96, 128), np.uint8)
    a[20:60, 30:90] = 255
    Image.fromarray(a).save(masks / "a.png")
    b = np.zeros((96, 128), np.uint8)
    b[10:40, 10:50], b[50:90, 70:120] = 1, 2
    indexed = Image.fromarray(b, mode="P")
    indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    indexed.save(masks / "b.png")
    return images, masks


def test_clicks_write_n_plus_one_points_per_image_and_route_means_of_the_images(engines, cases, tmp_path):
    images, masks = cases
    out = tmp_path / "o"
    result = invoke(images, "--boxes-from-masks", masks, "--clicks", 3, "--engines", engines, "--out", out,
                    "--nsd-tolerance", 1.5)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(["evaluation.json", LEDGER_NAME])  # nothing else
    report = json.loads((out / "evaluation.json").read_text())
    assert report["protocol"]["clicks"] == 3 and report["protocol"]["nsd_tolerance"] == 1.5
    records = {r["image"]: r for r in report["images"]}
    assert sorted(records) == ["a.png", "b.png"]
    assert [s["value"] for s in records["b.png"]["structures"]] == [1, 2]
    for record in records.values():
        assert record["spacing_unit"] == "pixel"
        for metric in ("dice", "nsd"):
            assert len(record[metric]) == 4 and all(0.0 <= v <= 1.0 for v in record[metric])
            for s in record["structures"]:
                assert len(s[metric]) == 4 and len(s["clicks"]) == 3
            # The image's curve is the mean of its structures'; its AUCs are computed from it.
            mean = np.mean([s[metric] for s in record["structures"]], axis=0)
            assert record[metric] == pytest.approx(list(mean), rel=0, abs=1e-12)
            assert record[f"{metric}_auc"] == pytest.approx(auc(record[metric], 3), rel=0, abs=1e-12)
            assert record[f"{metric}_auc_all"] == pytest.approx(auc_all(record[metric]), rel=0, abs=1e-12)
            assert record[f"{metric}_final"] == record[metric][-1]
        truth = np.asarray(Image.open(masks / record["image"]))
        for s in record["structures"]:
            for c in s["clicks"]:  # each click sits where the truth says its sign
                if c is not None:
                    assert (truth[c["y"], c["x"]] > 0 if s["value"] == 1 and record["image"] == "a.png"
                            else truth[c["y"], c["x"]] == s["value"]) == c["positive"]
    by_route: dict[str, list] = {}
    for r in report["images"]:
        by_route.setdefault(r["route"], []).append(r)
    assert set(report["per_route"]) == set(by_route)
    for route, rs in by_route.items():
        means = report["per_route"][route]
        assert means["n"] == len(rs)
        for key in ("dice_auc", "nsd_auc", "dice_auc_all", "nsd_final", "dice_final"):
            assert means[key] == pytest.approx(float(np.mean([r[key] for r in rs])), rel=0, abs=1e-12)
        assert means["dice"] == pytest.approx(list(np.mean([r["dice"] for r in rs], axis=0)), rel=0, abs=1e-12)
    assert report["overall"]["n"] == 2
    assert report["overall"]["nsd"] == pytest.approx(
        list(np.mean([r["nsd"] for r in report["images"]], axis=0)), rel=0, abs=1e-12)


def test_the_first_interaction_is_casam_infers_box_only_result(engines, cases, tmp_path):
    """Interaction 0 is the box through the session: the same mask casam-infer's box-only
    --boxes-from-masks run writes, so its Dice is that mask's Dice."""
    images, masks = cases
    invoke(images / "a.png", "--boxes-from-masks", masks, "--clicks", 0, "--engines", engines, "--out", tmp_path / "c")
    invoke(images / "a.png", "--boxes-from-masks", masks, "--engines", engines, "--out", tmp_path / "b", "--quiet")
    record = json.loads((tmp_path / "c" / "evaluation.json").read_text())["images"][0]
    assert len(record["dice"]) == 1 and record["dice_auc"] is None and record["dice_auc_all"] is None
    box_only = np.asarray(Image.open(tmp_path / "b" / "a_mask0.png")) > 0
    truth = np.asarray(Image.open(masks / "a.png")) > 0
    from casam_core.metrics import dice

    assert record["dice"][0] == pytest.approx(dice(box_only, truth), rel=0, abs=1e-12)


def test_a_volume_is_boxed_on_its_largest_slice_propagated_and_clicked_in_3d(engines, tmp_path):
    nib = need("nibabel")
    from nibabel.testing import data_path

    source = nib.load(str(Path(data_path) / "anatomical.nii"))  # a real 33×41×25 MR volume
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    nib.save(source, str(tmp_path / "imgs" / "mr.nii.gz"))
    labels = np.zeros(source.shape, np.uint8)
    labels[8:25, 10:30, 9:16] = 1
    labels[5:8, 10:30, 12] = 1  # slice 12 is the largest (9..15 are equal but for this)
    nib.save(nib.Nifti1Image(labels, source.affine), str(tmp_path / "masks" / "mr.nii.gz"))
    out = tmp_path / "o"
    result = invoke(tmp_path / "imgs", "--boxes-from-masks", tmp_path / "masks", "--clicks", 2, "--engines", engines,
                    "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "evaluation.json").read_text())["images"][0]
    assert record["route_mode"] == "volume" and record["spacing_unit"] == "mm"
    assert record["spacing"] == pytest.approx(list(np.linalg.norm(source.affine[:3, :3], axis=0)), rel=1e-6)
    structure = record["structures"][0]
    assert structure["slice"] == 12 and structure["box"] == [10.0, 5.0, 29.0, 24.0]  # x0 y0 x1 y1 on that slice
    assert len(record["dice"]) == 3 and len(structure["clicks"]) == 2


@pytest.mark.parametrize("extra, named", [
    ((), "--boxes-from-masks"),
    (("--boxes-from-masks", "M", "--box", 1, 1, 9, 9), "--box"),
    (("--boxes-from-masks", "M", "--prompts", "P"), "--prompts"),
    (("--boxes-from-masks", "M", "--server", "http://127.0.0.1:9"), "--server"),
    (("--boxes-from-masks", "M", "--single-slice"), "--single-slice"),
    (("--boxes-from-masks", "M", "--route-per-slice"), "--route-per-slice"),
    (("--boxes-from-masks", "M", "--overlay"), "--overlay"),
    (("--boxes-from-masks", "M", "--expect-task", "alpha"), "--expect-task"),
])
def test_each_refusal_comes_before_the_engines_load(cases, tmp_path, monkeypatch, extra, named):
    images, masks = cases
    (tmp_path / "P").write_text("{}")
    monkeypatch.setattr(cli, "open_pipeline", lambda *a, **k: pytest.fail("engines loaded before the check"))
    args = [masks if a == "M" else tmp_path / "P" if a == "P" else a for a in extra]
    line = one_error_line(invoke(images, "--clicks", 2, *args, "--out", tmp_path / "o"))
    assert "--clicks" in line and named in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("n", [-1, 21])
def test_clicks_outside_0_to_20_are_a_usage_error(cases, tmp_path, n):
    images, masks = cases
    line = one_error_line(invoke(images, "--boxes-from-masks", masks, "--clicks", n, "--out", tmp_path / "o"))
    assert "--clicks" in line and "0<=x<=20" in line.replace(" ", ""), line


def test_an_evaluation_json_casam_infer_did_not_write_needs_overwrite(engines, cases, tmp_path):
    images, masks = cases
    out = tmp_path / "o"
    out.mkdir()
    (out / "evaluation.json").write_text("somebody's notes")
    args = (images / "a.png", "--boxes-from-masks", masks, "--clicks", 1, "--engines", engines, "--out", out)
    line = one_error_line(invoke(*args))
    assert "evaluation.json" in line and "--overwrite" in line, line
    assert (out / "evaluation.json").read_text() == "somebody's notes"
    assert invoke(*args, "--overwrite").exit_code == 0
    assert "images" in json.loads((out / "evaluation.json").read_text())


def test_without_scipy_clicks_name_the_eval_extra_before_the_engines_load(cases, tmp_path, monkeypatch):
    images, masks = cases
    monkeypatch.setitem(sys.modules, "scipy.ndimage", None)  # import scipy.ndimage → ImportError
    monkeypatch.setattr(cli, "open_pipeline", lambda *a, **k: pytest.fail("engines loaded before the check"))
    line = one_error_line(invoke(images, "--boxes-from-masks", masks, "--clicks", 2, "--out", tmp_path / "o"))
    assert "scipy" in line and "casam[eval]" in line, line
