"""Dataset loading: formats, messy files, bad data, splits and NIfTI volumes (no SAM needed)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from casam_core.files import atomic_write_json
from casam_io.intensity import Intensity
from runtime.preprocess import Preprocessing, preprocess
from trainer.data import DataError, load_dataset, load_images, mask_to_index_map
from trainer.synthetic import STYLES, write_synthetic_task


def save(array: np.ndarray, path, mode=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def square_mask(h=32, w=40, value=255, box=(5, 5, 20, 20)) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[box[1]:box[3], box[0]:box[2]] = value
    return m


def test_mask_formats_become_structures():
    assert mask_to_index_map(square_mask(value=255)).max() == 1
    assert mask_to_index_map(square_mask(value=1)).max() == 1
    labels = np.zeros((20, 20), np.uint8)
    labels[:5, :5], labels[10:, 10:], labels[:5, 10:] = 3, 7, 200
    idx = mask_to_index_map(labels)
    assert idx.max() == 3 and (idx == 2).sum() == 100  # value 7 → second structure
    # A soft (anti-aliased/JPEG) mask with many grey levels is one binary structure.
    soft = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (4, 1))
    assert set(np.unique(mask_to_index_map(soft))) == {0, 1}
    # Colour-coded label maps: one structure per colour.
    colour = np.zeros((10, 10, 3), np.uint8)
    colour[:3, :3] = (255, 0, 0)
    colour[5:, 5:] = (0, 255, 0)
    assert mask_to_index_map(colour).max() == 2


def test_synthetic_task_loads_with_all_mask_formats(tmp_path):
    root = write_synthetic_task(tmp_path / "s", "dots", 10, seed=1)
    ds = load_dataset(root, seed=0)
    assert len(ds.train) == 8 and len(ds.test) == 2 and ds.split_source.startswith("seeded")
    assert any(s.num_structures > 1 for s in ds.samples)  # label maps
    raw = [np.unique(np.asarray(Image.open(p))).max() for p in sorted((root / "masks").iterdir())]
    assert {1, 255} <= set(raw)  # binary 0/1 and 0/255 both present
    again = load_dataset(root, seed=0)
    assert [s.stem for s in again.test] == [s.stem for s in ds.test]
    assert [s.stem for s in load_dataset(root, seed=1).test] != [s.stem for s in ds.test] or len(ds.samples) < 3
    assert set(STYLES) >= {"stripes", "dots", "plasma"}


def test_split_json_is_used(tmp_path):
    root = write_synthetic_task(tmp_path / "s", "stripes", 5)
    stems = sorted(p.stem for p in (root / "images").iterdir())
    atomic_write_json(root / "split.json", {"train": stems[:2], "test": stems[2:]})
    ds = load_dataset(root)
    assert [s.stem for s in ds.train] == stems[:2] and [s.stem for s in ds.test] == stems[2:]
    assert ds.split_record()["source"] == "split.json"


def test_bad_data_lists_every_problem(tmp_path):
    root = tmp_path / "bad"
    save(np.zeros((32, 40, 3), np.uint8), root / "images" / "no_mask.png")
    save(np.zeros((32, 40, 3), np.uint8), root / "images" / "wrong_size.png")
    save(square_mask(h=30, w=40), root / "masks" / "wrong_size.png")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    save(square_mask(), root / "masks" / "broken.png")
    save(np.zeros((32, 40, 3), np.uint8), root / "images" / "good.png")
    save(square_mask(), root / "masks" / "good.png")
    with pytest.raises(DataError) as err:
        load_dataset(root)
    text = str(err.value)
    assert "3 problem(s)" in text
    for name in ("no_mask.png", "wrong_size.png", "broken.png"):
        assert name in text
    assert "good.png" not in text


def test_empty_masks_are_skipped_and_counted(tmp_path):
    root = tmp_path / "d"
    for i in range(4):
        save(np.full((32, 40, 3), 40 * i, np.uint8), root / "images" / f"im{i}.png")
        save(square_mask() if i % 2 else np.zeros((32, 40), np.uint8), root / "masks" / f"im{i}.png")
    ds = load_dataset(root)
    assert sorted(ds.skipped_empty) == ["im0", "im2"]
    assert len(ds.samples) == 2
    assert ds.split_record()["skipped_empty"] == ["im0", "im2"]
    save(np.zeros((32, 40), np.uint8), root / "masks" / "im1.png")
    save(np.zeros((32, 40), np.uint8), root / "masks" / "im3.png")
    with pytest.raises(DataError, match="no image has a non-empty mask"):
        load_dataset(root)


def test_messy_images_16bit_palette_rgba_and_mixed_sizes(tmp_path):
    root = tmp_path / "messy"
    grey16 = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 13)
    save(grey16, root / "images" / "a16.png")
    save(square_mask(48, 64), root / "masks" / "a16.png")
    pal = Image.fromarray(np.random.default_rng(0).integers(0, 4, (30, 50)).astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    (root / "images").mkdir(parents=True, exist_ok=True)
    pal.save(root / "images" / "pal.png")
    save(square_mask(30, 50), root / "masks" / "pal.png")
    save(np.full((20, 24, 4), 120, np.uint8), root / "images" / "rgba.png")
    # Label map stored as a palette PNG: its indices are the labels, not its colours.
    lab = Image.fromarray(np.pad(np.array([[1, 1, 2, 2]] * 4, np.uint8), ((0, 16), (0, 20))), mode="P")
    lab.putpalette([0, 0, 0, 250, 250, 250, 128, 128, 128] + [0] * 759)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lab.save(root / "masks" / "rgba.png")
    ds = load_dataset(root, test_fraction=0.0)
    by = {s.stem: s for s in ds.samples}
    # prepared as the runtime prepares it: 16-bit min-max scaled to 8-bit
    assert by["a16"].image().dtype == np.uint8 and by["a16"].image().max() == 255
    assert by["rgba"].num_structures == 2
    assert {s.original_hw for s in ds.samples} == {(48, 64), (30, 50), (20, 24)}
    for s in ds.samples:
        x, frame = preprocess(s.image(), Preprocessing())
        assert x.shape == (1, 3, 1024, 1024) and frame.original_hw == s.original_hw
    assert len({s.image_hash for s in ds.samples}) == 3
    assert [s.stem for s in load_images(root, Intensity())] == ["a16", "pal", "rgba"]


def test_nifti_volumes_are_sliced_windowed_and_filtered(tmp_path):
    nib = pytest.importorskip("nibabel")
    root = tmp_path / "nii"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 30, (24, 20, 5)).astype(np.float32)
    vol[0, 0, 0] = 1e6  # an outlier the percentile window must ignore
    lab = np.zeros((24, 20, 5), np.uint8)
    lab[4:10, 4:10, 1] = 1
    lab[4:10, 4:10, 3] = 1
    lab[12:16, 12:16, 3] = 2
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / "images" / "case1.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "labels" / "case1.nii.gz"))
    ds = load_dataset(root, test_fraction=0.0)
    assert ds.kind == "nifti"
    assert [s.stem for s in ds.samples] == ["case1_a2_0001", "case1_a2_0003"]
    assert len(ds.skipped_empty) == 3
    assert [s.num_structures for s in ds.samples] == [1, 2]
    image = ds.samples[0].image()
    assert image.dtype == np.uint8 and image.shape == (24, 20)
    assert image.std() > 20  # windowed by percentile, not squashed by the outlier
    nib.save(nib.Nifti1Image(lab[:, :, :4], np.eye(4)), str(root / "labels" / "case1.nii.gz"))
    with pytest.raises(DataError, match="label volume"):
        load_dataset(root)
