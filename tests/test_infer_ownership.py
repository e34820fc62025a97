"""casam-infer writes only names it owns in --out (issue 26 item 1, repros 1, 3, 4, 5), each
input's outputs appear together or not at all, a refused run leaves no empty folder, and
the last tracebacks and misleading messages of casam-infer (items 7, 8, 12, 14, 15) are one
line each. Plus the grouped --help of the option dataclasses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_core.errors import InputError
from casam_core.ownership import LEDGER_NAME
from casam_infer import cli
from casam_infer.cli import main
from runtime_support import exported, one_error_line

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Path, Path]:
    return exported(tmp_path_factory)


@pytest.fixture(scope="module")
def engines(shipped) -> Path:
    return shipped[1]


@pytest.fixture(scope="module")
def anatomical() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "anatomical.nii"  # a real 33×41×25 int16 volume


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def picture(path: Path, seed: int, shape: tuple[int, int] = (96, 128)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_out_pointing_at_a_bundle_or_an_export_is_refused_and_nothing_changes(shipped, tmp_path):
    """Repros 1 and 3: an input named bundle.png (manifest.png) with --out at the bundle
    (export) folder would have replaced bundle.json (manifest.json) with its record."""
    bundle, engines = shipped
    for folder, marker in ((bundle, "bundle.json"), (engines, "manifest.json")):
        target = tmp_path / folder.name
        shutil.copytree(folder, target)
        before = (target / marker).read_bytes()
        image = picture(tmp_path / f"{marker[:-5]}.png", 1)
        for extra in ((), ("--overwrite",)):
            line = one_error_line(invoke(image, "--box", 10, 10, 60, 60, "--engines", engines, "--out", target, *extra))
            assert f"--out {target} is a casam" in line and marker in line, line
        assert (target / marker).read_bytes() == before
        assert not (target / f"{marker[:-5]}_mask0.png").exists()


def test_a_folder_of_other_files_needs_overwrite(engines, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    image = picture(tmp_path / "notes.png", 2)
    assert "notes.txt" in one_error_line(invoke(image, "--box", 10, 10, 60, 60, "--engines", engines, "--out", out))
    assert names(out) == ["notes.txt"]
    result = invoke(image, "--box", 10, 10, 60, 60, "--engines", engines, "--out", out, "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "notes.json").is_file()
    # --overwrite accepted the folder for one run; it did not make notes.txt casam-infer's.
    assert "notes.txt" in one_error_line(invoke(image, "--box", 10, 10, 60, 60, "--engines", engines, "--out", out))
    (out / "notes.txt").unlink()  # now the folder holds only casam-infer's files: a rerun may replace them
    again = invoke(image, "--box", 10, 10, 60, 60, "--engines", engines, "--out", out, "--quiet")
    assert again.exit_code == 0, again.output


def test_colliding_stems_get_distinct_output_sets(engines, tmp_path):
    """Repro 4: a/x.png, b/x.png and b/x_1.png gave two output sets (b/x.png took x_1, and
    b/x_1.png then overwrote it)."""
    inputs = [picture(tmp_path / "a" / "x.png", 3), picture(tmp_path / "b" / "x.png", 4),
              picture(tmp_path / "b" / "x_1.png", 5, (80, 100))]
    out = tmp_path / "o"
    result = invoke(*inputs, "--box", 10, 10, 60, 60, "--engines", engines, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    records = {json.loads((out / name).read_text())["image"]: name for name in names(out) if name.endswith(".json")
               and name != LEDGER_NAME}
    assert records == {str(inputs[0]): "x.json", str(inputs[1]): "x_1.json", str(inputs[2]): "x_1_1.json"}
    for image, name in records.items():
        mask = json.loads((out / name).read_text())["prompts"][0]["mask"]
        assert Image.open(out / mask).size == Image.open(image).size
    assert len([n for n in names(out) if n.endswith("_mask0.png")]) == 3


def test_an_input_named_like_the_run_summary_keeps_its_record(engines, tmp_path):
    """Repro 5: the record of evaluation.png was overwritten by the run's evaluation.json."""
    images, masks = tmp_path / "imgs", tmp_path / "masks"
    for i, stem in enumerate(("evaluation", "other")):
        picture(images / f"{stem}.png", 6 + i)
        mask = np.zeros((96, 128), np.uint8)
        mask[20:60, 30:90] = 255
        masks.mkdir(exist_ok=True)
        Image.fromarray(mask).save(masks / f"{stem}.png")
    out = tmp_path / "o"
    result = invoke(images, "--boxes-from-masks", masks, "--engines", engines, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert "images" in json.loads((out / "evaluation.json").read_text())  # the run's summary
    assert json.loads((out / "evaluation_1.json").read_text())["image"] == str(images / "evaluation.png")
    assert json.loads((out / "other.json").read_text())["image"] == str(images / "other.png")


def test_refused_inputs_leave_no_empty_out_folder(engines, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "new" / "deep"
    assert "corrupt" in one_error_line(invoke(corrupt, "--box", 5, 5, 50, 50, "--engines", engines, "--out", out))
    assert not (tmp_path / "new").exists()


def test_an_image_whose_outputs_fail_midway_leaves_none_of_them(engines, tmp_path, monkeypatch):
    """The masks used to be written before the overlay: an overlay that failed left them."""
    def broken(*args, **kwargs):
        raise InputError("disk full while drawing the overlay")

    monkeypatch.setattr("casam_infer.outputs.overlay", broken)
    out = tmp_path / "o"
    out.mkdir()
    image = picture(tmp_path / "x.png", 8)
    line = one_error_line(invoke(image, "--box", 10, 10, 60, 60, "--engines", engines, "--out", out, "--overlay"))
    assert "disk full" in line
    assert [n for n in names(out) if n != LEDGER_NAME] == []


def test_a_volume_whose_outputs_fail_midway_leaves_none_of_them(engines, anatomical, tmp_path, monkeypatch):
    """The NIfTI mask used to be written before the montage (and the SEG): a failure after it
    left a mask without its record."""
    def broken(*args, **kwargs):
        raise InputError("disk full while drawing the montage")

    monkeypatch.setattr("casam_infer.volume_outputs.montage", broken)
    out = tmp_path / "o"
    out.mkdir()
    result = invoke(anatomical, "--box3d", 5, 5, 11, 25, 30, 13, "--engines", engines, "--out", out, "--overlay")
    assert "disk full" in one_error_line(result)
    assert [n for n in names(out) if n != LEDGER_NAME] == []


def test_a_mask_of_another_size_is_one_line_naming_both_sizes(engines, tmp_path):
    """Item 7: 320×256 images with 160×128 masks gave a numpy broadcast traceback."""
    picture(tmp_path / "imgs" / "a.png", 9, (256, 320))
    (tmp_path / "masks").mkdir()
    mask = np.zeros((128, 160), np.uint8)
    mask[20:60, 30:90] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    line = one_error_line(invoke(tmp_path / "imgs", "--boxes-from-masks", tmp_path / "masks", "--engines", engines,
                                 "--out", tmp_path / "o"))
    assert "128×160" in line and "256×320" in line and "a.png" in line, line


def test_a_label_volume_of_another_shape_is_one_line_naming_both_shapes(engines, anatomical, tmp_path):
    """Item 8: a label volume of another shape than its NIfTI gave a traceback."""
    (tmp_path / "imgs").mkdir()
    shutil.copy(anatomical, tmp_path / "imgs" / "anatomical.nii")
    (tmp_path / "masks").mkdir()
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[5:15, 5:15, 3:7] = 1
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "masks" / "anatomical.nii.gz"))
    line = one_error_line(invoke(tmp_path / "imgs", "--boxes-from-masks", tmp_path / "masks", "--engines", engines,
                                 "--out", tmp_path / "o"))
    assert "20×20×10" in line and "33×41×25" in line, line
    assert not (tmp_path / "o").exists()


