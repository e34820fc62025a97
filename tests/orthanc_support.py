"""One real Orthanc per test session (per xdist worker) for the PACS tests: Debian's Orthanc
with its DICOMweb plugin on 127.0.0.1 (free ports, a temporary storage folder, a config
written here, basic authentication on), holding nibabel's two-slice MR series and pydicom's
CT and MR files, used in place. Registered as a plugin (``pytest_plugins = ["orthanc_support"]``
in each test module that uses it), so every module shares the one session fixture.
Without Orthanc the tests skip (fail under CI=true).
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from casam_core.local_server import ServerStartError, answers, free_port, stop, wait_until_ready
from conftest import missing, need

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "casam-test", "not-a-secret"
BOX = ["--box", "10", "10", "60", "60", "--slice", "0"]  # on nibabel's 256×256 series
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Orthanc's Lua hook that refuses every SEG (STOW included) and stores everything else. Orthanc
#: 1.10's DICOMweb plugin still answers such a STOW with success: casam must look it up.
REFUSE_SEG = 'function ReceivedInstanceFilter(dicom, origin, info)\n  return dicom.Modality ~= "SEG"\nend\n'


class Orthanc:
    """One Orthanc process with its own storage folder and config, on free local ports."""

    def __init__(self, root: Path, lua: Optional[str] = None):
        self.root, self.http_port = root, free_port()
        root.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "casam-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "HttpPort": self.http_port, "DicomPort": free_port(), "DicomServerEnabled": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpThreadsCount": 4, "StableAge": 1,
        }
        if lua is not None:
            (root / "filter.lua").write_text(lua)
            config["LuaScripts"] = [str(root / "filter.lua")]
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=1))
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self) -> "Orthanc":
        log = open(self.root / "orthanc.log", "ab")
        self.process = subprocess.Popen([str(ORTHANC), str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.root)
        log.close()
        auth = {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
        try:
            wait_until_ready(self.process, lambda: answers(f"{self.url}/system", auth, timeout_s=2), "Orthanc", 60,
                             lambda: (self.root / "orthanc.log").read_text(errors="replace"), interval_s=0.1)
        except ServerStartError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
        self.process = None

    def upload(self, path: Path) -> None:
        import requests

        answer = requests.post(f"{self.url}/instances", data=path.read_bytes(), auth=(USER, PASSWORD), timeout=30)
        assert answer.ok, answer.text

    def series(self, study: str) -> list[dict[str, Any]]:
        """QIDO: the study's series as (UID, modality) dicts (empty for an unknown study)."""
        import requests

        answer = requests.get(f"{self.dicomweb}/studies/{study}/series", auth=(USER, PASSWORD), timeout=30)
        if answer.status_code == 404 or not answer.content:
            return []
        answer.raise_for_status()
        return [{"uid": s["0020000E"]["Value"][0], "modality": s["00080060"]["Value"][0]} for s in answer.json()]


def nicom() -> Path:
    nibabel = need("nibabel")
    return Path(nibabel.__file__).parent / "nicom" / "tests" / "data"


def pydicom_file(name: str) -> Path:
    return Path(need("pydicom").data.get_testdata_file(name))


def uid_of(path: Path, keyword: str) -> str:
    return str(getattr(need("pydicom").dcmread(str(path), stop_before_pixels=True), keyword))


def start_orthanc(root: Path, lua: Optional[str] = None) -> Orthanc:
    """A started Orthanc holding nibabel's two-slice series; skips (fails in CI) without Orthanc."""
    need("dicomweb_client", "pacs")
    need("requests", "pacs")
    if not ORTHANC.is_file() or not PLUGIN.is_file():
        missing(f"{ORTHANC} or {PLUGIN} is absent (apt-get install orthanc orthanc-dicomweb; `make test` does it as root)")
    server = Orthanc(root, lua).start()
    try:
        for name in ("0.dcm", "1.dcm"):
            server.upload(nicom() / name)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Iterator[Orthanc]:
    """The session's Orthanc: nibabel's series plus pydicom's CT_small and MR_small, used in place."""
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        for name in ("CT_small.dcm", "MR_small.dcm"):
            server.upload(pydicom_file(name))
        yield server
    finally:
        server.stop()


@pytest.fixture()
def credentials(monkeypatch) -> None:
    monkeypatch.setenv("CASAM_DICOMWEB_USER", USER)
    monkeypatch.setenv("CASAM_DICOMWEB_PASSWORD", PASSWORD)
    monkeypatch.delenv("CASAM_DICOMWEB_TOKEN", raising=False)
