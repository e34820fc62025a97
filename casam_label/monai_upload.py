"""An uploaded file (MONAI Label's ``files`` / ``file`` part) → a ``Scan``, within the limits.

The bytes are streamed into a private folder with a size cap (``--max-upload-mb``), under
a name casam chooses (only the upload's registered suffix is kept, so a name with ``..``
or a slash never reaches the file system), read by the reader registry and deleted.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from fastapi import HTTPException, UploadFile

from casam_core.errors import InputError
from casam_io.readers import ReadOptions, read, split_suffix
from casam_io.scan import Scan
from casam_label.state import ServerState

CHUNK = 1 << 20


def upload_suffix(name: Optional[str]) -> str:
    """The registered suffix of an upload's file name (``.nii.gz``, ``.png``…); refused otherwise."""
    suffix = split_suffix(Path(name or "").name)[1].lower()
    if not suffix:
        raise InputError(f"upload {Path(name or '').name!r} has no suffix casam reads "
                         "(.nii, .nii.gz, .dcm, .png, .jpg, .tif…)")
    return suffix


async def save_upload(upload: UploadFile, folder: Path, limit_mb: int) -> Path:
    """Stream ``upload`` into ``folder`` under a casam-chosen name; 413 over ``limit_mb``."""
    path = folder / f"upload{upload_suffix(upload.filename)}"
    size, limit = 0, int(limit_mb) << 20
    with open(path, "wb") as out:
        while chunk := await upload.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"upload is over the server's {limit_mb} MB limit (--max-upload-mb)")
            out.write(chunk)
    if size == 0:
        raise InputError("the uploaded file is empty")
    return path


async def read_upload(state: ServerState, upload: UploadFile) -> tuple[Scan, bytes]:
    """The upload as a Scan (its voxels in memory) and its bytes (to keep in a datastore)."""
    with tempfile.TemporaryDirectory(dir=state.options.work_dir, prefix="casam-monai-") as tmp:
        path = await save_upload(upload, Path(tmp), state.options.max_upload_mb)
        scan = read(path, ReadOptions(strict_4d=False))
        scan.data = scan.data.copy()  # off the temporary file (nibabel may memory-map it)
        return scan, path.read_bytes()
