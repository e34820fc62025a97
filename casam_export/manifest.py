"""What the export folder's manifest.json says, and what an existing one lets us reuse.

The manifest is the only contract with the runtime (docs/FORMATS.md). Each graph entry
also records ``built_from``: everything its bytes depend on (checkpoint sha, alignment
file sha, opset, precision …). A later export reuses a graph only when ``built_from`` is
unchanged *and* the file on disk still has the recorded sha256, which is how adding a task
re-exports only its alignment graph and the router while the encoder stays untouched.

Graph files carry their content in their names (``casam_export.graphs.content_name``), so
the files a deployed manifest names are never overwritten; ``remove_unreferenced`` is the
one place that deletes them, once another manifest is in force.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

from casam_export.errors import ExportError
from casam_core import __version__
from casam_core.files import check_out_dir, read_json, sha256_file
from runtime.manifest import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, MANIFEST_NAME, graph_content_id
from casam_bundle import THRESHOLD_KEYS, Bundle

#: The parity report of the export in force, and the report of a verification that failed
#: (written instead of a manifest; removed by the next successful export).
PARITY_REPORT = "parity.json"
PARITY_FAILED = "parity-failed.json"
#: ``parity`` of a manifest exported with --no-verify; the runtime warns when it loads one.
UNVERIFIED = {"verified": False, "passed": None}
#: Top-level graph files an export writes: content-named (``encoder-<sha12>.onnx``), or the
#: fixed names of exports made before content naming (``encoder.onnx``), with weights files.
TOP_GRAPH_FILE = re.compile(r"(encoder|router|decoder|decoder_mask)(-[0-9a-f]{12})?\.onnx(\.data)?")
#: The int8 verification set (casam_export/verification_set.py), content-named like the graphs.
VERIFICATION_FILE = re.compile(r"verification-[0-9a-f]{12}\.npz")
#: Other entries an export folder holds ("deployment": the runtime's int8 verdicts per CPU class).
EXPORT_ENTRIES = {MANIFEST_NAME, PARITY_REPORT, PARITY_FAILED, "align", "trt", ".staging", "deployment"}


def is_export_entry(name: str) -> bool:
    """May a top-level entry called ``name`` belong to a casam export (so --out is not someone else's)?"""
    return name in EXPORT_ENTRIES or TOP_GRAPH_FILE.fullmatch(name) is not None or VERIFICATION_FILE.fullmatch(name) is not None


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
    refused without ``force`` (the CLI's ``--overwrite``); with ``force`` nothing in it is reused.
    """
    check_out_dir(out, ExportError)
    previous = read_previous(out) if out.is_dir() else None
    if force:
        return None
    if previous is not None:
        if not same_bundle(previous, bundle):
            owner = previous.get("bundle", {}).get("path", "another bundle")
            raise ExportError(f"--out {out} holds the export of {owner}, not of {bundle.root}; pass --overwrite to overwrite it")
        return previous
    foreign = sorted(p.name for p in out.iterdir() if not is_export_entry(p.name) and not p.name.startswith(".")) if out.is_dir() else []
    if foreign:
        raise ExportError(f"--out {out} is not empty and holds no casam export ({', '.join(foreign[:5])}); "
                          "pass --overwrite to write into it anyway")
    return None


def reusable(entry: Optional[Mapping[str, Any]], built_from: Mapping[str, Any], out: Path) -> bool:
    """True when ``entry`` (None: no previous export) was built from exactly ``built_from`` and its files are intact."""
    if not entry or entry.get("built_from") != dict(built_from):
        return False
    files = [(entry.get("file"), entry.get("sha256"))]
    for part in (entry, entry.get("fp32_fallback") or {}):  # weights, and the int8 graph's fp32 copy
        if part is not entry and part:
            files.append((part.get("file"), part.get("sha256")))
        if part.get("external_data"):
            files.append((part["external_data"].get("file"), part["external_data"].get("sha256")))
    for rel, sha in files:
        if not isinstance(rel, str) or not _relative(rel) or not (out / rel).is_file() or sha256_file(out / rel) != sha:
            return False
    return True


def _relative(rel: str) -> bool:
    """A path read from a previous manifest stays inside the folder (the manifest is untrusted)."""
    path = Path(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts


def named_files(manifest: Optional[Mapping[str, Any]]) -> set[str]:
    """Every file ``manifest`` names (graphs, their weights and fp32 copies, the int8 verification
    set, TensorRT engines), relative to its folder."""
    files = []
    for entry in graph_entries(manifest).values():
        for part in (entry, entry.get("fp32_fallback") if isinstance(entry, Mapping) else None):
            if isinstance(part, Mapping):
                files.append(part.get("file"))
                if isinstance(part.get("external_data"), Mapping):
                    files.append(part["external_data"].get("file"))
    verification = (manifest or {}).get("verification")
    if isinstance(verification, Mapping):
        files.append(verification.get("file"))
    engines = ((manifest or {}).get("tensorrt") or {}).get("engines") or {}
    files += [e.get("file") for e in engines.values() if isinstance(e, Mapping)]
    return {Path(f).as_posix() for f in files if isinstance(f, str) and f}  # "./x.onnx" names x.onnx


def _content_ids(manifest: Optional[Mapping[str, Any]]) -> set[str]:
    """The 12-hex content ids that engine file names of ``manifest``'s graphs carry."""
    ids = set()
    for entry in graph_entries(manifest).values():
        if isinstance(entry, Mapping) and isinstance(entry.get("sha256"), str):
            external = entry.get("external_data") if isinstance(entry.get("external_data"), Mapping) else {}
            ids.add(graph_content_id(entry["sha256"], external.get("sha256"))[:12])
    return ids


def remove_unreferenced(out: Path, manifest: Optional[Mapping[str, Any]]) -> None:
    """Delete the export's own files that ``manifest`` (the one in force; None: none) does not name.

    Graph files (``encoder…onnx``, ``align/*.onnx``, weights, fp32 copies), verification sets, temporary files left by a kill
    (``.*.tmp``) and ``.staging``. TensorRT engines stay when they were built for one of the
    manifest's graphs (the runtime caches engines for other GPUs there too). Nothing else in
    the folder is touched, and a file that cannot be removed is left (this also runs while an
    error is being reported).
    """
    if not out.is_dir():
        return
    named = named_files(manifest)
    ids = _content_ids(manifest)
    doomed = [p for p in out.iterdir() if p.is_file() and p.name not in named
              and (TOP_GRAPH_FILE.fullmatch(p.name) or VERIFICATION_FILE.fullmatch(p.name))]
    if (out / "align").is_dir():
        doomed += [p for p in (out / "align").iterdir()
                   if p.is_file() and p.name.endswith((".onnx", ".onnx.data")) and f"align/{p.name}" not in named]
    if (out / "trt").is_dir():
        doomed += [p for p in (out / "trt").glob("*.engine")
                   if f"trt/{p.name}" not in named and not any(f"-{i}-" in p.name for i in ids)]
    for folder in (out, out / "align", out / "trt"):
        if folder.is_dir():
            doomed += [p for p in folder.glob(".*.tmp") if p.is_file()]
    for path in doomed:
        with contextlib.suppress(OSError):
            path.unlink()
    shutil.rmtree(out / ".staging", ignore_errors=True)


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
    settings: Mapping[str, Any],
    tensorrt: Mapping[str, Any],
    parity: Optional[Mapping[str, Any]],
) -> dict[str, Any]:
    """manifest.json's content; ``settings`` holds the export's ``opset``, ``precision`` and
    ``max_prompts``."""
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "casam_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bundle": {"bundle_json_sha256": sha256_file(bundle.root / "bundle.json"), "path": str(bundle.root.resolve())},
        "sam": {"model": bundle.sam_model, "checkpoint_sha256": sam_sha},
        "preprocessing": bundle.preprocessing.to_dict(),
        "pooling": {"temperature": bundle.temperature},
        "opset": settings["opset"],
        "precision": settings["precision"],
        "max_prompts": settings["max_prompts"],
        "graphs": {k: dict(v) for k, v in graphs.items()},
        "tasks": task_entries(bundle, aligns),
        "tensorrt": dict(tensorrt),
        "parity": dict(parity) if parity is not None else None,
    }
