"""What the export folder's manifest.json says, and what an existing one lets us reuse.

The manifest is the only contract with the runtime (docs/FORMATS.md). Each graph entry
also records ``built_from``: everything its bytes depend on (checkpoint sha, alignment
file sha, opset, precision …). A later export reuses a graph only when ``built_from`` is
unchanged *and* the file on disk still has the recorded sha256, which is how adding a task
re-exports only its alignment graph and the router while the encoder stays untouched.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Mapping, Optional

from casam_export.errors import ExportError
from runtime.files import read_json, sha256_file
from runtime.manifest import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, MANIFEST_NAME
from casam_bundle import THRESHOLD_KEYS, Bundle

#: What an --out folder may hold without being someone else's: this export's own files.
EXPORT_ENTRIES = {MANIFEST_NAME, "encoder.onnx", "encoder.onnx.data", "router.onnx", "decoder.onnx",
                  "align", "trt", "parity.json", ".staging"}


def read_previous(out: Path) -> Optional[dict[str, Any]]:
    """The manifest already in ``out``, or None when there is none (or it is unreadable)."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except (ValueError, OSError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or data.get("format_version") != MANIFEST_FORMAT_VERSION:
        return None
    return data


def same_bundle(previous: Mapping[str, Any], bundle: Bundle) -> bool:
    """Is ``previous`` an export of this bundle (maybe with fewer tasks, maybe moved)?

    The same bundle folder counts, and so does any bundle in which every previously
    exported task is still present with the same alignment weights: a bundle only grows.
    """
    if previous.get("bundle", {}).get("path") == str(bundle.root.resolve()):
        return True
    tasks = previous.get("tasks") or []
    if not tasks:
        return False
    current = {r.name: r.files.get("alignment.safetensors") for r in bundle.tasks}
    return all(current.get(t.get("name")) == t.get("align", {}).get("built_from", {}).get("alignment_sha256")
               for t in tasks)


def claim_out_dir(out: Path, bundle: Bundle, force: bool) -> Optional[dict[str, Any]]:
    """Check that ``out`` may be written; return the previous manifest worth reusing.

    A folder with another bundle's export, or with files that are not an export's, is
    refused without ``force``; with ``force`` nothing in it is reused.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    previous = read_previous(out) if out.is_dir() else None
    if force:
        return None
    if previous is not None:
        if not same_bundle(previous, bundle):
            owner = previous.get("bundle", {}).get("path", "another bundle")
            raise ExportError(f"--out {out} holds the export of {owner}, not of {bundle.root}; pass --force to overwrite it")
        return previous
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES and not p.name.startswith(".")) if out.is_dir() else []
    if foreign:
        raise ExportError(f"--out {out} is not empty and holds no casam export ({', '.join(foreign[:5])}); "
                          "pass --force to write into it anyway")
    return None


def reusable(entry: Optional[Mapping[str, Any]], built_from: Mapping[str, Any], out: Path) -> bool:
    """True when ``entry`` (None: no previous export) was built from exactly ``built_from`` and its files are intact."""
    if not entry or entry.get("built_from") != dict(built_from):
        return False
    files = [(entry.get("file"), entry.get("sha256"))]
    if entry.get("external_data"):
        files.append((entry["external_data"].get("file"), entry["external_data"].get("sha256")))
    for rel, sha in files:
        if not rel or not (out / rel).is_file() or sha256_file(out / rel) != sha:
            return False
    return True


def graph_entries(manifest: Optional[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """``{"encoder": entry, …, "align/<task>": entry}`` of a manifest ({} for None)."""
    if manifest is None:
        return {}
    graphs = dict(manifest.get("graphs") or {})
    for task in manifest.get("tasks") or []:
        if isinstance(task, Mapping) and "align" in task:
            graphs[f"align/{task.get('name')}"] = task["align"]
    return graphs


def task_entries(bundle: Bundle, aligns: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per task, in router order: τ, the other calibrated percentiles, and its align graph."""
    entries = []
    for index, record in enumerate(bundle.tasks):
        calibration = bundle.load_calibration(record.name)
        entries.append({
            "name": record.name,
            "index": index,
            "threshold": float(record.threshold),
            "threshold_key": record.threshold_key,
            "thresholds": {k: float(calibration[k]) for k in THRESHOLD_KEYS if k in calibration},
            "align": dict(aligns[record.name]),
        })
    return entries


def build_manifest(
    bundle: Bundle,
    sam_sha: str,
    graphs: Mapping[str, Mapping[str, Any]],
    aligns: Mapping[str, Mapping[str, Any]],
    *,
    opset: int,
    precision: str,
    max_prompts: int,
    tensorrt: Mapping[str, Any],
    parity: Optional[Mapping[str, Any]],
) -> dict[str, Any]:
    from runtime import __version__

    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "casam_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bundle": {"bundle_json_sha256": sha256_file(bundle.root / "bundle.json"), "path": str(bundle.root.resolve())},
        "sam": {"model": bundle.sam_model, "checkpoint_sha256": sam_sha},
        "preprocessing": bundle.preprocessing.to_dict(),
        "pooling": {"temperature": bundle.temperature},
        "opset": opset,
        "precision": precision,
        "max_prompts": max_prompts,
        "graphs": {k: dict(v) for k, v in graphs.items()},
        "tasks": task_entries(bundle, aligns),
        "tensorrt": dict(tensorrt),
        "parity": dict(parity) if parity is not None else None,
    }
