"""casam-train refuses a dataset too small for a later stage before it embeds anything."""

from __future__ import annotations

import time

from click.testing import CliRunner
from runtime_support import one_error_line

from trainer.cli import main


def test_two_images_exit_2_before_any_work(tmp_path):
    runner = CliRunner()
    made = runner.invoke(main, ["synth", str(tmp_path / "data"), "--style", "stripes", "--count", "2", "--seed", "1"])
    assert made.exit_code == 0, made.output
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    result = runner.invoke(main, ["--bundle", str(tmp_path / "bundle"), "--task", "few", "--data", str(tmp_path / "data"),
                                  "--sam", "tiny", "--epochs", "1", "--device", "cpu", "--quiet",
                                  "--cache-dir", str(cache)], env={"CASAM_CACHE": str(tmp_path / "casam_cache")})
    elapsed = time.monotonic() - t0
    line = one_error_line(result)
    assert "needs at least 3 images" in line and "found 2 (1 for training, 1 held out)" in line, line
    assert not (tmp_path / "bundle").exists(), "no bundle, no .staging/ may be left"
    assert not cache.exists() or not any(cache.rglob("*")), "nothing may be embedded"
    assert elapsed < 30, f"refused only after {elapsed:.0f} s"


def test_a_recorded_split_needs_two_training_images(tmp_path):
    from casam_core.files import atomic_write_json

    runner = CliRunner()
    assert runner.invoke(main, ["synth", str(tmp_path / "data"), "--style", "stripes", "--count", "3", "--seed", "1"]).exit_code == 0
    stems = sorted(p.stem for p in (tmp_path / "data" / "images").iterdir())
    atomic_write_json(tmp_path / "data" / "split.json", {"train": stems[:1], "test": stems[1:]})
    result = runner.invoke(main, ["--bundle", str(tmp_path / "bundle"), "--task", "few", "--data", str(tmp_path / "data"),
                                  "--sam", "tiny", "--device", "cpu", "--quiet", "--folds", "5"])
    line = one_error_line(result)
    assert "needs at least 2 images" in line and "found 3 (1 for training, 2 held out)" in line, line
    assert not (tmp_path / "bundle").exists()
