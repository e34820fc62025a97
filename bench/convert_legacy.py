"""Convert the Markdown results of the sessions before JSON records into records.

Until 2026-12-03 each bench script wrote a Markdown file to bench/results/; those files
are read here from git (the commit that wrote each version), their tables parsed into
:class:`common.Table` and checked to print back byte for byte, and each written as a
record marked ``converted`` with its provenance: the source path and commit, the commit's
time as the record's date (the run's own time and commit were not recorded), and the CPU
and load average as the file states them. Figures stated in a file's prose (the ceiling
of infer_concurrency, the int8 IoU summary, the cache speed-ups, the volume RSS) are
parsed into tables of their own. Nothing is measured.

    python bench/convert_legacy.py [--results-dir bench/results]
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path
from typing import Any, Optional

from common import FLAGS, RESULTS, ROOT, Table, atomic_write_text, dumps, record_path, SCHEMA

# (record name, source file, commits to convert, oldest first; table names in file order)
LEGACY: list[tuple[str, str, list[str], list[str]]] = [
    ("export_size_time", "export_size_time.md", ["596f5ce"], ["exports"]),
    ("serve_throughput", "serve_throughput.md", ["596f5ce"], ["clients"]),
    ("encoder_time", "encoder_time.md", ["e291305"], ["parameters", "encoder_eager"]),
    ("train_throughput", "train_throughput.md", ["e291305"], ["epochs"]),
    ("ort_options", "ort_options.md", ["12c6ecc"], ["settings"]),
    ("graph_variants", "graph_variants.md", ["58ec314"], ["variants"]),
    ("infer_latency", "infer_latency.md", ["39cdc85"],
     ["tiny", "boxes_tiny", "vit_b", "boxes_vit_b", "router_vs_vit_b", "rss"]),
    ("train_scaling", "train_scaling.md", ["f84e9ce"], ["layouts"]),
    ("paper_protocol", "paper_protocol.md", ["c6c51e4"],
     ["summary", "iou_casam", "iou_naive", "iou_sam", "zero_shot", "routing"]),
    ("infer_latency", "infer_latency_intel.md", ["fc0fa31"], ["tiny", "boxes_tiny", "router_vs_tiny", "rss"]),
    ("infer_concurrency", "infer_concurrency.md", ["fc0fa31"], ["levels"]),
    ("paper_protocol", "paper_protocol_lr3e-4.md", ["e060ad5"],
     ["summary", "iou_casam", "iou_naive", "iou_sam", "zero_shot", "routing"]),
    ("infer_latency", "infer_latency_intel_idle.md", ["d4c6e50", "b2fd2fe", "3af0d9c", "053ba5b", "deff864"],
     ["tiny", "boxes_tiny", "router_vs_tiny", "rss"]),
    ("int8_speed_tiny", "int8_speed_tiny.md", ["3af0d9c"], ["stages", "iou", "rss"]),
    ("int8_speed_tiny", "int8_speed_tiny.md", ["e3b0be8", "deff864"], ["stages", "iou"]),
    ("int8_speed_vit_b", "int8_speed_vit_b.md", ["0936148"], ["stages", "iou", "rss"]),
    ("infer_concurrency", "infer_concurrency_idle.md", ["3237220", "3af0d9c", "ab61729"], ["levels"]),
    ("cpu_peak", "cpu_peak.md", ["3af0d9c"], ["figures", "ort_vs_openvino"]),
    ("volume_latency", "volume_latency.md", ["3af0d9c"], ["modes"]),
    ("thread_pool", "thread_pool.md", ["deff864"], ["tiny_predict", "tiny_cli"]),
    ("postprocess_build", "postprocess_build.md", ["13206e9"], ["build"]),
]

NUMBER = re.compile(r"^(-?\d{1,3}(?:,\d{3})+|-?\d+)(?:\.(\d+))?(×|%)?$")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def number_format(text: str) -> Optional[tuple[Any, str]]:
    """(value, format) of a cell that is one plain number, or None for text."""
    m = NUMBER.match(text)
    if not m:
        return None
    whole, decimals, suffix = m.group(1), m.group(2), m.group(3) or ""
    comma = "," if "," in whole else ""
    if decimals is None:
        return int(whole.replace(",", "")), "{:" + comma + "d}" + suffix
    return float(whole.replace(",", "") + "." + decimals), "{:" + comma + f".{len(decimals)}f" + "}" + suffix


def parse_table(lines: list[str]) -> Table:
    """A Markdown table whose numeric columns keep their printed format; a column whose
    numbers were printed in different formats stays text (so it prints back the same)."""
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    header, body = split[0], split[2:]
    columns, cells = [], [[c for c in row] for row in body]
    for j, name in enumerate(header):
        parsed = [number_format(row[j]) for row in body]
        formats = {p[1] for p in parsed if p}
        fmt = formats.pop() if len(formats) == 1 else "{}"
        if fmt != "{}":
            for i, p in enumerate(parsed):
                if p:
                    cells[i][j] = p[0]
        columns.append((name, fmt))
    table = Table.of(*columns)
    for row in cells:
        table.add(*row)
    return table


def blocks(text: str) -> tuple[list[list[str]], str]:
    """(the tables' lines, the prose with each table replaced by a ``[table]`` line)."""
    tables, prose, current = [], [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                tables.append(current)
                prose.append("[table]")
            current.append(line)
        else:
            current = None
            prose.append(line)
    return tables, "\n".join(prose).strip()


def prose_tables(source: str, text: str) -> dict[str, Table]:
    """Figures a file states in its prose, as tables."""
    out: dict[str, Table] = {}
    m = re.search(r"median of (\d+) passes\): ([\d.]+) images/s.*?: ([\d.]+)× concurrency 1", text, re.S)
    if m:
        out["ceiling"] = Table.of("what", ("images/s", "{:.2f}"), ("× concurrency 1", "{:.2f}×"))
        out["ceiling"].add("the chain alone, in process", float(m.group(2)), float(m.group(3)))
    m = re.search(r"mean \*\*([\d.]+)\*\*, min ([\d.]+); routes agree on (\d+) of (\d+)", text)
    if m:
        out["iou_summary"] = Table.of("images", ("mean IoU", "{:.4f}"), ("min IoU", "{:.4f}"), ("routes agree", "{:d}"))
        out["iou_summary"].add(int(m.group(4)), float(m.group(1)), float(m.group(2)), int(m.group(3)))
    speedups = re.findall(r"^- (\w+): ([\d.]+)×$", text, re.M)
    if speedups and source.startswith("train_throughput"):
        out["speedup"] = Table.of("model", ("cache on ÷ off, epochs after the first", "{:.2f}×"))
        for model, value in speedups:
            out["speedup"].add(model, float(value))
    m = re.search(r"Peak RSS of `casam-infer` on the volume \(--batch (\d+)\): \*\*(\d+) MB\*\*", text)
    if m:
        out["rss"] = Table.of("run", ("peak RSS MB", "{:d}"))
        out["rss"].add(f"casam-infer on the volume, --batch {m.group(1)}", int(m.group(2)))
    return out


def machine(text: str) -> dict[str, Any]:
    """The CPU and load the file states (None where it states none)."""
    model = next((m for m in ("Intel(R) Xeon(R) Processor", "AMD EPYC") if m in text), None)
    cores = re.search(r"(\d+)[- ]core|(\d+) cores|(\d+) CPU cores", text)
    flags = re.search(r"flags:? ([a-z0-9_, ]+)[;.]", text)
    loads = re.findall(r"load average(?: at the end)?:? ([\d.]+), ([\d.]+), ([\d.]+)", text, re.I)
    return {"cpu": {"model": model, "cores": int(next(g for g in cores.groups() if g)) if cores else None, "mhz": None,
                    "flags": [f for f in FLAGS if flags and f in flags.group(1).split(", ")] if flags else None,
                    "arch": "x86_64" if "x86_64" in text or model else None},
            "loads": [[float(x) for x in load] for load in loads]}


def convert(name: str, source: str, commit: str, table_names: list[str]) -> dict[str, Any]:
    path = f"bench/results/{source}"
    text = git("show", f"{commit}:{path}")
    found, prose = blocks(text)
    if len(found) != len(table_names):
        raise SystemExit(f"{path}@{commit}: {len(found)} tables, expected {len(table_names)}")
    tables = {}
    for key, lines in zip(table_names, found):
        table = parse_table(lines)
        if table.markdown() != "\n".join(lines):
            raise SystemExit(f"{path}@{commit}: table {key} does not print back the same")
        tables[key] = table
    tables.update(prose_tables(source, text))
    info = machine(text)
    full, when = git("log", "-1", "--format=%H %aI", commit).split()
    loads = info["loads"]
    return {"schema": SCHEMA, "name": name, "recorded": when,
            "command": None, "commit": {"commit": full, "dirty": None},
            "cpu": info["cpu"], "software": {},
            "load": {"before": loads[0] if len(loads) > 1 else None, "after": loads[-1] if loads else None},
            "converted": {"from": path, "at_commit": full,
                          "note": "converted from the Markdown file this commit wrote; the run's own time and "
                                  "commit were not recorded, so 'recorded' is the commit's time and 'commit' "
                                  "the commit that wrote the file; a single load average is the one the file "
                                  "gives 'when written' or 'at the end'"},
            "setup": prose, "notes": [], "tables": {k: t.to_json() for k, t in tables.items()}}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    records = [convert(name, source, commit, tables) for name, source, commits, tables in LEGACY for commit in commits]
    records.sort(key=lambda r: (r["recorded"], r["name"]))
    for record in records:
        path = record_path(args.results_dir, record["name"], record["recorded"][:10])
        atomic_write_text(path, dumps(record))
        print(f"{record['converted']['from']} @ {record['converted']['at_commit'][:7]} -> {path.name}")


if __name__ == "__main__":
    main()
