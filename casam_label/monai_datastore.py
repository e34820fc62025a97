"""MONAI Label's ``/datastore/`` routes on casam's datastore (``--datastore``).

casam's datastore (``casam_label.datastore``) answers four calls: ``images()``,
``open(id)``, ``save_label(id, data, suffix, tag, overwrite)`` and ``label(id, tag)``; its
ids are paths relative to the folder (``ct/case1.nii.gz``), checked so none leaves it.
MONAI's ids are usually file stems (Slicer uploads a volume under its node name), so an
id that names no file is also looked up by stem. An uploaded image is written as
``<id><suffix>`` at the datastore's top level, under a name casam builds (one plain name
part, never replacing a file). Labels go where the datastore puts them, with names it owns.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from casam_core.errors import InputError
from casam_core.files import atomic_write_bytes
from casam_core.names import check_task_name
from casam_io.readers import ReadOptions, split_suffix
from casam_io.scan import Scan
from casam_label.auth import client_identity
from casam_label.uploads import UploadLimits, stored_file, upload_suffix
from casam_label.state import ServerState, server_state

router = APIRouter(prefix="/datastore")
TAGS = ("final", "original")
READ = ReadOptions(strict_4d=False)  # a 4-D NIfTI from a viewer opens its first volume


def store_of(state: ServerState) -> Any:
    if state.datastore is None:
        raise HTTPException(404, "this server has no datastore: start casam-label with --datastore DIR")
    return state.datastore


def resolve_id(store: Any, image_id: str) -> str:
    """The datastore id for a MONAI id: itself if it names an image, else the one image whose
    file stem it is (404 for none, 400 for an id that tries to leave the datastore)."""
    if not image_id or len(image_id) > 1024:
        raise InputError("give image=ID (a datastore id)")
    ids = [item.id for item in store.images()]
    if image_id in ids:
        return image_id
    if "/" in image_id or "\\" in image_id or image_id.startswith(".") or "\0" in image_id:
        store.open(image_id)  # the datastore's own check names what is wrong (outside, hidden, ..)
    stems = [i for i in ids if split_suffix(i)[0] == image_id]
    if len(stems) != 1:
        raise HTTPException(404, f"no image {image_id!r} in the datastore" if not stems else
                            f"image id {image_id!r} is ambiguous: use one of {', '.join(stems[:5])}")
    return stems[0]


def scan_of_image(state: ServerState, image_id: str) -> Scan:
    store = store_of(state)
    return store.open(resolve_id(store, image_id))


def datastore_status(state: ServerState) -> dict[str, Any]:
    """MONAI's datastore stats: images, images with a final label, labels per tag."""
    if state.datastore is None:
        return {"total": 0, "completed": 0, "label_tags": {}}
    objects = _objects(state.datastore)
    tags: dict[str, int] = {}
    for obj in objects.values():
        for tag in obj["labels"]:
            tags[tag] = tags.get(tag, 0) + 1
    return {"total": len(objects), "completed": sum(1 for o in objects.values() if "final" in o["labels"]),
            "label_tags": tags}


def _objects(store: Any) -> dict[str, Any]:
    out = {}
    for item in store.images():
        labels = {tag: {"ext": "".join(Path(p.name).suffixes[-2:]) if p.name.endswith(".nii.gz") else p.suffix,
                        "info": {"path": p.name}}
                  for tag in TAGS for p in [store.label(item.id, tag)] if p is not None}
        out[item.id] = {"image": {"ext": split_suffix(item.id)[1], "info": {"name": item.name, "kind": item.kind}},
                        "labels": labels}
    return out


@router.get("/")
def listing(output: Optional[str] = None, state: ServerState = Depends(server_state),
            _: str = Depends(client_identity)) -> Any:
    """``output=all``: MONAI's datastore JSON (objects by id); ``train``: image/label pairs; else stats."""
    if output in (None, "stats"):
        return datastore_status(state)
    store = store_of(state)
    if output == "all":
        return {"name": "casam", "description": "casam-label datastore", "images_dir": "", "labels_dir": "labels",
                "objects": _objects(store)}
    if output == "train":
        return [{"image": i, "label": o["labels"]["final"]["info"]["path"]} for i, o in _objects(store).items()
                if "final" in o["labels"]]
    raise HTTPException(400, f"output {output!r} is not one of stats, all, train")


def client_name(file: UploadFile) -> str:
    """The upload's file name without a folder part (some clients send a whole path)."""
    return Path(file.filename or "").name


def _stored(state: ServerState, file: UploadFile) -> tuple[str, bytes]:
    """(the client's file name, its bytes) of an upload to keep, checked readable first
    (``casam_label.uploads``: limits, and errors that name no server path)."""
    name = client_name(file)
    upload_suffix(name)  # a name casam can store it under, before the bytes are read
    _scan, data = stored_file(name, file.file, UploadLimits.of(state.options), state.options.work_dir, READ)
    return name, data


def _add_image(store: Any, image_id: Optional[str], filename: str, data: bytes) -> str:
    suffix = upload_suffix(filename)
    stem = image_id or split_suffix(filename)[0]
    check_task_name(stem, where="the image id")  # one plain name part: letters, digits, _ . -
    root = getattr(store, "root", None)
    if root is None:
        raise HTTPException(501, "this datastore does not accept uploaded images")
    path = Path(root) / f"{stem}{suffix}"
    if os.path.lexists(path):
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            return path.name  # the same image again (Slicer uploads before each save)
        raise HTTPException(409, f"the datastore has an image {path.name!r} already; upload under another id")
    atomic_write_bytes(path, data)
    return path.name


@router.put("/")
@router.put("/image")
async def add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
                    state: ServerState = Depends(server_state), _: str = Depends(client_identity)) -> dict:
    """Store an uploaded image (checked readable first) under ``image`` or its file's stem."""
    store = store_of(state)
    name, data = await run_in_threadpool(_stored, state, file)
    return {"image": _add_image(store, image or None, name, data)}


@router.get("/image")
def download_image(image: str, state: ServerState = Depends(server_state), _: str = Depends(client_identity)):
    store = store_of(state)
    image_id = resolve_id(store, image)
    path = store.resolve(image_id)
    if not path.is_file():
        raise HTTPException(400, f"image {image_id!r} is a DICOM series folder; open it as a session instead")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.put("/label")
async def save_label(image: str, tag: str = "final", params: str = Form("{}"), label: UploadFile = File(...),
                     state: ServerState = Depends(server_state), _: str = Depends(client_identity)) -> dict:
    """Store a label for ``image`` under ``tag`` (replacing that tag's previous one, as MONAI does)."""
    store = store_of(state)
    image_id = resolve_id(store, image)
    try:
        info = json.loads(params or "{}")
    except ValueError:
        raise InputError("params is not JSON") from None
    name, data = await run_in_threadpool(_stored, state, label)
    suffix = upload_suffix(name)
    label_id = store.save_label(image_id, data, suffix, tag or "final", overwrite=True)
    return {"image": image_id, "label": label_id, "tag": tag or "final",
            "label_info": info.get("label_info") if isinstance(info, dict) else None}


@router.get("/label")
def download_label(label: str, tag: str = "final", state: ServerState = Depends(server_state),
                   _: str = Depends(client_identity)):
    store = store_of(state)
    path = store.label(resolve_id(store, label), tag)
    if path is None:
        raise HTTPException(404, f"image {label!r} has no {tag!r} label")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)
