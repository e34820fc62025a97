"""OpenVINO backend: the same fp32 graphs as onnxruntime, the same routes and masks (issue 14).

Skipped only where the openvino wheel is not installed (the ``openvino`` extra)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")

from runtime.backends import BACKENDS, CPU_PREFERENCE, open_backend  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.prompts import Prompts
from runtime_support import BOXES, sample_images  # noqa: E402


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def test_openvino_matches_onnxruntime_on_fp32_graphs(engines):
    ort = Pipeline.from_manifest(engines, backend="ort-cpu")
    ov = Pipeline.from_manifest(engines, backend="openvino")
    assert ov.describe()["backend"] == "openvino" and ov.describe()["inference_precision"] == "f32"
    ious = []
    for image in sample_images()[:3]:
        for task in (None, "beta", "identity"):
            a, b = ort.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task=task), ov.predict(image, Prompts.for_image(image.shape, boxes=BOXES), task=task)
            assert a.route == b.route
            ious += [mask_iou(x, y) for x, y in zip(a.masks, b.masks)]
    assert float(np.mean(ious)) >= 0.999, ious


def test_openvino_precision_is_explicit_f32(engines):
    """OpenVINO's CPU plugin would run fp32 graphs in bf16 on CPUs with bf16 units unless told."""
    manifest = Manifest.load(engines)
    backend = open_backend("openvino", manifest)
    compiled = backend.load("align/alpha", manifest.task("alpha").graph.path).compiled
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32", "float32")


def test_backend_choices_come_from_the_table(engines):
    from casam_infer.cli import main

    choices = next(p for p in main.params if p.name == "backend").type.choices
    assert tuple(choices) == BACKENDS and "openvino" in BACKENDS
    assert open_backend("auto", Manifest.load(engines)).name in {*CPU_PREFERENCE["fp32"], "ort-cuda", "trt"}
