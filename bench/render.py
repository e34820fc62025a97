"""Render the tables of BENCHMARKS.md from the records in bench/results/.

BENCHMARKS.md is hand-written prose around generated blocks; each block sits between a
marker and ``<!-- end -->`` and is replaced on every render:

- ``<!-- table: RECORD#TABLE -->``: one table of one record (``RECORD`` is the file name
  without ``.json``), followed by a line naming the record, its CPU, date and load;
- ``<!-- summary -->``: the targets at a glance. Each target names a benchmark, a table, a
  row and a column; its figure is taken from the *latest* record of that benchmark that
  holds it, and met or missed is computed from the figure and the target's bound;
- ``<!-- records -->``: every record, with where it came from.

Rendering is a pure function of the records and the prose, so the output is byte for byte
the same on every machine: ``make bench-report`` writes it, ``--check`` (and
tests/test_bench_report.py) fails when the committed file differs.

    python bench/render.py [--check] [--doc BENCHMARKS.md] [--results-dir bench/results]
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from common import RESULTS, ROOT, Table, atomic_write_text, cell, load_record

DOC = ROOT / "BENCHMARKS.md"
BLOCK = re.compile(r"(<!-- (table: [^>]+|summary|records) -->\n)(.*?)(<!-- end -->)", re.S)
Records = dict[str, dict[str, Any]]


def load_records(folder: Path) -> Records:
    """Every record of ``folder`` by file stem."""
    return {p.stem: load_record(p) for p in sorted(folder.glob("*.json"))}


def source_line(stem: str, record: dict[str, Any]) -> str:
    """Where a table's figures come from: the record, its CPU, date, load and origin."""
    cpu = record.get("cpu") or {}
    parts = [f"Record `bench/results/{stem}.json`"]
    machine = cpu.get("model") or "CPU model not recorded"
    if cpu.get("cores"):
        machine += f", {cpu['cores']} cores"
    parts.append(machine)
    parts.append(f"recorded {record['recorded'][:10]}")
    load = record.get("load") or {}
    loads = [f"{w} {', '.join(f'{x:g}' for x in load[w])}" for w in ("before", "after") if load.get(w)]
    parts.append("load average " + "; ".join(loads) if loads else "load average not recorded")
    converted = record.get("converted")
    if converted:
        parts.append(f"converted from `{converted['from']}` at {converted['at_commit'][:7]}")
    elif (record.get("commit") or {}).get("commit"):
        dirty = " with local changes" if record["commit"].get("dirty") else ""
        parts.append(f"code at {record['commit']['commit'][:7]}{dirty}")
    return parts[0] + ": " + ", ".join(parts[1:]) + "."


def render_table(spec: str, records: Records) -> str:
    stem, _, name = spec.partition("#")
    if stem not in records:
        raise SystemExit(f"render: no record bench/results/{stem}.json")
    tables = records[stem]["tables"]
    if name not in tables:
        raise SystemExit(f"render: record {stem} has no table {name!r} (it has {', '.join(tables)})")
    return Table.from_json(tables[name]).markdown() + "\n\n" + source_line(stem, records[stem]) + "\n"


