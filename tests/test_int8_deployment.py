"""int8 that holds where it runs (issue 27): the verification set travels with the export,
the runtime re-runs it on a CPU of another int8 kernel class (simulated by editing the
class the manifest records, so these tests run on any CPU), falls back to the shipped fp32
copies or refuses with one line, and the export gate checks score margins.

One int8 export per module (slow): a copy of the session's tiny bundle whose task splits
name a dataset folder (real images from ../shared/data/real where present, else synthetic
pictures): training images calibrate, held-out images verify.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_core.errors import ManifestError
from casam_core.files import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from casam_export import export_bundle, quantize
from casam_export.parity import synthetic_images
from conftest import real_data_or_skip
from runtime import deployment
from runtime.cpu_class import KERNEL_CLASSES, int8_kernel_class, kernel_class_of
from runtime.deployment import DeploymentWarning, VerificationSet
from runtime.pipeline import Pipeline
from runtime.prompts import Prompts
from runtime_support import exported, one_error_line

REAL_SETS = ("polyp_kvasir", "skin_ph2", "cxr_jsrt", "nuclei_monuseg")


def dataset(folder: Path) -> tuple[list[str], list[str]]:
    """images/ with 4 training and 4 held-out images (none of them among the images bench/int8_speed.py
    measures: it takes every 7th from the first); (train stems, test stems)."""
    (folder / "images").mkdir(parents=True)
    root = real_data_or_skip()
    real = [sorted((root / name / "images").iterdir())[3:5] for name in REAL_SETS if (root / name / "images").is_dir()]
    files = [p for pair in real for p in pair]
    if len(files) >= 8:
        for i, path in enumerate(files[:8]):
            img = Image.open(path).convert("RGB")
            img.thumbnail((512, 512))
            img.save(folder / "images" / f"s{i}.png")
    else:
        for i, img in enumerate(synthetic_images(seed=7) + synthetic_images(seed=8) + synthetic_images(seed=9)[:2]):
            Image.fromarray(img if img.dtype == np.uint8 else (img // 257).astype(np.uint8)).save(folder / "images" / f"s{i}.png")
    return [f"s{i}" for i in (0, 2, 4, 6)], [f"s{i}" for i in (1, 3, 5, 7)]


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    bundle, fp32 = exported(tmp_path_factory)
    root = tmp_path_factory.mktemp("int8_deploy")
    shutil.copytree(bundle, root / "bundle")
    train, test = dataset(root / "data")
    meta = read_json(root / "bundle" / "bundle.json")
    for task in meta["tasks"]:
        split = root / "bundle" / "tasks" / task["name"] / "split.json"
        atomic_write_json(split, {"data": str(root / "data"), "kind": "folder", "train": train, "test": test, "seed": 0})
        task["files"]["split.json"] = sha256_file(split)
    atomic_write_json(root / "bundle" / "bundle.json", meta)
    shutil.copytree(fp32, root / "engines")  # router and decoder stay fp32: reused, not traced again
    manifest = export_bundle(root / "bundle", root / "engines", int8=True, verify=False)
    return root, fp32, manifest


def deployed_copy(root: Path, dest: Path, **edits) -> Path:
    """A copy of the int8 export whose manifest says it was verified on another kernel class."""
    shutil.copytree(root / "engines", dest)
    data = read_json(dest / "manifest.json")
    data["int8_kernel_class"] = next(c for c in KERNEL_CLASSES if c != int8_kernel_class())
    data.update(edits)
    atomic_write_json(dest / "manifest.json", data)
    return dest


def rewrite_set(folder: Path, change) -> None:
    """Apply ``change`` to the folder's verification set and re-hash it in the manifest."""
    data = read_json(folder / "manifest.json")
    path = folder / data["verification"]["file"]
    vset = VerificationSet.read(path)
    change(vset)
    atomic_write_bytes(path, vset.to_bytes())
    data["verification"]["sha256"] = sha256_file(path)
    atomic_write_json(folder / "manifest.json", data)


def int8_keys(manifest):
    return [k for k, e in {**manifest["graphs"], **{f"align/{t['name']}": t["align"] for t in manifest["tasks"]}}.items()
            if e["precision"] == "int8"]


def test_cpu_class_from_flags():
    assert kernel_class_of(["avx2", "fma", "avx512f", "amx_int8", "avx512_vnni"]) == "amx"
    assert kernel_class_of(["avx2", "avx512f", "avx512_vnni"]) == "vnni"
    assert kernel_class_of(["avx2", "avx_vnni"]) == "vnni"
    assert kernel_class_of(["sse4_1", "avx2", "fma", "avx512f"]) == "avx2"  # AVX-512 without VNNI: int16 pairs
    assert int8_kernel_class() in KERNEL_CLASSES


