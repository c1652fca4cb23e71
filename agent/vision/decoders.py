"""Output decoders, one per model family: raw output tensors in, detections out.

Like Frigate's detector plugins, each family is a small class registered in
``DECODERS``; adding a family means adding a class here and a ``family`` value
in the manifest. Boxes come out normalised to the model input (x1, y1, x2, y2).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from agent.errors import ModelError
from models import ModelSpec

ReadOutput = Callable[[int], np.ndarray]  # tensor index → dequantised array


@dataclass(frozen=True)
class Detection:
    label: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 normalised to the image

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])

    def as_dict(self) -> dict:
        return {"label": self.label, "score": round(self.score, 3), "box": [round(v, 4) for v in self.box]}


class OutputDecoder(abc.ABC):
    """Knows one family's output layout; checks it once, when the model is loaded."""

    def __init__(self, spec: ModelSpec, outputs: list[dict[str, Any]], labels: dict[int, str]):
        self.spec = spec
        self.outputs = outputs
        self.labels = labels

    def classes_in_model(self) -> int | None:
        """How many classes the model emits, when its outputs say; else the manifest's ``num_classes``."""
        return self.spec.num_classes

    @abc.abstractmethod
    def decode(self, read: ReadOutput, min_score: float) -> list[Detection]: ...


class SsdPostProcessDecoder(OutputDecoder):
    """``TFLite_Detection_PostProcess``: boxes [1,N,4] (ymin, xmin, ymax, xmax), classes, scores, count."""

    def __init__(self, spec: ModelSpec, outputs: list[dict[str, Any]], labels: dict[int, str]):
        super().__init__(spec, outputs, labels)
        if len(outputs) != 4:
            raise ModelError(
                f"SSD model {spec.name!r} has {len(outputs)} outputs; TFLite_Detection_PostProcess gives 4"
            )
        roles: dict[str, int] = {}
        pairs = []
        for detail in outputs:
            shape = list(detail["shape"])
            if len(shape) == 3 and shape[-1] == 4:
                roles["boxes"] = detail["index"]
            elif len(shape) == 1:
                roles["count"] = detail["index"]
            else:
                pairs.append(detail)
        if set(roles) != {"boxes", "count"} or len(pairs) != 2:
            raise ModelError(f"SSD model {spec.name!r}: outputs do not look like boxes/classes/scores/count")
        names = {d["name"].rsplit(":", 1)[-1]: d["index"] for d in pairs}
        # TF1 exports name them :1 (classes) and :2 (scores); otherwise tell them apart by their values.
        self.ambiguous = set(names) != {"1", "2"}
        roles["classes"], roles["scores"] = (
            (pairs[0]["index"], pairs[1]["index"]) if self.ambiguous else (names["1"], names["2"])
        )
        self.roles = roles

    def decode(self, read: ReadOutput, min_score: float) -> list[Detection]:
        boxes = read(self.roles["boxes"])[0]
        classes, scores = read(self.roles["classes"])[0], read(self.roles["scores"])[0]
        if self.ambiguous and (np.any(scores > 1.0) or not np.allclose(classes, np.round(classes))):
            classes, scores = scores, classes
        count = int(read(self.roles["count"])[0])
        found = []
        for i in range(min(count, len(scores))):
            score, class_id = float(scores[i]), int(classes[i])
            if score < min_score or class_id not in self.labels:
                continue
            y1, x1, y2, x2 = (float(v) for v in np.clip(boxes[i], 0.0, 1.0))
            found.append(Detection(self.labels[class_id], class_id, score, (x1, y1, x2, y2)))
        return found


class Yolov8Decoder(OutputDecoder):
    """One output [1, 4+C, N]: cx, cy, w, h, then C class scores; score filter and class-aware NMS here."""

    nms_iou = 0.45

    def __init__(self, spec: ModelSpec, outputs: list[dict[str, Any]], labels: dict[int, str]):
        super().__init__(spec, outputs, labels)
        if len(outputs) != 1 or len(outputs[0]["shape"]) != 3:
            raise ModelError(f"YOLOv8 model {spec.name!r} should have one [1, 4+C, N] output")
        self.index = outputs[0]["index"]
        self.width, self.height = spec.input_size

    def classes_in_model(self) -> int | None:
        shape = self.outputs[0]["shape"]
        return int(min(shape[1], shape[2])) - 4

    def decode(self, read: ReadOutput, min_score: float) -> list[Detection]:
        output = read(self.index)[0]
        if output.shape[0] > output.shape[1]:
            output = output.T  # some exports are [N, 4+C]
        class_scores = output[4:]
        class_ids = class_scores.argmax(axis=0)
        scores = class_scores[class_ids, np.arange(class_scores.shape[1])]
        keep = scores >= min_score
        if not np.any(keep):
            return []
        cx, cy, w, h = (output[i][keep] for i in range(4))
        if max(float(cx.max(initial=0)), float(cy.max(initial=0))) > 2.0:  # pixel units: normalise
            cx, cy, w, h = cx / self.width, cy / self.height, w / self.width, h / self.height
        boxes = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
        ids, kept_scores = class_ids[keep], scores[keep]
        chosen = cv2.dnn.NMSBoxesBatched(boxes.tolist(), kept_scores.tolist(), ids.tolist(), min_score, self.nms_iou)
        found = []
        for i in np.array(chosen).reshape(-1):
            class_id = int(ids[i])
            if class_id not in self.labels:
                continue
            x, y, bw, bh = (float(v) for v in boxes[i])
            box = tuple(float(np.clip(v, 0.0, 1.0)) for v in (x, y, x + bw, y + bh))
            found.append(Detection(self.labels[class_id], class_id, float(kept_scores[i]), box))
        return found


