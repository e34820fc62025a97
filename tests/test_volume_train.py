"""Volumes end to end: train a task on NIfTI volumes (tiny SAM), export it, segment a held-out
volume with the runtime, and get the PyTorch model's route and masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from casam_bundle import Bundle
from float32 import CROSS_LIBRARY, vae_score_tol
from models.bundle_models import build_model
from casam_io.image_io import read_prepared, read_scan
from casam_io.intensity import WINDOW_PRESETS, Intensity
from casam_core.names import IDENTITY
from runtime.pipeline import Pipeline
from runtime.preprocess import boxes_to_frame, preprocess
from runtime.prompts import Prompts
from runtime.volume import Propagation, VolumeSegmenter, segment_volume
from trainer.data import Sample, content_hash
from trainer.embedding_cache import EmbeddingCache
from trainer.session import SessionOptions
from trainer.train_task import TaskOptions, TrainConfig, train_task
from trainer.vae_training import single_thread
from volume_support import oblique_affine, save_nifti, sphere_volume, write_dicom_series

nib = pytest.importorskip("nibabel")
SPACING = (1.0, 1.0, 2.5)
SOFT_TISSUE = Intensity(mode="window", window=WINDOW_PRESETS["soft-tissue"])
CONFIG = TrainConfig(epochs=1, batch_size=4, masks_per_image=1, vae_epochs=4, folds=2)


def SESSION(base, tiny_sam) -> SessionOptions:
    """The tiny SAM on the CPU, with the module's shared embedding cache under ``base``."""
    return SessionOptions(sam="tiny", device="cpu", cache_dir=base / "cache", quiet=True, frozen_sam=tiny_sam)