def test_export_ships_its_verification_set_and_fp32_copies(int8_export):
    root, _, manifest = int8_export
    assert manifest["int8_kernel_class"] == int8_kernel_class()
    entry = manifest["verification"]
    path = root / "engines" / entry["file"]
    assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"] <= entry["size_cap_bytes"]
    vset = VerificationSet.read(path)
    # held-out images of both tasks (their split.json "test" lists), not the training images
    assert len(vset.cases) == 8 and {c.label for c in vset.cases} == {"alpha", "beta"}
    assert all(max(c.image.shape[:2]) <= 384 and c.image.dtype == np.uint8 for c in vset.cases)
    keys = int8_keys(manifest)
    assert "encoder" in keys
    for key in keys:
        graph = manifest["graphs"].get(key) or next(t["align"] for t in manifest["tasks"] if f"align/{t['name']}" == key)
        copy = graph["fp32_fallback"]
        assert sha256_file(root / "engines" / copy["file"]) == copy["sha256"]
        assert not any(n.op_type == "DequantizeLinear" for n in onnx.load(str(root / "engines" / copy["file"])).graph.node)
        check = graph["quantization"]["verification"]
        assert set(check["per_label"]) == {"alpha", "beta"} and check["bars"]["score_margin"] == deployment.SCORE_MARGIN


def test_same_class_trusts_the_export(int8_export, monkeypatch):
    root, _, _ = int8_export
    monkeypatch.setattr(deployment, "run_set", lambda *a: pytest.fail("re-ran the set on the exporting CPU class"))
    Pipeline.from_manifest(root / "engines", backend="ort-cpu")


def test_other_class_reruns_the_set_once_and_keeps_int8(int8_export, tmp_path, monkeypatch):
    root, _, manifest = int8_export
    folder = deployed_copy(root, tmp_path / "engines")
    pipe = Pipeline.from_manifest(folder, backend="ort-cpu")
    assert pipe.manifest_obj.graphs["encoder"].path.name == manifest["graphs"]["encoder"]["file"]  # int8 kept
    verdicts = list((folder / "deployment").iterdir())
    assert len(verdicts) == 1 and read_json(verdicts[0])["affected"] == []
    runs = []
    real = deployment.run_set
    monkeypatch.setattr(deployment, "run_set", lambda *a: runs.append(1) or real(*a))
    Pipeline.from_manifest(folder, backend="ort-cpu")
    assert runs == []  # the cached verdict
    rewrite_set(folder, lambda v: v.cases.pop())  # other inputs: the old verdict is not trusted
    Pipeline.from_manifest(folder, backend="ort-cpu")
    assert runs == [1] and len(list((folder / "deployment").iterdir())) == 2


def test_a_failing_set_runs_the_fp32_copies(int8_export, tmp_path):
    root, _, manifest = int8_export
    folder = deployed_copy(root, tmp_path / "engines")

    def invert_masks(vset):  # references no int8 chain can match: every graph misses the IoU bar
        for case in vset.cases:
            case.masks = ~case.masks
            case.forced = {k: ~v for k, v in case.forced.items()}

    rewrite_set(folder, invert_masks)
    with pytest.warns(DeploymentWarning, match="run in fp32"):
        pipe = Pipeline.from_manifest(folder, backend="ort-cpu")
    encoder = manifest["graphs"]["encoder"]
    assert pipe.manifest_obj.graphs["encoder"].path.name == encoder["fp32_fallback"]["file"]
    assert pipe.manifest["graphs"]["encoder"]["precision"] == "fp32"
    image = synthetic_images()[0]
    prompts = Prompts.for_image(image.shape, boxes=np.array([[10, 10, 200, 150]], np.float32))
    assert pipe.predict(image, prompts).masks.shape[0] == 1


def test_a_route_change_fails_the_encoder_only(int8_export, tmp_path):
    root, _, manifest = int8_export
    folder = deployed_copy(root, tmp_path / "engines")

    def reroute(vset):
        vset.cases[0].route = next(t for t in ["identity", *vset.tasks] if t != vset.cases[0].route)

    rewrite_set(folder, reroute)
    from casam_infer.verify_deployment import verify_deployment

    report = verify_deployment(folder, "ort-cpu")
    assert report.affected == ["encoder"] and not report.routes_identical


