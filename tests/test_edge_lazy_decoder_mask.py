"""casam-infer's memory: the ``decoder_mask`` graph is opened only when a correction needs it
(or up front with ``preload``, as casam-serve asks), not by every Pipeline."""

import numpy as np

from runtime import pipeline as pipeline_module
from runtime.pipeline import Pipeline
from runtime.prompts import Prompts
from runtime_support import sample_images


def _loads(monkeypatch) -> list[str]:
    loaded: list[str] = []
    original = pipeline_module.open_backend

    def recording(*args, **kwargs):
        backend = original(*args, **kwargs)
        load = backend.load
        backend.load = lambda key, path: (loaded.append(key), load(key, path))[1]
        return backend

    monkeypatch.setattr(pipeline_module, "open_backend", recording)
    return loaded


def test_decoder_mask_opens_on_the_first_correction_only(engines, monkeypatch):
    loaded = _loads(monkeypatch)
    pipe = Pipeline.from_manifest(engines, backend="ort-cpu")
    assert pipe.capabilities.mask_input and "decoder_mask" not in loaded
    image = sample_images()[1]
    box = np.array([[40, 30, 220, 200]], np.float32)
    first = pipe.predict(image, Prompts.for_image(image.shape, boxes=box), task="identity")
    assert "decoder_mask" not in loaded  # a plain box needs only the decoder
    pipe.predict(image, Prompts.for_image(image.shape, boxes=box, mask_input=first.low_res_logits), task="identity")
    assert loaded.count("decoder_mask") == 1 and pipe.calls["decoder_mask"] == 1
    pipe.predict(image, Prompts.for_image(image.shape, boxes=box, mask_input=first.low_res_logits), task="identity")
    assert loaded.count("decoder_mask") == 1  # opened once, then kept


def test_preload_opens_it_up_front(engines, monkeypatch):
    loaded = _loads(monkeypatch)
    Pipeline.from_manifest(engines, backend="ort-cpu", preload=True)
    assert loaded.count("decoder_mask") == 1
