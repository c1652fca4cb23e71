"""Object detection with quantised TFLite models: LiteRT first, tflite-runtime as fallback.

The interpreter is loaded once. Two families are decoded here:

* ``ssd``: ``TFLite_Detection_PostProcess`` outputs (boxes, classes, scores,
  count), matched by shape and name rather than by position;
* ``yolov8``: one ``[1, 4+C, N]`` output (cx, cy, w, h normalised to the
  input, then C class scores), score pre-filtering and class-aware NMS here.

uint8, int8 and float32 tensors are handled with the model's own quantisation
parameters. Boxes come out normalised to the image given (x1, y1, x2, y2 in 0..1).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models import ModelSpec, label_count, load_labels, verify_model_file

from ..errors import ModelError

log = logging.getLogger(__name__)


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


def load_interpreter(model_path: Path, num_threads: int = 2, runtime: str = "auto", edgetpu: bool = False):
    """Return ``(interpreter, runtime_name)``; LiteRT preferred, tflite-runtime as fallback."""
    candidates = {"litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}
    order = list(candidates) if runtime == "auto" else [runtime]
    errors = []
    for name in order:
        if name not in candidates:
            raise ModelError(f"unknown detector runtime {name!r}; use auto, litert or tflite-runtime")
        try:
            module = __import__(candidates[name], fromlist=["Interpreter"])
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        delegates = []
        if edgetpu:
            try:
                delegates = [module.load_delegate("libedgetpu.so.1")]
            except (ValueError, OSError) as exc:
                raise ModelError(
                    f"Edge TPU delegate could not be loaded ({exc}); is libedgetpu1-std installed "
                    "and the accelerator plugged in?"
                ) from None
        try:
            interpreter = module.Interpreter(
                model_path=str(model_path), num_threads=num_threads, experimental_delegates=delegates or None
            )
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"{model_path} is not a loadable TFLite model: {str(exc).strip()[:200]}") from None
        return interpreter, name + ("+edgetpu" if edgetpu else "")
    raise ModelError(
        "no TFLite runtime is installed (" + "; ".join(errors) + "); "
        "install ai-edge-litert (pip install 'edge-agent[detect]')"
    )


class Detector:
    """A loaded model: ``detect(rgb)`` returns detections normalised to the given image."""

    def __init__(
        self,
        spec: ModelSpec,
        model_dir: Path,
        num_threads: int = 2,
        runtime: str = "auto",
        edgetpu: bool = False,
        min_score: float = 0.3,
        label_dir: Path | None = None,
    ):
        from models import LABEL_DIR

        self.spec = spec
        self.min_score = min_score
        model_path = verify_model_file(spec, model_dir)
        labels_path = self._find_labels(spec, Path(label_dir or LABEL_DIR), Path(model_dir))
        self.labels = load_labels(labels_path, spec.label_format)
        self.interpreter, self.runtime = load_interpreter(model_path, num_threads, runtime, edgetpu)
        (self._input,) = self.interpreter.get_input_details()
        self._outputs = self.interpreter.get_output_details()
        shape = self._input["shape"]
        if list(shape[1:3]) != [spec.input_size[1], spec.input_size[0]]:
            raise ModelError(
                f"{model_path}: input is {shape[2]}x{shape[1]}, manifest says {spec.input_size[0]}x{spec.input_size[1]}"
            )
        self.width, self.height = spec.input_size
        self._lut = self._input_lut()
        expected = self._classes_in_model()
        described = label_count(labels_path, spec.label_format)
        if expected is not None and described != expected:
            raise ModelError(
                f"label file {labels_path} describes {described} classes but model {spec.name!r} has {expected}"
            )
        if spec.family == "ssd":
            self._ssd_outputs = self._match_ssd_outputs()
        self.last_invoke_ms = 0.0
        log.info("detector %s loaded with %s (%d threads)", spec.name, self.runtime, num_threads)

    @staticmethod
    def _find_labels(spec: ModelSpec, label_dir: Path, model_dir: Path) -> Path:
        for directory in (model_dir, label_dir):
            if (directory / spec.labels).is_file():
                return directory / spec.labels
        raise ModelError(f"label file {spec.labels} for {spec.name!r} not found in {model_dir} or {label_dir}")

    def _classes_in_model(self) -> int | None:
        if self.spec.family == "yolov8":
            (output,) = self._outputs
            return int(output["shape"][1]) - 4
        return self.spec.num_classes

    def _input_lut(self) -> np.ndarray:
        """Pixel value 0..255 → input tensor value, with the model's quantisation."""
        low, high = self.spec.input_range
        real = low + np.arange(256, dtype=np.float32) * (high - low) / 255.0
        dtype = self._input["dtype"]
        scale, zero_point = self._input["quantization"]
        if dtype == np.float32:
            return real.astype(np.float32)
        info = np.iinfo(dtype)
        if not scale:
            return np.clip(np.arange(256), info.min, info.max).astype(dtype)
        return np.clip(np.round(real / scale + zero_point), info.min, info.max).astype(dtype)

    def _match_ssd_outputs(self) -> dict[str, int]:
        if len(self._outputs) != 4:
            raise ModelError(
                f"SSD model {self.spec.name!r} has {len(self._outputs)} outputs; TFLite_Detection_PostProcess gives 4"
            )
        by_role: dict[str, int] = {}
        pairs = []
        for detail in self._outputs:
            shape = list(detail["shape"])
            if len(shape) == 3 and shape[-1] == 4:
                by_role["boxes"] = detail["index"]
            elif len(shape) == 1:
                by_role["count"] = detail["index"]
            else:
                pairs.append(detail)
        if set(by_role) != {"boxes", "count"} or len(pairs) != 2:
            raise ModelError(f"SSD model {self.spec.name!r}: outputs do not look like boxes/classes/scores/count")
        names = {d["name"].rsplit(":", 1)[-1]: d["index"] for d in pairs}
        if set(names) == {"1", "2"}:  # TF1 export order: :1 classes, :2 scores
            by_role["classes"], by_role["scores"] = names["1"], names["2"]
        else:
            by_role["ambiguous"] = 1
            by_role["classes"], by_role["scores"] = pairs[0]["index"], pairs[1]["index"]
        return by_role

    def prepare(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """Resize (stretch or letterbox) and quantise; returns the tensor and the mapping back."""
        h, w = rgb.shape[:2]
        if self.spec.colour_order == "bgr":
            rgb = rgb[..., ::-1]
        if self.spec.resize == "letterbox":
            scale = min(self.width / w, self.height / h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            canvas = np.full((self.height, self.width, 3), 114, dtype=np.uint8)
            dx, dy = (self.width - nw) // 2, (self.height - nh) // 2
            canvas[dy : dy + nh, dx : dx + nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
            mapping = (dx / self.width, dy / self.height, nw / self.width, nh / self.height)
            resized = canvas
        else:
            resized = cv2.resize(rgb, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
            mapping = (0.0, 0.0, 1.0, 1.0)
        return cv2.LUT(resized, self._lut)[np.newaxis], mapping

    def invoke(self, tensor: np.ndarray) -> None:
        start = time.perf_counter()
        self.interpreter.set_tensor(self._input["index"], tensor)
        self.interpreter.invoke()
        self.last_invoke_ms = (time.perf_counter() - start) * 1000

    def detect(self, rgb: np.ndarray) -> list[Detection]:
        tensor, mapping = self.prepare(rgb)
        self.invoke(tensor)
        raw = self._decode_ssd() if self.spec.family == "ssd" else self._decode_yolo()
        return [self._unmap(d, mapping) for d in raw]

    def _output(self, index: int) -> np.ndarray:
        detail = next(d for d in self._outputs if d["index"] == index)
        value = self.interpreter.get_tensor(index)
        scale, zero_point = detail["quantization"]
        if detail["dtype"] != np.float32 and scale:
            value = (value.astype(np.float32) - zero_point) * scale
        return value

    def _decode_ssd(self) -> list[Detection]:
        roles = self._ssd_outputs
        boxes = self._output(roles["boxes"])[0]
        classes, scores = self._output(roles["classes"])[0], self._output(roles["scores"])[0]
        if "ambiguous" in roles and (np.any(scores > 1.0) or not np.allclose(classes, np.round(classes))):
            classes, scores = scores, classes
        count = int(self._output(roles["count"])[0])
        found = []
        for i in range(min(count, len(scores))):
            score = float(scores[i])
            class_id = int(classes[i])
            if score < self.min_score or class_id not in self.labels:
                continue
            y1, x1, y2, x2 = (float(v) for v in np.clip(boxes[i], 0.0, 1.0))
            found.append(Detection(self.labels[class_id], class_id, score, (x1, y1, x2, y2)))
        return found

    def _decode_yolo(self) -> list[Detection]:
        (detail,) = self._outputs
        output = self._output(detail["index"])[0]  # [4+C, N]
        if output.shape[0] > output.shape[1]:
            output = output.T
        class_scores = output[4:]
        class_ids = class_scores.argmax(axis=0)
        scores = class_scores[class_ids, np.arange(class_scores.shape[1])]
        keep = scores >= self.min_score
        if not np.any(keep):
            return []
        cx, cy, w, h = (output[i][keep] for i in range(4))
        if max(float(cx.max(initial=0)), float(cy.max(initial=0))) > 2.0:  # pixel units: normalise
            cx, cy, w, h = cx / self.width, cy / self.height, w / self.width, h / self.height
        boxes = np.stack([cx - w / 2, cy - h / 2, w, h], axis=1)
        ids, kept_scores = class_ids[keep], scores[keep]
        chosen = cv2.dnn.NMSBoxesBatched(boxes.tolist(), kept_scores.tolist(), ids.tolist(), self.min_score, 0.45)
        found = []
        for i in np.array(chosen).reshape(-1):
            class_id = int(ids[i])
            if class_id not in self.labels:
                continue
            x, y, bw, bh = (float(v) for v in boxes[i])
            box = tuple(float(np.clip(v, 0.0, 1.0)) for v in (x, y, x + bw, y + bh))
            found.append(Detection(self.labels[class_id], class_id, float(kept_scores[i]), box))
        return found

    @staticmethod
    def _unmap(detection: Detection, mapping: tuple[float, float, float, float]) -> Detection:
        dx, dy, sw, sh = mapping
        if mapping == (0.0, 0.0, 1.0, 1.0):
            return detection
        x1, y1, x2, y2 = detection.box
        box = tuple(
            float(np.clip(v, 0.0, 1.0)) for v in ((x1 - dx) / sw, (y1 - dy) / sh, (x2 - dx) / sw, (y2 - dy) / sh)
        )
        return Detection(detection.label, detection.class_id, detection.score, box)
