"""int8 export (issue 14): static QDQ quantisation of the encoder and alignment layers,
verified per graph against fp32, with fp32 fallback and incremental re-export.

One int8 export of a copy of the session's tiny bundle (its fp32 export is the session's
shared one), then one re-export after adding a task, with that task's bar made impossible.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from casam_export import export as export_module
from casam_export import export_bundle, parity, quantize
from casam_export.errors import ExportError
from casam_export.parity import prompts_for, synthetic_images
from casam_io.image_io import read_prepared
from casam_io.intensity import Intensity
from runtime.pipeline import Pipeline
from runtime.prompts import Prompts
from runtime_support import BOXES, exported, sample_images

QUANTISED_OP = "DequantizeLinear"


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory):
    bundle, fp32 = exported(tmp_path_factory)
    root = tmp_path_factory.mktemp("int8")
    shutil.copytree(bundle, root / "bundle")
    calib = root / "calib"
    calib.mkdir()
    for i, image in enumerate(synthetic_images(seed=5)[:2]):
        Image.fromarray(image).save(calib / f"c{i}.png")
    # Start from a copy of the fp32 export: the router and decoder stay fp32 under --int8, so
    # they are reused rather than traced again (only the encoder and alignment layers are built).
    shutil.copytree(fp32, root / "engines")
    manifest = export_bundle(root / "bundle", root / "engines", int8=True, calibration=calib, verify=False)
    assert manifest["graphs"]["router"]["reused"] and manifest["graphs"]["decoder"]["reused"]
    assert manifest["graphs"]["decoder_mask"]["reused"]
    return root, fp32, manifest


def entries(manifest):
    graphs = dict(manifest["graphs"])
    graphs.update({f"align/{t['name']}": t["align"] for t in manifest["tasks"]})
    return graphs


def test_precision_is_recorded_per_graph_and_backed_by_its_verification(int8_export):
    root, _, manifest = int8_export
    assert manifest["precision"] == "int8"
    graphs = entries(manifest)
    assert graphs["router"]["precision"] == "fp32" and "quantization" not in graphs["router"]
    assert graphs["decoder"]["precision"] == graphs["decoder_mask"]["precision"] == "fp32"
    for key in ("encoder", "align/alpha", "align/beta"):
        entry = graphs[key]
        check = entry["quantization"]["verification"]
        assert check["images"] == 3 and check["output_max_abs_diff"] >= 0 and check["masks_compared"] > 0
        has_qdq = any(n.op_type == QUANTISED_OP for n in onnx.load(str(root / "engines" / entry["file"])).graph.node)
        if entry["precision"] == "int8":
            assert check["passed"] and check["routes_identical"] and check["mask_iou_mean"] >= 0.95 and has_qdq
        else:  # missed a bar: written in fp32, the record says why
            assert entry["quantization"]["fallback"] == "fp32" and check["failures"] and not has_qdq
    # The alignment layers (3×3 convolutions, per-channel weights) keep their masks in int8.
    assert graphs["align/alpha"]["precision"] == graphs["align/beta"]["precision"] == "int8"


def test_int8_chain_routes_like_fp32_and_keeps_masks(int8_export):
    """The issue's bars, checked through the runtime at the original size on the
    verification images and prompts the export used: routes identical to the fp32 export,
    mean mask IoU against it ≥ 0.95."""
    root, fp32, _ = int8_export
    a, b = Pipeline.from_manifest(fp32, backend="ort-cpu"), Pipeline.from_manifest(root / "engines", backend="ort-cpu")
    ious = []
    for i, image in enumerate(synthetic_images()):
        boxes = prompts_for(image, i)["boxes"]
        for task in (None, "alpha", "beta"):  # routed, then each int8 alignment layer forced
            ra, rb = a.predict(image, Prompts.for_image(image.shape, boxes=boxes), task=task), b.predict(image, Prompts.for_image(image.shape, boxes=boxes), task=task)
            assert ra.route == rb.route
            union = np.logical_or(ra.masks, rb.masks).sum((1, 2))
            ious += list(np.where(union == 0, 1.0, np.logical_and(ra.masks, rb.masks).sum((1, 2)) / np.maximum(union, 1)))
    assert float(np.mean(ious)) >= quantize.INT8_MASK_IOU_BAR


def test_new_task_quantises_only_its_layer_and_a_missed_bar_falls_back(int8_export, monkeypatch, tmp_path):
    from casam_bundle import Bundle
    from conftest import make_random_bundle

    root, _, before = int8_export
    donor = make_random_bundle(tmp_path / "donor", ("alpha", "beta", "gamma"), seed=3)
    bundle = Bundle.open(root / "bundle")
    staged = bundle.staging_dir("gamma")
    shutil.copytree(donor.task_dir("gamma"), staged)
    bundle.commit_task(donor.task("gamma"), staged)
    monkeypatch.setattr(quantize, "INT8_MASK_IOU_BAR", 1.01)  # no int8 graph can reach it
    with pytest.warns(UserWarning, match="int8 align/gamma misses its bar"):
        after = export_bundle(root / "bundle", root / "engines", int8=True, calibration=root / "calib", verify=False)
    old, new = entries(before), entries(after)
    for key in ("encoder", "align/alpha", "align/beta", "decoder"):
        assert new[key]["reused"] and new[key]["sha256"] == old[key]["sha256"], key
    gamma = new["align/gamma"]
    assert gamma["precision"] == "fp32" and gamma["quantization"]["fallback"] == "fp32"
    assert gamma["quantization"]["verification"]["failures"] and not gamma["reused"]
    assert Pipeline.from_manifest(root / "engines", backend="ort-cpu").predict(sample_images()[1], Prompts.for_image(np.shape(sample_images()[1]), boxes=BOXES), task="gamma").masks.shape[0] == len(BOXES)


def test_int8_without_calibration_images_fails_before_exporting(tmp_path_factory, tmp_path, monkeypatch):
    bundle, _ = exported(tmp_path_factory)  # its task splits record no images
    with pytest.raises(ExportError, match="pass --calibration DIR"):
        export_bundle(bundle, tmp_path / "out", int8=True)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="choose one of --fp16 and --int8"):
        export_bundle(bundle, tmp_path / "out", int8=True, fp16=True)
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(export_module, "_graphs", lambda *a, **k: pytest.fail("traced before checking --verify-images"))
    with pytest.raises(ExportError, match="--verify-images: .*holds no images"):
        export_bundle(bundle, tmp_path / "out", verify_images=tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "scan.png").write_bytes(b"not a png")  # read before tracing, not after
    with pytest.raises(ExportError, match="--verify-images: .*scan.png"):
        export_bundle(bundle, tmp_path / "out", verify_images=tmp_path / "broken")


def test_calibration_runs_each_measurement_as_soon_as_its_tensor_exists(monkeypatch):
    """The calibration session runs in priority order with memory patterns off: in
    onnxruntime's default order the ReduceMin/ReduceMax side branches may run last, which
    kept every measured tensor alive (quantize.py). The
    library's own session factory is restored afterwards."""
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate

    rng = np.random.default_rng(0)
    model = conv_then_matmul(rng)
    seen = []
    real = ort.InferenceSession

    def spy(path, sess_options=None, **kw):
        seen.append((str(path), sess_options))
        return real(path, sess_options=sess_options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    original = calibrate.CalibraterBase.create_inference_session
    feeds = [{"x": rng.normal(size=(1, 3, 4, 256)).astype(np.float32)} for _ in range(2)]
    quantised = quantize.quantize_model(model, feeds)
    assert any(n.op_type == QUANTISED_OP for n in quantised.graph.node)
    calibration = [options for path, options in seen if "augmented" in path]
    assert len(calibration) == 1, seen
    assert calibration[0].execution_order == ort.ExecutionOrder.PRIORITY_BASED
    assert not calibration[0].enable_mem_pattern
    assert calibrate.CalibraterBase.create_inference_session is original


# Quantises a chain of LAYERS MatMuls (1×ROWS×8 activations, 12.2 MiB each) in a fresh
# process and prints how far calibration raised its peak RSS above the RSS it started
# from (VmHWM reset through /proc/self/clear_refs). argv[1] "library-order" runs the
# calibration session as onnxruntime.quantization opens it, without casam's node order.
CALIBRATION_PEAK = """
import contextlib, re, sys
from pathlib import Path
import numpy as np, onnx
from onnx import TensorProto, helper, numpy_helper
from casam_export import quantize

def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))

layers, rows = int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
weights = [numpy_helper.from_array((rng.normal(size=(8, 8)) / 8 ** 0.5).astype(np.float32), f"w{i}") for i in range(layers)]
nodes = [helper.make_node("MatMul", [f"t{i}", f"w{i}"], [f"t{i + 1}"], name=f"mm{i}") for i in range(layers)]
graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, rows, 8])],
                          [helper.make_tensor_value_info(f"t{layers}", TensorProto.FLOAT, [1, rows, 8])], weights)
model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
feeds = [{"t0": rng.normal(size=(1, rows, 8)).astype(np.float32)} for _ in range(2)]
if sys.argv[1] == "library-order":
    quantize._calibration_sessions_in_priority_order = contextlib.nullcontext
Path("/proc/self/clear_refs").write_text("5")
start = kib("VmRSS")
quantize.quantize_model(model, feeds)
print(kib("VmHWM") - start)
"""


def calibration_peak_mib(order: str, layers: int, rows: int) -> float:
    """The calibration's peak RSS above its start, in MiB, measured in a child process."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CALIBRATION_PEAK, order, str(layers), str(rows)], env=env, cwd=repo,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.split()[-1]) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures peak RSS through /proc")
def test_calibration_peak_memory_holds_a_few_tensors_not_every_measured_one():
    """The measured memory itself: calibrating a chain of 12 products, each output 12.2 MiB,
    on two images. In onnxruntime's own order the ReduceMin/ReduceMax of every measured
    tensor ran after the whole chain, so all 13 tensors were alive at once (measured: 308
    MiB above the start, about two copies each); in casam's priority order each is reduced
    as soon as it exists (measured: 45 MiB). The bound, half the chain's tensors, sits
    between the two with a margin of over 1.6x on either side."""
    layers, rows = 12, 400_000
    tensor_mib = rows * 8 * 4 / 2**20
    bound = layers / 2 * tensor_mib
    ours = calibration_peak_mib("casam-order", layers, rows)
    theirs = calibration_peak_mib("library-order", layers, rows)
    assert theirs > layers * tensor_mib > bound, f"the graph no longer shows the difference: {theirs:.0f} MiB"
    assert ours < bound, f"calibration peaked {ours:.0f} MiB above its start (bound {bound:.0f} MiB)"


def conv_then_matmul(rng: np.random.Generator) -> onnx.ModelProto:
    """image → Conv (reads the graph input) → Relu → MatMul over 256 features ("long") →
    MatMul over 5 ("short")."""
    from onnx import TensorProto, helper, numpy_helper

    weights = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.normal(size=(256, 5)).astype(np.float32), "m"),
               numpy_helper.from_array(rng.normal(size=(5, 3)).astype(np.float32), "s")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"]), helper.make_node("MatMul", ["r", "m"], ["y"], name="long"),
         helper.make_node("MatMul", ["y", "s"], ["z"], name="short")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 256])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 4, 3])], weights)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                                               ir_version=9))  # onnx writes a newer IR than onnxruntime reads


def test_only_long_products_after_the_image_are_quantised():
    """The patch embedding reads the image itself (quantising it cost the tiny encoder its
    mask bar), and a product over a few features saves less than its quantise/dequantise
    steps cost (the tiny encoder ran no faster in int8): both keep fp32 operands, while a
    product over ``MIN_REDUCTION`` features is quantised (quantize.py)."""
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.normal(size=(1, 3, 4, 256)).astype(np.float32)} for _ in range(2)]
    quantised = quantize.quantize_model(conv_then_matmul(rng), feeds)
    made_by = {o: n.op_type for n in quantised.graph.node for o in n.output}
    nodes = {n.name: n for n in quantised.graph.node}
    # A quantised product reads its weight through a DequantizeLinear; an fp32 one reads the
    # float weight itself (its activation may still come from a neighbour's Q/DQ pair).
    assert made_by.get(nodes["long"].input[1]) == QUANTISED_OP
    assert nodes["conv"].input[1] == "w" and nodes["short"].input[1] == "s"


CT_WINDOW = Intensity(mode="window", window=(40.0, 400.0))


def windowed_bundle(source, root, dataset):
    """A copy of bundle ``source`` whose recorded intensity is a fixed CT window and whose
    task ``alpha`` was trained on the folder dataset ``dataset`` (its split.json)."""
    from casam_bundle import Bundle
    from casam_core.files import atomic_write_json, read_json, sha256_file

    shutil.copytree(source, root)
    meta = read_json(root / "bundle.json")
    meta["preprocessing"]["intensity"] = CT_WINDOW.to_dict()
    split = root / "tasks" / "alpha" / "split.json"
    stems = sorted(p.name.split(".")[0] for p in (dataset / "images").iterdir())
    atomic_write_json(split, {"data": str(dataset), "kind": "folder", "train": stems, "test": [], "seed": 0})
    next(t for t in meta["tasks"] if t["name"] == "alpha")["files"]["split.json"] = sha256_file(split)
    atomic_write_json(root / "bundle.json", meta)
    return Bundle.open(root)


def scanner_images(folder):
    """A CT volume (int16 HU, NIfTI), one CT slice (DICOM, HU after RescaleIntercept) and a
    16-bit picture, in name order: files whose raw values differ from what a window makes."""
    from volume_support import save_nifti, sphere_volume, write_dicom_series

    folder.mkdir(parents=True)
    volume, _ = sphere_volume((40, 48, 8), (20, 24, 4), radius_mm=9.0)
    save_nifti(folder / "a_ct.nii.gz", volume, np.eye(4))
    write_dicom_series(folder / "series", volume[:, :, 3:4].astype(np.float64))
    shutil.move(next((folder / "series").iterdir()), folder / "b_slice.dcm")
    (folder / "series").rmdir()
    Image.fromarray(np.arange(30 * 20, dtype=np.uint16).reshape(30, 20) * 90).save(folder / "c_grey16.png")
    return sorted(folder.iterdir())


def test_calibration_and_verification_images_get_the_bundles_recorded_intensity(tmp_path_factory, tmp_path, tiny_sam,
                                                                                monkeypatch):
    """A bundle trained with a CT window is calibrated and verified on the grey levels its
    deployment sees: every image the exporter reads (--calibration DIR, the task splits'
    training images, --verify-images DIR in the quantizer and in the parity check) is
    ``read_prepared(path, bundle intensity)``, bit for bit. Read raw and left to
    preprocessing, the volume's middle slice and the DICOM slice were min-max scaled."""
    pytest.importorskip("nibabel")
    pytest.importorskip("pydicom")
    from casam_export import verify
    from casam_core.files import read_json

    source, engines = exported(tmp_path_factory)
    files = scanner_images(tmp_path / "data" / "images")
    bundle = windowed_bundle(source, tmp_path / "bundle", tmp_path / "data")
    assert bundle.preprocessing.intensity == CT_WINDOW
    expected = [read_prepared(p, CT_WINDOW)[0] for p in files]
    minmax = [read_prepared(p, Intensity(mode="minmax"))[0] for p in files[:2]]
    assert not any(np.array_equal(a, b) for a, b in zip(expected, minmax))  # the window matters for these

    def same(images, wanted=expected):
        return len(images) == len(wanted) and all(np.array_equal(a, b) for a, b in zip(images, wanted))

    assert same(quantize.calibration_set(bundle, tmp_path / "data" / "images", count=8).shared)
    from_splits = quantize.calibration_set(bundle, None, count=8)
    # A folder dataset holds pictures and DICOM files (the trainer's layout); its NIfTI is no training image.
    assert list(from_splits.per_task) == ["alpha"] and same(from_splits.per_task["alpha"], expected[1:])
    checks = parity.verification_images(tmp_path / "data", bundle.preprocessing)
    quantizer = quantize.Quantizer(bundle, tiny_sam.model, from_splits, checks)
    assert same(quantizer.verify_images)

    class Seen(Exception):
        pass

    seen = []

    def spy(image, prep):  # what the parity check hands to preprocessing; its first image is enough
        seen.append(image)
        raise Seen

    monkeypatch.setattr(verify, "preprocess", spy)
    with pytest.raises(Seen):
        verify.verify_export(engines, read_json(engines / "manifest.json"), bundle, tiny_sam.model, checks)
    assert len(seen) == 1 and np.array_equal(seen[0], expected[0])
