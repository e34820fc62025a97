"""int8 that holds where it runs: the export's verification set, re-run on another CPU.

onnxruntime's u8s8 int8 kernels differ by CPU (runtime/cpu_class.py): an int8 export
verified on a VNNI workstation may give other masks on an AVX2 edge box. So an int8 export
ships its verification set (``verification-<sha12>.npz``: prepared images, prompts, and the
fp32 reference routes, scores, embedding summaries and masks) and records the int8 kernel
class of the CPU that verified it (manifest ``int8_kernel_class``). The first time the
runtime opens the export on a machine of another class it re-runs that set through the
deployed chain and checks the export's own bars:

- routes identical to the fp32 reference (routed with the thresholds recorded in the set);
- no score crosses its task's τ, or comes within ``SCORE_MARGIN`` of τ where fp32 did not;
- mean mask IoU ≥ ``MASK_IOU_BAR`` (low-resolution masks, logits > 0).

The verdict is per graph: the encoder answers for routes, scores and every mask, each
alignment graph for the masks it produced. A failed int8 graph is replaced by its fp32 copy
when the export ships one (``casam-export --int8`` does, unless ``--no-fp32-fallback``), with
a warning; else the export is refused with one ``ManifestError`` line. The verdict is cached
per CPU class and backend beside the engines (``deployment/``, as TensorRT engines are
cached per GPU in ``trt/``), written atomically, and keyed by the sha256 of everything it was
computed from (verification set, graphs, bars), so a changed file is never judged by an old
verdict.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from casam_core.errors import ManifestError
from casam_core.files import atomic_write_json, read_json, sha256_bytes
from casam_core.names import IDENTITY
from runtime.cpu_class import KERNEL_CLASSES, int8_kernel_class
from runtime.prompts import Prompts
from runtime.manifest import GraphFile, Manifest, verify_file

#: The export's int8 bar (casam_export.quantize.INT8_MASK_IOU_BAR is this same number).
MASK_IOU_BAR = 0.95
#: How near its task's τ an int8 score may come, as a fraction of |τ|, where the fp32 score
#: did not. fp32 scores agree across CPUs to ~1e-6 relative (float32 sums of a few thousand
#: terms), but int8 moves them by up to 15 % (issue 27, AVX2): a score that int8 brings to
#: within 2 % of τ has kept its side of τ by less than the run-to-run spread of int8 kernels
#: between CPU classes measured here (bench/int8_speed.py, "largest relative score change"),
#: so it would route by chance on the next CPU. Scores that fp32 already puts that near τ
#: are judged by the crossing test alone (int8 cannot be asked to be steadier than fp32).
SCORE_MARGIN = 0.02
VERIFICATION_FORMAT = "casam-int8-verification"
VERDICT_FORMAT = "casam-int8-verdict"
VERDICT_DIR = "deployment"
UNKNOWN = "unknown"  # label of --verify-images site images (the others carry their task's name)
MASK_SIDE = 256  # low-resolution masks, K×256×256, stored bit-packed


class DeploymentWarning(UserWarning):
    """An int8 graph failed the export's verification set on this CPU and runs in fp32."""


# ----- the checks both the exporter and the runtime apply -----------------------------------
def score_margin_failures(reference: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
                          margin: float = SCORE_MARGIN) -> list[str]:
    """One line per (image, task) whose int8 score crosses τ relative to the fp32 score, or
    comes within ``margin``·|τ| of τ where the fp32 score did not. Arrays are M×N, τ is (N,)."""
    reference, scores = np.atleast_2d(reference), np.atleast_2d(scores)
    band = margin * np.abs(thresholds)
    crossed = (reference <= thresholds) != (scores <= thresholds)
    near = (np.abs(scores - thresholds) < band) & (np.abs(reference - thresholds) >= band)
    return [f"image {i} task {j}: fp32 score {reference[i, j]:.4g}, int8 {scores[i, j]:.4g}, τ {thresholds[j]:.4g} "
            f"({'crosses τ' if crossed[i, j] else f'within {margin:.0%} of τ'})"
            for i, j in zip(*np.nonzero(crossed | near))]


def route_of(scores: np.ndarray, thresholds: np.ndarray, names: list[str]) -> str:
    """The runtime's routing rule (``Pipeline.choose``): argmin, taken when ≤ its τ."""
    if scores.size == 0:
        return IDENTITY
    best = int(np.argmin(scores))
    return names[best] if scores[best] <= thresholds[best] else IDENTITY


