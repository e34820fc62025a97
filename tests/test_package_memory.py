"""Bounded memory on untrusted archives: a zip bomb disguised as a task package is refused
without inflating it into memory (docs/RELIABILITY.md, "Archive memory").

The peak RSS of ``casam-train unpack`` is measured in a child process (an intermediate
Python reports its children's ru_maxrss, so no earlier child of the test runner counts) and
compared with the same command refusing a tiny broken package: same imports, no archive.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from casam_bundle.errors import BundleError
from casam_bundle.format import TASK_FILES
from casam_bundle.package import FILES_PREFIX, INDEX, MAX_WEIGHTS_BYTES, PACKAGE_FORMAT, _read_member, read_package

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
#: The stated bound (docs/RELIABILITY.md): a refused package costs at most two copies of the
#: largest member cap plus 100 MB over the same command refusing a tiny package.
BOUND_BYTES = 2 * MAX_WEIGHTS_BYTES + 100 * 1000 * 1000
MEASURE = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.returncode); print(r.stderr)")


def _index() -> bytes:
    """A well-formed index whose file hashes no member will match."""
    return json.dumps({"format": PACKAGE_FORMAT, "format_version": 1,
                       "task": {"name": "bomb", "files": {f: "0" * 64 for f in TASK_FILES}, "alignment": {}, "vae": {}},
                       "sam": {}, "preprocessing": {}, "pooling": {}}).encode()


def write_bomb(path: Path, member_bytes: int, names: tuple[str, ...] = TASK_FILES) -> Path:
    """Members of zeros, deflated (about 1000:1), written a MiB at a time so the test stays small."""
    chunk = bytes(MIB)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(INDEX, _index())
        for name in names:
            with archive.open(FILES_PREFIX + name, "w") as fh:
                for _ in range(member_bytes // MIB):
                    fh.write(chunk)
    return path


def unpack_peak(package: Path, bundle: Path) -> tuple[int, int, str]:
    """(peak RSS in bytes, exit code, stderr) of ``casam-train unpack`` in a child process."""
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "trainer", "unpack", "--bundle", str(bundle), str(package)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout.split("\n", 2)
    return int(out[0]) * 1024, int(out[1]), out[2]


def test_zip_bomb_is_refused_within_the_memory_bound(tmp_path):
    tiny = tmp_path / "tiny.casam"
    with zipfile.ZipFile(tiny, "w") as archive:
        archive.writestr(INDEX, b"{}")
    base, code, _ = unpack_peak(tiny, tmp_path / "b0")
    assert code == 2
    # Five members of 200 MiB each (1 GB inflated, 1 MB on disk): refused by their declared size.
    big, code, err = unpack_peak(write_bomb(tmp_path / "bomb.casam", 200 * MIB), tmp_path / "b1")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "declares" in err, err
    assert big - base < BOUND_BYTES, f"peak {big / 1e6:.0f} MB against {base / 1e6:.0f} MB for a tiny package"
    # Members within their caps but not what the index lists: each is streamed, hashed and
    # dropped on its mismatch, so at most one is held.
    weights = tuple(f for f in TASK_FILES if f.endswith(".safetensors"))
    near, code, err = unpack_peak(write_bomb(tmp_path / "near.casam", MAX_WEIGHTS_BYTES - MIB, weights), tmp_path / "b2")
    assert code == 2 and "has sha256" in err, err
    assert near - base < BOUND_BYTES, f"peak {near / 1e6:.0f} MB against {base / 1e6:.0f} MB for a tiny package"
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_inflated_bytes_are_capped_even_when_the_directory_lies(tmp_path):
    """The directory is checked first, but the cap holds on the bytes inflated as well: a
    member read past a lying directory entry stops one chunk after its cap."""
    path = write_bomb(tmp_path / "over.casam", MAX_WEIGHTS_BYTES + MIB, ("alignment.safetensors",))
    with pytest.raises(BundleError, match="declares"):
        read_package(path)
    with zipfile.ZipFile(path) as archive:
        with pytest.raises(BundleError, match="inflates to more than"):
            _read_member(archive, archive.getinfo(FILES_PREFIX + "alignment.safetensors"), path)
