"""casam-export on the tiny SAM: graphs, manifest, fp32/fp16 parity, incremental export, bad input.

The 2-task bundle is exported once per precision (module-scoped); tests that change things
work on copies of the bundle or the export folder.
"""

from __future__ import annotations

import importlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from casam_export import ExportError, export_bundle
from casam_export.cli import main as cli_main
from casam_export.fp16 import convert_to_fp16, fp32_node_names
from casam_export.graphs import ALIGN, DECODER, GraphSpec, TensorSpec, export_graph, finalize, write_graph
from casam_export.manifest import claim_out_dir
from casam_export.parity import synthetic_images
from conftest import make_random_bundle
from models.prompt_decoder import PromptDecoder
from models.sam_loader import load_frozen_sam
from runtime.backends.ort import session_options
from casam_core.errors import CasamError, ManifestError
from casam_core.files import read_json, sha256_file
from runtime.pipeline import Pipeline, UnverifiedExportWarning
from runtime.prompts import Prompts
from casam_bundle import Bundle, BundleError
from models.bundle_models import build_model, build_router, load_alignment
from float32 import CROSS_LIBRARY, f32_tol, peak, vae_score_tol
from runtime_support import one_error_line

NAMES = ("alpha", "beta")


def session(path: Path) -> ort.InferenceSession:
    """A plain CPU session, with the options every casam session starts from."""
    return ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])