def mask_ious(a: np.ndarray, b: np.ndarray) -> list[float]:
    """IoU of each pair of K×… boolean masks; two empty masks agree perfectly."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    inter, union = (a & b).sum(1), (a | b).sum(1)
    return [1.0 if u == 0 else float(i) / float(u) for i, u in zip(inter, union)]


# ----- the verification set -------------------------------------------------------------------
@dataclass
class VerificationCase:
    """One stored image with its prompts and fp32 reference outputs."""

    image: np.ndarray  # uint8 H×W or H×W×3, as the deployment's preprocessing receives it
    label: str  # the task whose held-out image it is, UNKNOWN for a site image, or "synthetic"
    boxes: np.ndarray  # K×4 float32 in the stored image's pixels
    route: str
    scores: np.ndarray  # (N,) fp32 reference scores
    masks: np.ndarray  # K×256×256 bool, the reference route's
    forced: dict[str, np.ndarray] = field(default_factory=dict)  # task → masks with that task forced
    embedding_summary: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mean, std, max |x|


@dataclass
class VerificationSet:
    tasks: list[str]
    thresholds: np.ndarray  # τ per task when the set was made (its routes were taken with these)
    cases: list[VerificationCase]

    def to_bytes(self) -> bytes:
        """A compressed .npz (no pickles): arrays per case, and one JSON record of the rest."""
        arrays: dict[str, np.ndarray] = {"thresholds": self.thresholds.astype(np.float32)}
        meta: dict[str, Any] = {"format": VERIFICATION_FORMAT, "version": 1, "tasks": self.tasks, "cases": []}
        for i, c in enumerate(self.cases):
            arrays[f"image_{i}"], arrays[f"boxes_{i}"] = c.image, c.boxes.astype(np.float32)
            arrays[f"scores_{i}"], arrays[f"masks_{i}"] = c.scores.astype(np.float32), _pack(c.masks)
            for t, masks in c.forced.items():
                arrays[f"forced_{i}_{self.tasks.index(t)}"] = _pack(masks)
            meta["cases"].append({"label": c.label, "route": c.route, "masks": int(c.masks.shape[0]),
                                  "forced": [self.tasks.index(t) for t in c.forced],
                                  "embedding_summary": list(c.embedding_summary)})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def read(cls, path: Path) -> "VerificationSet":
        """The set in ``path`` (its sha256 already checked against the manifest)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                if meta.get("format") != VERIFICATION_FORMAT or meta.get("version") != 1:
                    raise ValueError(f"not a {VERIFICATION_FORMAT} v1 file")
                tasks = [str(t) for t in meta["tasks"]]
                cases = [_case(z, i, c, tasks) for i, c in enumerate(meta["cases"])]
                return cls(tasks, np.asarray(z["thresholds"], np.float32), cases)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ManifestError(f"verification set {path} is unreadable ({exc}); re-export the bundle") from exc


def _pack(masks: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(masks, bool).reshape(masks.shape[0], -1), axis=1)


def _unpack(packed: np.ndarray, count: int) -> np.ndarray:
    side = MASK_SIDE * MASK_SIDE
    return np.unpackbits(packed, axis=1, count=side).astype(bool).reshape(count, MASK_SIDE, MASK_SIDE)


def _case(z: Any, i: int, c: Mapping[str, Any], tasks: list[str]) -> VerificationCase:
    k = int(c["masks"])
    forced = {tasks[int(t)]: _unpack(z[f"forced_{i}_{int(t)}"], k) for t in c.get("forced", [])}
    return VerificationCase(np.asarray(z[f"image_{i}"]), str(c["label"]), np.asarray(z[f"boxes_{i}"], np.float32),
                            str(c["route"]), np.asarray(z[f"scores_{i}"], np.float32), _unpack(z[f"masks_{i}"], k),
                            forced, tuple(float(v) for v in c.get("embedding_summary", (0, 0, 0))))


# ----- running the set ------------------------------------------------------------------------
@dataclass
class Report:
    """What re-running the verification set found, per graph and per image label."""

    cpu_class: str
    exported_class: str
    backend: str
    images: int
    routes_identical: bool
    route_changes: list[str]
    margin_failures: list[str]
    mask_iou_mean: float
    mask_iou_min: float
    per_label: dict[str, dict[str, float]]  # label → {"images", "iou_mean", "iou_min"}
    graphs: dict[str, dict[str, Any]]  # int8 graph key → {"passed", "failures", "iou_mean", "masks"}
    bars: dict[str, float] = field(default_factory=lambda: {"mask_iou_mean": MASK_IOU_BAR, "score_margin": SCORE_MARGIN})

    @property
    def affected(self) -> list[str]:
        """The int8 graphs that missed a bar here."""
        return [k for k, g in self.graphs.items() if not g["passed"]]

    @property
    def passed(self) -> bool:
        return not self.affected

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "affected": self.affected}


