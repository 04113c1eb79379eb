"""Draw predicted keypoints on an image: a filled dot per point in its label's colour, with a
white ring around it and the label written beside it. Pillow only (no torch), no side effects.

Every label box is drawn before any dot, so a dot is never hidden by another point's label, and
the pixel at a point's position always has its label's colour (tests read it back).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

#: distinct colours (Sasha Trubetskoy's list), assigned to labels in order
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (0, 0, 128),
    (128, 128, 0),
    (255, 225, 25),
    (220, 190, 255),
)
RING = (255, 255, 255)


@dataclass(frozen=True)
class OverlayPoint:
    """A point in pixels of the image it is drawn on (0,0 = top-left corner of the image)."""

    label: str
    x: float
    y: float


def label_colors(labels: Iterable[str]) -> dict[str, tuple[int, int, int]]:
    """A colour per distinct label, in first-seen order (the palette repeats after 15 labels)."""
    colors: dict[str, tuple[int, int, int]] = {}
    for label in labels:
        if label not in colors:
            colors[label] = PALETTE[len(colors) % len(PALETTE)]
    return colors


def dot_radius(width: int, height: int) -> int:
    """About 1.2 % of the shorter side, at least 3 px: visible on thumbnails and on photos."""
    return max(3, round(min(width, height) * 0.012))


def draw_overlay(
    image: Image.Image,
    points: Sequence[OverlayPoint],
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    radius: int | None = None,
    show_labels: bool = True,
) -> Image.Image:
    """A copy of ``image`` (RGB) with ``points`` drawn on it; ``image`` itself is not changed.

    Points outside the image are skipped. ``colors`` maps labels to RGB (default: ``label_colors``
    of the points' labels, in order)."""
    out = image.convert("RGB")  # a converted copy, even when the image is RGB already
    colors = dict(colors or label_colors(p.label for p in points))
    for p in points:
        colors.setdefault(p.label, PALETTE[len(colors) % len(PALETTE)])
    width, height = out.size
    r = radius if radius is not None else dot_radius(width, height)
    ring = max(1, r // 3)
    inside = [p for p in points if 0 <= p.x <= width and 0 <= p.y <= height]
    draw = ImageDraw.Draw(out)

    if show_labels:
        font = _font(max(10, round(r * 2.6)))
        for p in inside:
            _label_box(draw, font, p, colors[p.label], r + ring, width, height)
    for p in inside:
        cx, cy = _pixel(p.x, width), _pixel(p.y, height)
        draw.ellipse([cx - r - ring, cy - r - ring, cx + r + ring, cy + r + ring], fill=RING)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colors[p.label])
    return out


def _pixel(coordinate: float, size: int) -> int:
    """The pixel a continuous coordinate falls in (the right/bottom edge belongs to the last one)."""
    return min(max(int(coordinate), 0), size - 1)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def _label_box(
    draw: ImageDraw.ImageDraw, font, p: OverlayPoint, color, gap: int, width: int, height: int
) -> None:
    """The label in a box of its colour, right of the dot (left of it near the right edge)."""
    text = p.label
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    pad = max(2, th // 5)
    box_w, box_h = tw + 2 * pad, th + 2 * pad
    x = p.x + gap + 2
    if x + box_w > width:
        x = p.x - gap - 2 - box_w
    y = p.y - box_h / 2
    x = min(max(x, 0), max(width - box_w, 0))
    y = min(max(y, 0), max(height - box_h, 0))
    draw.rectangle([x, y, x + box_w, y + box_h], fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    draw.text(
        (x + pad - left, y + pad - top),
        text,
        font=font,
        fill=(0, 0, 0) if luminance > 150 else (255, 255, 255),
    )