def graph(out: Path, key: str) -> Path:
    """The file of graph ``key`` (``encoder``, ``align/beta`` …): content-named, so read from the manifest."""
    m = read_json(out / "manifest.json")
    entry = m["graphs"][key] if "/" not in key else next(t["align"] for t in m["tasks"] if t["name"] == key[6:])
    return out / entry["file"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def bundle2(root) -> Bundle:
    """Two tasks with thresholds between the synthetic images' best scores, so verification
    sees both a task route and the identity fallback."""
    probe = make_random_bundle(root / "probe", NAMES)
    sam = load_frozen_sam("tiny")
    model = build_model(probe, sam.model)
    from runtime.preprocess import preprocess

    best = []
    with torch.no_grad():
        for image in synthetic_images():
            x, _ = preprocess(image, probe.preprocessing)
            best.append(float(model.router(model.encode(torch.from_numpy(x)))[1].min()))
    tau = float(np.median(best))
    return make_random_bundle(root / "bundle", NAMES, thresholds=[tau, tau])


@pytest.fixture(scope="module")
def out32(root, bundle2) -> Path:
    export_bundle(bundle2.root, root / "out32")
    return root / "out32"


@pytest.fixture(scope="module")
def out16(root, bundle2) -> Path:
    images = root / "verify_images"
    images.mkdir()
    for i, image in enumerate(synthetic_images()[:2]):
        Image.fromarray(image).save(images / f"{i}.png")
    export_bundle(bundle2.root, root / "out16", fp16=True, verify_images=images)
    return root / "out16"


# ----- graphs ---------------------------------------------------------------------------
def io_dims(values) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def test_graphs_pass_checker_and_have_the_documented_io(out32):
    manifest = read_json(out32 / "manifest.json")
    entries = {**manifest["graphs"], **{f"align/{t['name']}": t["align"] for t in manifest["tasks"]}}
    assert sorted(entries) == ["align/alpha", "align/beta", "decoder", "decoder_mask", "encoder", "router"]
    for key, entry in entries.items():
        path = out32 / entry["file"]
        onnx.checker.check_model(str(path))
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
        assert model.opset_import[0].version == 18
        assert io_dims(model.graph.input) == {t["name"]: t["shape"] for t in entry["inputs"]}
        assert io_dims(model.graph.output) == {t["name"]: t["shape"] for t in entry["outputs"]}
        assert not any(n.metadata_props for n in model.graph.node), "exporter metadata (local paths) must be stripped"
        # Content-named, so a re-export never overwrites a file the deployed manifest names.
        assert entry["file"] == f"{key}-{entry['sha256'][:12]}.onnx"
    assert io_dims(onnx.load(str(graph(out32, "encoder"))).graph.input) == {"image": ["batch", 3, 1024, 1024]}
    assert io_dims(onnx.load(str(graph(out32, "router"))).graph.output) == {"pooled": ["batch", 256], "scores": ["batch", 2]}
    assert [t.name for t in DECODER.inputs] == ["embeddings", "point_coords", "point_labels"]
    assert io_dims(onnx.load(str(graph(out32, "decoder"))).graph.output) == {
        "low_res_masks": ["prompts", 1, 256, 256], "iou_predictions": ["prompts", 1]}


def test_decoder_and_align_graphs_are_dynamic_and_match_torch(out32, bundle2, tiny_sam):
    decoder = PromptDecoder(tiny_sam.model).eval()
    dec = session(graph(out32, "decoder"))
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(1, 256, 64, 64)).astype(np.float32)
    for k, p in ((1, 1), (5, 4)):  # neither size was traced at export (2 prompts, 3 points)
        coords = (rng.uniform(0, 1024, (k, p, 2))).astype(np.float32)
        labels = rng.integers(-1, 4, (k, p)).astype(np.float32)
        low, iou = dec.run(None, {"embeddings": emb, "point_coords": coords, "point_labels": labels})
        assert low.shape == (k, 1, 256, 256) and iou.shape == (k, 1)
        with torch.no_grad():
            low_t, iou_t = decoder(torch.from_numpy(emb), torch.from_numpy(coords), torch.from_numpy(labels))
        # onnxruntime against torch; the longest sums run over 64×64 image tokens.
        np.testing.assert_allclose(low, low_t.numpy(), rtol=0, atol=f32_tol(peak(low_t), n=64 * 64, k=CROSS_LIBRARY))
        np.testing.assert_allclose(iou, iou_t.numpy(), rtol=0, atol=f32_tol(peak(iou_t), n=64 * 64, k=CROSS_LIBRARY))
    layer = load_alignment(bundle2, "beta")
    x = rng.normal(size=(3, 256, 64, 64)).astype(np.float32)
    (aligned,) = session(graph(out32, "align/beta")).run(None, {"embeddings": x})
    with torch.no_grad():
        ref = layer(torch.from_numpy(x)).numpy()
    # 3×3 convolutions over 256 channels (n = 2304), onnxruntime against torch.
    np.testing.assert_allclose(aligned, ref, rtol=0, atol=f32_tol(peak(ref), n=9 * 256, k=CROSS_LIBRARY))
    pooled, scores = session(graph(out32, "router")).run(None, {"embeddings": x[:1]})
    with torch.no_grad():
        pooled_t, scores_t = build_router(bundle2)(torch.from_numpy(x[:1]))
    np.testing.assert_allclose(scores, scores_t.numpy(), rtol=0, atol=vae_score_tol(scores_t))
    # Softmax-weighted sums over 64×64 tokens of terms whose weighted size is about mean |x|.
    np.testing.assert_allclose(pooled, pooled_t.numpy(), rtol=0,
                               atol=f32_tol(np.abs(x[:1]).mean(), n=64 * 64, k=CROSS_LIBRARY))


def test_export_is_deterministic():
    from models.alignment import AlignmentLayer

    torch.manual_seed(3)
    layer = AlignmentLayer()
    first = finalize(export_graph(layer, ALIGN, 18, 16), fp16=False).SerializeToString()
    second = finalize(export_graph(layer, ALIGN, 18, 16), fp16=False).SerializeToString()
    assert first == second


