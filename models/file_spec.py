"""A model given by path: its manifest entry read from the model itself.

``edge-agent detect --model path/to/model.tflite`` (or ``[detector] model =
"/path/model.tflite"``) has no manifest entry; what the detector needs is read
from the file and its tensors:

* family: ``ssd`` when the graph holds the ``TFLite_Detection_PostProcess``
  custom op with its four outputs (boxes [1,N,4], classes, scores, count);
  ``yolov8`` when there is one [1, 4+C, N] (or [1, N, 4+C]) output;
* input: size from the [1, H, W, 3] input; value range from its
  quantisation (uint8/int8: the real values 0..255 map to); a float input
  carries no range, so it needs a manifest entry;
* resize: SSD stretches, YOLOv8 letterboxes (as their exporters train);
* labels: ``<stem>.txt`` (one label a line) next to the model, else COCO for
  the usual class counts (SSD: the 90-id TF labelmap; YOLOv8 with 80 classes).

Anything that cannot be read is a ModelError saying what was found.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from models.errors import ModelError

POSTPROCESS_OP = b"TFLite_Detection_PostProcess"
INTEGER_RANGES = {"uint8": (0, 255), "int8": (-128, 127)}


def is_model_path(model: str) -> bool:
    """A ``--model`` value naming a file rather than a manifest entry."""
    return model.lower().endswith(".tflite") or "/" in model or "\\" in model


def describe_model_file(path: Path, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Manifest fields for the model at ``path`` from its tensors' details (as the interpreter gives them)."""
    data = path.read_bytes()
    if len(inputs) != 1:
        raise ModelError(f"{path}: {len(inputs)} input tensors; a detection model has one image input")
    family = _family(path, data, outputs)
    width, height = _input_size(path, inputs[0])
    labels, label_format = _labels(path, family, outputs)
    return {
        "name": path.stem,
        "family": family,
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "input_size": (width, height),
        "input_range": _input_range(path, inputs[0]),
        "resize": "stretch" if family == "ssd" else "letterbox",
        "labels": labels,
        "label_format": label_format,
        "num_classes": 90 if family == "ssd" and label_format == "offset" else None,
        "description": f"read from {path.name}",
    }


def _family(path: Path, data: bytes, outputs: list[dict[str, Any]]) -> str:
    shapes = [list(o["shape"]) for o in outputs]
    if POSTPROCESS_OP in data and len(outputs) == 4:
        return "ssd"
    if len(shapes) == 1 and len(shapes[0]) == 3:
        small, large = sorted(shapes[0][1:])
        if 5 <= small < large:
            return "yolov8"
    raise ModelError(
        f"{path}: cannot tell the model family from its outputs {shapes}; supported are SSD with "
        "TFLite_Detection_PostProcess (4 outputs) and YOLOv8-style raw output [1, 4+classes, boxes]; "
        "describe other models in models/manifest.toml"
    )


def _input_size(path: Path, detail: dict[str, Any]) -> tuple[int, int]:
    shape = [int(v) for v in detail["shape"]]
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        raise ModelError(f"{path}: input shape {shape} is not an RGB image [1, height, width, 3]")
    return shape[2], shape[1]


def _input_range(path: Path, detail: dict[str, Any]) -> tuple[float, float]:
    """The real values pixels 0 and 255 stand for, from the input's quantisation."""
    dtype = getattr(detail["dtype"], "__name__", str(detail["dtype"]))
    scale, zero_point = detail["quantization"]
    if dtype not in INTEGER_RANGES or not scale:
        raise ModelError(
            f"{path}: the input is {dtype} without quantisation, so the model does not say which values its "
            "pixels take (0..1, -1..1, 0..255); describe it in models/manifest.toml with input_range"
        )
    low, high = INTEGER_RANGES[dtype]
    return (round((low - zero_point) * scale, 6), round((high - zero_point) * scale, 6))


def _labels(path: Path, family: str, outputs: list[dict[str, Any]]) -> tuple[str, str]:
    own = path.with_suffix(".txt")
    if own.is_file():
        return str(own), "plain"
    if family == "ssd":
        return "coco_labelmap_ssd.txt", "offset"
    classes = int(min(outputs[0]["shape"][1:])) - 4
    if classes == 80:
        return "coco80.txt", "plain"
    raise ModelError(f"{path}: the model has {classes} classes; put their names, one a line, in {own}")
