"""Read the points out of a Molmo answer, in percent of the image like Label Studio.

Formats (see FACTS.md section 2):

- Molmo2: ``<points coords="1 1 461 527 2 481 521">cat</points>``: an image index, then
  (point id, x, y) triples on a 0-1000 scale; several images are separated by a tab or ``;``.
- Molmo v1: ``<point x="61.5" y="40.6" alt="cat">cat</point>`` and
  ``<points x1=".." y1=".." x2=".." y2="..">cats</points>`` on a 0-100 scale.

Model output is untrusted and may be cut off by the token limit, so the parser never raises and
keeps only whole points inside the image. A value whose closing quote is missing may itself be cut
off ("52" of "527"), so it is not trusted.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    """One point in percent of the image (0..100), with the text the model gave it."""

    x: float
    y: float
    label: str | None = None


# <point ...> or <points ...>: attributes up to '>' (missing when the answer was cut off), then the
# text up to the next tag. <tracks> (video) is not matched.
_TAG = re.compile(r"<\s*(points?)\b([^<>]*)(?:>([^<]*))?", re.IGNORECASE)
# name="value" or name='value', the closing quote optional (cut-off answers); the look-behind keeps
# long garbage words linear
_ATTR = re.compile(r"""(?<![\w-])([A-Za-z_][\w-]*)\s*=\s*(?:"([^"]*)("?)|'([^']*)('?))""")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_V1_KEY = re.compile(r"([xy])([0-9]{0,6})")  # capped: int() refuses huge digit strings


def parse_points(answer: str) -> list[Point]:
    """All whole points of ``answer`` in order; [] for "There are none." or anything unreadable."""
    if not isinstance(answer, str):
        return []
    points: list[Point] = []
    for match in _TAG.finditer(answer):
        attrs, cut = _attributes(match.group(2))
        self_closing = match.group(2).rstrip().endswith("/")  # <point .../>: no text of its own
        label = _label(None if self_closing else match.group(3), attrs.get("alt"))
        if "coords" in attrs:
            found = _molmo2_points(attrs["coords"], truncated=False)
        elif "coords" in cut:
            found = _molmo2_points(cut["coords"], truncated=True)
        else:
            found = _molmo1_points(attrs)  # a cut-off x or y is not trusted: that point is skipped
        points.extend(Point(x, y, label) for x, y in found if _inside(x, y))
    return points


def _attributes(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(attributes, attributes whose closing quote is missing), names lower-cased."""
    closed: dict[str, str] = {}
    cut: dict[str, str] = {}
    for match in _ATTR.finditer(text):
        name, dq_value, dq_end, sq_value, sq_end = match.groups()
        if dq_value is not None:
            value, is_closed = dq_value, bool(dq_end)
        else:
            value, is_closed = sq_value, bool(sq_end)
        (closed if is_closed else cut)[name.lower()] = value
    return closed, cut


def _label(body: str | None, alt: str | None) -> str | None:
    """The tag's text, else its alt; None when both are missing or blank."""
    for text in (body, alt):
        text = html.unescape(text or "").strip()
        if text:
            return text
    return None


def _molmo2_points(coords: str, truncated: bool) -> list[tuple[float, float]]:
    """(x, y) in percent from a Molmo2 coords value (0-1000 scale)."""
    if truncated:
        # the last number may be cut ("52" of "527"): drop it unless a separator follows it
        end = len(coords)
        while end and not (coords[end - 1].isspace() or coords[end - 1] == ";"):
            end -= 1
        coords = coords[:end]
    out = []
    for group in re.split(r"[\t;]", coords):
        numbers = _leading_numbers(group.split())
        triples = numbers[1:]  # numbers[0] is the image index (a timestamp for video)
        for i in range(0, len(triples) - 2, 3):
            out.append((triples[i + 1] / 10, triples[i + 2] / 10))
    return out


def _molmo1_points(attrs: dict[str, str]) -> list[tuple[float, float]]:
    """(x, y) in percent from v1 attributes: x/y, or x1/y1, x2/y2, ... (already 0-100)."""
    xs: dict[str, float] = {}
    ys: dict[str, float] = {}
    for name, value in attrs.items():
        key = _V1_KEY.fullmatch(name)
        number = _number(value)
        if key and number is not None:
            (xs if key.group(1) == "x" else ys)[key.group(2)] = number
    ordered = sorted(xs, key=lambda k: int(k) if k else 0)
    return [(xs[k], ys[k]) for k in ordered if k in ys]


def _leading_numbers(tokens: list[str]) -> list[float]:
    """The numbers before the first token that is not one (the rest cannot be aligned)."""
    numbers = []
    for token in tokens:
        number = _number(token)
        if number is None:
            break
        numbers.append(number)
    return numbers


def _number(text: str) -> float | None:
    text = text.strip()
    return float(text) if _NUMBER.fullmatch(text) else None


def _inside(x: float, y: float) -> bool:
    return math.isfinite(x) and math.isfinite(y) and 0 <= x <= 100 and 0 <= y <= 100