# ----- manifest -------------------------------------------------------------------------
def test_manifest_fields(out32, bundle2):
    m = read_json(out32 / "manifest.json")
    assert (m["format"], m["format_version"], m["casam_version"]) == ("casam-manifest", 1, "0.1.0")
    assert m["bundle"]["bundle_json_sha256"] == sha256_file(bundle2.root / "bundle.json")
    assert m["sam"] == {"model": "tiny", "checkpoint_sha256": "untrained-tiny-seed-0"}
    assert m["preprocessing"] == bundle2.meta["preprocessing"] and m["pooling"] == {"temperature": 1.0}
    assert (m["opset"], m["precision"], m["max_prompts"]) == (18, "fp32", 16)
    assert [t["name"] for t in m["tasks"]] == list(NAMES) and [t["index"] for t in m["tasks"]] == [0, 1]
    for task, record in zip(m["tasks"], bundle2.tasks):
        assert task["threshold"] == record.threshold and task["threshold_key"] == "p97"
        assert set(task["thresholds"]) == {"p95", "p97", "p99", "mean_plus_2std"}
        assert task["align"]["built_from"]["alignment_sha256"] == record.files["alignment.safetensors"]
    for entry in [*m["graphs"].values(), *(t["align"] for t in m["tasks"])]:
        assert entry["precision"] == "fp32" and entry["external_data"] is None
        assert sha256_file(out32 / entry["file"]) == entry["sha256"]
    assert m["graphs"]["encoder"]["inputs"] == [{"name": "image", "shape": ["batch", 3, 1024, 1024], "dtype": "float32"}]
    assert m["tensorrt"]["engines"] == {}
    if not m["tensorrt"]["available"]:
        assert m["tensorrt"]["reason"]
        assert not (out32 / "trt").exists(), "no engine may be written without TensorRT"
    assert m["parity"]["verified"] is True and m["parity"]["passed"] is True and "fp32" in m["parity"]
    assert not (out32 / "parity-failed.json").exists()


# ----- parity -----------------------------------------------------------------------------
def test_fp32_parity(out32):
    report = read_json(out32 / "parity.json")
    assert report["passed"] and not report["failures"]
    s = report["summary"]
    assert s["routes_identical"] and s["mask_iou_mean"] >= 0.999
    assert 0 < s["mask_input_masks_compared"] < s["masks_compared"]  # decoder_mask's corrections count too
    # onnxruntime's encoder against torch's: sums over 64×64 tokens of values up to embeddings_max_abs.
    assert s["embeddings_max_abs_diff"] <= f32_tol(s["embeddings_max_abs"], n=64 * 64, k=CROSS_LIBRARY)
    scores = [v for r in report["per_image"] for v in r["scores_pytorch"]]
    assert s["scores_max_abs_diff"] <= vae_score_tol(scores)
    routes = {r["route_exported"] for r in report["per_image"]}
    assert "identity" in routes and routes & set(NAMES), f"verification should see both kinds of route: {routes}"


def test_fp16_parity_and_precision(out16, out32):
    m = read_json(out16 / "manifest.json")
    assert m["precision"] == "fp16" and m["parity"]["passed"] and m["parity"]["fp16"]["mask_iou_mean"] >= 0.99
    assert m["parity"]["fp16"]["image_source"].endswith("verify_images") and m["parity"]["fp16"]["images"] == 2
    assert {k: g["precision"] for k, g in m["graphs"].items()} == {"encoder": "fp16", "decoder": "fp16",
                                                                    "decoder_mask": "fp16", "router": "fp32"}
    assert all(t["align"]["precision"] == "fp16" for t in m["tasks"])
    enc = onnx.load(str(graph(out16, "encoder")))
    assert graph(out16, "encoder").stat().st_size < 0.7 * graph(out32, "encoder").stat().st_size
    assert io_dims(enc.graph.input) == {"image": ["batch", 3, 1024, 1024]}
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in [*enc.graph.input, *enc.graph.output])
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(enc).graph.value_info}
    for node in enc.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt"):
            assert types[node.output[0]] == onnx.TensorProto.FLOAT, f"{node.op_type} must stay fp32"
    # The fp16 and fp32 chains agree with each other, not only each with PyTorch; both
    # were verified, so loading them raises no UnverifiedExportWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedExportWarning)
        p32, p16 = Pipeline.from_manifest(out32, backend="ort-cpu"), Pipeline.from_manifest(out16, backend="ort-cpu")
    image = synthetic_images()[0]
    boxes = np.array([[40, 30, 260, 200], [100, 120, 400, 290]], np.float32)
    r32, r16 = p32.predict(image, Prompts.for_image(image.shape, boxes=boxes)), p16.predict(image, Prompts.for_image(image.shape, boxes=boxes))
    assert r32.route == r16.route
    inter, union = (r32.masks & r16.masks).sum(), (r32.masks | r16.masks).sum()
    assert union == 0 or inter / union >= 0.99


