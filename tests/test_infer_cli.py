"""casam-infer end to end: output files, JSON records, every bad input, real image files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import real_data_or_skip
from casam_infer.cli import main
from runtime.manifest import Manifest
from runtime.pipeline import STAGES, Pipeline
from runtime.prompts import Prompts
from runtime_support import copy_engines, one_error_line
from float32 import f32_tol, peak


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli_images")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray((rng.random((100, 90)) * 60000).astype(np.uint16)).save(folder / "grey16.png")
    return folder


def invoke(*args: str, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_writes_masks_overlay_and_json(engines, images, tmp_path):
    out = tmp_path / "out"
    result = invoke(images, "--box", 10, 10, 80, 90, "--box", -5, 30, 60, 200, "--engines", engines,
                    "--out", out, "--overlay", "--timings")
    assert result.exit_code == 0, result.output
    assert "routes over 2 images" in result.stdout and "ms: preprocess" in result.stdout
    assert "clipped" in result.stderr  # the second box overhangs both images
    pipe = Pipeline.from_manifest(engines, backend="ort-cpu")
    for stem, shape in (("rgb", (120, 160)), ("grey16", (100, 90))):
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["route"] in pipe.task_names + ["identity"]
        assert set(record["scores"]) == set(record["thresholds"]) == set(pipe.task_names)
        assert set(record["timings_ms"]) == set(STAGES)
        assert record["overlay"] == f"{stem}_overlay.png"
        assert Image.open(out / record["overlay"]).size == shape[::-1]
        assert [p["mask"] for p in record["prompts"]] == [f"{stem}_mask0.png", f"{stem}_mask1.png"]
        image = np.asarray(Image.open(images / f"{stem}.png"))
        expected = pipe.predict(image, Prompts.for_image(image.shape, boxes=np.array([[10, 10, 80, 90], [-5, 30, 60, 200]], np.float32)))
        assert record["route"] == expected.route
        for k, prompt in enumerate(record["prompts"]):
            mask = np.asarray(Image.open(out / prompt["mask"]))
            assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, expected.masks[k])
            # Two pipelines on one engine folder (one library): sums over 64×64 image tokens.
            assert prompt["iou"] == pytest.approx(float(expected.iou[k]), rel=0,
                                                  abs=f32_tol(peak(expected.iou), n=64 * 64))
            assert prompt["area"] == int(expected.masks[k].sum())


def test_json_lines_forced_task_points_and_env_default(engines, images, tmp_path):
    out = tmp_path / "out"
    result = invoke(images / "rgb.png", "--point", 50, 60, "--point", 20, 20, "--label", 1, "--label", 0,
                    "--task", "identity", "--json", "--out", out, env={"CASAM_ENGINES": str(engines)})
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip())
    assert record["route"] == "identity"
    assert record["prompts"][0]["points"] == [[50.0, 60.0], [20.0, 20.0]] and record["prompts"][0]["labels"] == [1, 0]
    assert (out / "rgb_mask0.png").is_file() and not (out / "rgb_overlay.png").exists()
    forced = invoke(images / "rgb.png", "--box", 5, 5, 60, 60, "--task", "beta", "--json", "--quiet",
                    "--engines", engines, "--out", out)
    assert json.loads(forced.stdout)["route"] == "beta"


@pytest.mark.parametrize(
    "box, message",
    [((50, 50, 10, 80), "inverted"), ((50, 50, 50, 80), "zero area"), (("nan", 5, 60, 80), "NaN"),
     ((200, 10, 300, 60), "wholly outside")],
)
def test_bad_boxes(engines, images, tmp_path, box, message):
    line = one_error_line(invoke(images / "rgb.png", "--box", *box, "--engines", engines, "--out", tmp_path))
    assert message in line and line.startswith("casam-infer: error:")


def test_bad_images_and_prompts(engines, images, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    box = ("--box", 5, 5, 50, 50, "--engines", engines, "--out", tmp_path / "o")
    assert "does not exist" in one_error_line(invoke(tmp_path / "missing.png", *box))
    assert "corrupt" in one_error_line(invoke(tmp_path / "corrupt.png", *box))
    assert "at least one prompt" in one_error_line(invoke(images / "rgb.png", "--engines", engines))
    assert "one per point" in one_error_line(
        invoke(images / "rgb.png", "--point", 5, 5, "--point", 9, 9, "--label", 0, "--engines", engines))
    assert "unknown task 'gamma'" in one_error_line(invoke(images / "rgb.png", *box, "--task", "gamma"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no images" in one_error_line(invoke(empty, *box))


def test_bad_engine_folders(engines, images, tmp_path):
    args = (images / "rgb.png", "--box", 5, 5, 50, 50, "--out", tmp_path / "o", "--engines")
    assert "no manifest.json" in one_error_line(invoke(*args, tmp_path))

    versioned = copy_engines(engines, tmp_path / "versioned")
    data = json.loads((versioned / "manifest.json").read_text())
    (versioned / "manifest.json").write_text(json.dumps({**data, "format_version": 99}))
    assert "format version 99" in one_error_line(invoke(*args, versioned))

    tampered = copy_engines(engines, tmp_path / "tampered")
    files = Manifest.load(tampered, verify=False)  # graph files are content-named: ask the manifest
    router, alpha = files.graphs["router"].path, files.task("alpha").graph.path
    with open(router, "ab") as fh:
        fh.write(b"\0")
    assert router.name in (line := one_error_line(invoke(*args, tampered))) and "sha256" in line

    alpha.unlink()
    router.write_bytes((engines / router.name).read_bytes())
    assert alpha.name in (line := one_error_line(invoke(*args, tampered))) and "missing" in line


@pytest.mark.real_data
def test_real_files_of_several_sizes_and_modes(engines, tmp_path):
    real = real_data_or_skip("cxr_jsrt", "em_isbi2012", "polyp_kvasir", "nuclei_monuseg")
    folder = tmp_path / "real"
    folder.mkdir()
    picks = {name: sorted((real / name / "images").iterdir())[0] for name in
             ("cxr_jsrt", "em_isbi2012", "polyp_kvasir", "nuclei_monuseg")}
    for name, path in picks.items():  # copies into the test's temp folder only
        (folder / f"{name}{path.suffix}").write_bytes(path.read_bytes())
    rgb = Image.open(picks["polyp_kvasir"]).convert("RGB")
    rgb.convert("P", palette=Image.ADAPTIVE, colors=64).save(folder / "palette.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.save(folder / "kvasir.bmp")
    grey = np.asarray(Image.open(picks["em_isbi2012"]).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(folder / "em16.tif")

    out = tmp_path / "out"
    result = invoke(folder, "--box", 20, 20, 200, 210, "--engines", engines, "--out", out, "--overlay")
    assert result.exit_code == 0, result.output
    files = sorted(p for p in folder.iterdir())
    assert f"routes over {len(files)} images" in result.stdout
    for path in files:
        stem = path.name.rsplit(".", 1)[0]
        width, height = Image.open(path).size
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["size"] == [height, width]
        assert Image.open(out / f"{stem}_mask0.png").size == (width, height)
        assert Image.open(out / f"{stem}_overlay.png").size == (width, height)


def test_unverified_export_warning_is_one_cli_line(engines, images, tmp_path):
    # A private copy: the runtime warns once per folder and process, and other tests in this
    # worker may already have loaded the shared (unverified) export.
    private = copy_engines(engines, tmp_path / "engines")
    result = invoke(images / "rgb.png", "--box", 10, 10, 100, 90, "--engines", private, "--out", tmp_path / "out",
                    "--quiet")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "not verified" in line]
    assert len(warnings) == 1 and warnings[0].startswith("casam-infer: warning: export "), result.stderr
    assert "UnverifiedExportWarning" not in result.stderr and "pipeline.py" not in result.stderr
