"""The request and response of the Triton model ``casam``, as plain numpy arrays.

Client (``runtime.remote``) and server (``casam_serve.model``) both go through this
module, so the two ends cannot disagree about a name, a dtype or a shape. The model is
unbatched on the Triton side (encoder batching happens inside the model, after
preprocessing, where images of any size fit one batch), so tensors carry no batch axis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

from casam_core.errors import CasamError, InputError
from casam_io.intensity import Intensity
from runtime.preprocess import to_rgb_255
from runtime.prompts import LOW_RES, Prompts


MODEL_NAME = "casam"  # the segmentation model
INFO_MODEL_NAME = "casam_info"  # no inputs; one JSON text describing the served engines

@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: type  # numpy scalar type; np.object_ means Triton BYTES
    shape: tuple[int, ...]  # -1 = any size
    optional: bool = False
    doc: str = ""

    @property
    def triton_dtype(self) -> str:
        return {np.uint8: "UINT8", np.float32: "FP32", np.object_: "BYTES"}[self.dtype]


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("image", np.uint8, (-1, -1, -1), doc="H×W×C, C = 1, 3 or 4; 8-bit (deeper data: see RemotePipeline)"),
    TensorSpec("boxes", np.float32, (-1, 4), optional=True, doc="K×4 x0 y0 x1 y1 in original pixels"),
    TensorSpec("points", np.float32, (-1, -1, 2), optional=True, doc="K×P×2 x y in original pixels"),
    TensorSpec("point_labels", np.float32, (-1, -1), optional=True, doc="K×P, 1 foreground, 0 background"),
    TensorSpec("mask_input", np.float32, (-1, 1, LOW_RES, LOW_RES), optional=True,
               doc="K×1×256×256 low-res logits of a previous prediction, to correct it"),
    TensorSpec("task", np.object_, (1,), optional=True, doc="force a task name, or 'identity' for plain SAM"),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("masks", np.uint8, (-1, -1, -1), doc="K×H×W, 1 inside the mask"),
    TensorSpec("iou", np.float32, (-1,), doc="K predicted IoU"),
    TensorSpec("route", np.object_, (1,), doc="the task that handled the image, or 'identity'"),
    TensorSpec("scores", np.float32, (-1,), doc="N task scores (negative ELBO), in task_names order"),
    TensorSpec("thresholds", np.float32, (-1,), doc="N routing thresholds"),
    TensorSpec("task_names", np.object_, (-1,), doc="N task names"),
    TensorSpec("low_res_logits", np.float32, (-1, 1, 256, 256), doc="K×1×256×256 decoder logits"),
    TensorSpec("warnings", np.object_, (-1,), doc="e.g. a box clipped to the image"),
)

# The model ``casam_info`` takes no input and answers this one tensor.
INFO_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("info", np.object_, (1,), doc="JSON: tasks, thresholds, backend, precision, max_prompts, max_batch"),
)


#: Request tensor → the ``Prompts`` field it carries (the wire names predate ``Prompts``).
PROMPT_FIELDS = {"boxes": "boxes", "points": "points", "point_labels": "labels", "mask_input": "mask_input"}


@dataclass
class Call:
    """One request, in the argument form of ``Pipeline.predict``: an image and its prompts,
    checked against it (``Prompts.for_image``; the server checks them again on arrival)."""

    image: np.ndarray
    prompts: Prompts
    task: Optional[str] = None


# ----- client side ------------------------------------------------------------------------
def wire_image(image: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Any image ``Pipeline.predict`` takes → the uint8 H×W×C it sends.

    8-bit images travel as they are (grey as H×W×1, a third of RGB). Deeper data goes
    through the same ``to_rgb_255`` the server would apply, with the server's recorded
    ``intensity``, so a raw CT slice gives the same masks remotely as locally.
    """
    array = np.asarray(image)
    if array.dtype == np.uint8 and array.ndim == 2:
        return np.ascontiguousarray(array[:, :, None])
    if array.dtype == np.uint8 and array.ndim == 3:
        return np.ascontiguousarray(array)
    return to_rgb_255(array, intensity)


def request_arrays(call: Call, intensity: Intensity) -> dict[str, np.ndarray]:
    """``Pipeline.predict`` arguments → the tensors of one request (absent prompts left out).
    ``intensity`` is the server's, for an image deeper than 8 bits (``wire_image``)."""
    arrays = {"image": wire_image(call.image, intensity)}
    for name, field_name in PROMPT_FIELDS.items():
        value = getattr(call.prompts, field_name)
        if value is not None:
            arrays[name] = np.ascontiguousarray(value, dtype=np.float32)
    if call.task is not None:
        arrays["task"] = np.array([call.task.encode("utf-8")], dtype=np.object_)
    return arrays