def write_cases(root: Path) -> None:
    """Three 64×64×3 sphere volumes (train/test split by case) with their labels: few slices,
    as each costs an encoder run at 1024² even for the tiny SAM."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, center in enumerate([(30, 34, 1), (28, 30, 1), (34, 33, 1)]):
        volume, label = sphere_volume((64, 64, 3), center, radius_mm=9.0, spacing=SPACING, seed=i)
        save_nifti(root / "images" / f"case{i}.nii.gz", volume, oblique_affine(SPACING))
        save_nifti(root / "labels" / f"case{i}.nii.gz", label, oblique_affine(SPACING))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sam):
    from casam_export import export_bundle

    base = tmp_path_factory.mktemp("volume_train")
    write_cases(base / "data")
    with single_thread():
        summary = train_task(base / "bundle", "sphere", base / "data", config=CONFIG, session=SESSION(base, tiny_sam),
                             options=TaskOptions(intensity=SOFT_TISSUE))
    export_bundle(base / "bundle", base / "engines", verify=False, quiet=True)
    return base, summary


def test_split_is_by_case_and_intensity_is_recorded_through_to_the_runtime(trained):
    base, _ = trained
    split = json.loads((base / "bundle" / "tasks" / "sphere" / "split.json").read_text())
    assert split["unit"] == "case" and not set(split["cases"]["train"]) & set(split["cases"]["test"])
    assert all(stem.rsplit("_a2_", 1)[0] in split["cases"]["test"] for stem in split["test"])
    bundle = json.loads((base / "bundle" / "bundle.json").read_text())
    manifest = json.loads((base / "engines" / "manifest.json").read_text())
    assert bundle["preprocessing"]["intensity"] == manifest["preprocessing"]["intensity"] == SOFT_TISSUE.to_dict()
    assert Pipeline.from_manifest(base / "engines", backend="ort-cpu").preprocessing.intensity == SOFT_TISSUE


def test_held_out_volume_gets_the_pytorch_models_route_and_masks(trained, tiny_sam):
    base, _ = trained
    split = json.loads((base / "bundle" / "tasks" / "sphere" / "split.json").read_text())
    held_out = base / "data" / "images" / f"{split['cases']['test'][0]}.nii.gz"
    pipe = Pipeline.from_manifest(base / "engines", backend="ort-cpu")
    scan = read_scan(held_out)
    result = segment_volume(pipe, scan, Prompts.for_volume(scan.data.shape, 2, box3d=[(16.0, 18.0, 0, 46.0, 50.0, 2)]),
                            settings=Propagation(batch=3))
    model = build_model(Bundle.open(base / "bundle"), tiny_sam.model)
    slices = VolumeSegmenter(pipe, scan)  # the manifest's SOFT_TISSUE window
    torch_scores, torch_masks = [], {}
    with torch.no_grad():
        for k, record in result.slices.items():
            x, frame = preprocess(slices.slice_image(k), pipe.preprocessing)
            box = boxes_to_frame(np.asarray([record.prompts[0]["box"]], np.float32), frame)
            out = model(torch.from_numpy(x), boxes=[torch.from_numpy(box)], task=result.route)
            torch_scores.append(out.scores[0].double().numpy())
            torch_masks[k] = (tiny_sam.model.postprocess_masks(out.masks[0], frame.resized_hw, frame.original_hw) > 0)[0, 0].numpy()
    slices.close()
    mean = np.mean(torch_scores, axis=0)
    tau = float(model.thresholds[0])
    torch_route = "sphere" if mean[0] <= tau else IDENTITY
    assert result.route == torch_route
    # The whole chain (encoder, alignment, router VAE) in onnxruntime against torch: the VAE
    # score's float32 rounding across libraries (vae_score_tol, as the export's parity check);
    # a mean over slices of differences each within that bound stays within it.
    runtime_scores = np.asarray([r.scores for r in result.slices.values()])
    tol = vae_score_tol(torch_scores, k=CROSS_LIBRARY)
    np.testing.assert_allclose(runtime_scores, np.asarray(torch_scores), rtol=0, atol=tol)
    np.testing.assert_allclose(list(result.mean_scores.values()), mean, rtol=0, atol=tol)
    # the volume's mean is the float64 mean of exactly these slice scores (same numbers, same order)
    np.testing.assert_allclose(list(result.mean_scores.values()), runtime_scores.mean(axis=0), rtol=1e-12)
    assert np.ptp(runtime_scores[:, 0]) > 1e-9 * abs(runtime_scores[0, 0])  # slices differ, so the mean is checked
    for k, expected in torch_masks.items():
        got = np.take(result.labels, k, axis=2) == 1
        union = np.logical_or(got, expected).sum()
        # logits at 0 may flip on float32 rounding; pixels that flip are a thousandth at most (as test_runtime_pipeline)
        assert union == 0 or np.logical_and(got, expected).sum() / union >= 0.999


# --- unseen images (eval --ood, sequence --ood, unpack --check-data) get the bundle's intensity ---
def write_unseen(root: Path) -> Path:
    """An unseen set the bundle's SOFT_TISSUE window and ``auto`` prepare differently: an
    int16 CT volume (images/ + labels/, so the protocol can score it too) and a 16-bit
    single-file DICOM slice stored with a rescale intercept."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    volume, label = sphere_volume((48, 40, 3), (20, 22, 1), radius_mm=8.0, spacing=SPACING, seed=7)
    save_nifti(root / "images" / "ct.nii.gz", volume, oblique_affine(SPACING))
    save_nifti(root / "labels" / "ct.nii.gz", label, oblique_affine(SPACING))
    slice_, _ = sphere_volume((40, 36, 1), (18, 16, 0), radius_mm=10.0, seed=8)
    write_dicom_series(root / "one", slice_, shuffle=False)
    (root / "one" / "IM0000").rename(root / "images" / "slice.dcm")
    (root / "one").rmdir()
    return root


@pytest.fixture()
def embedded(monkeypatch) -> list[Sample]:
    """Every sample the trainer's embedding cache is asked for (cache hit or not): what the
    evaluator scores. A hit is keyed by the image's content hash, so checking both the
    sample's image and its hash covers embeddings encoded earlier."""
    seen: list[Sample] = []
    original = EmbeddingCache.embeddings

    def spy(self, samples, *args, **kwargs):
        seen.extend(samples)
        return original(self, samples, *args, **kwargs)

    monkeypatch.setattr(EmbeddingCache, "embeddings", spy)
    return seen


