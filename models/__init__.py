"""Model manifests and label files: what each detection model is, where it comes from, how to check it."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import ModelError

MANIFEST = Path(__file__).with_name("manifest.toml")
LABEL_DIR = Path(__file__).parent


class ModelSpec(BaseModel):
    """One manifest entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    family: Literal["ssd", "yolov8", "blazeface"] = Field(
        description="Output decoding: SSD post-processed, YOLOv8 raw, or BlazeFace face boxes (MediaPipe anchors)."
    )
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_size: tuple[int, int] = Field(description="Width, height.")
    colour_order: Literal["rgb", "bgr"] = "rgb"
    input_range: tuple[float, float] = Field((0.0, 1.0), description="Real-valued range pixels 0..255 map to.")
    resize: Literal["stretch", "letterbox"] = "stretch"
    labels: str
    label_format: Literal["plain", "offset", "indexed"] = Field(
        "plain",
        description="plain: line k is class k; offset: line 0 is a placeholder, class k is line k+1; "
        "indexed: lines 'k label'.",
    )
    num_classes: int | None = Field(None, description="Classes the model emits, when its outputs do not say.")
    licence: str = ""
    url: str | None = None
    archive_member: str | None = None
    test_only: bool = False
    description: str = ""


def load_manifest(path: Path = MANIFEST) -> dict[str, ModelSpec]:
    try:
        data = tomllib.loads(path.read_text())
        specs = [ModelSpec.model_validate(entry) for entry in data.get("model", [])]
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelError(f"cannot read model manifest {path}: {exc}") from None
    except ValidationError as exc:
        raise ModelError(f"model manifest {path} is invalid: {exc}") from None
    return {spec.name: spec for spec in specs}


def find_model(name: str, path: Path = MANIFEST) -> ModelSpec:
    manifest = load_manifest(path)
    if name not in manifest:
        raise ModelError(f"no model named {name!r} in {path}; known: {', '.join(sorted(manifest))}")
    return manifest[name]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_model_file(spec: ModelSpec, model_dir: Path) -> Path:
    """The model file's path, after checking it exists and its sha256 matches the manifest."""
    path = Path(model_dir) / spec.file
    if not path.is_file():
        raise ModelError(
            f"model file {path} for {spec.name!r} does not exist; fetch it with 'edge-agent models fetch {spec.name}'"
        )
    actual = sha256_of(path)
    if actual != spec.sha256:
        raise ModelError(
            f"model file {path} has sha256 {actual}, but the manifest expects {spec.sha256} for "
            f"{spec.name!r}; refusing to load it (fetch it again)"
        )
    return path


def load_labels(path: Path, label_format: str) -> dict[int, str]:
    """Class index → name; placeholder entries ('???') are left out."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise ModelError(f"cannot read label file {path}: {exc.strerror}") from None
    while lines and not lines[-1]:
        lines.pop()
    labels: dict[int, str] = {}
    if label_format == "indexed":
        for number, line in enumerate(lines, start=1):
            match = re.match(r"^(\d+)[\s:,]+(.+)$", line)
            if not match:
                raise ModelError(f"{path}:{number}: expected 'index label', got {line!r}")
            labels[int(match.group(1))] = match.group(2).strip()
    else:
        offset = 1 if label_format == "offset" else 0
        labels = {k - offset: name for k, name in enumerate(lines) if k >= offset}
    return {k: v for k, v in labels.items() if v and v != "???"}


def label_count(path: Path, label_format: str) -> int:
    """How many class slots the file describes (placeholders included), to compare with the model."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if label_format == "indexed":
        return max(load_labels(path, label_format), default=-1) + 1
    return len(lines) - (1 if label_format == "offset" else 0)
