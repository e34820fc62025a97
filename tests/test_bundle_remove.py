"""Withdrawing a task: ``casam-train remove`` and the incremental re-export after it.

The export is driven only through its public face (``export_bundle``), and graphs are
compared by the sha256 the manifest records for them (checked against the files on disk),
not by file name, so the test holds whatever names the export gives its graphs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from casam_bundle import REMOVED_DIR, Bundle
from casam_bundle.package import pack_task, unpack_package
from conftest import make_random_bundle
from casam_core.files import sha256_file
from runtime_support import copy_engines, exported, sample_images
from trainer.cli import main


def graph_shas(manifest: dict[str, Any], engines: Path) -> dict[str, str]:
    """Graph key (encoder, router, decoder, align/<task>) → sha256, each checked on disk."""
    entries = dict(manifest["graphs"])
    entries.update({f"align/{t['name']}": t["align"] for t in manifest["tasks"]})
    for key, entry in entries.items():
        assert sha256_file(engines / entry["file"]) == entry["sha256"], key
    return {key: entry["sha256"] for key, entry in entries.items()}


def routes(engines: Path) -> list[str]:
    from runtime.pipeline import Pipeline

    pipe = Pipeline.from_manifest(engines, backend="ort-cpu")
    return [pipe.route(pipe.embed(image)[0])[0] for image in sample_images()]


def test_remove_then_reexport_rebuilds_only_the_router(tmp_path, tmp_path_factory):
    from casam_export import export_bundle

    source_bundle, source_engines = exported(tmp_path_factory)  # alpha, beta
    bundle_dir = tmp_path / "bundle"
    shutil.copytree(source_bundle, bundle_dir)
    engines = copy_engines(source_engines, tmp_path / "engines")
    # A third site's task joins (so that two tasks remain after the withdrawal).
    make_random_bundle(tmp_path / "site", ("gamma",), seed=7)
    pack_task(tmp_path / "site", "gamma", tmp_path / "gamma.casam")
    unpack_package(bundle_dir, tmp_path / "gamma.casam")
    before = graph_shas(export_bundle(bundle_dir, engines, verify=False, quiet=True), engines)
    routed = routes(engines)
    gone = max(("alpha", "beta", "gamma"), key=routed.count)  # withdraw the task that wins most images
    assert routed.count(gone) > 0
    record = Bundle.open(bundle_dir).task(gone)

    result = CliRunner().invoke(main, ["remove", "--bundle", str(bundle_dir), "--task", gone, "--keep"])
    assert result.exit_code == 0, result.output
    bundle = Bundle.open(bundle_dir)
    assert gone not in bundle.task_names and len(bundle.task_names) == 2
    entry = bundle.history[-1]
    assert entry["event"] == "removed" and entry["name"] == gone and entry["files"] == record.files
    kept = bundle_dir / entry["kept"]
    assert kept.parent == bundle_dir / REMOVED_DIR and not bundle.task_dir(gone).exists()
    assert {f: sha256_file(kept / f) for f in record.files} == record.files

    manifest = export_bundle(bundle_dir, engines, verify=False, quiet=True)
    after = graph_shas(manifest, engines)
    assert set(after) == set(before) - {f"align/{gone}"}
    for key in after:
        if key != "router":
            assert after[key] == before[key], f"{key} was rebuilt"
    assert after["router"] != before["router"]
    assert not list(engines.rglob(f"*{gone}*")), "the withdrawn task's graph is still in the export folder"
    now = routes(engines)
    assert gone not in now
    assert all(a == b for a, b in zip(routed, now) if a != gone)  # the others keep their images