def test_a_failing_set_without_fp32_copies_is_refused_in_one_line(int8_export, tmp_path):
    root, _, manifest = int8_export
    folder = deployed_copy(root, tmp_path / "engines")
    data = read_json(folder / "manifest.json")
    for entry in [*data["graphs"].values(), *(t["align"] for t in data["tasks"])]:
        entry.pop("fp32_fallback", None)  # as --no-fp32-fallback writes it
    atomic_write_json(folder / "manifest.json", data)
    rewrite_set(folder, lambda v: [setattr(c, "masks", ~c.masks) for c in v.cases])
    with pytest.raises(ManifestError, match="fail the export's verification set .* ships no fp32 copy"):
        Pipeline.from_manifest(folder, backend="ort-cpu")
    from casam_infer.cli import main

    image = tmp_path / "x.png"
    Image.fromarray(synthetic_images()[1]).save(image)
    result = CliRunner().invoke(main, [str(image), "--engines", str(folder), "--box", "5", "5", "100", "100",
                                       "--out", str(tmp_path / "out"), "--backend", "ort-cpu"])
    assert "ships no fp32 copy" in one_error_line(result)
    table = CliRunner().invoke(main, ["--verify-deployment", str(folder)], env={"CASAM_BACKEND": "ort-cpu"})
    assert "encoder" in table.stdout and "FAIL" in table.stdout
    assert "fail the verification set" in one_error_line(table)


def test_verify_deployment_prints_the_table(int8_export):
    from casam_infer.cli import main

    root, _, _ = int8_export
    result = CliRunner().invoke(main, ["--verify-deployment", str(root / "engines")], env={"CASAM_BACKEND": "ort-cpu"})
    assert result.exit_code == 0, result.output
    assert "alpha" in result.stdout and "beta" in result.stdout and "pass" in result.stdout


def scaled_encoder(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """``model`` with its output multiplied by ``factor``: a stand-in for an int8 encoder
    whose embeddings (and so its scores) moved."""
    from onnx import helper, numpy_helper

    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_raw" if o == out else o for o in node.output]
        node.input[:] = [f"{i}_raw" if i == out else i for i in node.input]
    model.graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "scale_factor"))
    model.graph.node.append(helper.make_node("Mul", [f"{out}_raw", "scale_factor"], [out]))
    return model


def test_a_score_margin_violation_fails_the_export_gate(int8_export, tiny_sam, monkeypatch):
    """τ placed between each image's fp32 score and the moved one: the encoder's int8 graph
    is refused (written fp32) with a score-margin failure, though its masks and routes hold."""
    from casam_bundle import Bundle

    root, _, manifest = int8_export
    bundle = Bundle.open(root / "bundle")
    fp32 = onnx.load(str(root / "engines" / manifest["graphs"]["encoder"]["fp32_fallback"]["file"]))
    moved = scaled_encoder(onnx.load(str(root / "engines" / manifest["graphs"]["encoder"]["fp32_fallback"]["file"])), 1.02)
    quantizer = quantize.Quantizer(bundle, tiny_sam.model, quantize.calibration_set(bundle, None, 2))
    a, b = quantize._session(fp32), quantize._session(moved)
    scores = [(quantizer._route(a.run(None, f)[0])[1], quantizer._route(b.run(None, f)[0])[1])
              for f in quantizer._inputs("encoder", quantizer.verify_images)]
    assert all(not np.allclose(s, t) for s, t in scores)
    # τ per task at the median midpoint of (fp32, moved) scores: some image crosses it
    tau = np.array([np.median([(s[j] + t[j]) / 2 for s, t in scores]) for j in range(len(bundle.tasks))])
    monkeypatch.setattr(quantizer, "thresholds", tau.astype(np.float32))
    monkeypatch.setattr(quantize, "quantize_model", lambda model, feeds, config: moved)
    with pytest.warns(UserWarning, match="int8 encoder misses its bar"):
        _, record = quantizer.quantize("encoder", fp32)
    failures = record["verification"]["failures"]
    assert record["precision"] == "fp32" and any(f.startswith("score margin") for f in failures), failures


def test_int8_masks_hold_on_real_images(int8_export):
    """The chosen defaults on real images (one box from each ground-truth mask, images the
    calibration never saw): mean IoU ≥ 0.97 and min ≥ 0.93 against fp32, routes identical."""
    real_data_or_skip(*REAL_SETS)
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from int8_speed import iou, real_cases

    root, fp32, _ = int8_export
    a, b = Pipeline.from_manifest(fp32, backend="ort-cpu"), Pipeline.from_manifest(root / "engines", backend="ort-cpu")
    ious, same = [], []
    for _, image, box in real_cases(16, a.preprocessing):
        prompts = Prompts.for_image(image.shape, boxes=box)
        ra, rb = a.predict(image, prompts), b.predict(image, prompts)
        ious.append(iou(ra.masks[0], rb.masks[0]))
        same.append(ra.route == rb.route)
    assert len(ious) >= 16 and all(same)
    assert np.mean(ious) >= 0.97 and min(ious) >= 0.93, (np.mean(ious), min(ious))
