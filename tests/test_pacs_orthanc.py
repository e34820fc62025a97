"""casam-infer against a real PACS: Debian's Orthanc with its DICOMweb plugin, started by
the test on 127.0.0.1 (free ports, a temporary storage folder, a config written here, basic
authentication on), holding nibabel's two-slice MR series and pydicom's CT and MR files.

The round trip is the one docs/PACS.md describes: casam-infer --dicomweb … --store, then the
SEG is found by QIDO, retrieved by WADO-RS, checked by dciodvfy and highdicom, and compared
with the SEG of the same series segmented from a local folder, bit for bit. Each fault has
its own test: Orthanc stopped mid-retrieval, a wrong password, an unknown study, a series of
mixed sizes, a STOW that Orthanc refuses. Without Orthanc the tests skip (fail under CI=true).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner

from conftest import assert_valid_dicom, need
from orthanc_support import (BOX, PASSWORD, REFUSE_SEG, SEG_CLASS, USER, Orthanc, nicom, pydicom_file,
                             start_orthanc, uid_of)
from runtime_support import one_error_line

pytest_plugins = ["orthanc_support"]  # the session's one Orthanc (fixtures orthanc, credentials)


def infer(*args: Any) -> Any:
    from casam_infer.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def pacs_args(server: Orthanc, study: str, engines: Path, out: Path) -> list[Any]:
    return ["--dicomweb", server.dicomweb, "--study", study, "--engines", engines, "--backend", "ort-cpu",
            "--out", out]


def test_store_round_trip_matches_the_local_folder_run(orthanc, credentials, engines, tmp_path):
    hd = need("highdicom")
    study, series = uid_of(nicom() / "0.dcm", "StudyInstanceUID"), uid_of(nicom() / "0.dcm", "SeriesInstanceUID")
    local = tmp_path / "local" / series
    local.mkdir(parents=True)
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(nicom() / name, local / name)
    ran = infer(local, *BOX, "--engines", engines, "--backend", "ort-cpu", "--out", tmp_path / "local_out")
    assert ran.exit_code == 0, ran.output
    stored = infer(*pacs_args(orthanc, study, engines, tmp_path / "pacs_out"), *BOX, "--store", "--json")
    assert stored.exit_code == 0, stored.output
    record = json.loads(stored.stdout.strip().splitlines()[-1])

    segs = [s["uid"] for s in orthanc.series(study) if s["modality"] == "SEG"]
    assert segs == [record["stored"]["series"]]
    client = need("dicomweb_client").DICOMwebClient(orthanc.dicomweb)
    client._session.auth = (USER, PASSWORD)
    [ds] = client.retrieve_series(study, segs[0])
    assert ds.SOPClassUID == SEG_CLASS and ds.StudyInstanceUID == study
    ds.save_as(str(tmp_path / "from_orthanc_seg.dcm"))
    assert_valid_dicom(tmp_path / "from_orthanc_seg.dcm")

    remote = hd.seg.segread(str(tmp_path / "from_orthanc_seg.dcm"))
    mine = hd.seg.segread(str(tmp_path / "local_out" / f"{series}_seg.dcm"))
    sources = {uid_of(nicom() / n, "SOPInstanceUID") for n in ("0.dcm", "1.dcm")}
    assert {uid for _, _, uid in remote.get_source_image_uids()} == sources
    assert {uid for _, _, uid in mine.get_source_image_uids()} == sources
    assert remote.pixel_array.dtype == mine.pixel_array.dtype
    np.testing.assert_array_equal(remote.pixel_array, mine.pixel_array)  # bit for bit
    assert np.asarray(remote.pixel_array).any()
    route = record["route"]
    assert ds.SeriesDescription.startswith(f"CA-SAM {route} (casam ")
    algorithm = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "CA-SAM" and str(ds.ContentCreatorName) == "casam^CA-SAM"
    assert f"route={route}" in str(algorithm.AlgorithmParameters)
    nib = need("nibabel")
    np.testing.assert_array_equal(nib.load(tmp_path / "pacs_out" / f"{series}_mask.nii.gz").get_fdata(),
                                  nib.load(tmp_path / "local_out" / f"{series}_mask.nii.gz").get_fdata())


def test_query_skips_the_stored_seg_and_prompts_are_keyed_by_series_uid(orthanc, credentials, engines, tmp_path):
    """pydicom's one-slice CT as its own study; a --prompts file names its series by UID; the
    SEG and the RT Structure Set are stored, each in its own request, and not segmented again."""
    ct = pydicom_file("CT_small.dcm")
    study, series = uid_of(ct, "StudyInstanceUID"), uid_of(ct, "SeriesInstanceUID")
    (tmp_path / "p.json").write_text(json.dumps({series: {"boxes": [[20, 20, 100, 100]], "slice": 0}}))
    ran = infer(*pacs_args(orthanc, study, engines, tmp_path / "o"), "--prompts", tmp_path / "p.json", "--store",
                "--rtstruct", "--json")
    assert ran.exit_code == 0, ran.output
    assert (tmp_path / "o" / f"{series}_mask.nii.gz").is_file()
    record = json.loads(ran.stdout.strip().splitlines()[-1])
    assert record["outputs"]["rtstruct"] == f"{series}_rtstruct.dcm"
    assert_valid_dicom(tmp_path / "o" / f"{series}_rtstruct.dcm", iod="RTStructureSet")
    kinds = {s["uid"]: s["modality"] for s in orthanc.series(study)}
    assert kinds[record["stored"]["rtstruct"]["series"]] == "RTSTRUCT" and kinds[record["stored"]["series"]] == "SEG"
    from casam_pacs.client import Connection, Credentials, DicomWeb
    from casam_pacs.query import image_series, study_series

    web = DicomWeb(Connection(orthanc.dicomweb), Credentials(USER, PASSWORD))
    assert {s.modality for s in study_series(web, study)} == {"CT", "SEG", "RTSTRUCT"}  # stored …
    assert [s.series_uid for s in image_series(web, study)] == [series]  # … and not segmented again


def test_orthanc_stopped_mid_retrieval_exits_2_and_stores_nothing(credentials, engines, tmp_path, monkeypatch):
    import casam_pacs.retrieve as retrieve

    server = start_orthanc(tmp_path / "orthanc")
    study = uid_of(nicom() / "0.dcm", "StudyInstanceUID")
    try:
        def stop_after_first(name: str) -> None:
            if name == "pacs:after-instance":
                server.stop()  # the first of two instances is on disk; the second request finds no server

        monkeypatch.setattr(retrieve, "fault_point", stop_after_first)
        ran = infer(*pacs_args(server, study, engines, tmp_path / "o"), *BOX, "--store")
        line = one_error_line(ran)
        assert "retrieving instance 2 of 2" in line and "cannot reach" in line and "after 4 attempts" in line
        assert not (tmp_path / "o").exists()
        server.start()
        assert [s["modality"] for s in server.series(study)] == ["MR"]  # nothing stored
    finally:
        server.stop()


def test_a_wrong_password_is_one_line_naming_authentication(orthanc, engines, tmp_path, monkeypatch):
    monkeypatch.setenv("CASAM_DICOMWEB_USER", USER)
    monkeypatch.setenv("CASAM_DICOMWEB_PASSWORD", "wrong")
    study = uid_of(nicom() / "0.dcm", "StudyInstanceUID")
    line = one_error_line(infer(*pacs_args(orthanc, study, engines, tmp_path / "o"), *BOX))
    assert "authentication failed" in line and "HTTP 401" in line and "wrong" not in line
    assert not (tmp_path / "o").exists()


def test_an_unknown_study_is_one_line(orthanc, credentials, engines, tmp_path):
    line = one_error_line(infer(*pacs_args(orthanc, "1.2.3.4.5.6.7", engines, tmp_path / "o"), *BOX))
    assert line == f"casam-infer: error: study 1.2.3.4.5.6.7 is not on {orthanc.dicomweb}"


def test_a_series_of_mixed_sizes_is_refused_as_a_local_one(orthanc, credentials, engines, tmp_path):
    """pydicom's 128×128 CT and 64×64 MR given one patient, study and series: one series, two
    sizes. The local folder names its files by SOP Instance UID, as the retrieved one does, so
    the two refusals differ only in the folder that holds the series."""
    pydicom = need("pydicom")
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    folder = tmp_path / series
    folder.mkdir()
    for n, name in enumerate(("CT_small.dcm", "MR_small.dcm")):
        ds = pydicom.dcmread(str(pydicom_file(name)))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, pydicom.uid.generate_uid()
        ds.PatientID, ds.PatientName = "casam-mixed", "Mixed^Sizes"
        ds.Modality, ds.InstanceNumber = "CT", n + 1
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * n]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(str(folder / f"{ds.SOPInstanceUID}.dcm"))
        orthanc.upload(folder / f"{ds.SOPInstanceUID}.dcm")
    local = one_error_line(infer(folder, *BOX, "--engines", engines, "--backend", "ort-cpu", "--out", tmp_path / "a"))
    remote = one_error_line(infer(*pacs_args(orthanc, study, engines, tmp_path / "b"), *BOX, "--store"))
    assert "slices must have one size" in local and "64×64" in local
    in_folder = re.compile(r"DICOM series \S+/(?=" + re.escape(series) + ":)")
    assert in_folder.sub("DICOM series <folder>/", remote) == in_folder.sub("DICOM series <folder>/", local)
    assert [s["modality"] for s in orthanc.series(study)] == ["CT"]  # nothing stored
    assert not (tmp_path / "b").exists()


def test_a_stow_orthanc_refuses_fails_the_series_and_leaves_nothing(credentials, engines, tmp_path):
    server = start_orthanc(tmp_path / "orthanc", lua=REFUSE_SEG)
    study, series = uid_of(nicom() / "0.dcm", "StudyInstanceUID"), uid_of(nicom() / "0.dcm", "SeriesInstanceUID")
    try:
        line = one_error_line(infer(*pacs_args(server, study, engines, tmp_path / "o"), *BOX, "--store"))
        assert line.startswith(f"casam-infer: error: series {series}: {server.dicomweb} refused to store") and \
            "refused to store" in line and "does not hold the instance" in line, line
        assert [s["modality"] for s in server.series(study)] == ["MR"]
        assert not (tmp_path / "o").exists()  # the series' outputs were staged, never shown: none or all
    finally:
        server.stop()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(Orthanc's PEM with certificate and key, the certificate alone as a CA bundle) for
    127.0.0.1, made with the cryptography package (the train extra brings it)."""
    need("cryptography", "train")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "casam test PACS")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.pem").write_bytes(pem)
    (folder / "orthanc.pem").write_bytes(pem + key.private_bytes(serialization.Encoding.PEM,
                                                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                                                  serialization.NoEncryption()))
    return folder / "orthanc.pem", folder / "ca.pem"


