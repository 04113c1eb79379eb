"""``molmo-backend predict``: image files and labels in, points as JSON and an overlay PNG per
image out (see overlay.py), for a look at what Molmo sees before connecting anything. The images
go through the server's own backend (as data URIs), so the points are what ``serve`` would give.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from molmo_backend.commands.backend_session import EngineFactory, close_backend, load_backend
from molmo_backend.commands.overlay import OverlayPoint, draw_overlay, label_colors
from molmo_backend.engine.scheduler import Priority
from molmo_backend.errors import BadInput
from molmo_backend.images.decode import decode_image
from molmo_backend.images.errors import ImageLoadError
from molmo_backend.labelstudio.model import MolmoBackend, cached_config
from molmo_backend.settings import Settings


@dataclass
class FileResult:
    path: str
    width: int
    height: int
    points: list[dict]  # {"label", "x", "y" (pixels), "x_percent", "y_percent", "score"}
    overlay: str | None = None

    def as_dict(self, labels: Sequence[str]) -> dict:
        by_label: dict[str, list[dict]] = {label: [] for label in labels}
        for p in self.points:
            by_label.setdefault(p["label"], []).append({k: v for k, v in p.items() if k != "label"})
        return {
            "image": self.path,
            "width": self.width,
            "height": self.height,
            "labels": by_label,
            "overlay": self.overlay,
        }


def keypoint_config(labels: Sequence[str]) -> str:
    """A label config with one KeyPointLabels of ``labels`` on ``$image``."""
    body = "\n".join(f"    <Label value={quoteattr(label)}/>" for label in labels)
    return (
        f'<View>\n  <Image name="image" value="$image"/>\n'
        f'  <KeyPointLabels name="kp" toName="image">\n{body}\n  </KeyPointLabels>\n</View>'
    )


def _data_uri(data: bytes, path: Path) -> str:
    kind = path.suffix.lower().lstrip(".") or "png"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode("ascii")


def predict_files(
    settings: Settings,
    paths: Sequence[str | Path],
    labels: Sequence[str],
    *,
    out_dir: str | Path | None = None,
    engine_factory: EngineFactory | None = None,
    backend: MolmoBackend | None = None,
) -> dict:
    """Points per image and label, through the server's backend; with ``out_dir`` an overlay PNG
    per image there (``<name>.molmo.png``). No label, no file or an unreadable file raise
    BadInput (exit code 2) before the model loads."""
    labels = list(dict.fromkeys(label.strip() for label in labels if label and label.strip()))
    if not labels:
        raise BadInput("give at least one --label")
    if not paths:
        raise BadInput("give at least one image file")
    files: list[tuple[Path, bytes, Any]] = []
    problems = []
    for raw in paths:
        path = Path(raw)
        try:
            data = path.read_bytes()
            if len(data) > settings.max_image_bytes:
                raise ImageLoadError(f"larger than MOLMO_MAX_IMAGE_BYTES={settings.max_image_bytes}")
            files.append((path, data, decode_image(data, settings.max_image_pixels)))
        except (OSError, ImageLoadError) as exc:
            problems.append(f"{path}: {exc.strerror if isinstance(exc, OSError) else exc}")
    if problems:
        raise BadInput("cannot read " + "; ".join(problems))

    config = keypoint_config(labels)
    cached_config(config)
    own = backend is None
    backend = backend or load_backend(settings, engine_factory)
    tasks = [
        {"id": i + 1, "data": {"image": _data_uri(data, path)}} for i, (path, data, _) in enumerate(files)
    ]
    try:
        predictions = backend.predict(tasks, label_config=config, priority=Priority.BULK)
    finally:
        if own:
            close_backend(backend)

    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    colors = label_colors(labels)
    used: set[str] = set()
    results = []
    for (path, _, image), prediction in zip(files, predictions):
        points = []
        for region in prediction["result"]:
            value = region["value"]
            x, y = float(value["x"]), float(value["y"])
            points.append(
                {
                    "label": value["keypointlabels"][0],
                    "x": round(x / 100 * image.width, 2),
                    "y": round(y / 100 * image.height, 2),
                    "x_percent": round(x, 4),
                    "y_percent": round(y, 4),
                    "score": region.get("score"),
                }
            )
        result = FileResult(str(path), image.width, image.height, points)
        if out is not None:
            name = _unique_name(path.stem, used)
            target = out / f"{name}.molmo.png"
            overlay = draw_overlay(
                image.image, [OverlayPoint(p["label"], p["x"], p["y"]) for p in points], colors=colors
            )
            overlay.save(target, format="PNG")
            result.overlay = str(target)
        results.append(result)
    return {
        "model_version": backend.model_version,
        "prompt_template": backend.prompt_template,
        "labels": labels,
        "images": [r.as_dict(labels) for r in results],
    }


def _unique_name(stem: str, used: set[str]) -> str:
    name, n = stem or "image", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name