def test_fp16_keeps_sam_layernorm2d_fp32():
    """SAM's hand-expanded LayerNorm2d squares deviations: all-fp16 overflows at large activations.

    Evaluated with onnx's reference evaluator, which computes in each tensor's own dtype
    (onnxruntime's CPU provider would quietly run fp16 Pow in fp32 and hide the overflow).
    """
    from onnx.reference import ReferenceEvaluator

    from models.sam_import import load_modeling

    norm = load_modeling().common.LayerNorm2d(8).eval()
    x = torch.randn(1, 8, 4, 4) * 2000.0
    model = export_graph(norm, GraphSpec((TensorSpec("x", (1, 8, 4, 4)),), (TensorSpec("y", (1, 8, 4, 4)),)), 18, 16)
    keep = fp32_node_names(model)
    assert keep, "the LayerNorm2d nodes must be found through the exporter metadata"
    with torch.no_grad():
        expected = norm(x).numpy()
    run = lambda m: ReferenceEvaluator(m).run(None, {"x": x.numpy()})[0]  # noqa: E731
    # The graph's input and output pass through fp16 (eps16 = 2**-10): two roundings of
    # values up to the output's peak; the kept-fp32 norm adds only float32 rounding.
    eps16 = float(np.finfo(np.float16).eps)
    atol = 2 * eps16 * peak(expected)
    np.testing.assert_allclose(run(convert_to_fp16(model, keep)), expected, rtol=0, atol=atol)
    naive = run(convert_to_fp16(model, ()))  # op-type blocking only: Sub/Pow/Sqrt/Div go fp16
    assert not np.allclose(naive, expected, rtol=0, atol=atol), "all-fp16 LayerNorm2d should overflow here"


# ----- incremental export -------------------------------------------------------------------
def test_adding_a_task_reexports_only_its_align_graph_and_the_router(root, bundle2, out32):
    bundle = Bundle.open(shutil.copytree(bundle2.root, root / "inc_bundle"))
    out = shutil.copytree(out32, root / "inc_out")
    donor = make_random_bundle(root / "donor", (*NAMES, "gamma"))
    staged = bundle.staging_dir("gamma")
    shutil.copytree(donor.task_dir("gamma"), staged)
    bundle.commit_task(donor.task("gamma"), staged)
    keys = ("encoder", "decoder", "align/alpha", "align/beta")
    before = {k: (graph(out, k).relative_to(out), graph(out, k).read_bytes()) for k in keys}
    old_router = graph(out, "router")
    m = export_bundle(bundle.root, out, verify=False)
    for k, (rel, data) in before.items():
        assert graph(out, k) == out / rel and (out / rel).read_bytes() == data, f"{k} must stay byte-identical"
    assert m["graphs"]["encoder"]["reused"] and m["graphs"]["decoder"]["reused"]
    assert [t["align"]["reused"] for t in m["tasks"]] == [True, True, False]
    assert not m["graphs"]["router"]["reused"]
    assert io_dims(onnx.load(str(graph(out, "router"))).graph.output)["scores"] == ["batch", 3]
    assert not old_router.exists(), "the replaced router is removed once the new manifest is in place"
    with pytest.warns(UnverifiedExportWarning):
        Pipeline.from_manifest(out, backend="ort-cpu")  # every sha in the new manifest holds

    # Tampering with a graph in the export folder: the runtime refuses it and the next
    # export rebuilds exactly that graph, under the same content name.
    with open(graph(out, "align/alpha"), "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="alpha"):
        Pipeline.from_manifest(out, backend="ort-cpu")
    m = export_bundle(bundle.root, out, verify=False)
    assert [t["align"]["reused"] for t in m["tasks"]] == [False, True, True]
    assert graph(out, "align/alpha").read_bytes() == before["align/alpha"][1]
    assert graph(out, "align/alpha") == out / before["align/alpha"][0]


# ----- bad input ------------------------------------------------------------------------------
def test_tampered_alignment_file_in_bundle_is_refused(root, bundle2):
    bundle = shutil.copytree(bundle2.root, root / "tampered")
    path = bundle / "tasks" / "beta" / "alignment.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="beta.*modified or corrupted") as refused:
        export_bundle(bundle, root / "tampered_out")
    assert not (root / "tampered_out" / "manifest.json").exists()
    # The sha256 check is shared with the runtime's engine files; a bundle's stays a BundleError.
    assert not isinstance(refused.value, ManifestError)
    path.unlink()
    with pytest.raises(BundleError, match=r"task 'beta': .*alignment\.safetensors is missing$"):
        export_bundle(bundle, root / "tampered_out")


def test_missing_and_corrupt_bundles(root):
    with pytest.raises(CasamError, match="not a casam bundle"):
        export_bundle(root / "nowhere", root / "o1")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "bundle.json").write_text("{not json")
    with pytest.raises(CasamError, match="corrupt"):
        export_bundle(corrupt, root / "o2")