def test_a_prompts_key_naming_no_input_is_refused_before_engines_load(engines, tmp_path, monkeypatch):
    """Item 12: a --prompts entry for a file that is not an input was silently ignored."""
    image = picture(tmp_path / "a.png", 10)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"a.png": {"boxes": [[5, 5, 40, 40]]}, "typo.png": {"boxes": [[5, 5, 40, 40]]}}))
    monkeypatch.setattr(cli, "open_pipeline", lambda *a, **k: pytest.fail("engines loaded before the prompts check"))
    line = one_error_line(invoke(image, "--prompts", prompts, "--engines", engines, "--out", tmp_path / "o"))
    assert "typo.png" in line and "not among the inputs" in line, line


def test_a_box3d_slice_out_of_range_is_named(engines, anatomical, tmp_path):
    """Item 14: Z1 = 500 on a 25-slice volume was reported as its computed middle, slice 255."""
    line = one_error_line(invoke(anatomical, "--box3d", 5, 5, 10, 25, 30, 500, "--engines", engines,
                                 "--out", tmp_path / "o"))
    assert "Z1 = 500" in line and "25 slices" in line and "255" not in line, line
    assert not (tmp_path / "o").exists()


def test_usage_errors_are_one_line():
    """Item 15: click's usage errors printed Usage, Try, a blank line and the error."""
    for args in (["--concurrency", "0", "img.png", "--box", "1", "1", "2", "2"], ["--nope", "x.png"], []):
        line = one_error_line(invoke(*args))
        assert line.startswith("casam-infer: error: "), line


def test_help_lists_every_option_in_its_group():
    result = invoke("--help")
    assert result.exit_code == 0
    sections = {}
    current = None
    for line in result.stdout.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif current is not None and line.startswith("  -"):
            sections.setdefault(current, []).append(line.split()[0].rstrip(","))
    assert list(sections) == ["Engines and routing", "Prompts", "Volumes", "Outputs", "Speed", "Server", "PACS",
                              "Other options"]
    assert sections["Other options"] == ["--debug", "-h"]
    # 33 options, --overwrite, --verify-deployment (an action: checks an int8 export, then exits),
    # --rtstruct, and the 6 PACS options (--dicomweb, --study, --series, --store, --ca-bundle, --max-series-mb)
    assert sum(len(v) for k, v in sections.items() if k != "Other options") == 42
    assert "--clicks" in sections["Prompts"] and "--nsd-tolerance" in sections["Prompts"]
    assert "--verify-deployment" in sections["Engines and routing"]
    assert "--box3d" in sections["Volumes"] and "--overwrite" in sections["Outputs"]
    assert "--concurrency" in sections["Speed"] and "--server-timeout" in sections["Server"]
