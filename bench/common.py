"""What every bench script shares: the preamble of a run and the one record writer.

A benchmark's figures are data, not prose: each script calls :func:`start` before it
measures (CPU model and flags, load average, date, git commit, command line) and
:func:`write_record` after, which writes one JSON record to ``bench/results/<name>-<date>.json``
with the load average after the run. ``bench/render.py`` renders the tables of
BENCHMARKS.md from those records, so no figure is copied by hand.

A record holds tables (:class:`Table`: named columns with a number format, rows of
values), so the renderer and the script print the same cells from the same numbers.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCHEMA = 1
# The CPU features that decide fp32 and int8 speed; a record lists those the CPU has.
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from casam_core.files import atomic_write_text  # noqa: E402


# ----- tables -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A table column: its header and the ``str.format`` pattern of its numbers
    (text cells are printed as they are, ``None`` as an em dash)."""

    name: str
    fmt: str = "{}"


def cell(value: Any, fmt: str) -> str:
    """One cell as printed: the one place numbers become text, for scripts and renderer alike."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


@dataclass
class Table:
    """Rows of figures under named columns; what a record stores and BENCHMARKS.md shows."""

    columns: list[Column]
    rows: list[list[Any]] = field(default_factory=list)

    @classmethod
    def of(cls, *columns: tuple[str, str] | str) -> "Table":
        """``Table.of(("stage", ""), ("runtime ms", "{:.1f}"), ...)``; a bare name is a text column."""
        return cls([Column(c) if isinstance(c, str) else Column(c[0], c[1] or "{}") for c in columns])

    def add(self, *values: Any) -> None:
        if len(values) != len(self.columns):
            raise ValueError(f"row of {len(values)} cells for {len(self.columns)} columns")
        self.rows.append(list(values))

    def markdown(self) -> str:
        def line(cells: list[str]) -> str:
            return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

        lines = [line([c.name for c in self.columns]), "|" + "---|" * len(self.columns)]
        lines += [line([cell(v, c.fmt) for v, c in zip(row, self.columns)]) for row in self.rows]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"columns": [{"name": c.name, "format": c.fmt} for c in self.columns], "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Table":
        return cls([Column(c["name"], c["format"]) for c in data["columns"]], [list(r) for r in data["rows"]])

    def row(self, key: Any) -> Optional[list[Any]]:
        """The first row whose first cell is ``key`` (tables are keyed by their first column)."""
        return next((r for r in self.rows if r and r[0] == key), None)

    def value(self, key: Any, column: str) -> Any:
        """The cell of row ``key`` in ``column``; None when either is absent."""
        row = self.row(key)
        names = [c.name for c in self.columns]
        return row[names.index(column)] if row is not None and column in names else None


# ----- the preamble -------------------------------------------------------------------------
def cpu() -> dict[str, Any]:
    """CPU model, logical cores, clock the kernel reports, and which of FLAGS it has
    (/proc/cpuinfo): figures from a shared VM mean little without them."""
    path = Path("/proc/cpuinfo")
    info = path.read_text() if path.exists() else ""
    lines = info.splitlines()

    def first(key: str) -> Optional[str]:
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == key), None)

    flags = set((first("flags") or "").split())
    mhz = first("cpu MHz")
    return {"model": first("model name") or platform.processor() or "unknown", "cores": os.cpu_count(),
            "mhz": float(mhz) if mhz else None, "flags": [f for f in FLAGS if f in flags],
            "arch": platform.machine()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> dict[str, Any]:
    """The commit the measured code came from, and whether the tree had changes."""
    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def software() -> dict[str, str]:
    """Versions of what the figures depend on; only modules the script already imported
    (importing torch here would cost seconds and memory the run did not use)."""
    out = {"python": platform.python_version()}
    for name in ("numpy", "onnxruntime", "torch", "openvino", "onnx"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = str(module.__version__)
    return out


@dataclass
class Run:
    """The preamble of one benchmark run, taken before anything is measured."""

    name: str
    command: list[str]
    started: str
    commit: dict[str, Any]
    cpu: dict[str, Any]
    load_before: list[float]


def start(name: str, argv: Optional[Sequence[str]] = None) -> Run:
    """Record the preamble of a run named ``name`` (the record's file name starts with it)."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"bad record name {name!r}")
    command = [Path(sys.argv[0]).name if sys.argv else "python", *(sys.argv[1:] if argv is None else argv)]
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    return Run(name, command, now.isoformat(), git_commit(), cpu(), load_average())


def add_results_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="where the JSON record goes (default: bench/results)")


def record_path(folder: Path, name: str, date: str) -> Path:
    """``<name>-<date>.json``, or ``-2``, ``-3``… when that day already has one: a rerun
    never replaces an earlier record."""
    path, n = folder / f"{name}-{date}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{name}-{date}-{n}.json"
    return path


def dumps(record: dict[str, Any]) -> str:
    """The one JSON layout of a record (stable, so a record diffs cleanly)."""
    return json.dumps(record, indent=1, ensure_ascii=False) + "\n"


def write_record(run: Run, tables: dict[str, Table], *, setup: str = "", notes: Sequence[str] = (),
                 folder: Path = RESULTS) -> Path:
    """Write the record of ``run`` and print its tables; returns the record's path."""
    record = {"schema": SCHEMA, "name": run.name, "recorded": run.started, "command": run.command,
              "commit": run.commit, "cpu": run.cpu, "software": software(),
              "load": {"before": run.load_before, "after": load_average()}, "setup": setup,
              "notes": list(notes), "tables": {k: t.to_json() for k, t in tables.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    path = record_path(folder, run.name, run.started[:10])
    atomic_write_text(path, dumps(record))
    print(f"# {run.name}\n\n{setup}\n")
    for key, table in tables.items():
        print(f"{key}:\n\n{table.markdown()}\n")
    for note in notes:
        print(note)
    print(f"record: {path}")
    return path


def load_record(path: Path) -> dict[str, Any]:
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if record.get("schema") != SCHEMA:
        raise ValueError(f"{path}: record schema {record.get('schema')!r}, expected {SCHEMA}")
    return record
