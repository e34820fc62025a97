"""One ``Prompts`` value, checked once against its image or volume; ``Preprocessing.prepare``
applies the recorded intensity, so a raw CT slice given to ``Pipeline.predict`` is what the
CLI makes of the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from casam_core.errors import InputError
from casam_infer.cli import main
from casam_io.intensity import WINDOW_PRESETS, Intensity
from runtime.pipeline import Pipeline
from runtime.predictor import Predictor
from runtime.preprocess import Preprocessing
from runtime.prompts import Prompts
from runtime_support import exported, take_unverified_warning

pydicom = pytest.importorskip("pydicom")
CT_WINDOW = Intensity(mode="window", window=WINDOW_PRESETS["soft-tissue"])
BOX = (30.0, 28.0, 100.0, 96.0)


@pytest.fixture(scope="module")
def ct_engines(tmp_path_factory) -> Path:
    """A tiny export whose manifest records a CT soft-tissue window, as one trained on CT does."""
    from casam_export import export_bundle
    from conftest import make_random_bundle

    root = tmp_path_factory.mktemp("ct_export")
    make_random_bundle(root / "bundle", ("alpha", "beta"), seed=3, intensity=CT_WINDOW)
    export_bundle(root / "bundle", root / "engines", verify=False, quiet=True)
    take_unverified_warning(root / "engines")
    return root / "engines"


def hounsfield_slice() -> tuple[Path, np.ndarray]:
    """pydicom's CT_small.dcm and its pixels in Hounsfield units as int16: the raw slice a
    PACS-side caller holds (stored values × RescaleSlope + RescaleIntercept)."""
    from pydicom.data import get_testdata_file

    path = Path(get_testdata_file("CT_small.dcm"))
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
    assert hu.min() < -160 and hu.max() > 240  # wider than the soft-tissue window: min-max would differ
    return path, hu.astype(np.int16)


def test_a_raw_ct_slice_gets_the_recorded_window_and_the_clis_mask(ct_engines, tmp_path):
    path, hu = hounsfield_slice()
    pipe = Pipeline.from_manifest(ct_engines, backend="ort-cpu")
    assert isinstance(pipe, Predictor) and pipe.preprocessing.intensity == CT_WINDOW
    result = pipe.predict(hu, Prompts.for_image(hu.shape, boxes=np.array([BOX])))
    out = tmp_path / "out"
    cli = CliRunner().invoke(main, [str(path), "--box", *map(str, BOX), "--engines", str(ct_engines),
                                    "--out", str(out), "--backend", "ort-cpu", "--quiet"])
    assert cli.exit_code == 0, cli.output
    record = json.loads((out / "CT_small.json").read_text())
    cli_mask = np.asarray(Image.open(out / record["prompts"][0]["mask"])) > 0
    assert result.route == record["route"]
    np.testing.assert_array_equal(result.masks[0], cli_mask)
    # Same uint8 image, same engines, same thread counts: the same float32 IoU, bit for bit.
    assert float(result.iou[0]) == record["prompts"][0]["iou"]
    prepared, _ = pipe.read(path)
    assert np.array_equal(prepared, pipe.preprocessing.prepare(hu)[0])  # the file and the raw slice agree
    # The window matters: a min-max scaled slice is another image and another prediction.
    minmax, _ = Preprocessing(intensity=Intensity(mode="minmax")).prepare(hu)
    assert not np.array_equal(minmax, prepared)
    assert float(pipe.predict(minmax, Prompts.for_image(hu.shape, boxes=np.array([BOX]))).iou[0]) != float(result.iou[0])


def test_prompts_are_checked_once_against_their_image():
    p = Prompts.for_image((300, 500, 3), boxes=np.array([-20, 100, 550, 280]))
    assert p.boxes.tolist() == [[0, 100, 500, 280]] and "clipped" in p.warnings[0] and p.count == 1
    p.check_image((300, 500))
    with pytest.raises(InputError, match="checked against a 500×300 image, not this 80×64 one"):
        p.check_image((64, 80))
    with pytest.raises(InputError, match="2 boxes and 1 point sets"):
        Prompts.for_image((300, 500), boxes=np.array([[0, 0, 9, 9], [1, 1, 9, 9]]), points=np.array([[[4.0, 4.0]]]))
    clicks = Prompts.for_image((300, 500), points=np.array([[10.0, 20.0], [30.0, 40.0]]), labels=[1, 0])
    assert clicks.points.shape == (2, 1, 2) and clicks.labels.tolist() == [[1.0], [0.0]]
    coords, labels = clicks.encode((2.0, 0.5))
    assert coords[:, 0].tolist() == [[20.0, 10.0], [60.0, 20.0]] and labels.tolist() == [[1, -1], [0, -1]]


def test_a_previous_mask_is_one_field_with_its_check(tmp_path):
    previous = np.zeros((1, 1, 256, 256), np.float32)
    p = Prompts.for_image((40, 50), boxes=np.array([[1, 1, 20, 20]]), mask_input=previous[0])  # K×256×256 is taken too
    assert p.mask_input.shape == (1, 1, 256, 256)
    for bad, message in ((np.zeros((2, 1, 256, 256)), "one per prompt"), (np.zeros((1, 1, 64, 64)), "K×1×256×256"),
                         (np.full((1, 1, 256, 256), np.nan), "finite")):
        with pytest.raises(InputError, match=message):
            Prompts.for_image((40, 50), boxes=np.array([[1, 1, 20, 20]]), mask_input=bad)


def test_volume_prompts_name_what_is_wrong():
    shape = (64, 48, 25)
    p = Prompts.for_volume(shape, 2, boxes=[(5, 5, 30, 30)], box3d=[(5, 5, 10, 25, 30, 20)])
    assert p.slice == 12 and p.count == 2 and p.slice_hw == (64, 48)
    cases = [
        (dict(box3d=[(5, 5, 10, 25, 30, 500)]), "Z1 = 500"),  # not the computed middle slice (issue 26, item 14)
        (dict(box3d=[(5, 5, -3, 25, 30, 5)]), "Z0 = -3"),
        (dict(box3d=[(5, 5, 9, 25, 30, 4)]), "give whole slice numbers Z0 ≤ Z1"),
        (dict(boxes=[(5, 5, 30, 30)], slice=40), "slice 40 is outside the volume's 25 slices"),
        (dict(boxes=[(50, 5, 60, 30)]), "is outside (or empty in) slice 12, which is 48×64 pixels"),
        (dict(boxes=[(5, 5, 30, 30)], points=[(3, 3)]), "--point is not supported for volumes"),
        (dict(), "give a prompt for the volume"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Prompts.for_volume(shape, 2, **kwargs)


def test_pipeline_refuses_a_mask_input_its_decoder_cannot_take(tmp_path_factory):
    engines = exported(tmp_path_factory)[1]
    old = json.loads((engines / "manifest.json").read_text())
    del old["graphs"]["decoder_mask"]  # an export made before the decoder_mask graph
    pipe = Pipeline.from_manifest(engines, backend="ort-cpu", manifest=old)
    assert not pipe.capabilities.mask_input and pipe.capabilities.volumes
    image = np.zeros((40, 50), np.uint8)
    prompts = Prompts.for_image(image.shape, boxes=np.array([[1, 1, 20, 20]]), mask_input=np.zeros((1, 1, 256, 256)))
    with pytest.raises(InputError, match="takes no previous mask"):
        pipe.predict(image, prompts)
