"""Reading and trusting an export folder's manifest.json (docs/FORMATS.md).

The runtime knows the engines only through this file: which graphs exist, where they are,
their sha256, how images were preprocessed and each task's routing threshold. Every engine
file is hashed on load, so a truncated copy or a swapped graph fails loudly here instead of
producing plausible but wrong masks later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from casam_core.errors import InputError, ManifestError
from casam_core.files import PathLike, check_sha256, read_versioned_json, sha256_bytes
from casam_core.names import IDENTITY, check_task_name
from runtime.preprocess import Preprocessing

MANIFEST_FORMAT = "casam-manifest"
MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


def check_task(task: str, task_names: list[str]) -> str:
    """``task`` when it names one of ``task_names`` or the identity, else one clear error."""
    if task != IDENTITY and task not in task_names:
        raise InputError(f"unknown task {task!r}; known: {', '.join(task_names) or 'none'}, identity")
    return task


CORE_GRAPHS = ("encoder", "router", "decoder")
#: Graphs an export may lack: older exports have no ``decoder_mask`` (the decoder taking a
#: previous mask, ``Prompts.mask_input``) and still load, without that capability.
OPTIONAL_GRAPHS = ("decoder_mask",)


@dataclass(frozen=True)
class GraphFile:
    """One ONNX graph of the export: its key (``encoder``, ``align/<task>`` …) and files."""

    key: str
    path: Path
    sha256: str
    external_data: Optional[Path] = None
    external_sha256: Optional[str] = None

    @property
    def content_id(self) -> str:
        return graph_content_id(self.sha256, self.external_sha256)

    def verify(self) -> None:
        """Check that the graph's file (and its weights file) exist and match their sha256."""
        verify_file(self.path, self.sha256, self.key)
        if self.external_data is not None:
            verify_file(self.external_data, self.external_sha256 or "", f"{self.key} weights")


def graph_content_id(sha256: str, external_sha256: Optional[str] = None) -> str:
    """What a graph's compiled engine depends on: the .onnx file and, where its weights live
    apart (vit_h's encoder), the weights file too. Without external data it is the .onnx
    sha256 itself, so engine names of such graphs stay as they were."""
    return sha256 if not external_sha256 else sha256_bytes(f"{sha256}:{external_sha256}".encode())


@dataclass(frozen=True)
class TaskEntry:
    name: str
    index: int
    threshold: float
    graph: GraphFile


class Manifest:
    """A validated manifest: graphs and tasks resolved to paths inside ``folder``."""

    def __init__(self, folder: Path, data: dict[str, Any]) -> None:
        """``data`` has passed ``casam_core/schemas/manifest.schema.json`` (``Manifest.load``), so
        only what a schema cannot say is checked here: names, paths, indices, duplicates."""
        self.folder = folder
        self.data = data
        self.preprocessing = Preprocessing.from_dict(data["preprocessing"])
        self.max_prompts = int(data.get("max_prompts", 16))
        graphs = data["graphs"]
        self.graphs: dict[str, GraphFile] = {key: _graph_file(folder, key, graphs[key])
                                             for key in (*CORE_GRAPHS, *OPTIONAL_GRAPHS) if key in graphs}
        self.tasks: list[TaskEntry] = []
        for i, task in enumerate(data["tasks"]):
            name = check_task_name(task["name"], ManifestError, f"manifest task #{i}")
            entry = TaskEntry(name, int(task.get("index", i)), float(task["threshold"]),
                              _graph_file(folder, f"align/{name}", task["align"]))
            if entry.index != i:
                raise ManifestError(f"manifest task {name!r} has index {entry.index} but sits at position {i}")
            self.tasks.append(entry)
        names = self.task_names
        if len(set(names)) != len(names):
            raise ManifestError(f"manifest repeats a task name: {names}")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TaskEntry:
        for entry in self.tasks:
            if entry.name == name:
                return entry
        raise ManifestError(f"unknown task {name!r}; known: {', '.join(self.task_names) or 'none'}, identity")

    def all_graphs(self) -> list[GraphFile]:
        return list(self.graphs.values()) + [t.graph for t in self.tasks]

    def tensorrt_engines(self) -> dict[str, dict[str, Any]]:
        trt = self.data.get("tensorrt") or {}
        return dict(trt.get("engines") or {})

    def verify(self) -> None:
        """Check that every engine file exists and matches its sha256."""
        for g in self.all_graphs():
            g.verify()

    @classmethod
    def load(cls, folder: PathLike, data: Optional[Mapping[str, Any]] = None, verify: bool = True) -> "Manifest":
        """Open ``folder/manifest.json`` (or validate ``data`` against ``folder``'s files).

        ``data`` lets an exporter check its engines before it writes the final manifest.
        """
        root = Path(folder)
        document = read_versioned_json(
            root / MANIFEST_NAME, MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, ManifestError, "casam manifest",
            missing=f"no {MANIFEST_NAME} in {root}: point --engines (or $CASAM_ENGINES) at a casam-export folder",
            upgrade_hint=" (re-export the bundle or upgrade casam)", data=data,
        )
        manifest = cls(root, document)
        if verify:
            manifest.verify()
        return manifest


def verify_file(path: Path, expected: str, what: str) -> None:
    """The shared sha256 check (``casam_core.files.check_sha256``) worded for an engine file."""
    check_sha256(path, expected, ManifestError, f"engine file {path} ({what})", "the manifest",
                 hint="; re-export the bundle")


def _graph_file(folder: Path, key: str, entry: Mapping[str, Any]) -> GraphFile:
    ext = entry.get("external_data")
    return GraphFile(
        key=key,
        path=_inside(folder, entry["file"]),
        sha256=str(entry["sha256"]),
        external_data=_inside(folder, ext["file"]) if ext else None,
        external_sha256=str(ext["sha256"]) if ext else None,
    )


def _inside(folder: Path, rel: str) -> Path:
    """A manifest path, refused when it escapes the export folder (the manifest is untrusted).

    Checked lexically, so a deployment may still symlink engine files into the folder.
    """
    path = Path(str(rel))
    if path.is_absolute() or ".." in path.parts:
        raise ManifestError(f"manifest file {rel!r} points outside the export folder {folder}")
    return folder / path
