"""Object detection with quantised TFLite models: LiteRT first, tflite-runtime as fallback.

The interpreter is loaded once. Output layouts are decoded by the family's
decoder (``decoders``: SSD post-processed, YOLOv8 raw). uint8, int8 and
float32 tensors are handled with the model's own quantisation parameters.
Boxes come out normalised to the image given (x1, y1, x2, y2 in 0..1).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np

from agent.config.vision import DetectorSection
from agent.errors import ModelError
from agent.vision.decoders import DECODERS, Detection
from models import ModelSpec, find_model, label_count, load_labels, verify_model_file
from models.file_spec import describe_model_file, is_model_path

__all__ = ["Detection", "Detector", "default_threads", "load_interpreter"]  # Detection lives with the decoders

log = logging.getLogger(__name__)


def default_threads() -> int:
    """One interpreter thread per core this process may use, less one (at least one).

    The spare core decodes frames and runs tracking, rules and the agent: on
    2 cores, 2 interpreter threads fought the decoder (pipeline at 0.74–0.81
    of raw invoke); 1 thread keeps the pipeline at ≥ 0.9 of its raw speed
    and the button path's p99 within its 10 ms (docs/benchmarks.md).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def load_interpreter(model_path: Path, num_threads: int | None = None, runtime: str = "auto", edgetpu: bool = False):
    """Return ``(interpreter, runtime_name)``; LiteRT preferred, tflite-runtime as fallback."""
    num_threads = num_threads or default_threads()
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


def spec_for_file(path: Path, runtime: str = "auto") -> ModelSpec:
    """A manifest entry read from the model file itself (family, input size and range, labels)."""
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    interpreter, _ = load_interpreter(path, 1, runtime)
    fields = describe_model_file(path, interpreter.get_input_details(), interpreter.get_output_details())
    log.info("model %s described from the file: %s", path, {k: fields[k] for k in ("family", "input_size")})
    return ModelSpec.model_validate(fields)


class Detector:
    """A loaded model: ``detect(rgb)`` returns detections normalised to the given image."""

    def __init__(
        self,
        spec: ModelSpec,
        model_dir: Path,
        num_threads: int | None = None,
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
        self._decoder = DECODERS[spec.family](spec, self._outputs, self.labels)
        expected = self._decoder.classes_in_model()
        described = label_count(labels_path, spec.label_format)
        if expected is not None and described != expected:
            raise ModelError(
                f"label file {labels_path} describes {described} classes but model {spec.name!r} has {expected}"
            )
        self.last_invoke_ms = 0.0
        self.num_threads = num_threads or default_threads()
        log.info("detector %s loaded with %s (%d threads)", spec.name, self.runtime, self.num_threads)

    @classmethod
    def from_settings(
        cls, settings: DetectorSection, model_dir: Path, *, model: str | None = None, min_score: float | None = None
    ) -> Detector:
        """The detector a ``[detector]`` section describes; ``model`` and ``min_score`` override it.

        The model is a manifest name or a ``.tflite`` path (then described from the file itself).
        """
        name = model or settings.model
        if is_model_path(name):
            spec, model_dir = spec_for_file(Path(name), settings.runtime), Path(name).parent
        else:
            spec = find_model(name)
        return cls(
            spec,
            model_dir,
            settings.num_threads,
            settings.runtime,
            settings.edgetpu,
            settings.min_score if min_score is None else min_score,
        )

    @staticmethod
    def _find_labels(spec: ModelSpec, label_dir: Path, model_dir: Path) -> Path:
        for directory in (model_dir, label_dir):
            if (directory / spec.labels).is_file():
                return directory / spec.labels
        raise ModelError(f"label file {spec.labels} for {spec.name!r} not found in {model_dir} or {label_dir}")

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
        return self.infer(*self.prepare(rgb))

    def infer(self, tensor: np.ndarray, mapping: tuple[float, float, float, float]) -> list[Detection]:
        """Detections for a tensor from ``prepare`` (which may run on another thread, ahead)."""
        self.invoke(tensor)
        raw = self._decoder.decode(self._output, self.min_score)
        return [self._unmap(d, mapping) for d in raw]

    def _output(self, index: int) -> np.ndarray:
        detail = next(d for d in self._outputs if d["index"] == index)
        value = self.interpreter.get_tensor(index)
        scale, zero_point = detail["quantization"]
        if detail["dtype"] != np.float32 and scale:
            value = (value.astype(np.float32) - zero_point) * scale
        return value

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
