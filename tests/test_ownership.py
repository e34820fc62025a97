"""casam_core.ownership: the rules every output-writing command shares (issue: output ownership)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from casam_core.errors import InputError
from casam_core.ownership import LEDGER_NAME, OutputDir, refuse_existing

SUFFIXES = (".json", "_mask.png")


def _write(out: OutputDir, stem: str, fail: bool = False) -> None:
    with out.group() as staging:
        for s in SUFFIXES:
            (staging / (stem + s)).write_text(stem)
            if fail:
                raise RuntimeError("disk full halfway")


@pytest.mark.parametrize("marker", ["bundle.json", "manifest.json"])
def test_bundle_and_export_folders_are_refused_even_with_overwrite(tmp_path: Path, marker: str) -> None:
    (tmp_path / marker).write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=marker):
            OutputDir(tmp_path, "casam-infer", overwrite=overwrite).claim()
    assert (tmp_path / marker).read_text() == "{}"


def test_foreign_files_need_overwrite_and_own_files_do_not(tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "o", "casam-infer").claim()
    _write(out, "x")
    # A second run of the same command may replace what the first wrote …
    again = OutputDir(tmp_path / "o", "casam-infer").claim()
    assert again.allocate("x", SUFFIXES) == "x"
    # … but a file it did not write makes the folder foreign.
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="notes.txt"):
        OutputDir(tmp_path / "o", "casam-infer").claim()
    with pytest.raises(InputError, match="did not write"):
        OutputDir(tmp_path / "o", "casam-export").claim()
    OutputDir(tmp_path / "o", "casam-infer", overwrite=True).claim()
    assert json.loads((tmp_path / "o" / LEDGER_NAME).read_text())["files"]["x.json"] == "casam-infer"


def test_stems_never_collide_with_each_other_reserved_names_or_disk(tmp_path: Path) -> None:
    out = OutputDir(tmp_path, "casam-infer", overwrite=True, reserved=["evaluation.json"]).claim()
    (tmp_path / "y.json").write_text("someone else's")
    out.overwrite = False  # the folder was accepted; its foreign file must still not be replaced
    stems = [out.allocate(s, SUFFIXES) for s in ("x", "x", "x_1", "evaluation", "y")]
    assert stems == ["x", "x_1", "x_1_1", "evaluation_1", "y_1"]
    names = [st + s for st in stems for s in SUFFIXES]
    assert len(set(names)) == len(names)


def test_a_group_that_fails_halfway_leaves_nothing(tmp_path: Path) -> None:
    out = OutputDir(tmp_path, "casam-infer").claim()
    with pytest.raises(RuntimeError):
        _write(out, "x", fail=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_refused_run_leaves_no_empty_folder(tmp_path: Path) -> None:
    out = OutputDir(tmp_path / "new" / "deep", "casam-infer").claim()
    out.ensure()
    out.close()
    assert not (tmp_path / "new").exists()  # the parent it made for --out goes too …
    assert tmp_path.is_dir()  # … but not one that was there before


def test_the_ledger_and_staging_names_are_never_an_output_stem(tmp_path: Path) -> None:
    out = OutputDir(tmp_path, "casam-infer").claim()
    assert out.allocate(".casam-outputs", (".json",)) == ".casam-outputs_1"
    assert out.allocate(".casam-staging-x", (".json",)) == "_.casam-staging-x"


def test_single_file_writers_share_the_overwrite_rule(tmp_path: Path) -> None:
    target = tmp_path / "t.casam"
    refuse_existing(target, overwrite=False)
    target.write_text("old")
    with pytest.raises(InputError, match="--overwrite"):
        refuse_existing(target, overwrite=False)
    refuse_existing(target, overwrite=True)
    (tmp_path / "bundle.json").write_text("{}")
    with pytest.raises(InputError, match="bundle"):
        refuse_existing(tmp_path / "bundle.json", overwrite=True)