def run_set(pipe: Any, vset: VerificationSet, int8_graphs: list[str]) -> dict[str, Any]:
    """Every case through ``pipe`` (a ``Pipeline``): routes, scores and the IoU of each mask,
    recorded under the graphs that produced it (the encoder: all of them)."""
    ious: dict[str, list[float]] = {"encoder": []}
    labels: dict[str, list[float]] = {}
    changes, scores = [], []
    for i, case in enumerate(vset.cases):
        embedding, frame = pipe.embed(case.image)
        _, s, _ = pipe.route(embedding)
        scores.append(np.asarray(s, np.float32))
        route = route_of(scores[-1], vset.thresholds, vset.tasks)
        if route != case.route:
            changes.append(f"image {i} ({case.label}): fp32 {case.route}, here {route}")
        for task, reference in [(case.route, case.masks), *case.forced.items()]:
            _, low, _ = pipe.decode(embedding, frame, Prompts.for_image(case.image.shape, boxes=case.boxes), route=task)
            got = mask_ious(reference, np.asarray(low)[:, 0] > 0)
            ious.setdefault(f"align/{task}", []).extend(got)
            if task == case.route:
                ious["encoder"].extend(got)
                labels.setdefault(case.label, []).append(float(np.mean(got)))
    reference = np.stack([c.scores for c in vset.cases]) if vset.cases else np.zeros((0, len(vset.tasks)))
    margins = score_margin_failures(reference, np.stack(scores), vset.thresholds) if scores else []
    return {"ious": ious, "labels": labels, "changes": changes, "margins": margins}


def judge(raw: Mapping[str, Any], int8_graphs: list[str], context: tuple[str, str, str], images: int) -> Report:
    """The per-graph verdict of ``run_set``'s measurements against the export's bars."""
    graphs: dict[str, dict[str, Any]] = {}
    for key in int8_graphs:
        got = raw["ious"].get(key, [])
        failures = []
        if key == "encoder":
            failures += [f"routes differ: {c}" for c in raw["changes"]] + [f"score margin: {m}" for m in raw["margins"]]
        mean = float(np.mean(got)) if got else None
        if mean is not None and mean < MASK_IOU_BAR:
            failures.append(f"mean mask IoU {mean:.4f} < {MASK_IOU_BAR}")
        graphs[key] = {"passed": not failures, "failures": failures, "iou_mean": mean, "masks": len(got)}
    every = raw["ious"]["encoder"] or [1.0]
    per_label = {label: {"images": len(v), "iou_mean": float(np.mean(v)), "iou_min": float(np.min(v))}
                 for label, v in raw["labels"].items()}
    return Report(context[0], context[1], context[2], images, not raw["changes"], list(raw["changes"]),
                  list(raw["margins"]), float(np.mean(every)), float(np.min(every)), per_label, graphs)


def int8_graphs(manifest: Manifest) -> list[str]:
    """Keys of the manifest's graphs that are int8."""
    entries = {**manifest.data["graphs"], **{f"align/{t['name']}": t["align"] for t in manifest.data["tasks"]}}
    return [k for k, e in entries.items() if isinstance(e, Mapping) and e.get("precision") == "int8"]


def verification_file(manifest: Manifest) -> Optional[GraphFile]:
    """The export's verification set, sha256-checked, or None when it ships none."""
    entry = manifest.data.get("verification")
    if not isinstance(entry, Mapping) or not entry.get("file"):
        return None
    from runtime.manifest import _inside  # the one check that a manifest path stays in its folder

    vfile = GraphFile("verification", _inside(manifest.folder, str(entry["file"])), str(entry.get("sha256", "")))
    verify_file(vfile.path, vfile.sha256, "int8 verification set")
    return vfile


def verify(manifest: Manifest, make_pipeline: Callable[[Manifest], Any], backend: str) -> Report:
    """Re-run the export's verification set through the deployed chain (on demand: whatever
    this CPU's class). A ManifestError when the export ships no set."""
    vfile = verification_file(manifest)
    if vfile is None:
        raise ManifestError(f"{manifest.folder} ships no int8 verification set (not an int8 export, or made by an "
                            "older casam-export); re-export with --int8")
    vset = VerificationSet.read(vfile.path)
    keys = int8_graphs(manifest)
    raw = run_set(make_pipeline(manifest), vset, keys)
    context = (int8_kernel_class(), str(manifest.data.get("int8_kernel_class", "unknown")), backend)
    return judge(raw, keys, context, len(vset.cases))


