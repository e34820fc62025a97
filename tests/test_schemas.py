"""bundle.json, manifest.json and calibration.json against their published JSON Schemas.

Every malformed document ends in exit code 2 and one line naming the file, the field
(JSON path) and what was expected; never a traceback. NaN and ±Infinity, which Python's
json reads although JSON has no such numbers, are refused wherever they appear.
"""

from __future__ import annotations

import configparser
import copy
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from casam_core.errors import ManifestError
from casam_core.files import SCHEMA_DIR, read_versioned_json
from runtime.manifest import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION
from runtime_support import exported, one_error_line

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Path, Path]:
    return exported(tmp_path_factory)


def broken_manifest(engines: Path, folder: Path, edit) -> Path:
    """``folder`` holding the shipped manifest.json after ``edit(data)``; the schema check
    runs before any engine file is opened, so the graphs need not be copied."""
    data = json.loads((engines / "manifest.json").read_text())
    edit(data)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(data))  # json.dumps writes NaN as NaN
    return folder


def set_path(data, path: tuple, value) -> None:
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


@pytest.mark.parametrize("path,value,expected", [
    (("max_prompts",), "x", r"\$\.max_prompts: 'x' is not of type 'integer'"),
    (("preprocessing", "size"), 0, r"\$\.preprocessing\.size: 0 is less than the minimum of 1"),
    (("tasks", 0, "threshold"), float("nan"), r"\$\.tasks\[0\]\.threshold is NaN; every number must be finite"),
    (("tasks", 1, "thresholds", "p99"), float("-inf"), r"\$\.tasks\[1\]\.thresholds\.p99 is -Infinity"),
    (("graphs", "decoder", "sha256"), 12, r"\$\.graphs\.decoder\.sha256: 12 is not of type 'string'"),
    (("graphs", "router"), None, r"\$\.graphs\.router: None is not of type 'object'"),
])
def test_malformed_manifest_exits_2_naming_file_and_field(shipped, tmp_path, path, value, expected):
    from casam_infer.cli import main

    from PIL import Image

    folder = broken_manifest(shipped[1], tmp_path / "engines", lambda d: set_path(d, path, value))
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    result = CliRunner().invoke(main, [str(tmp_path / "x.png"), "--box", "1", "2", "3", "4", "--engines", str(folder),
                                       "--out", str(tmp_path / "out")])
    line = one_error_line(result)
    assert str(folder / "manifest.json") in line
    assert re.search(expected, line), line


def test_manifest_without_a_required_graph_or_task_field(shipped, tmp_path):
    data = json.loads((shipped[1] / "manifest.json").read_text())
    for n, edit in enumerate([lambda d: d["graphs"].pop("encoder"), lambda d: d["tasks"][0].pop("align")]):
        broken = copy.deepcopy(data)
        edit(broken)
        with pytest.raises(ManifestError) as info:
            read_versioned_json(tmp_path / f"m{n}.json", MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, ManifestError,
                                "casam manifest", missing="", data=broken)
        assert ("$.graphs: 'encoder' is a required property", "$.tasks[0]: 'align' is a required property")[n] \
            in str(info.value)


def test_unknown_extra_fields_are_allowed(shipped, tmp_path):
    """Newer writers add fields (a history, a verified flag, …): readers must still load."""
    from runtime.manifest import Manifest

    def add(d):
        d["verified"] = True
        d["graphs"]["encoder"]["note"] = {"anything": [1, 2]}
        d["tasks"][0]["extra"] = "x"
    folder = broken_manifest(shipped[1], tmp_path / "engines", add)
    manifest = Manifest.load(folder, verify=False)
    assert manifest.task_names == ["alpha", "beta"]


def _bundle_copy(bundle: Path, dest: Path, edit) -> Path:
    """The shipped bundle's bundle.json after ``edit``, next to its (linked) task folders."""
    dest.mkdir()
    (dest / "tasks").symlink_to(bundle / "tasks")
    data = json.loads((bundle / "bundle.json").read_text())
    edit(data)
    (dest / "bundle.json").write_text(json.dumps(data))
    return dest


