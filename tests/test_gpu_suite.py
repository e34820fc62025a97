"""bench/gpu_suite.py runs end to end on the CPU (--device cpu, tiny), so its plumbing is
known to work before any GPU time is spent (issue 14)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime_support import exported

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_gpu_suite_runs_on_cpu(tmp_path_factory, tmp_path):
    import gpu_suite

    bundle, engines = exported(tmp_path_factory)  # the session's shared tiny export
    out = tmp_path / "suite"
    # One timed call each and no warm-ups, the export's own router: plumbing, not figures.
    gpu_suite.main(["--device", "cpu", "--runs", "1", "--warmups", "0", "--router-tasks", "0", "--bundle", str(bundle),
                    "--engines", f"fp32={engines}", "--work", str(tmp_path / "work"), "--out", str(out),
                    "--results-dir", str(tmp_path / "records")])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["models"][0]["rows"]
    assert result["device"] == "cpu" and result["models"][0]["model"] == "tiny"
    assert set(rows) == {"eager fp32", "eager bf16", "casam ort-cpu fp32"}
    for row in rows.values():
        assert set(row) == {"encoder_ms", "chain_ms", "boxes8_batched_ms", "boxes8_separate_ms"}
        assert all(v > 0 for v in row.values())
        assert row["chain_ms"] > row["encoder_ms"]  # the chain contains the encoder
    assert result["router"]["tasks"] == 2 and result["router"]["runtime_ms"] > 0
    assert set(result["targets"]["tiny"]["met"]) == {"chain_over_encoder", "chain_vs_eager_fp32", "boxes8"}
    table = out.with_suffix(".md").read_text()
    assert "| tiny | casam ort-cpu fp32 |" in table and "router at 2 tasks" in table
    (record_path,) = (tmp_path / "records").glob("gpu_suite-*.json")  # the common record, beside the raw figures
    record = json.loads(record_path.read_text())
    assert record["name"] == "gpu_suite" and record["load"]["before"] and record["cpu"]["cores"]
    chains = record["tables"]["chains"]["rows"]
    assert ["tiny", "casam ort-cpu fp32"] in [row[:2] for row in chains]
    assert {row[1]: row[3] for row in chains}["casam ort-cpu fp32"] == rows["casam ort-cpu fp32"]["chain_ms"]