def test_out_folder_of_another_bundle_is_refused(root, bundle2, out32):
    other = make_random_bundle(root / "other", ("delta",))
    with pytest.raises(ExportError, match="--overwrite"):
        export_bundle(other.root, out32)
    assert claim_out_dir(out32, other, force=True) is None  # --overwrite: nothing is reused
    assert claim_out_dir(out32, bundle2, force=False)["tasks"][0]["name"] == "alpha"
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="holds no casam export"):
        export_bundle(bundle2.root, foreign)


def test_wrong_checkpoint_is_refused(root, bundle2, tiny_sam):
    from casam_core.files import atomic_path
    from safetensors.torch import save_file

    ckpt = root / "tiny.safetensors"
    with atomic_path(ckpt) as tmp:
        save_file({k: v.contiguous() for k, v in tiny_sam.model.state_dict().items()}, str(tmp))
    with pytest.raises(ExportError, match="trained on"):
        export_bundle(bundle2.root, root / "ckpt_out", checkpoint=ckpt)


def test_task_name_climbing_out_is_refused_and_nothing_is_written_outside_out(root, bundle2, monkeypatch):
    """A bundle.json task renamed ``../../evil``, with matching files where that name points:
    casam-export refuses with exit 2 and one line, and writes nothing anywhere (the graph
    would have gone to ``<out>/align/../../evil.onnx``, outside --out). The exporter checks
    names itself too, so it refuses even if the bundle reader's check were bypassed."""
    base = root / "escape"
    bundle = Path(shutil.copytree(bundle2.root, base / "a" / "b" / "bundle"))
    meta = read_json(bundle / "bundle.json")
    meta["tasks"][1]["name"] = "../../evil"
    (bundle / "bundle.json").write_text(json.dumps(meta))
    shutil.copytree(bundle / "tasks" / "beta", bundle / "tasks" / "../../evil")  # base/a/b/evil
    out = base / "a" / "b" / "out"
    snapshot = lambda: {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}  # noqa: E731
    before = snapshot()
    args = ["--bundle", str(bundle), "--out", str(out), "--no-verify", "--quiet"]
    for bypass in (False, True):
        if bypass:
            import casam_bundle.format

            monkeypatch.setattr(casam_bundle.format, "check_task_name", lambda name, where="": name)
            Bundle.open(bundle)  # the reader's check is really bypassed
        result = CliRunner().invoke(cli_main, args)
        assert result.output.count("\n") == 1 and "'../../evil'" in one_error_line(result), result.output
        assert snapshot() == before and not out.exists(), "nothing may be written, inside or outside --out"


def test_graph_paths_cannot_climb_out_of_the_export_folder(tmp_path):
    for rel in ("align/../../evil.onnx", "/tmp/evil.onnx", ""):
        with pytest.raises(ExportError, match="outside the export folder"):
            write_graph(onnx.ModelProto(), ALIGN, tmp_path / "out", rel)
    assert not any(tmp_path.rglob("*"))


# ----- CLI -----------------------------------------------------------------------------------
def test_cli_help_explains_every_option():
    result = CliRunner().invoke(cli_main, ["--help"])
    assert result.exit_code == 0
    for option in ("--bundle", "--out", "--fp16", "--trt / --no-trt", "--opset", "--max-boxes", "--verify / --no-verify",
                   "--verify-images", "--checkpoint", "--overwrite", "--quiet"):
        assert option in result.output


