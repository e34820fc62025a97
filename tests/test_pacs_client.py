"""casam_pacs without a server: the cheap checks run before any request (URL form, UID syntax,
credentials from the environment only), the bounded retries with back-off, the one-line
error of each failure kind, and a STOW answer that lists the SEG as failed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import need
from runtime_support import one_error_line


def test_urls_uids_and_credentials_are_checked_in_one_line():
    from casam_pacs.client import Connection, Credentials, check_uid
    from casam_pacs.errors import PacsOptionError

    assert Connection("https://pacs.example/dicom-web/").checked().url == "https://pacs.example/dicom-web"
    for url, why in [("ftp://x/dw", "not an http"), ("http:///dw", "not an http"), ("pacs/dicom-web", "not an http"),
                     ("https://u:p@pacs/dw", "must not hold credentials"), ("http://pacs/dw?x=1", "query"),
                     ("http://pacs:port/dw", "port")]:
        with pytest.raises(PacsOptionError, match=why):
            Connection(url).checked()
    assert check_uid("1.2.840.10008.5.1.4.1.1.66.4", "--study")
    for uid in ("1.02.3", "1..2", "1.2.", "a.b", "1.2/../3", "1." + "2" * 63, ""):
        with pytest.raises(PacsOptionError, match="is not a DICOM UID"):
            check_uid(uid, "--study")
    assert Credentials.from_env({}) == Credentials()
    assert Credentials.from_env({"CASAM_DICOMWEB_TOKEN": "t"}).token == "t"
    with pytest.raises(PacsOptionError, match="CASAM_DICOMWEB_USER is set but CASAM_DICOMWEB_PASSWORD is not"):
        Credentials.from_env({"CASAM_DICOMWEB_USER": "u"})
    with pytest.raises(PacsOptionError, match="not both"):
        Credentials.from_env({"CASAM_DICOMWEB_TOKEN": "t", "CASAM_DICOMWEB_USER": "u", "CASAM_DICOMWEB_PASSWORD": "p"})
    assert "secret" not in Credentials("u", "secret").describe()


def _web(retries: int = 3):
    need("dicomweb_client", "pacs")
    from casam_pacs.client import Connection, Credentials, DicomWeb

    slept: list[float] = []
    return DicomWeb(Connection("http://127.0.0.1:9/dicom-web", retries=retries), Credentials(), slept.append), slept


def _http_error(status: int):
    requests = need("requests", "pacs")
    response = requests.Response()
    response.status_code, response.reason = status, "Reason"
    return requests.HTTPError(response=response)


def test_transient_failures_are_retried_with_back_off_and_bounded():
    requests = need("requests", "pacs")
    from casam_pacs.errors import AuthenticationError, NotFoundError, PacsError

    web, slept = _web()
    failures = [requests.ConnectionError("reset"), _http_error(503)]
    assert web.call("x", lambda: _raise(failures.pop(0)) if failures else 7) == 7
    assert slept == [0.5, 1.0]  # exponential back-off, one sleep per retry
    web, slept = _web()
    with pytest.raises(PacsError, match=r"^listing: http://127.0.0.1:9/dicom-web answered HTTP 502 Reason "
                                        r"\(after 4 attempts\)$"):
        web.call("listing", _raise, _http_error(502))
    assert slept == [0.5, 1.0, 2.0]  # bounded: 3 retries after the first attempt
    for status, kind, text in [(401, AuthenticationError, "authentication failed"), (403, AuthenticationError, "403"),
                               (404, NotFoundError, "not found"), (400, PacsError, "HTTP 400")]:
        web, slept = _web()
        with pytest.raises(kind, match=text):
            web.call("x", _raise, _http_error(status))
        assert slept == []  # not transient: asked once
    web, slept = _web()
    with pytest.raises(PacsError, match="TLS verification .* --ca-bundle"):
        web.call("x", _raise, requests.exceptions.SSLError("certificate verify failed"))
    assert slept == []


def _raise(exc: Exception):
    raise exc


def test_a_stow_answer_that_lists_the_instance_as_failed_is_a_refusal():
    pydicom = need("pydicom")
    from casam_pacs.errors import PacsError
    from casam_pacs.store import _check_response

    answer = pydicom.Dataset()
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID, item.FailureReason = "1.2.3", 0xA700
    answer.FailedSOPSequence = [item]
    with pytest.raises(PacsError, match=r"refused \(failure reason 0xA700\)"):
        _check_response(answer, "1.2.3", "refused")
    ok = pydicom.Dataset()
    ok.ReferencedSOPSequence = [pydicom.Dataset()]
    ok.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = "1.2.3"
    _check_response(ok, "1.2.3", "refused")
    with pytest.raises(PacsError, match="other instances"):
        _check_response(ok, "1.2.4", "refused")


@pytest.mark.parametrize("args, env, message", [
    (["--dicomweb", "http://127.0.0.1:9/dw", "--study", "1.2.3"], {"CASAM_DICOMWEB_USER": "u"},
     "CASAM_DICOMWEB_USER is set but CASAM_DICOMWEB_PASSWORD is not"),
    (["--dicomweb", "http://u:pw@127.0.0.1:9/dw", "--study", "1.2.3"], {}, "must not hold credentials"),
    (["--dicomweb", "http://127.0.0.1:9/dw", "--study", "1.2.03"], {}, "--study '1.2.03' is not a DICOM UID"),
    (["--dicomweb", "http://127.0.0.1:9/dw", "--study", "1.2", "--series", "x"], {}, "--series 'x' is not"),
    (["--dicomweb", "http://127.0.0.1:9/dw"], {}, "--dicomweb needs --study UID"),
    (["--study", "1.2.3", "--store"], {}, "--study, --store need(s) --dicomweb URL"),
    (["--dicomweb", "http://127.0.0.1:9/dw", "--study", "1.2", "img.png"], {}, "give no IMAGE arguments"),
    (["--dicomweb", "http://127.0.0.1:9/dw", "--study", "1.2", "--store", "--single-slice"], {}, "--single-slice"),
    (["--dicomweb", "http://127.0.0.1:9/dw", "--study", "1.2", "--ca-bundle", "/nonexistent/ca.pem"], {},
     "--ca-bundle /nonexistent/ca.pem is not a file"),
])
def test_cheap_checks_come_before_any_request_or_engine(args, env, message, tmp_path, monkeypatch):
    """Port 9 has no server and --engines names no export: reaching either would say so instead."""
    from casam_infer.cli import main

    for name in ("CASAM_DICOMWEB_USER", "CASAM_DICOMWEB_PASSWORD", "CASAM_DICOMWEB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(main, [*args, "--box", "1", "1", "9", "9", "--engines", str(tmp_path / "none"),
                                       "--out", str(tmp_path / "o")])
    assert message in one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_an_unreachable_server_is_one_line_after_bounded_retries(tmp_path, monkeypatch):
    need("dicomweb_client", "pacs")
    import casam_pacs.client as client
    from casam_infer.cli import main

    slept: list[float] = []
    monkeypatch.setattr(client.time, "sleep", slept.append)
    result = CliRunner().invoke(main, ["--dicomweb", "http://127.0.0.1:9/dw", "--study", "1.2.3", "--box", "1", "1",
                                       "9", "9", "--engines", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    line = one_error_line(result)
    assert line == ("casam-infer: error: listing the series of study 1.2.3: cannot reach http://127.0.0.1:9/dw "
                    "(after 4 attempts): Connection refused")
    assert slept == [0.5, 1.0, 2.0]
    assert not Path(tmp_path / "o").exists()


class _FakeServer:
    """A DICOMweb client stand-in that answers QIDO/WADO from pydicom's CT_small, for the
    checks on what a server sends (the real server's tests are in test_pacs_orthanc.py)."""

    def __init__(self, series_uid: str, sop_uids: list[str], answer_sop: str | None = None):
        self.series_uid, self.sop_uids, self.answer_sop = series_uid, sop_uids, answer_sop

    def search_for_series(self, **_: object) -> list[dict]:
        return [{"0020000E": {"Value": [self.series_uid]}, "00080060": {"Value": ["CT"]}}]

    def search_for_instances(self, **_: object) -> list[dict]:
        return [{"00080018": {"Value": [uid]}, "00200013": {"Value": [n]}} for n, uid in enumerate(self.sop_uids)]

    def retrieve_instance(self, study: str, series: str, sop: str):
        pydicom = need("pydicom")
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, self.answer_sop or sop
        return ds


def _fake_web(server: _FakeServer):
    web, _ = _web(retries=0)
    web.client = server
    return web


def test_uids_a_server_sends_are_checked_before_they_name_files(tmp_path):
    from casam_pacs.errors import PacsError
    from casam_pacs.query import SeriesInfo, image_series
    from casam_pacs.retrieve import retrieve_series

    with pytest.raises(PacsError, match=r"listed a series UID '\.\./\.\./x' .*not a DICOM UID"):
        image_series(_fake_web(_FakeServer("../../x", ["1.2.3"])), "1.2")
    with pytest.raises(PacsError, match=r"listed an instance UID of series 1.2.9 '1.2/../../y' .*not a DICOM UID"):
        retrieve_series(_fake_web(_FakeServer("1.2.9", ["1.2/../../y"])), SeriesInfo("1.2", "1.2.9", "CT"), tmp_path)
    assert list(tmp_path.rglob("*")) == []
    with pytest.raises(PacsError, match=r"answered with instance 1\.2\.77 of series 1\.2\.9"):
        retrieve_series(_fake_web(_FakeServer("1.2.9", ["1.2.3"], answer_sop="1.2.77")),
                        SeriesInfo("1.2", "1.2.9", "CT"), tmp_path / "b")


def test_a_series_past_the_size_cap_is_refused(tmp_path):
    from casam_pacs.errors import PacsError
    from casam_pacs.query import SeriesInfo
    from casam_pacs.retrieve import retrieve_series

    web = _fake_web(_FakeServer("1.2.9", ["1.2.3", "1.2.4", "1.2.5"]))
    folder = retrieve_series(web, SeriesInfo("1.2", "1.2.9", "CT"), tmp_path / "a", max_bytes=10 ** 6)
    assert sorted(p.name for p in folder.iterdir()) == ["1.2.3.dcm", "1.2.4.dcm", "1.2.5.dcm"]
    one = (folder / "1.2.3.dcm").stat().st_size
    with pytest.raises(PacsError, match=r"series 1\.2\.9 is larger than .* after 2 of 3 instances"):
        retrieve_series(web, SeriesInfo("1.2", "1.2.9", "CT"), tmp_path / "b", max_bytes=int(one * 1.5))
