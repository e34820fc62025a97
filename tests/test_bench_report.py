"""BENCHMARKS.md is rendered from the records in bench/results/: the committed file
equals a fresh render, every table in it is a rendered one, every record is well formed, the
summary's verdicts are computed from the latest record, and the bench scripts write records
through the one writer."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import render  # noqa: E402

DOC = ROOT / "BENCHMARKS.md"


def test_committed_benchmarks_equal_a_fresh_render():
    doc = DOC.read_text(encoding="utf-8")
    fresh = render.render(doc, render.load_records(common.RESULTS))
    assert fresh == doc, "BENCHMARKS.md differs from its render from bench/results/: run `make bench-report`"


def test_render_check_fails_when_a_figure_is_edited_by_hand(tmp_path):
    doc = DOC.read_text(encoding="utf-8")
    edited = tmp_path / "BENCHMARKS.md"
    edited.write_text(doc.replace("| 1.90× |", "| 2.10× |", 1), encoding="utf-8")
    assert edited.read_text(encoding="utf-8") != doc  # the edit hit a rendered table
    assert render.main(["--check", "--doc", str(edited)]) == 1
    assert render.main(["--doc", str(edited)]) == 0  # a render puts the record's figure back
    assert edited.read_text(encoding="utf-8") == doc


def test_every_table_in_benchmarks_is_rendered_from_a_record():
    """A table line outside a generated block would be a figure copied by hand."""
    outside = render.BLOCK.sub("", DOC.read_text(encoding="utf-8"))
    assert [line for line in outside.splitlines() if line.lstrip().startswith("|")] == []
    blocks = render.BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert any(kind == "summary" for _, kind, _, _ in blocks)
    for _, kind, body, _ in blocks:
        if kind.startswith("table: "):
            stem = kind[len("table: "):].partition("#")[0]
            assert f"Record `bench/results/{stem}.json`" in body  # each table names its record


def test_every_record_is_well_formed():
    records = render.load_records(common.RESULTS)
    assert len(records) >= 20
    for stem, record in records.items():
        assert re.fullmatch(rf"{re.escape(record['name'])}-\d{{4}}-\d{{2}}-\d{{2}}(-\d+)?", stem), stem
        assert stem[len(record["name"]) + 1:][:10] == record["recorded"][:10], stem
        assert {"recorded", "commit", "cpu", "load", "tables", "setup"} <= set(record), stem
        assert record["tables"], stem
        for name, data in record["tables"].items():
            table = common.Table.from_json(data)
            assert all(len(row) == len(table.columns) for row in table.rows), (stem, name)
            table.markdown()  # every cell prints with its column's format
        if record.get("converted"):
            assert (record["converted"]["from"].startswith("bench/results/")
                    and re.fullmatch(r"[0-9a-f]{40}", record["converted"]["at_commit"])), stem
        else:
            assert record["command"] and record["load"]["before"] and record["load"]["after"], stem


def _record(folder: Path, stem: str, name: str, recorded: str, ratio: float, load: float = 1.0) -> None:
    table = common.Table.of("stage", ("runtime ms", "{:.1f}"), ("eager ms", "{:.1f}"), ("ratio", "{:.2f}×"))
    table.add("**end to end**", 100.0, 100.0 * ratio, ratio)
    record = {"schema": common.SCHEMA, "name": name, "recorded": recorded, "command": ["x"], "commit": {},
              "cpu": {"model": "test CPU", "cores": 2}, "load": {"before": [load, 0, 0], "after": [load, 0, 0]},
              "setup": "", "notes": [], "tables": {"tiny": table.to_json()}}
    (folder / f"{stem}.json").write_text(common.dumps(record), encoding="utf-8")


def test_summary_verdict_comes_from_the_latest_record_that_holds_the_figure(tmp_path):
    _record(tmp_path, "infer_latency-2026-01-01", "infer_latency", "2026-01-01T00:00:00+00:00", 2.30)
    _record(tmp_path, "infer_latency-2026-01-02", "infer_latency", "2026-01-02T00:00:00+00:00", 1.90)
    summary = render.render_summary(render.load_records(tmp_path))
    row = next(line for line in summary.splitlines() if line.startswith("| runtime ≥ 2× eager end to end, tiny"))
    assert "| 1.90× | `infer_latency-2026-01-02` (test CPU) | **missed** |" in row
    # a newer record meets it; one under load says so
    _record(tmp_path, "infer_latency-2026-01-03", "infer_latency", "2026-01-03T00:00:00+00:00", 2.05, load=7.5)
    summary = render.render_summary(render.load_records(tmp_path))
    row = next(line for line in summary.splitlines() if line.startswith("| runtime ≥ 2× eager end to end, tiny"))
    assert "| 2.05× | `infer_latency-2026-01-03` (test CPU) | met (under load 7.5 on 2 cores) |" in row
    # a target with no record is "not measured", never met
    assert "| vit_b int8 encoder ≥ 2× fp32 | — | no record | not measured |" in summary


def test_write_record_writes_the_preamble_and_never_replaces_a_record(tmp_path, capsys):
    run = common.start("unit_test", ["--flag"])
    table = common.Table.of("what", ("ms", "{:.1f}"))
    table.add("thing", 1.25)
    first = common.write_record(run, {"t": table}, setup="s", folder=tmp_path)
    second = common.write_record(run, {"t": table}, setup="s", folder=tmp_path)
    assert first.name == f"unit_test-{run.started[:10]}.json" and second.name == f"unit_test-{run.started[:10]}-2.json"
    record = json.loads(first.read_text(encoding="utf-8"))
    assert record["command"][1:] == ["--flag"] and record["cpu"]["cores"] and record["cpu"]["model"]
    assert len(record["load"]["before"]) == 3 and len(record["load"]["after"]) == 3
    assert record["tables"]["t"]["rows"] == [["thing", 1.25]]
    assert "| thing | 1.2 |" in capsys.readouterr().out  # printed from the same table ("{:.1f}" rounds half to even)


SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if p.stem not in ("common", "render", "convert_legacy"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_every_bench_script_writes_its_record_through_the_one_writer(script):
    text = script.read_text(encoding="utf-8")
    assert "write_record(" in text and "start(" in text
    assert not re.search(r'"results" / "[\w.-]+\.md"', text)  # no Markdown results file of its own


def test_every_record_the_documents_cite_exists():
    """A figure cited as "(bench/results/NAME.json)" in the README, docs/, EVALUATION.md or
    the prose of BENCHMARKS.md names a record that is there."""
    records = render.load_records(common.RESULTS)
    cited = set()
    for doc in [ROOT / "README.md", ROOT / "EVALUATION.md", DOC, *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        cited |= {(doc.name, m) for m in re.findall(r"bench/results/([\w.-]+?)\.json", text)}
        cited |= {(doc.name, m) for m in re.findall(r"`([a-z0-9_]+-\d{4}-\d{2}-\d{2}(?:-\d+)?)`", text)}
    assert cited, "no document cites a record"
    assert [(doc, stem) for doc, stem in sorted(cited) if stem not in records] == []