@pytest.mark.parametrize("edit,expected", [
    (lambda d: d["tasks"][0].pop("alignment"), "$.tasks[0]: 'alignment' is a required property"),
    (lambda d: d["tasks"][1].__setitem__("threshold", float("nan")), "$.tasks[1].threshold is NaN"),
    (lambda d: d["preprocessing"].__setitem__("resize", "crop"), "$.preprocessing.resize: 'crop' is not one of"),
    (lambda d: d["tasks"][0]["files"].__setitem__("vae.safetensors", "abc"),
     "$.tasks[0].files['vae.safetensors']: 'abc' does not match"),
])
def test_malformed_bundle_exits_2_naming_file_and_field(shipped, tmp_path, edit, expected):
    from casam_export.cli import main

    bundle = _bundle_copy(shipped[0], tmp_path / "bundle", edit)
    result = CliRunner().invoke(main, ["--bundle", str(bundle), "--out", str(tmp_path / "out"), "--no-verify"])
    line = one_error_line(result)
    assert str(bundle / "bundle.json") in line and expected in line, line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_malformed_calibration_exits_2(shipped, tmp_path):
    """calibration.json feeds the manifest's thresholds: a string there is refused by name."""
    import shutil

    from casam_export.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(shipped[0], bundle)
    calibration = bundle / "tasks" / "beta" / "calibration.json"
    data = json.loads(calibration.read_text())
    data["p95"] = "high"
    calibration.write_text(json.dumps(data))
    meta = json.loads((bundle / "bundle.json").read_text())
    from casam_core.files import sha256_file

    meta["tasks"][1]["files"]["calibration.json"] = sha256_file(calibration)  # a consistent, but wrong, bundle
    (bundle / "bundle.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(main, ["--bundle", str(bundle), "--out", str(tmp_path / "out"), "--no-verify"])
    line = one_error_line(result)
    assert str(calibration) in line and "$.p95: 'high' is not of type 'number'" in line, line


def test_schemas_are_published_in_docs_and_shipped_with_the_package():
    """docs/*.schema.json are links to the one copy in casam_core/schemas/, which setup.cfg installs."""
    names = sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json"))
    assert names == ["bundle.schema.json", "calibration.schema.json", "manifest.schema.json"]
    for name in names:
        doc = REPO / "docs" / name
        assert doc.is_symlink() and doc.resolve() == (SCHEMA_DIR / name).resolve()
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    pattern = cfg["options.package_data"]["casam_core"].strip()
    assert sorted(p.name for p in (REPO / "casam_core").glob(pattern)) == names


NON_FINITE = ["NaN", "Infinity", "-Infinity"]


def _with_literal(path: Path, field: tuple, literal: str) -> None:
    """Rewrite JSON file ``path`` with ``literal`` (Python's json writes NaN, Infinity and
    -Infinity, which JSON has not) as the number at ``field``."""
    data = json.loads(path.read_text())
    set_path(data, field, {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[literal])
    text = json.dumps(data)
    assert literal in text
    path.write_text(text)


def _refusal(document: str, where: str, literal: str) -> str:
    """The one-line refusal of a non-finite number, as a regex: the file, the JSON path, the literal."""
    return rf"{re.escape(document)}: \${re.escape(where)} is {re.escape(literal)}; every number must be finite"


@pytest.mark.parametrize("literal", NON_FINITE)
def test_non_finite_numbers_in_manifest_json_are_refused_by_name(shipped, tmp_path, literal):
    from runtime.manifest import Manifest

    folder = broken_manifest(shipped[1], tmp_path / "engines", lambda d: None)
    _with_literal(folder / "manifest.json", ("tasks", 1, "threshold"), literal)
    with pytest.raises(ManifestError, match=_refusal("manifest.json", ".tasks[1].threshold", literal)):
        Manifest.load(folder, verify=False)


@pytest.mark.parametrize("literal", NON_FINITE)
def test_non_finite_numbers_in_bundle_json_are_refused_by_name(shipped, tmp_path, literal):
    from casam_bundle import Bundle, BundleError

    bundle = _bundle_copy(shipped[0], tmp_path / "bundle", lambda d: None)
    _with_literal(bundle / "bundle.json", ("tasks", 0, "threshold"), literal)
    with pytest.raises(BundleError, match=_refusal("bundle.json", ".tasks[0].threshold", literal)):
        Bundle.open(bundle, verify=False)


@pytest.mark.parametrize("literal", NON_FINITE)
@pytest.mark.parametrize("field", [("p97",), ("scores", 2)], ids=["p97", "scores"])
def test_non_finite_numbers_in_calibration_json_are_refused_by_name(shipped, tmp_path, literal, field):
    """A task's calibration.json, checked against its schema whenever the bundle is opened."""
    import shutil

    from casam_bundle import Bundle, BundleError
    from casam_core.files import sha256_file

    bundle = tmp_path / "bundle"
    shutil.copytree(shipped[0], bundle)
    calibration = bundle / "tasks" / "beta" / "calibration.json"
    _with_literal(calibration, field, literal)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["tasks"][1]["files"]["calibration.json"] = sha256_file(calibration)  # consistent, so the reader is what refuses
    (bundle / "bundle.json").write_text(json.dumps(meta))
    where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in field)
    with pytest.raises(BundleError, match=_refusal("calibration.json", where, literal)):
        Bundle.open(bundle)
