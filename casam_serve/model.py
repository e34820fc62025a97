"""The Triton model ``casam``: one request in, one ``Pipeline`` prediction out.

Each request runs in its own Triton model-instance thread through ``Pipeline.predict``:
it is decoded and checked, preprocessed, its prompts validated (before any encoder time is
spent on a request that will be refused), then its encoder run is shared with whatever
other requests are waiting (``EncoderBatcher``), and routing and decoding finish in the
request's thread again, overlapping the next encoder batch.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from casam_core import __version__
from casam_core.errors import CasamError
from runtime.pipeline import Pipeline
from casam_serve.batcher import EncoderBatcher
from runtime.wire import info_arrays, read_request, response_arrays

LOG = logging.getLogger("casam.serve")


class CasamModel:
    """Answers Triton requests with ``pipeline``; results equal ``pipeline.predict``."""

    def __init__(self, pipeline: Pipeline, max_batch: int = 8) -> None:
        self.pipeline = pipeline
        self.batcher = EncoderBatcher(pipeline.encode, max_batch)

    def infer(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """PyTriton's inference callable (unbatched model: normally one request per call)."""
        return [self.answer(request) for request in requests]

    def answer(self, request: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pipe = self.pipeline
        try:
            call = read_request(request)  # its prompts checked against its image here
            # predict checks the task and image before its encoder call, so a request that
            # will be refused never takes a place in an encoder batch.
            result = pipe.predict(call.image, call.prompts, call.task, encode=self.batcher.encode)
        except CasamError as exc:
            LOG.info("refused a request: %s", exc)
            raise
        return response_arrays(result.masks, result.low_res_logits, result.iou, result.route,
                               list(result.scores.values()), list(result.thresholds.values()),
                               pipe.task_names, result.warnings)

    def info(self) -> dict[str, Any]:
        """What a client needs before its first request (task names for --task, mostly),
        and how well concurrent requests have shared encoder runs so far."""
        pipe = self.pipeline
        return {**pipe.describe(), "tasks": pipe.task_names,
                "thresholds": {n: float(t) for n, t in zip(pipe.task_names, pipe.thresholds)},
                "max_batch": self.batcher.max_batch, "casam_version": __version__,
                "encoder_batches": {str(size): runs for size, runs in sorted(self.batcher.batch_sizes.items())}}

    def info_infer(self, requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """PyTriton's inference callable of the model ``casam_info``."""
        answer = info_arrays(self.info())
        return [answer for _ in requests]

    def close(self) -> None:
        self.batcher.close()