# ----- server side ------------------------------------------------------------------------
def read_request(arrays: Mapping[str, np.ndarray]) -> Call:
    """Tensors of one request → a Call, with every dtype and rank checked, and its prompts
    checked against its image (``Prompts.for_image``).

    Triton already refuses wrong dtypes and ranks against the model config; checking again
    here keeps the model correct when it is called some other way (tests, a future backend).
    """
    unknown = sorted(set(arrays) - {spec.name for spec in INPUTS})
    if unknown:
        raise InputError(f"unknown input(s) {', '.join(unknown)}; expected {', '.join(s.name for s in INPUTS)}")
    values: dict[str, object] = {}
    for spec in INPUTS:
        if spec.name not in arrays:
            if not spec.optional:
                raise InputError(f"input {spec.name!r} is required")
            continue
        values[spec.name] = _checked(spec, np.asarray(arrays[spec.name]))
    task = values.pop("task", None)
    if task is not None:
        task = _text(task.reshape(-1)[0], "task")  # type: ignore[union-attr]
    image = values.pop("image")
    prompts = Prompts.for_image(image.shape, **{PROMPT_FIELDS[k]: v for k, v in values.items()})  # type: ignore[arg-type]
    return Call(image, prompts, task)  # type: ignore[arg-type]


def response_arrays(
    masks: np.ndarray,
    low_res_logits: np.ndarray,
    iou: np.ndarray,
    route: str,
    scores: np.ndarray,
    thresholds: np.ndarray,
    task_names: Sequence[str],
    warnings: Sequence[str],
) -> dict[str, np.ndarray]:
    """One prediction → the tensors of its response."""
    return {
        "masks": np.ascontiguousarray(masks, dtype=np.uint8),
        "iou": np.asarray(iou, dtype=np.float32).reshape(-1),
        "route": _bytes([route]),
        "scores": np.asarray(scores, dtype=np.float32).reshape(-1),
        "thresholds": np.asarray(thresholds, dtype=np.float32).reshape(-1),
        "task_names": _bytes(task_names),
        "low_res_logits": np.asarray(low_res_logits, dtype=np.float32),
        "warnings": _bytes(warnings),
    }


def read_response(arrays: Mapping[str, Optional[np.ndarray]]) -> dict[str, object]:
    """Tensors of one response → the fields of ``runtime.predictor.Result`` (timings aside).

    Every output is checked against ``OUTPUTS`` first (a CasamError names the first one
    missing or malformed), so a reply from something that is not a casam server never
    reaches the caller half-read.
    """
    for spec in OUTPUTS:
        _checked_output(spec, arrays.get(spec.name))
    names = [_text(v, "task_names") for v in arrays["task_names"].reshape(-1)]
    scores = arrays["scores"].reshape(-1)
    thresholds = arrays["thresholds"].reshape(-1)
    return {
        "masks": arrays["masks"].astype(bool),
        "low_res_logits": arrays["low_res_logits"].astype(np.float32, copy=False),
        "iou": arrays["iou"].astype(np.float32, copy=False),
        "route": _text(arrays["route"].reshape(-1)[0], "route"),
        "scores": {n: float(s) for n, s in zip(names, scores)},
        "thresholds": {n: float(t) for n, t in zip(names, thresholds)},
        "warnings": [_text(v, "warnings") for v in arrays["warnings"].reshape(-1)],
    }


def info_arrays(info: Mapping[str, object]) -> dict[str, np.ndarray]:
    return {"info": _bytes([json.dumps(info)])}


def _checked(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if spec.dtype is np.object_:
        if array.dtype != np.object_ and array.dtype.kind not in "SU":
            raise InputError(f"input {spec.name!r} must be BYTES, got {array.dtype}")
    elif array.dtype != spec.dtype:
        raise InputError(f"input {spec.name!r} must be {np.dtype(spec.dtype).name}, got {array.dtype}")
    if array.ndim != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, array.shape)):
        want = "×".join("?" if d == -1 else str(d) for d in spec.shape)
        raise InputError(f"input {spec.name!r} must have shape {want}, got {'×'.join(map(str, array.shape))}")
    return array


def _checked_output(spec: TensorSpec, array: Optional[np.ndarray]) -> None:
    if not isinstance(array, np.ndarray):
        raise CasamError(f"the reply has no output {spec.name!r}")
    kind_ok = (array.dtype == np.object_ or array.dtype.kind in "SU") if spec.dtype is np.object_ else array.dtype == spec.dtype
    if not kind_ok or array.ndim != len(spec.shape) or any(w not in (-1, g) for w, g in zip(spec.shape, array.shape)):
        raise CasamError(f"the reply's output {spec.name!r} is {array.dtype} {array.shape}, not the casam wire format")


def _bytes(texts: Sequence[str]) -> np.ndarray:
    # Fixed-width bytes, not objects: PyTriton's output check cannot look into an empty
    # object array (no warnings, no tasks), and Triton sends both kinds as BYTES.
    return np.array([t.encode("utf-8") for t in texts], dtype=np.bytes_).reshape(len(texts))


def _text(value: object, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{name} is not UTF-8 text") from exc
    return str(value)
