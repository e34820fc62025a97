"""The casam-train command line: help, an end-to-end run, eval, sequence and clean errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from casam_core.files import atomic_write_json, read_json
from casam_bundle import Bundle
from trainer.cli import main
from casam_core.metrics import continual_metrics
from runtime_support import one_error_line
from trainer.vae_training import single_thread

TRAIN = ["--sam", "tiny", "--epochs", "1", "--batch-size", "4", "--masks-per-image", "1", "--vae-epochs", "40",
         "--device", "cpu", "--quiet"]


def invoke(args, env):
    return CliRunner().invoke(main, args, env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI-trained bundle; the images repeat other trainer tests' seeds, so the shared
    embedding cache already holds them. One thread: the runs are small and the cores busy."""
    base = tmp_path_factory.mktemp("cli")
    cache = tmp_path_factory.getbasetemp() / "embedding_cache"
    env = {"CASAM_CACHE": str(base / "casam_cache")}
    with single_thread():
        for style, count, seed in (("stripes", 6, 3), ("dots", 6, 3), ("plasma", 5, 9)):
            result = invoke(["synth", str(base / style), "--style", style, "--count", str(count), "--seed", str(seed)], env)
            assert result.exit_code == 0, result.output
        for style in ("stripes", "dots"):
            stems = sorted(p.stem for p in (base / style / "images").iterdir())
            atomic_write_json(base / style / "split.json", {"train": stems[:4], "test": stems[4:]})
        summary = base / "summary.json"
        result = invoke(["--bundle", str(base / "bundle"), "--task", "stripes", "--data", str(base / "stripes"),
                         "--json-summary", str(summary), "--cache-dir", str(cache)] + TRAIN, env)
        assert result.exit_code == 0, result.output
        yield {"base": base, "env": env, "cache": str(cache), "summary": read_json(summary)}


def test_help_explains_every_option():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for option in ("--bundle", "--task", "--data", "--sam", "--checkpoint", "--epochs", "--batch-size", "--lr",
                   "--masks-per-image", "--vae-epochs", "--vae-lr", "--beta", "--folds", "--percentile", "--resize",
                   "--seed", "--device", "--replace", "--resume", "--quiet", "--cache-dir", "--json-summary",
                   "eval", "sequence", "synth"):
        assert option in result.output, option
    for sub in ("eval", "sequence", "synth"):
        sub_help = CliRunner().invoke(main, [sub, "--help"])
        assert sub_help.exit_code == 0 and "Usage" in sub_help.output


def test_cli_end_to_end_train_and_eval(cli_run):
    base, env = cli_run["base"], cli_run["env"]
    summary = cli_run["summary"]
    assert summary["task"] == "stripes" and summary["tasks"] == ["stripes"]
    assert summary["metrics"]["n_train"] == 4 and summary["metrics"]["n_test"] == 2
    bundle = Bundle.open(base / "bundle")
    assert bundle.sam_model == "tiny" and bundle.task_names == ["stripes"]
    out = base / "eval.json"
    result = invoke(["eval", "--bundle", str(base / "bundle"), "--data", f"stripes={base / 'stripes'}",
                     "--ood", str(base / "plasma"), "--out", str(out), "--device", "cpu", "--quiet",
                     "--cache-dir", cli_run["cache"]], env)
    assert result.exit_code == 0, result.output
    assert "routing acc" in result.output and "OOD plasma" in result.output
    report = read_json(out)
    assert report["tasks"][0]["count"] == 2 and report["tasks"][0]["routing_accuracy"] is not None
    assert report["ood"][0]["count"] == 5 and 0.0 <= report["ood"][0]["rejection_rate"] <= 1.0


def test_cli_errors_are_one_line_with_exit_code_2(cli_run, tmp_path):
    base, env = cli_run["base"], cli_run["env"]
    result = CliRunner().invoke(main, ["--bundle", str(base / "bundle"), "--task", "stripes", "--data",
                                       str(base / "stripes")] + TRAIN, env=env)
    line = one_error_line(result)
    assert "already exists" in line and "--replace" in line, line
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    (bad / "images" / "x.png").write_bytes(b"not an image")
    result = CliRunner().invoke(main, ["--bundle", str(tmp_path / "b"), "--task", "t", "--data", str(bad)] + TRAIN, env=env)
    assert "x.png" in one_error_line(result)
    assert not (tmp_path / "b").exists()  # nothing written for bad data


def test_sequence_writes_matrices_metrics_and_report(cli_run):
    base, env = cli_run["base"], cli_run["env"]
    out = base / "seq"
    result = invoke(["sequence", "--bundle", str(base / "bundle"), "--tasks", f"stripes={base / 'stripes'}",
                     f"dots={base / 'dots'}", "--methods", "casam,sam", "--out", str(out),
                     "--json-summary", str(base / "seq_summary.json"), "--cache-dir", cli_run["cache"]] + TRAIN, env)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sequence.json").read_text())
    assert report["tasks"] == ["stripes", "dots"] and report["trained"] == {"casam": ["dots"]}  # stripes kept as it was
    casam = report["results"]["casam"]
    iou = casam["iou_matrix"]
    assert iou[1][0] is None and all(v is not None for v in (iou[0][0], iou[0][1], iou[1][1]))
    nan = float("nan")
    expected = continual_metrics([[iou[0][0], iou[0][1]], [nan, iou[1][1]]], report["test_sizes"])
    # float64 means of a few IoUs, recomputed from the same values: approx's rel 1e-6 is far
    # above float64 rounding and far below a wrong formula.
    assert casam["iou"]["per_stage"] == pytest.approx(expected.pop("per_stage"))
    assert {k: casam["iou"][k] for k in expected} == pytest.approx(expected)
    for method in ("casam", "sam"):
        assert (out / f"{method}_iou_matrix.csv").read_text().count("\n") == 3
        assert (out / f"{method}_biou_matrix.csv").is_file()
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 4
    assert Bundle.open(base / "bundle").task_names == ["stripes", "dots"]