#: MediaPipe's SSD anchor layouts for BlazeFace, by input side: (stride, anchors per cell) per feature map.
#: From its face_detection_{short,full}_range graphs: every layer has one anchor of aspect ratio 1 plus an
#: interpolated one (short range: layers of equal stride share a grid), all of fixed size 1x1.
BLAZEFACE_GRIDS: dict[int, list[tuple[int, int]]] = {128: [(8, 2), (16, 6)], 192: [(4, 1)]}


def blazeface_anchor_centres(side: int) -> np.ndarray:
    """Anchor centres (x, y), normalised, in the model's output order: row by row, cell by cell."""
    if side not in BLAZEFACE_GRIDS:
        raise ModelError(f"no BlazeFace anchor layout is known for a {side}x{side} input; known: 128, 192")
    centres = []
    for stride, per_cell in BLAZEFACE_GRIDS[side]:
        cells = -(-side // stride)
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


class BlazeFaceDecoder(OutputDecoder):
    """MediaPipe BlazeFace: regressors [1,N,16] (box offsets, then keypoints that are never read), scores [1,N,1].

    Boxes are (dx, dy, w, h) in input pixels around fixed 1x1 anchors; scores are logits. Overlapping boxes
    are merged by NMS. Only face boxes come out: no keypoints, nothing that could identify a face.
    """

    nms_iou = 0.3

    def __init__(self, spec: ModelSpec, outputs: list[dict[str, Any]], labels: dict[int, str]):
        super().__init__(spec, outputs, labels)
        by_width = {int(d["shape"][-1]): d for d in outputs if len(d["shape"]) == 3}
        if len(outputs) != 2 or 1 not in by_width or not any(w >= 4 for w in by_width if w != 1):
            raise ModelError(f"BlazeFace model {spec.name!r} should have a [1,N,16] and a [1,N,1] output")
        self.scores_index = by_width.pop(1)["index"]
        (boxes,) = by_width.values()
        self.boxes_index = boxes["index"]
        self.side = spec.input_size[0]
        self.anchors = blazeface_anchor_centres(self.side)
        if len(self.anchors) != int(boxes["shape"][1]):
            raise ModelError(
                f"BlazeFace model {spec.name!r} gives {boxes['shape'][1]} boxes, "
                f"the {self.side}x{self.side} anchor layout has {len(self.anchors)}"
            )

    def classes_in_model(self) -> int | None:
        return 1

    def decode(self, read: ReadOutput, min_score: float) -> list[Detection]:
        logits = np.clip(read(self.scores_index)[0, :, 0], -80.0, 80.0)  # exp() stays finite
        scores = 1.0 / (1.0 + np.exp(-logits))
        keep = np.flatnonzero(scores >= min_score)
        if not len(keep):
            return []
        raw = read(self.boxes_index)[0, keep, :4] / self.side
        centres = self.anchors[keep] + raw[:, :2]
        sizes = raw[:, 2:4]
        boxes = np.concatenate([centres - sizes / 2, sizes], axis=1)
        chosen = cv2.dnn.NMSBoxes(boxes.tolist(), scores[keep].tolist(), min_score, self.nms_iou)
        label = self.labels.get(0, "face")
        found = []
        for i in np.array(chosen).reshape(-1):
            x, y, w, h = (float(v) for v in boxes[i])
            box = tuple(float(np.clip(v, 0.0, 1.0)) for v in (x, y, x + w, y + h))
            found.append(Detection(label, 0, float(scores[keep][i]), box))
        return found


DECODERS: dict[str, type[OutputDecoder]] = {
    "ssd": SsdPostProcessDecoder,
    "yolov8": Yolov8Decoder,
    "blazeface": BlazeFaceDecoder,
}