def assert_prepared_with(samples: list[Sample], expected: dict[str, np.ndarray]) -> None:
    """``samples`` are exactly the ``expected`` images (by stem), bit for bit, and so is the
    hash that keys their cached embedding."""
    assert sorted(s.stem for s in samples) == sorted(expected)
    for s in samples:
        image = s.image()
        assert image.dtype == expected[s.stem].dtype and np.array_equal(image, expected[s.stem]), s.stem
        assert s.image_hash == content_hash(expected[s.stem]), s.stem


def unseen_pictures(root: Path, intensity: Intensity) -> dict[str, np.ndarray]:
    """The images of ``root`` as casam-infer prepares them under ``intensity``."""
    pictures = {"ct": read_prepared(root / "images" / "ct.nii.gz", intensity)[0],
                "slice": read_prepared(root / "images" / "slice.dcm", intensity)[0]}
    auto = {k: read_prepared(root / "images" / f, Intensity())[0]
            for k, f in (("ct", "ct.nii.gz"), ("slice", "slice.dcm"))}
    assert all(not np.array_equal(pictures[k], auto[k]) for k in pictures)  # else this test could not tell them apart
    return pictures


def test_eval_ood_images_are_prepared_with_the_bundles_intensity(trained, tiny_sam, tmp_path, embedded):
    from trainer.sequence import evaluate_bundle

    base, _ = trained
    unseen = write_unseen(tmp_path / "unseen")
    report = evaluate_bundle(base / "bundle", [], [str(unseen)], session=SESSION(base, tiny_sam))
    assert report["ood"][0]["count"] == 2
    assert_prepared_with(embedded, unseen_pictures(unseen, SOFT_TISSUE))


def test_sequence_ood_sets_are_prepared_with_the_bundles_intensity(trained, tiny_sam, tmp_path, embedded):
    from trainer.sequence import run_sequence

    base, _ = trained
    unseen = write_unseen(tmp_path / "unseen")
    with single_thread():
        report = run_sequence(base / "bundle", [("sphere", str(base / "data"))], tmp_path / "out", methods=["sam"],
                              ood=[("ct", str(unseen))], config=CONFIG, session=SESSION(base, tiny_sam))
    ct = read_scan(unseen / "images" / "ct.nii.gz").data
    labelled = [k for k in range(3) if read_scan(unseen / "labels" / "ct.nii.gz").data[:, :, k].any()]
    assert report["ood"][0]["count"] == len(labelled) > 0
    ood = {f"ct_a2_{k:04d}": read_prepared(unseen / "images" / "ct.nii.gz", SOFT_TISSUE, index=k)[0] for k in labelled}
    auto = read_prepared(unseen / "images" / "ct.nii.gz", Intensity(), index=labelled[0])[0]
    assert ct.dtype == np.int16 and not np.array_equal(ood[f"ct_a2_{labelled[0]:04d}"], auto)
    # the seen task's slices too (the protocol embeds all of them): prepared as for training
    split = json.loads((base / "bundle" / "tasks" / "sphere" / "split.json").read_text())
    seen = {stem: read_prepared(base / "data" / "images" / f"{stem.rsplit('_a2_', 1)[0]}.nii.gz", SOFT_TISSUE,
                                index=int(stem.rsplit("_", 1)[1]))[0] for stem in split["train"] + split["test"]}
    assert_prepared_with([s for s in embedded if s.stem in ood], ood)
    assert_prepared_with([s for s in embedded if s.stem not in ood], seen)


def test_unpack_check_data_images_are_prepared_with_the_bundles_intensity(trained, tiny_sam, tmp_path, embedded):
    import shutil

    from casam_bundle.package import pack_task, unpack_package
    from trainer.package_check import package_vet

    base, _ = trained
    unseen = write_unseen(tmp_path / "unseen")
    pack_task(base / "bundle", "sphere", tmp_path / "sphere.casam")
    shutil.copytree(base / "bundle", tmp_path / "site")
    report: dict = {}
    vet = package_vet(unseen, session=SESSION(base, tiny_sam), report=report)
    unpack_package(tmp_path / "site", tmp_path / "sphere.casam", as_name="sphere_copy", vet=vet)
    assert report["takeover"]["images"] == 2
    assert_prepared_with(embedded, unseen_pictures(unseen, SOFT_TISSUE))
