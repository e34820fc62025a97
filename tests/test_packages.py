"""Task packages: pack at one site, unpack at another, and every refusal of issue 13.

Sites are random bundles (tests/conftest.py ``make_random_bundle``) on the same tiny SAM
checkpoint, so the tests exercise the real format, signatures and export without paying
for training. A refused package must leave the bundle byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_bundle import Bundle
from casam_bundle.package import INDEX, pack_task, read_package
from conftest import make_random_bundle
from casam_core.files import atomic_write_json, sha256_bytes
from runtime_support import TASKS, copy_engines, exported, one_error_line, sample_images
from trainer.cli import main
from trainer.session import SessionOptions


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) → sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def rezip(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], dict[str, bytes]]) -> Path:
    """A copy of package ``src`` whose entries ``edit`` changed (stored, so only ``edit`` differs)."""
    with zipfile.ZipFile(src) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in edit(entries).items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return dst


def edit_index(entries: dict[str, bytes], change: Callable[[dict], None], files: dict[str, bytes] = {}) -> dict[str, bytes]:
    """Entries with ``files`` replaced and the index changed, its sha256 list kept consistent."""
    index = json.loads(entries[INDEX])
    for name, data in files.items():
        entries[f"files/{name}"] = data
        index["task"]["files"][name] = sha256_bytes(data)
    change(index)
    return {**entries, INDEX: json.dumps(index).encode()}


def unpack(*args: str):
    return CliRunner().invoke(main, ["unpack", *args])


def refused(result, *phrases: str) -> None:
    line = one_error_line(result)
    assert result.stderr.startswith("casam-train: error: ") and result.stderr.count("\n") == 1, result.stderr
    for phrase in phrases:
        assert phrase in line, line


def restage(bundle: Bundle, name: str, vae_beta: float | None = None, **files: bytes) -> None:
    """Recommit task ``name`` with some files replaced (and its record's VAE β)."""
    staged = bundle.root / ".staging" / name / "task"
    staged.mkdir(parents=True)
    for fname in ("alignment.safetensors", "vae.safetensors", "calibration.json", "split.json", "train_log.json"):
        (staged / fname).write_bytes(files.get(fname.replace(".", "_"), (bundle.task_dir(name) / fname).read_bytes()))
    record = bundle.task(name)
    if vae_beta is not None:
        record.vae["beta"] = vae_beta
    bundle.commit_task(record, staged, replace=True)


# ----- two sites → one deployment -----------------------------------------------------------
def test_two_sites_pack_unpack_export_route_like_one_site(tmp_path, tmp_path_factory):
    """Site A trains alpha, site B trains beta (next to a task it keeps): packed, unpacked
    into a third bundle and exported, the deployment is the one-site bundle's, graph for
    graph, and routes every image the same."""
    from casam_export import export_bundle
    from runtime.pipeline import Pipeline

    one_site, one_site_engines = exported(tmp_path_factory)  # alpha, beta seeded as in one place (seed 3)
    make_random_bundle(tmp_path / "site_a", ("alpha",), seed=3)
    make_random_bundle(tmp_path / "site_b", ("alpha", "beta"), seed=3)  # only beta leaves site B
    for site, task in (("site_a", "alpha"), ("site_b", "beta")):
        result = CliRunner().invoke(main, ["pack", "--bundle", str(tmp_path / site), "--task", task,
                                           "--out", str(tmp_path / f"{task}.casam")])
        assert result.exit_code == 0, result.output
    for task in TASKS:
        assert unpack(str(tmp_path / f"{task}.casam"), "--bundle", str(tmp_path / "hub")).exit_code == 0
    hub = Bundle.open(tmp_path / "hub")
    assert hub.task_names == list(TASKS) and hub.meta["sam"] == Bundle.open(one_site).meta["sam"]

    engines = copy_engines(one_site_engines, tmp_path / "engines")
    manifest = export_bundle(hub.root, engines, verify=False, quiet=True)
    before = json.loads((one_site_engines / "manifest.json").read_text())
    # Same bytes in, same graphs out: the export recognises every graph as already built.
    for key, entry in manifest["graphs"].items():
        assert entry["reused"] and entry["sha256"] == before["graphs"][key]["sha256"], key
    for task, old in zip(manifest["tasks"], before["tasks"]):
        assert task["align"]["reused"] and task["align"]["sha256"] == old["align"]["sha256"]
        assert task["threshold"] == old["threshold"]
    hub_pipe = Pipeline.from_manifest(engines, backend="ort-cpu")
    one_pipe = Pipeline.from_manifest(one_site_engines, backend="ort-cpu")
    for image in sample_images():
        assert hub_pipe.route(hub_pipe.embed(image)[0])[0] == one_pipe.route(one_pipe.embed(image)[0])[0]


# ----- refusals ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    """Built once: another site's bundle with task 'gamma' (τ = 0.75), its package, and a
    target bundle with alpha and beta."""
    root = tmp_path_factory.mktemp("packages")
    make_random_bundle(root / "site", ("gamma",), seed=7, thresholds=[0.75])
    pack_task(root / "site", "gamma", root / "gamma.casam")
    make_random_bundle(root / "target", ("alpha", "beta"), seed=1)
    return root


@pytest.fixture
def site(site_files, tmp_path):
    """(gamma's package, a private copy of the target bundle)."""
    shutil.copytree(site_files / "target", tmp_path / "target")
    shutil.copytree(site_files / "site", tmp_path / "site")
    return site_files / "gamma.casam", tmp_path / "target"


def _flip_payload_byte(entries: dict[str, bytes]) -> dict[str, bytes]:
    data = bytearray(entries["files/vae.safetensors"])
    data[len(data) // 2] ^= 0x01
    return {**entries, "files/vae.safetensors": bytes(data)}


TAMPERING = {
    # name: (edit of the archive's entries, phrases of the one-line refusal)
    "flipped byte": (_flip_payload_byte, ["files/vae.safetensors has sha256", "refused"]),
    "added file": (lambda e: {**e, "files/extra.bin": b"x"}, ["unexpected archive entry 'files/extra.bin'"]),
    "zip-slip ..": (lambda e: {**e, "files/../../evil.py": b"x"}, ["would escape the task folder (zip-slip)"]),
    "zip-slip absolute": (lambda e: {**e, "/tmp/evil.py": b"x"}, ["would escape the task folder (zip-slip)"]),
    "format version": (lambda e: edit_index(e, lambda i: i.update(format_version=99)), ["format version 99"]),
    "other SAM": (lambda e: edit_index(e, lambda i: i["sam"].update(checkpoint_sha256="f" * 64)),
                  ["trained on SAM 'tiny' checkpoint ffff", "only works with the SAM it was trained on"]),
    "other preprocessing": (lambda e: edit_index(e, lambda i: i["preprocessing"].update(resize="stretch")),
                            ["trained with preprocessing", "cannot be mixed"]),
    # the one task-name check, on the name a package's index gives (casam_core/names.py)
    "task name climbing out": (lambda e: edit_index(e, lambda i: i["task"].update(name="../../evil")),
                               ["task name '../../evil'", "is not allowed"]),
    "task name with a newline": (lambda e: edit_index(e, lambda i: i["task"].update(name="gamma\n")),
                                 ["task name 'gamma\\n'", "is not allowed"]),
    "task name identity": (lambda e: edit_index(e, lambda i: i["task"].update(name="identity")),
                           ["task name 'identity'", "is not allowed"]),
    "non-finite threshold": (lambda e: edit_index(e, lambda i: i["task"].update(threshold=float("inf"))),
                             ["threshold inf is not a finite number"]),
    "threshold not from its scores": (
        lambda e: edit_index(e, lambda i: None, files={"calibration.json": json.dumps(
            {**json.loads(e["files/calibration.json"]), "scores": [0.1, 0.2, 0.3, 0.4, 0.5]}).encode()}),
        ["the recorded held-out scores give", "does not come from its calibration"]),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_package_is_refused_and_bundle_untouched(site, tmp_path, case):
    package, target = site
    edit, phrases = TAMPERING[case]
    bad = rezip(package, tmp_path / "bad.casam", edit)
    before = snapshot(target)
    refused(unpack(str(bad), "--bundle", str(target)), *phrases)
    assert snapshot(target) == before
    assert not (tmp_path / "evil.py").exists() and not Path("/tmp/evil.py").exists()


def test_name_clash_suggests_as(site):
    package, target = site
    assert unpack(str(package), "--bundle", str(target)).exit_code == 0
    before = snapshot(target)
    refused(unpack(str(package), "--bundle", str(target)), "task 'gamma' already exists", "--as NAME")
    assert snapshot(target) == before
    assert unpack(str(package), "--bundle", str(target), "--as", "gamma2").exit_code == 0
    bundle = Bundle.open(target)
    assert bundle.task_names == ["alpha", "beta", "gamma", "gamma2"]
    assert bundle.task("gamma2").files == bundle.task("gamma").files


@pytest.mark.parametrize("name", ["../../evil", "gamma\n", "identity"])
def test_package_task_names_get_the_one_name_check(site, tmp_path, name):
    """The name in a package's index is checked when the package is read on its own (before
    any file in it is looked at), and the name given with ``--as`` when it is unpacked."""
    from casam_bundle import BundleError

    package, target = site
    bad = rezip(package, tmp_path / "bad.casam", lambda e: edit_index(e, lambda i: i["task"].update(name=name)))
    with pytest.raises(BundleError, match=f"task name {re.escape(repr(name))} in {re.escape(str(bad))} .*is not allowed"):
        read_package(bad)
    before = snapshot(target)
    refused(unpack(str(package), "--bundle", str(target), "--as", name), f"task name {name!r}", "is not allowed")
    assert snapshot(target) == before


def test_signatures_trust_and_required(site, tmp_path):
    package, target = site
    runner = CliRunner()
    (tmp_path / "keys").mkdir()
    for who in ("site_key", "other_key"):
        assert runner.invoke(main, ["keygen", "--out", str(tmp_path / who)]).exit_code == 0
    (tmp_path / "site_key.pub").rename(tmp_path / "keys" / "site_key.pub")  # the coordinator trusts 'site' only
    assert oct((tmp_path / "site_key").stat().st_mode & 0o777) == "0o600"
    signed, forged = tmp_path / "signed.casam", tmp_path / "forged.casam"
    for key, out in (("site_key", signed), ("other_key", forged)):
        result = runner.invoke(main, ["pack", "--bundle", str(tmp_path / "site"), "--task", "gamma",
                                      "--out", str(out), "--sign", str(tmp_path / key)])
        assert result.exit_code == 0, result.output
    before = snapshot(target)
    refused(unpack(str(forged), "--bundle", str(target), "--trust", str(tmp_path / "keys")), "not in the trust folder")
    refused(unpack(str(package), "--bundle", str(target), "--trust", str(tmp_path / "keys")), "is not signed")
    # A signed index with another site's file swapped in: the signature covers every sha256.
    swapped = rezip(signed, tmp_path / "swapped.casam", lambda e: edit_index(
        e, lambda i: None, files={"train_log.json": b'{"epochs": []}\n'}))
    refused(unpack(str(swapped), "--bundle", str(target), "--trust", str(tmp_path / "keys")), "signature does not match")
    assert snapshot(target) == before

    ok = unpack(str(signed), "--bundle", str(target), "--trust", str(tmp_path / "keys"), "--require-signatures")
    assert ok.exit_code == 0 and "signed by trusted key" in ok.output
    assert Bundle.open(target).require_signatures
    refused(unpack(str(package), "--bundle", str(target), "--as", "gamma2"), "requires signed task packages")


def test_redacted_split_ships_no_stems(tmp_path):
    bundle = make_random_bundle(tmp_path / "site", ("gamma",))
    split = {"source": "seeded 80/20", "seed": 0, "data": "/hospital/private/gamma", "kind": "folder", "axis": 2,
             "train": ["patient0417_a", "patient0418_b"], "test": ["patient0419_c"], "skipped_empty": []}
    restage(bundle, "gamma", split_json=json.dumps(split).encode())
    bundle.meta["tasks"][0]["hyperparameters"]["data"] = "/hospital/private/gamma"
    atomic_write_json(bundle.root / "bundle.json", bundle.meta)
    plain, redacted = tmp_path / "plain.casam", tmp_path / "redacted.casam"
    pack_task(bundle.root, "gamma", plain)
    assert CliRunner().invoke(main, ["pack", "--bundle", str(bundle.root), "--task", "gamma", "--out", str(redacted),
                                     "--redact-split"]).exit_code == 0
    assert b"patient0417_a" in read_package(plain).files["split.json"]
    package = read_package(redacted)
    with zipfile.ZipFile(redacted) as archive:
        everything = b"".join(archive.read(n) for n in archive.namelist())
    assert b"patient04" not in everything and b"/hospital/private" not in everything
    assert json.loads(package.files["split.json"]) == {"source": "seeded 80/20", "seed": 0, "kind": "folder", "axis": 2,
                                                        "n_train": 2, "n_test": 1, "n_skipped_empty": 0, "redacted": True}
    assert unpack(str(redacted), "--bundle", str(tmp_path / "hub")).exit_code == 0
    assert Bundle.open(tmp_path / "hub").load_split("gamma")["redacted"] is True


def test_check_data_flags_a_task_that_captures_every_image(site, tmp_path, tiny_sam, capsys):
    """A VAE with zero weights and β = 0 scores every image at mean(f²), lower than any real
    VAE, so with a generous threshold it would win every routing decision."""
    from safetensors.torch import save_file
    from casam_bundle.package import unpack_package
    from models.vae import TaskVAE
    from trainer.package_check import package_vet

    package, target = site
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, image in enumerate(sample_images()[:3]):
        Image.fromarray(image[..., :3] if image.ndim == 3 else (image >> 8).astype(np.uint8)).save(refs / f"ref{i}.png")
    evil_site = make_random_bundle(tmp_path / "evil_site", ("gamma",), seed=7)  # threshold 1e6
    zero = {k: v.zero_() for k, v in TaskVAE().state_dict().items()}
    save_file(zero, str(tmp_path / "zero.safetensors"))
    restage(evil_site, "gamma", vae_beta=0.0, vae_safetensors=(tmp_path / "zero.safetensors").read_bytes())
    evil = tmp_path / "evil.casam"
    pack_task(evil_site.root, "gamma", evil)
    cache = tmp_path / "cache"
    before = snapshot(target)
    refused(unpack(str(evil), "--bundle", str(target), "--check-data", str(refs), "--strict", "--device", "cpu",
                   "--cache-dir", str(cache), "--quiet"),
            "would take 3 of 3 reference images", "refused (--strict)")
    assert snapshot(target) == before

    def vet(strict: bool, report: dict):
        return package_vet(refs, strict=strict, report=report,
                           session=SessionOptions(device="cpu", cache_dir=cache, quiet=True, frozen_sam=tiny_sam))

    benign: dict = {}
    unpack_package(target, package, as_name="gamma_ok", vet=vet(True, benign))  # τ = 0.75: takes nothing
    assert benign["takeover"] == {"images": 3, "taken": 0, "share": 0.0}
    warned: dict = {}
    unpack_package(target, evil, vet=vet(False, warned))
    assert warned["takeover"]["taken"] == 3 and "warning: task 'gamma' would take 3 of 3" in capsys.readouterr().err
    assert Bundle.open(target).task_names == ["alpha", "beta", "gamma_ok", "gamma"]