# ----- the verdict, cached per CPU class ---------------------------------------------------------
def verdict_dir(folder: Path) -> Path:
    """``<export>/deployment`` when writable, else a per-user cache (as ``trt/`` for engines)."""
    own = folder / VERDICT_DIR
    if os.access(folder, os.W_OK) and (not own.exists() or os.access(own, os.W_OK)):
        return own
    base = Path(os.environ.get("CASAM_CACHE", Path.home() / ".cache" / "casam")) / VERDICT_DIR
    return base / sha256_bytes(str(folder.resolve()).encode())[:16]


def verdict_inputs(manifest: Manifest, vfile: GraphFile, keys: list[str], backend: str) -> dict[str, Any]:
    """Everything a verdict depends on: a change to any of them means a new verdict."""
    graphs = {g.key: g.content_id for g in manifest.all_graphs()}
    return {"format": VERDICT_FORMAT, "version": 1, "cpu_class": int8_kernel_class(), "backend": backend,
            "verification_sha256": vfile.sha256, "graphs": {k: graphs.get(k) for k in keys},
            "decoder": graphs["decoder"], "router": graphs["router"],
            "bars": {"mask_iou_mean": MASK_IOU_BAR, "score_margin": SCORE_MARGIN}}


def read_verdict(path: Path, inputs_sha256: str) -> Optional[dict[str, Any]]:
    """The cached verdict in ``path`` when it was computed from exactly these inputs."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("inputs_sha256") != inputs_sha256 or not isinstance(data.get("affected"), list):
        return None
    return data


def deployable(manifest: Manifest, backend: str, make_pipeline: Callable[[Manifest], Any]) -> Manifest:
    """The manifest to run here: ``manifest`` itself, or with the int8 graphs that fail the
    export's verification set on this CPU class replaced by their fp32 copies.

    Runs only for an int8 export verified on another kernel class; the first load per class
    and backend runs the set, later loads read the cached verdict.
    """
    keys = int8_graphs(manifest)
    recorded = manifest.data.get("int8_kernel_class")
    if not keys or recorded not in KERNEL_CLASSES or recorded == int8_kernel_class():
        return manifest
    vfile = verification_file(manifest)
    if vfile is None:
        return manifest
    inputs = verdict_inputs(manifest, vfile, keys, backend)
    digest = sha256_bytes(json.dumps(inputs, sort_keys=True).encode())
    path = verdict_dir(manifest.folder) / f"int8-{inputs['cpu_class']}-{digest[:16]}.json"
    verdict = read_verdict(path, digest)
    if verdict is None:
        report = verify(manifest, make_pipeline, backend)
        verdict = {"inputs": inputs, "inputs_sha256": digest, "affected": report.affected, "report": report.to_dict()}
        try:
            atomic_write_json(path, verdict)
        except OSError:  # a read-only deployment still runs; it re-checks at the next start
            pass
    return fall_back(manifest, [str(k) for k in verdict["affected"]], inputs["cpu_class"])


def fall_back(manifest: Manifest, affected: list[str], cpu_class: str) -> Manifest:
    """``manifest`` with each graph of ``affected`` replaced by its fp32 copy; a ManifestError
    (one line) when one of them ships none."""
    if not affected:
        return manifest
    data = copy.deepcopy(manifest.data)
    entries = {**data["graphs"], **{f"align/{t['name']}": t["align"] for t in data["tasks"]}}
    missing = [k for k in affected if not isinstance(entries.get(k, {}).get("fp32_fallback"), Mapping)]
    where = (f"on this CPU (int8 kernel class {cpu_class}; exported on {manifest.data.get('int8_kernel_class')})")
    if missing:
        raise ManifestError(f"int8 graph(s) {', '.join(missing)} of {manifest.folder} fail the export's verification "
                            f"set {where} and the export ships no fp32 copy (--no-fp32-fallback); re-export on this "
                            "CPU class, or without --int8")
    for key in affected:
        entry, fp32 = entries[key], entries[key]["fp32_fallback"]
        entry.update(file=fp32["file"], sha256=fp32["sha256"], external_data=fp32.get("external_data"),
                     precision="fp32", deployment_fallback={"cpu_class": cpu_class, "int8_file": entry["file"]})
    replaced = Manifest(manifest.folder, data)
    for graph in replaced.all_graphs():
        if graph.key in affected:
            graph.verify()
    warnings.warn(f"int8 graph(s) {', '.join(affected)} fail the export's verification set {where}; they run in "
                  "fp32 (casam-infer --verify-deployment shows why)", DeploymentWarning, stacklevel=3)
    return replaced