# ----- the summary ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """A promise and where its figure lives: benchmark ``record``, its ``table``, the row
    whose first cells are ``row`` (None: the first row) and the column whose name starts
    with ``column``; or ``derive``, a function of a record's tables. ``op`` None: reported,
    no bound. ``stale_before``: (date, change) the figure's code changed on, so a record
    older than it is marked stale."""

    label: str
    record: str
    table: str = ""
    row: Any = None
    column: str = ""
    op: Optional[str] = None
    bound: Optional[float] = None
    derive: Optional[Callable[[dict[str, Any]], Optional[tuple[float, str]]]] = None
    stale_before: Optional[tuple[str, str]] = None
    unit: str = ""


def lookup(tables: dict[str, Any], target: Target) -> Optional[tuple[Any, str]]:
    """(value, format) of the target's cell in one record's tables, or None."""
    if target.derive is not None:
        return target.derive(tables)
    if target.table not in tables:
        return None
    table = Table.from_json(tables[target.table])
    keys = target.row if isinstance(target.row, tuple) else (target.row,)
    row = next((r for r in table.rows if target.row is None or tuple(r[: len(keys)]) == keys), None)
    col = next((i for i, c in enumerate(table.columns) if c.name.startswith(target.column)), None)
    if row is None or col is None or row[col] is None:
        return None
    return row[col], table.columns[col].fmt


def peak_fraction(label: str) -> Callable[[dict[str, Any]], Optional[tuple[float, str]]]:
    """The best backend's GMAC/s on encoder ``label`` over the onnxruntime fp32 GEMM
    GMAC/s of the same record (the cpu_peak 'figures' table)."""
    def derive(tables: dict[str, Any]) -> Optional[tuple[float, str]]:
        if "encoders" in tables and "peaks" in tables:  # the records of today's cpu_peak.py
            peaks, encoders = Table.from_json(tables["peaks"]), Table.from_json(tables["encoders"])
            gemm = next((r[4] for r in peaks.rows if r[0] == "GEMM 2048³ fp32" and r[1] == "onnxruntime"), None)
            rates = [r[5] for r in encoders.rows if r[0] == label]
        elif "figures" in tables:  # the converted record of 2026-12-03
            table = Table.from_json(tables["figures"])
            gemm = table.value("GEMM 2048³ fp32 (onnxruntime)", "GMAC/s")
            rates = [r[3] for r in table.rows if str(r[0]).startswith(f"{label} encoder")]
        else:
            return None
        if not gemm or not rates:
            return None
        return max(rates) / gemm, "{:.2f} of the onnxruntime fp32 GEMM 2048³ rate"
    return derive


OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b, "==": lambda a, b: a == b}

TARGETS = [
    Target("AlignmentLayer parameters = 3,541,007", "encoder_time", "parameters",
           "AlignmentLayer (3 CAResBlocks, 256)", "parameters", "==", 3541007),
    Target("SAM vit_b parameters = 93,735,472", "encoder_time", "parameters", "SAM vit_b (all)", "parameters", "==",
           93735472),
    Target("embedding cache: later epochs ≥ 5× faster, vit_b", "train_throughput", "speedup", "vit_b", "cache on", ">=", 5),
    Target("runtime ≥ 2× eager end to end, tiny", "infer_latency", "tiny", "**end to end**", "ratio", ">=", 2),
    Target("runtime ≥ 1.5× eager end to end, vit_b", "infer_latency", "vit_b", "**end to end**", "ratio", ">=", 1.5),
    Target("postprocess no slower than torch (768×1024, one mask)", "infer_latency", "tiny", "postprocess", "ratio",
           ">=", 1.0),
    Target("router ≤ 1 % of the vit_b encoder at 100 tasks", "infer_latency", "router_vs_vit_b", 100,
           "share of the vit_b", "<=", 1.0),
    Target("8 boxes in one decoder call no slower than 8 calls, tiny", "infer_latency", "boxes_tiny", "runtime",
           "separate / batched", ">=", 1.0),
    Target("8 boxes in one decoder call no slower than 8 calls, vit_b", "infer_latency", "boxes_vit_b", "runtime",
           "separate / batched", ">=", 1.0),
    Target("casam-infer peak RSS ≤ 1200 MB, vit_b fp32", "infer_latency", "rss", "vit_b", "peak RSS MB", "<=", 1200, unit=" MB"),
    Target("fp16 export mask IoU ≥ 0.99 against fp32 PyTorch, tiny", "export_size_time", "exports", ("tiny", "fp16"),
           "mean mask IoU", ">=", 0.99, stale_before=("2026-11-30", "the lean decoder")),
    Target("fp16 export mask IoU ≥ 0.99 against fp32 PyTorch, vit_b", "export_size_time", "exports",
           ("vit_b", "fp16"), "mean mask IoU", ">=", 0.99, stale_before=("2026-11-30", "the lean decoder")),
    Target("casam-serve ≥ 0.9× the local loop at concurrency 8, CPU", "serve_throughput", "clients",
           ("casam-serve (http)", 8), "× local loop", ">=", 0.9),
    Target("casam-infer --concurrency 8 ≥ 1.5× --concurrency 1, tiny, local casam-serve", "infer_concurrency",
           "levels", 8, "× concurrency 1", ">=", 1.5),
    Target("vit_b int8 encoder ≥ 2× fp32", "int8_speed_vit_b", "stages", "encoder", "fp32 / int8", ">=", 2),
    Target("tiny int8 end to end ≥ 1.5× fp32", "int8_speed_tiny", "stages", "**end to end**", "fp32 / int8", ">=", 1.5),
    Target("vit_b int8 mask IoU against fp32, real images, mean", "int8_speed_vit_b", "iou_summary", None, "mean IoU"),
    Target("casam-infer peak RSS ≤ 600 MB, int8 vit_b", "int8_speed_vit_b", "rss", "int8", "casam-infer peak RSS",
           "<=", 600, unit=" MB"),
    Target("the better CPU backend ≥ 0.70 of the onnxruntime fp32 GEMM peak, vit_b fp32 encoder", "cpu_peak",
           op=">=", bound=0.70, derive=peak_fraction("vit_b-fp32")),
    Target("onnxruntime time ÷ OpenVINO time, vit_b fp32 encoder", "cpu_peak", "ort_vs_openvino", "vit_b-fp32",
           "onnxruntime / OpenVINO"),
    Target("volume mode no slower per slice than single-image casam-infer", "volume_latency", "modes",
           "volume, --batch 1", "vs casam-infer per slice", ">=", 1.0),
    Target("volume mode no slower per slice than Pipeline.predict in process", "volume_latency", "modes",
           "volume, --batch 1", "vs single image (in process)", ">=", 1.0),
    Target("encoder batching ≥ 1.2× faster per slice (batch 4 against 1), CPU", "volume_latency", "modes",
           "volume, --batch 4", "vs volume batch 1", ">=", 1.2),
    Target("casam-infer peak RSS < 1536 MB, 64-slice volume", "volume_latency", "rss", None, "peak RSS MB", "<", 1536, unit=" MB"),
    Target("mobile_sam casam-infer chain ≤ 0.6 s per 1024² image, fp32", "encoder_variants", "variants",
           ("mobile_sam", "fp32"), "chain s", "<=", 0.6, unit=" s"),
    Target("mobile_sam chain ≥ 10× faster than vit_b's, fp32, same run", "encoder_variants", "variants",
           ("mobile_sam", "fp32"), "vs vit_b", ">=", 10),
    Target("mobile_sam chain vs vit_b's, int8, same run", "encoder_variants", "variants", ("mobile_sam", "int8"),
           "vs vit_b"),
    Target("efficientvit_sam_l0 casam-infer chain ≤ 0.5 s per image, fp32", "encoder_variants", "variants",
           ("efficientvit_sam_l0", "fp32"), "chain s", "<=", 0.5, unit=" s"),
    Target("casam-infer peak RSS ≤ 400 MB, mobile_sam fp32", "encoder_variants", "variants", ("mobile_sam", "fp32"),
           "peak RSS MB", "<=", 400, unit=" MB"),
    Target("casam-infer peak RSS ≤ 400 MB, efficientvit_sam_l0 fp32", "encoder_variants", "variants",
           ("efficientvit_sam_l0", "fp32"), "peak RSS MB", "<=", 400, unit=" MB"),
    Target("GPU suite on an H200 (bench/gpu_suite.py)", "gpu_suite", "rows"),
]


def latest(target: Target, records: Records) -> Optional[tuple[str, Any, str]]:
    """(record stem, value, format) from the latest record of the target's benchmark that
    holds its figure."""
    mine = sorted((r["recorded"], stem) for stem, r in records.items() if r["name"] == target.record)
    for _, stem in reversed(mine):
        found = lookup(records[stem]["tables"], target)
        if found is not None:
            return stem, found[0], found[1]
    return None


def status(target: Target, record: dict[str, Any], value: Any) -> str:
    """met / missed / reported, with the record's load when it exceeded the core count and
    a stale mark when the record predates a change to what it measures."""
    verdict = "reported" if target.op is None else ("met" if OPS[target.op](value, target.bound) else "**missed**")
    marks = []
    load = max((x[0] for x in (record.get("load") or {}).values() if x), default=None)  # 1-minute averages
    cores = (record.get("cpu") or {}).get("cores")
    if load is not None and cores and load > cores:
        marks.append(f"under load {load:g} on {cores} cores")
    if target.stale_before and record["recorded"][:10] < target.stale_before[0]:
        marks.append(f"stale: recorded before {target.stale_before[1]} ({target.stale_before[0]})")
    return verdict + (f" ({'; '.join(marks)})" if marks else "")


def render_summary(records: Records) -> str:
    table = Table.of("target", "measured", "record", "status")
    for target in TARGETS:
        found = latest(target, records)
        if found is None:
            table.add(target.label, None, "no record", "not measured")
            continue
        stem, value, fmt = found
        model = (records[stem].get("cpu") or {}).get("model") or "CPU not recorded"
        table.add(target.label, cell(value, fmt) + target.unit, f"`{stem}` ({model})", status(target, records[stem], value))
    return table.markdown() + "\n"


def render_index(records: Records) -> str:
    table = Table.of("record", "benchmark", "recorded", "CPU", "load after", "origin")
    for stem, r in sorted(records.items(), key=lambda kv: (kv[1]["recorded"], kv[0])):
        load = (r.get("load") or {}).get("after")
        origin = (f"converted from `{r['converted']['from']}` at {r['converted']['at_commit'][:7]}"
                  if r.get("converted") else f"`{' '.join(r.get('command') or [])}`")
        table.add(f"`{stem}`", r["name"], r["recorded"][:10], (r.get("cpu") or {}).get("model"),
                  ", ".join(f"{x:g}" for x in load) if load else None, origin)
    return table.markdown() + "\n"


def render(doc: str, records: Records) -> str:
    """``doc`` with every generated block rendered again from ``records``."""
    def block(m: re.Match) -> str:
        kind = m.group(2)
        if kind == "summary":
            body = render_summary(records)
        elif kind == "records":
            body = render_index(records)
        else:
            body = render_table(kind[len("table: "):].strip(), records)
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(block, doc)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--check", action="store_true", help="fail if the document differs from a fresh render")
    args = parser.parse_args(argv)
    current = args.doc.read_text(encoding="utf-8")
    fresh = render(current, load_records(args.results_dir))
    if args.check:
        if fresh != current:
            print(f"{args.doc}: differs from its render from {args.results_dir}; run `make bench-report`",
                  file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        atomic_write_text(args.doc, fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
