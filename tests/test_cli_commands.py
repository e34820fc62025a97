"""casam-train, casam-export and casam-serve in the one CLI frame (casam_core.cli_frame):
usage errors and casam errors in one line, --overwrite as the one replace flag, the
`add` subcommand and its bare alias, --resume and --volume telling the truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from casam_export.cli import main as export_main
from casam_serve.cli import main as serve_main
from conftest import make_random_bundle
from models.sam_loader import SAM_SPECS
from runtime.backends import BACKENDS
from runtime_support import one_error_line
from trainer.cli import main as train_main


def run(command, *args: str):
    return CliRunner().invoke(command, [str(a) for a in args])


@pytest.mark.parametrize("command, name, args", [
    (train_main, "casam-train", ["--concurrency", "0"]),
    (train_main, "casam-train", ["pack", "--bundle"]),
    (train_main, "casam-train", ["nonsense"]),
    (export_main, "casam-export", ["--bundle", "b"]),
    (export_main, "casam-export", ["--bundle", "b", "--out", "o", "--opset", "x"]),
    (serve_main, "casam-serve", ["--engines", "e", "--http-port", "x"]),
    (serve_main, "casam-serve", ["--engines", "e", "--backend", "nope"]),
])
def test_usage_errors_are_one_line_exit_2(command, name, args):
    assert one_error_line(run(command, *args)).startswith(f"{name}: error: ")


def test_casam_errors_use_the_one_format(tmp_path):
    line = one_error_line(run(serve_main, "--engines", tmp_path))
    assert line.startswith("casam-serve: error: ") and "manifest.json" in line
    line = one_error_line(run(export_main, "--bundle", tmp_path / "none", "--out", tmp_path / "o"))
    assert line.startswith("casam-export: error: ")


def test_choices_come_from_their_tables():
    assert f"[{'|'.join(SAM_SPECS)}]" in run(train_main, "add", "--help").output
    assert f"[{'|'.join(BACKENDS)}]" in run(serve_main, "--help").output


def test_help_lists_add_and_the_bare_form_is_its_alias(tmp_path):
    assert "  add " in run(train_main, "--help").output
    for prefix in ([], ["add"]):  # the same refusal, before any work, from both spellings
        line = one_error_line(run(train_main, *prefix, "--bundle", tmp_path / "b", "--task", "t", "--data", tmp_path,
                                  "--resume", "--sam", "tiny"))
        assert "no interrupted run of task 't'" in line and "without --resume" in line
    assert not (tmp_path / "b").exists()
    assert "missing --bundle" in one_error_line(run(train_main, "add", "--task", "t"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_random_bundle(tmp_path_factory.mktemp("cmds") / "bundle", ("alpha",), seed=5).root


def test_pack_never_replaces_the_bundle_file_and_overwrite_is_the_one_flag(bundle, tmp_path):
    before = (bundle / "bundle.json").read_bytes()
    line = one_error_line(run(train_main, "pack", "--bundle", bundle, "--task", "alpha", "--out", bundle / "bundle.json",
                              "--overwrite"))
    assert "casam bundle's bundle.json" in line
    assert (bundle / "bundle.json").read_bytes() == before
    out = tmp_path / "alpha.casam"
    out.write_bytes(b"mine")
    assert "pass --overwrite" in one_error_line(run(train_main, "pack", "--bundle", bundle, "--task", "alpha", "--out", out))
    assert out.read_bytes() == b"mine"
    assert run(train_main, "pack", "--bundle", bundle, "--task", "alpha", "--out", out, "--overwrite").exit_code == 0
    assert out.read_bytes() != b"mine"


def test_keygen_follows_the_same_rule(tmp_path):
    key = tmp_path / "site"
    assert run(train_main, "keygen", "--out", key).exit_code == 0
    first = key.read_bytes()
    assert "pass --overwrite" in one_error_line(run(train_main, "keygen", "--out", key))
    assert key.read_bytes() == first
    assert run(train_main, "keygen", "--out", key, "--overwrite").exit_code == 0 and key.read_bytes() != first


def test_export_force_is_a_hidden_alias_of_overwrite(bundle, tmp_path):
    help_text = run(export_main, "--help").output
    assert "--overwrite" in help_text and "--force" not in help_text
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_error_line(run(export_main, "--bundle", bundle, "--out", out, "--no-verify", "--quiet"))
    assert "pass --overwrite" in line
    for flag in ("--overwrite", "--force"):
        result = run(export_main, "--bundle", bundle, "--out", out, "--no-verify", "--quiet", flag)
        assert result.exit_code == 0, result.output


def test_volume_picks_one_volume_of_a_4d_nifti(tmp_path):
    """nibabel's example4d (128×96×24, 2 volumes) with a 3-D label: the message offers
    --volume, casam-train has it, and it reaches the reader."""
    nib = pytest.importorskip("nibabel")
    from trainer.data import load_dataset

    source = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    shutil.copy(source, data / "images" / "case.nii.gz")
    image = nib.load(source)
    label = np.zeros(image.shape[:3], np.uint8)
    label[30:90, 20:70, 8:16] = 1
    nib.save(nib.Nifti1Image(label, image.affine), data / "labels" / "case.nii.gz")
    line = one_error_line(run(train_main, "--bundle", tmp_path / "b", "--task", "v", "--data", data, "--sam", "tiny"))
    assert "choose one with --volume K (0..1)" in line
    line = one_error_line(run(train_main, "--bundle", tmp_path / "b", "--task", "v", "--data", data, "--sam", "tiny",
                              "--volume", "2"))
    assert "--volume 2 is outside" in line
    assert not (tmp_path / "b").exists()
    dataset = load_dataset(data, volume=1)
    assert len(dataset.samples) == 8 and dataset.split_record()["volume"] == 1
    first = load_dataset(data, volume=0)
    assert [s.stem for s in first.samples] == [s.stem for s in dataset.samples]
    assert all(a.image_hash != b.image_hash for a, b in zip(first.samples, dataset.samples))  # other voxels


def test_report_files_never_replace_a_bundle_or_manifest_file(bundle, tmp_path):
    """casam-train's report files (--json-summary, eval's --out) are refused before any work
    when they name a bundle's bundle.json or an export's manifest.json."""
    before = (bundle / "bundle.json").read_bytes()
    line = one_error_line(run(train_main, "eval", "--bundle", bundle, "--out", bundle / "bundle.json"))
    assert "casam bundle's bundle.json" in line
    line = one_error_line(run(train_main, "--bundle", bundle, "--task", "beta", "--data", tmp_path,
                              "--json-summary", bundle / "bundle.json", "--sam", "tiny"))
    assert "--json-summary" in line and "bundle.json" in line
    assert (bundle / "bundle.json").read_bytes() == before