def test_cli_reexport_and_error(root, bundle2, out32):
    out = shutil.copytree(out32, root / "cli_out")
    # Leftovers of a killed export and engines the runtime cached: after the switch, files
    # of the export that no manifest names go; engines built for the graphs in force and
    # files that are not the export's stay.
    encoder_id = read_json(out / "manifest.json")["graphs"]["encoder"]["sha256"][:12]
    planted = {"trt/encoder-" + encoder_id + "-Some_GPU-trt10.9.engine": True, "notes.txt": True,
               "trt/encoder-0123456789ab-Some_GPU-trt10.9.engine": False, "align/ghost-0123456789ab.onnx": False,
               "router-0123456789ab.onnx": False, ".router.onnx.x1y2.tmp": False, "align/.beta.onnx.x1y2.tmp": False,
               ".staging/align_beta.onnx.123/beta.onnx": False}
    for rel in planted:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"leftover")
    result = CliRunner().invoke(cli_main, ["--bundle", str(bundle2.root), "--out", str(out), "--no-verify"])
    assert result.exit_code == 0, result.output
    assert "unchanged: encoder, decoder, decoder_mask, router, align/alpha, align/beta" in result.output
    assert read_json(out / "manifest.json")["parity"] == {"verified": False, "passed": None}
    assert "parity: not verified (--no-verify)" in result.output
    assert {rel: (out / rel).exists() for rel in planted} == planted
    assert not (out / ".staging").exists()
    result = CliRunner().invoke(cli_main, ["--bundle", str(root / "nowhere"), "--out", str(out)])
    assert result.output.strip().count("\n") == 0 and one_error_line(result).startswith("casam-export: error:")


# ----- TensorRT ------------------------------------------------------------------------------
@pytest.mark.trt
def test_without_tensorrt_export_says_so_and_trt_flag_fails_clearly():
    from casam_export.tensorrt_build import tensorrt_status

    try:
        importlib.import_module("tensorrt")
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    assert tensorrt_status(None)[0] is False and "TensorRT" in tensorrt_status(None)[1]
    assert tensorrt_status(False) == (False, "disabled with --no-trt")
    with pytest.raises(ExportError, match="--trt"):
        tensorrt_status(True)


@pytest.mark.trt
def test_tensorrt_engines_are_built_and_keyed(request: pytest.FixtureRequest):
    # Skip before asking for out32: as an argument it would be a verified export (~30 s)
    # built and thrown away wherever TensorRT or a GPU is missing.
    pytest.importorskip("tensorrt")
    from casam_export.tensorrt_build import build_engines, tensorrt_status

    ready, reason = tensorrt_status(None)
    if not ready:
        pytest.skip(reason)
    out32: Path = request.getfixturevalue("out32")
    m = read_json(out32 / "manifest.json")
    section = build_engines(out32, {"align/alpha": m["tasks"][0]["align"]}, fp16=False, max_prompts=16)
    engine = section["engines"]["align/alpha"]
    assert engine["onnx_sha256"][:12] in engine["file"] and engine["tensorrt_version"] in engine["file"]
    assert sha256_file(out32 / engine["file"]) == engine["sha256"]


def test_big_weights_go_to_external_data(tmp_path, monkeypatch):
    """vit_h's encoder exceeds protobuf's 2 GB: its weights must move to a .data file."""
    import casam_export.graphs as graphs
    from models.alignment import AlignmentLayer

    monkeypatch.setattr(graphs, "EXTERNAL_DATA_BYTES", 0)
    layer = AlignmentLayer().eval()
    written = graphs.write_graph(finalize(export_graph(layer, ALIGN, 18, 16), fp16=False), ALIGN, tmp_path, "encoder.onnx")
    data_sha = written.external_data["sha256"]
    # Both files are content-named: new weights never overwrite a deployed weights file.
    assert written.external_data["file"] == f"encoder-{data_sha[:12]}.onnx.data"
    assert written.file == f"encoder-{written.sha256[:12]}.onnx"
    data, model = tmp_path / written.external_data["file"], tmp_path / written.file
    assert sha256_file(data) == data_sha and sha256_file(model) == written.sha256
    assert model.stat().st_size < 100_000 < data.stat().st_size
    x = np.random.default_rng(0).normal(size=(1, 256, 64, 64)).astype(np.float32)
    (y,) = session(model).run(None, {"embeddings": x})
    with torch.no_grad():
        ref = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, ref, rtol=0, atol=f32_tol(peak(ref), n=9 * 256, k=CROSS_LIBRARY))  # as the align graph
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([model.name, data.name])
