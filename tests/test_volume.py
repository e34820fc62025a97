"""Volume inference: propagation, volume routing, NIfTI and DICOM SEG outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from casam_infer.cli import main
from casam_io.image_io import read_scan
from casam_io.intensity import Intensity, Source
from casam_io.scan import Scan
from runtime.manifest import Manifest
from casam_core.names import IDENTITY
from runtime.pipeline import Pipeline
from runtime.preprocess import Frame, Preprocessing
from runtime.predictor import DEFAULT_BATCH, Capabilities
from runtime.prompts import Prompts
from runtime.volume import RESIDENT_BYTES, EmbeddingSpill, Propagation, VolumeSegmenter, segment_volume, volume_route
from conftest import assert_valid_dicom, need
from float32 import SAME_LIBRARY, vae_score_tol
from runtime_support import one_error_line, with_thresholds
from volume_support import oblique_affine, save_nifti, sphere_volume, write_dicom_series, write_multiframe_dicom

SPACING = (1.0, 1.0, 2.5)


@pytest.fixture(scope="module")
def sphere(tmp_path_factory) -> tuple[Path, np.ndarray]:
    need("nibabel", "train")
    folder = tmp_path_factory.mktemp("sphere")
    volume, label = sphere_volume((64, 64, 16), (30, 34, 8), spacing=SPACING)
    return save_nifti(folder / "sphere.nii.gz", volume, oblique_affine(SPACING)), label


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class BrightVoxels:
    """A stand-in for the engines whose answer is known: the "embedding" is the preprocessed
    slice and the "decoder" returns the voxels brighter than mid-grey inside the box.

    Propagation's contract (which slices are visited, where each prompt goes) does not
    depend on SAM; the tiny test SAM is untrained and segments nothing meaningful, so the
    sphere's extent can only be checked against a segmenter that finds it.
    """

    task_names: list[str] = []
    thresholds = np.zeros(0, np.float32)
    capabilities = Capabilities(volumes=True)

    def __init__(self, size: int, intensity: Intensity = Intensity()) -> None:
        self.preprocessing = Preprocessing(size=size, intensity=intensity)

    def encode(self, x: np.ndarray) -> np.ndarray:
        return x[:, :1].copy()

    def route(self, embedding: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
        return IDENTITY, np.zeros(0, np.float32), self.thresholds

    def choose(self, scores: np.ndarray, task=None) -> str:
        return IDENTITY

    def check_task(self, task: str) -> str:
        return task

    def decode(self, embedding: np.ndarray, frame: Frame, prompts: Prompts, route: str):
        grey = embedding[0, 0] * self.preprocessing.std[0] + self.preprocessing.mean[0]
        h, w = frame.original_hw
        x0, y0, x1, y1 = (int(round(v)) for v in prompts.boxes[0])
        mask = np.zeros((h, w), bool)
        mask[y0:y1, x0:x1] = grey[:h, :w][y0:y1, x0:x1] > 128
        return mask[None], None, np.ones(1, np.float32)


@pytest.mark.parametrize("axis", [2, 0])
def test_propagation_recovers_the_sphere_within_one_slice(sphere, axis):
    path, label = sphere
    scan = read_scan(path)
    start = label.shape[axis] // 2
    cut = np.take(label, start, axis=axis)
    rows, cols = np.flatnonzero(cut.any(axis=1)), np.flatnonzero(cut.any(axis=0))
    box = (cols[0] - 1.0, rows[0] - 1.0, cols[-1] + 2.0, rows[-1] + 2.0)
    result = segment_volume(BrightVoxels(max(cut.shape), Intensity(mode="window", window=(150.0, 300.0))), scan,
                            Prompts.for_volume(scan.data.shape, axis, boxes=[box], slice=start),
                            settings=Propagation(batch=3))
    on = lambda vol: np.flatnonzero(np.moveaxis(vol, axis, 0).reshape(vol.shape[axis], -1).any(axis=1))  # noqa: E731
    truth, found = on(label), on(result.labels)
    assert abs(found[0] - truth[0]) <= 1 and abs(found[-1] - truth[-1]) <= 1, (truth, found)
    inter = np.logical_and(result.labels == 1, label == 1).sum()
    assert inter / np.logical_or(result.labels == 1, label == 1).sum() > 0.9  # the label sits on the sphere
    # streamed: each visited slice encoded once, plus at most one look-ahead batch per direction
    assert len(result.slices) <= result.timings_ms["slices_encoded"] <= len(result.slices) + 2 * 2


def test_box3d_propagates_inside_its_range_and_segments_every_slice(sphere):
    """A 3-D box starts on its middle slice and prompts each next slice with the previous
    mask's box (tighter than the 3-D box toward the sphere's tips); past the sphere, where
    the mask vanished, the range is still covered, prompted with the 3-D box again."""
    path, label = sphere
    scan = read_scan(path)
    z = np.flatnonzero(label.any(axis=(0, 1)))
    rows, cols = np.flatnonzero(label.any(axis=(1, 2))), np.flatnonzero(label.any(axis=(0, 2)))
    box = (cols[0] - 1.0, rows[0] - 1.0, cols[-1] + 2.0, rows[-1] + 2.0)
    z0, z1 = max(int(z[0]) - 3, 0), min(int(z[-1]) + 3, label.shape[2] - 1)
    result = segment_volume(BrightVoxels(max(label.shape[:2]), Intensity(mode="window", window=(150.0, 300.0))), scan,
                            Prompts.for_volume(scan.data.shape, 2, box3d=[(box[0], box[1], z0, box[2], box[3], z1)]),
                            settings=Propagation(batch=3))
    assert sorted(result.slices) == list(range(z0, z1 + 1))
    area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
    prompt = {k: r.prompts[0]["box"] for k, r in result.slices.items()}
    assert area(prompt[int(z[0]) + 1]) < 0.8 * area(box) and area(prompt[int(z[-1]) - 1]) < 0.8 * area(box)
    assert prompt[z0] == prompt[z1] == [float(v) for v in box]  # past the tips: the 3-D box again
    found = np.flatnonzero(result.labels.any(axis=(0, 1)))
    assert abs(found[0] - z[0]) <= 1 and abs(found[-1] - z[-1]) <= 1


def test_nifti_mask_has_the_input_grid_and_the_record_lists_slices(engines, sphere, tmp_path):
    nib = need("nibabel", "train")
    path, _ = sphere
    out = tmp_path / "out"
    result = invoke(path, "--box3d", 18, 20, 6, 44, 48, 9, "--engines", engines, "--out", out, "--overlay", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    source, mask = nib.load(str(path)), nib.load(str(out / "sphere_mask.nii.gz"))
    assert mask.shape == source.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask.affine, source.affine)
    for get in ("get_qform", "get_sform"):
        (m_aff, m_code), (s_aff, s_code) = getattr(mask, get)(coded=True), getattr(source, get)(coded=True)
        np.testing.assert_array_equal(m_aff, s_aff)
        assert m_code == s_code
    labels = np.asarray(mask.dataobj)
    assert not labels[:, :, :6].any() and not labels[:, :, 10:].any()  # --box3d limits the slices
    assert [s["index"] for s in record["slices"]] == [6, 7, 8, 9]
    assert record["outputs"] == {"mask": "sphere_mask.nii.gz", "seg": None, "overlay": "sphere_overlay.png"}
    assert labels[:, :, 6:10].any(), "nothing was segmented: the overlay would not be checked"
    assert (out / "sphere_overlay.png").is_file()


def test_volume_routing_gives_one_route_where_slices_disagree(pipe, sphere):
    path, _ = sphere
    scan = read_scan(path)
    prompts = Prompts.for_volume(scan.data.shape, 2, box3d=[(18, 20, 6, 44, 48, 9)])
    probe = VolumeSegmenter(pipe, scan, settings=Propagation(batch=4))
    probe.prefetch([6, 7, 8, 9])  # scores only: the encoder and router, no decoding
    best = np.stack([probe.scores[k] for k in (6, 7, 8, 9)]).min(axis=1)
    probe.close()
    # thresholds between the slices' best scores: some slices accept a task, others do not
    tau = float(np.median(best))
    routed = Pipeline(Manifest.load(pipe.manifest_obj.folder, with_thresholds(pipe.manifest, [tau, tau])), pipe.backend)
    split = segment_volume(routed, scan, prompts, settings=Propagation(per_slice=True))
    assert len({r.route for r in split.slices.values()}) >= 2
    whole = segment_volume(routed, scan, prompts)
    assert {r.route for r in whole.slices.values()} == {whole.route}
    expected, mean = volume_route(routed, [np.asarray(r.scores) for r in split.slices.values()])
    assert whole.route == expected and whole.route_mode == "volume" and whole.passes == 2
    # The same graphs on the same slices, one slice per encoder run both times: onnxruntime may
    # at most sum in another order (SAME_LIBRARY); the float64 mean of 4 slices adds nothing
    # near float32 rounding.
    np.testing.assert_allclose(list(whole.mean_scores.values()), mean, rtol=0, atol=vae_score_tol(mean, k=SAME_LIBRARY))


def test_dicom_series_writes_a_seg_that_references_the_source(engines, tmp_path):
    hd, pydicom, nib = need("highdicom"), need("pydicom"), need("nibabel", "train")
    volume, _ = sphere_volume((64, 64, 5), (30, 34, 2), radius_mm=9.0, spacing=(0.7, 0.8, 3.0))
    uids = write_dicom_series(tmp_path / "series", volume.astype(np.float64))
    out = tmp_path / "out"
    result = invoke(tmp_path / "series", "--box3d", 10, 10, 0, 50, 54, 2, "--engines", engines, "--out", out,
                    "--task", "identity", "--min-area", 1)
    assert result.exit_code == 0, result.output
    labels = np.asarray(nib.load(str(out / "series_mask.nii.gz")).dataobj)
    scan = read_scan(tmp_path / "series")
    np.testing.assert_allclose(nib.load(str(out / "series_mask.nii.gz")).affine, scan.affine, atol=1e-4)  # float32 header
    assert labels.shape == (64, 64, 5) and labels[:, :, 0].any() and not labels[:, :, 3:].any()  # not symmetric
    ds = pydicom.dcmread(str(out / "series_seg.dcm"))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    referenced = {item.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for item in s.ReferencedInstanceSequence}
    assert referenced == set(uids)
    seg = hd.seg.segread(str(out / "series_seg.dcm"))
    assert {uid for _, _, uid in seg.get_source_image_uids()} == set(uids)
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(frames.astype(bool), np.moveaxis(labels, -1, 0) == 1)
    assert_valid_dicom(out / "series_seg.dcm")  # and an independent validator finds no error


def test_a_source_header_highdicom_refuses_gives_the_nifti_mask_and_one_warning(engines, tmp_path):
    """A real-world source with a PatientSex of 'X' (or an invalid date) makes highdicom raise
    while copying the patient module: the SEG is skipped with one warning naming why, the
    labels are still written, and the run exits 0 (it used to end in a traceback)."""
    pydicom = need("pydicom")
    need("highdicom")
    volume, _ = sphere_volume((64, 64, 5), (30, 34, 2), radius_mm=9.0, spacing=(0.7, 0.8, 3.0))
    write_dicom_series(tmp_path / "series", volume.astype(np.float64))
    for f in (tmp_path / "series").iterdir():
        ds = pydicom.dcmread(str(f))
        ds.PatientSex = "X"
        ds.save_as(str(f))
    out = tmp_path / "out"
    result = invoke(tmp_path / "series", "--box3d", 10, 10, 0, 50, 54, 2, "--engines", engines, "--out", out,
                    "--task", "identity", "--min-area", 1)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert (out / "series_mask.nii.gz").is_file() and not (out / "series_seg.dcm").exists()
    lines = [line for line in result.stderr.splitlines() if "no DICOM SEG" in line]
    assert len(lines) == 1 and "NIfTI mask" in lines[0], result.stderr


def test_multiframe_dicom_writes_a_mask_and_a_seg_on_its_source_frames(engines, tmp_path):
    """An enhanced CT file whose frames are stored out of slice order, each with its own
    rescale: the mask lies on the sorted slices, and the SEG maps each slice back to the
    source frame that holds it."""
    hd, nib = need("highdicom"), need("nibabel", "train")
    need("pydicom")  # the source file is written with pydicom
    volume, _ = sphere_volume((64, 64, 5), (30, 34, 2), radius_mm=9.0, spacing=(0.7, 0.8, 3.0))
    order = [3, 0, 4, 1, 2]  # frame i holds slice order[i]
    uid = write_multiframe_dicom(tmp_path / "ct.dcm", volume, slopes=[1.0, 2.0, 1.0, 0.5, 1.0],
                                 intercepts=[-1024.0, -2000.0, -1024.0, -500.0, 0.0], frame_order=order)
    out = tmp_path / "out"
    result = invoke(tmp_path / "ct.dcm", "--box3d", 10, 10, 0, 50, 54, 2, "--engines", engines, "--out", out,
                    "--task", "identity", "--min-area", 1, "--json")
    assert result.exit_code == 0, result.output
    assert "ct.dcm" not in result.stderr  # no warning about this file (a library's once-only ones may come first)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["outputs"]["mask"] == "ct_mask.nii.gz" and record["outputs"]["seg"] == "ct_seg.dcm"
    mask = nib.load(str(out / "ct_mask.nii.gz"))
    labels = np.asarray(mask.dataobj)
    np.testing.assert_allclose(mask.affine, read_scan(tmp_path / "ct.dcm").affine, atol=1e-4)  # float32 header
    assert labels.shape == (64, 64, 5) and labels[:, :, 0].any() and not labels[:, :, 3:].any()
    seg = hd.seg.segread(str(out / "ct_seg.dcm"))
    assert {ref for _, _, ref in seg.get_source_image_uids()} == {uid}
    for k in range(5):
        frame = seg.get_pixels_by_source_frame(uid, [order.index(k) + 1], segment_numbers=[1],
                                               assert_missing_frames_are_empty=True)[0, ..., 0]
        np.testing.assert_array_equal(frame.astype(bool), labels[:, :, k] == 1, err_msg=f"slice {k}")
    assert_valid_dicom(out / "ct_seg.dcm")


def test_legacy_multiframe_dicom_gets_a_mask_and_one_warning_instead_of_a_seg(engines, tmp_path):
    """A legacy multi-frame file has one position for all its frames: the reader places the
    slices (SpacingBetweenSlices), but a SEG cannot reference them frame by frame."""
    nib = need("nibabel", "train")
    need("pydicom")  # the source file is written with pydicom
    volume, _ = sphere_volume((48, 40, 4), (24, 20, 2), radius_mm=8.0, spacing=(0.7, 0.8, 3.0))
    write_multiframe_dicom(tmp_path / "legacy.dcm", volume, photometric="MONOCHROME1", enhanced=False)
    out = tmp_path / "out"
    result = invoke(tmp_path / "legacy.dcm", "--box3d", 8, 8, 0, 32, 40, 3, "--engines", engines, "--out", out,
                    "--task", "identity", "--json")
    assert result.exit_code == 0, result.output
    # one line about this file (the unverified export's once-only warning may come first)
    mine = [line for line in result.stderr.strip().splitlines() if "legacy.dcm" in line]
    assert len(mine) == 1 and mine[0].startswith("casam-infer: warning: legacy.dcm: no DICOM SEG for legacy.dcm: ")
    assert "Traceback" not in result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["outputs"]["seg"] is None and not (out / "legacy_seg.dcm").exists()
    assert nib.load(str(out / "legacy_mask.nii.gz")).shape == (48, 40, 4)


def test_bad_volumes_exit_2_with_one_line(engines, sphere, tmp_path):
    pydicom = need("pydicom")
    from nibabel.testing import data_path

    path, _ = sphere
    line = one_error_line(invoke(path, "--box", 100, 100, 120, 120, "--slice", 8, "--engines", engines))
    assert "outside" in line and "64×64" in line
    line = one_error_line(invoke(Path(data_path) / "example4d.nii.gz", "--box", 1, 1, 9, 9, "--engines", engines))
    assert "4-D" in line and "--volume" in line
    volume, _ = sphere_volume((32, 32, 5), (16, 16, 2), radius_mm=6.0)
    write_dicom_series(tmp_path / "gap", volume.astype(np.float64), skip=(2,))
    line = one_error_line(invoke(tmp_path / "gap", "--box", 1, 1, 9, 9, "--engines", engines))
    assert "uneven slice positions" in line and "--allow-gaps" in line
    for what, change in (("size", lambda ds: setattr(ds, "Rows", 16) or setattr(ds, "PixelData", ds.PixelData[: 16 * 32 * 2])),
                         ("orientation", lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))):
        folder = tmp_path / what
        write_dicom_series(folder, volume.astype(np.float64))
        first = sorted(folder.iterdir())[0]
        ds = pydicom.dcmread(str(first))
        change(ds)
        ds.save_as(str(first))
        line = one_error_line(invoke(folder, "--box", 1, 1, 9, 9, "--engines", engines))
        assert what in line and str(folder) in line


def test_embeddings_past_the_memory_budget_spill_to_disk_and_read_back_exactly():
    """Memory stays bounded however many slices a volume has: past ``resident_bytes`` the
    embeddings go to a file, and come back bit-identical."""
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(1, 8, 16, 16)).astype(np.float32) for _ in range(5)]
    spill = EmbeddingSpill(resident_bytes=2 * arrays[0].nbytes)
    try:
        for k, a in enumerate(arrays):
            spill.put(10 + k, a)
        assert spill.on_disk == 3 and 10 in spill and 14 in spill and 15 not in spill
        for k, a in enumerate(arrays):
            np.testing.assert_array_equal(spill.get(10 + k), a)
    finally:
        spill.close()


class SamSizedBrightVoxels(BrightVoxels):
    """BrightVoxels whose embeddings weigh what SAM's do: 64 copies of the 256×256 slice,
    16 MiB a slice (vit_b's 256×64×64 are 4 MiB), so 16 slices fill the 256 MB budget."""

    def encode(self, x: np.ndarray) -> np.ndarray:
        return np.repeat(x[:, :1], 64, axis=1)


def test_a_volume_past_256_mb_of_embeddings_spills_by_default_and_segments_the_same(monkeypatch):
    """A real segmentation (propagation through 20 slices of a 256×256 volume, 320 MiB of
    embeddings) with the default budget: the first 256 MiB stay in memory, the last 4 slices
    go to the temporary file, which is gone afterwards; the labels are those of a run that
    kept everything in memory."""
    import runtime.volume

    spills: list[EmbeddingSpill] = []

    class Recorded(EmbeddingSpill):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            spills.append(self)

    volume, label = sphere_volume((256, 256, 20), (128, 120, 10), radius_mm=20.0, spacing=SPACING)
    scan = Scan(Path("sphere.nii.gz"), volume, Source(kind="volume"), np.diag([*SPACING, 1.0]))
    prompts = Prompts.for_volume(volume.shape, 2, box3d=[(100.0, 92.0, 0, 157.0, 149.0, 19)])  # every slice
    window = Intensity(mode="window", window=(150.0, 300.0))
    monkeypatch.setattr(runtime.volume, "EmbeddingSpill", Recorded)
    spilled = segment_volume(SamSizedBrightVoxels(256, window), scan, prompts)
    assert RESIDENT_BYTES == 256 << 20 and spills[0].resident_bytes == RESIDENT_BYTES  # the default, not a test's
    assert spilled.timings_ms["slices_encoded"] == 20 and spills[0].on_disk == 20 - 16
    assert spills[0]._dir is not None and not Path(spills[0]._dir.name).exists()  # removed when the volume is done
    monkeypatch.setattr(runtime.volume, "EmbeddingSpill", lambda: Recorded(resident_bytes=1 << 40))
    resident = segment_volume(SamSizedBrightVoxels(256, window), scan, prompts)
    assert spills[1].on_disk == 0
    np.testing.assert_array_equal(spilled.labels, resident.labels)
    overlap = np.logical_and(spilled.labels == 1, label == 1).sum() / np.logical_or(spilled.labels == 1, label == 1).sum()
    assert overlap > 0.9  # the sphere, found through the spilled slices too


def test_volume_batch_defaults_by_device(pipe, sphere):
    """One slice per encoder call on the CPU (batches measured slower per slice there), the
    GPU's batch on a CUDA backend: read from the backend's device, not copied."""
    assert pipe.backend.device == "cpu" and pipe.capabilities.encoder_batch == DEFAULT_BATCH["cpu"] == 1
    assert VolumeSegmenter(pipe, read_scan(sphere[0])).batch == 1

    class OnGpu:  # the CPU backend, reporting a CUDA device
        device = "cuda"

        def load(self, key, path):
            return pipe.backend.load(key, path)

    assert Pipeline(pipe.manifest_obj, OnGpu()).capabilities.encoder_batch == DEFAULT_BATCH["cuda"] > 1
