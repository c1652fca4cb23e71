"""Download a model named in the manifest, show progress, verify its sha256, install it atomically.

Sources may be zip archives (the TensorFlow detection zoo ships models that
way): ``archive_member`` names the file inside. ``file://`` URLs work too, for
mirrors on a USB stick or the installer's laptop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from models import ModelSpec, sha256_of
from models.errors import ModelError


def _download(url: str, target: Path, progress: bool) -> None:
    try:
        response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (http, https and file are all wanted)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ModelError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None
    total = int(response.headers.get("Content-Length") or 0) or None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False)
    with response, target.open("wb") as handle:
        while block := response.read(1 << 16):
            handle.write(block)
            if bar is not None:
                bar.update(len(block))
    if bar is not None:
        bar.close()


def fetch_model(spec: ModelSpec, model_dir: Path, url: str | None = None, progress: bool = True) -> Path:
    """Fetch ``spec`` into ``model_dir`` (from ``url`` or the manifest's); returns the installed path."""
    if spec.test_only and url is None:
        raise ModelError(f"{spec.name!r} is marked test-only ({spec.licence}); it is not fetched for devices")
    source = url or spec.url
    if not source:
        raise ModelError(f"the manifest gives no URL for {spec.name!r}; pass --from URL")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / spec.file
    if target.exists() and sha256_of(target) == spec.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=model_dir, prefix=".fetch-") as scratch:
        downloaded = Path(scratch) / "download"
        _download(source, downloaded, progress)
        candidate = downloaded
        if zipfile.is_zipfile(downloaded):
            member = spec.archive_member or spec.file
            try:
                with zipfile.ZipFile(downloaded) as archive, archive.open(member) as inner:
                    candidate = Path(scratch) / spec.file
                    with candidate.open("wb") as out:
                        shutil.copyfileobj(inner, out)
            except KeyError:
                raise ModelError(f"{source} does not contain {member}") from None
        actual = sha256_of(candidate)
        if actual != spec.sha256:
            raise ModelError(
                f"{source} gave a file with sha256 {actual}, not the manifest's {spec.sha256}; not installed"
            )
        os.chmod(candidate, 0o644)
        os.replace(candidate, target)
    return target


def verify_all(specs: list[ModelSpec], model_dir: Path) -> list[tuple[ModelSpec, str]]:
    """(spec, 'ok' | 'missing' | 'sha256 mismatch') for every model."""
    results = []
    for spec in specs:
        path = Path(model_dir) / spec.file
        if not path.exists():
            results.append((spec, "missing"))
        else:
            results.append((spec, "ok" if sha256_of(path) == spec.sha256 else "sha256 mismatch"))
    return results


__all__ = ["fetch_model", "verify_all"]