class TlsFront:
    """HTTPS on a free local port in front of the session's plain-HTTP Orthanc: a TLS
    terminator that pipes each connection's bytes through. (Debian's Orthanc 1.10.1 crashes
    on its first HTTPS request with SslEnabled on this OpenSSL, so TLS is done here; the
    DICOMweb answers are Orthanc's.)"""

    def __init__(self, pem: Path, backend_port: int):
        import ssl
        import threading

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(pem))
        self.backend_port = backend_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._connection, args=(raw,), daemon=True).start()

    def _connection(self, raw: socket.socket) -> None:
        import threading

        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except OSError:
            raw.close()  # the handshake failed: a client that did not trust the certificate
            return
        backend = socket.create_connection(("127.0.0.1", self.backend_port))

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(backend, client), daemon=True).start()
        pipe(client, backend)

    def close(self) -> None:
        self.listener.close()


def test_tls_is_verified_and_ca_bundle_names_the_authority(orthanc, credentials, engines, tmp_path, monkeypatch):
    """HTTPS with a self-signed certificate: refused in one line without --ca-bundle
    (verification is on by default, with no switch to turn it off), segmented with it, also
    where $REQUESTS_CA_BUNDLE names a machine-wide bundle (requests would let it win)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", need("certifi", "pacs").where())
    server_pem, ca = self_signed(tmp_path / "tls")
    front = TlsFront(server_pem, orthanc.http_port)
    url = f"https://127.0.0.1:{front.port}/dicom-web"
    study, series = uid_of(nicom() / "0.dcm", "StudyInstanceUID"), uid_of(nicom() / "0.dcm", "SeriesInstanceUID")
    args = ["--dicomweb", url, "--study", study, "--engines", engines, "--backend", "ort-cpu", *BOX]
    try:
        line = one_error_line(infer(*args, "--out", tmp_path / "a"))
        assert line.startswith(f"casam-infer: error: listing the series of study {study}: TLS verification of "
                               f"{url} failed") and "--ca-bundle FILE" in line, line
        ran = infer(*args, "--out", tmp_path / "b", "--ca-bundle", ca)
        assert ran.exit_code == 0, ran.output
        assert (tmp_path / "b" / f"{series}_seg.dcm").is_file()
    finally:
        front.close()
