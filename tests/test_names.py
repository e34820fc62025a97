"""The one task-name check: command line, bundle.json and manifest.json all refuse the same names."""

from __future__ import annotations

import copy
import json

import pytest

from casam_bundle import Bundle, BundleError
from casam_core.errors import InputError, ManifestError
from runtime.manifest import Manifest
from casam_core.names import IDENTITY, check_task_name
from runtime_support import exported, one_error_line

BAD_NAMES = ["abc\n", "abc\t", "a\x00b", "\nabc", "../../evil", "a/b", "..", ".hidden", "", IDENTITY, "x" * 65, "é"]


@pytest.mark.parametrize("name", ["a", "polyp_kvasir", "cxr.jsrt-2", "A" * 64])
def test_good_names_pass(name):
    assert check_task_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES + [None, 3])
def test_bad_names_are_refused(name):
    # A trailing newline used to pass: the pattern ran through re.match with "$".
    with pytest.raises(InputError, match="is not allowed"):
        check_task_name(name)


@pytest.mark.parametrize("name", ["abc\n", "../../evil", IDENTITY])
def test_bundle_json_names_are_checked_on_open(random_bundle, name):
    path = random_bundle.root / "bundle.json"
    data = json.loads(path.read_text())
    data["tasks"][0]["name"] = name
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="is not allowed"):
        Bundle.open(random_bundle.root, verify=False)


@pytest.mark.parametrize("name", ["abc\n", "../../evil", IDENTITY])
def test_manifest_names_are_checked_on_load(tmp_path_factory, name):
    engines = exported(tmp_path_factory)[1]
    data = json.loads((engines / "manifest.json").read_text())
    bad = copy.deepcopy(data)
    bad["tasks"][0]["name"] = name
    with pytest.raises(ManifestError, match="is not allowed"):
        Manifest.load(engines, data=bad, verify=False)


def test_train_cli_refuses_control_characters(tmp_path):
    from click.testing import CliRunner

    from trainer.cli import main

    for name in ("abc\n", "abc\t", "a\x00b"):
        result = CliRunner().invoke(main, ["--bundle", str(tmp_path / "b"), "--task", name, "--data", str(tmp_path),
                                           "--sam", "tiny", "--quiet"])
        assert "is not allowed" in one_error_line(result), name
        assert not (tmp_path / "b").exists()
