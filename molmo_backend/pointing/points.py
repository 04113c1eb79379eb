"""Read the points out of a Molmo answer, in percent of the image like Label Studio.

Formats (allenai/molmo2's olmo/preprocessing/point_formatter.py; Molmo v1's model cards):

- Molmo2: ``<points coords="1 1 461 527 2 481 521">cat</points>``: an image index, then
  (point id, x, y) triples on a 0-1000 scale; several images are separated by a tab or ``;``.
- Molmo v1: ``<point x="61.5" y="40.6" alt="cat">cat</point>`` and
  ``<points x1=".." y1=".." x2=".." y2="..">cats</points>`` on a 0-100 scale.

Model output is untrusted and may be cut off by the token limit, so the parser never raises and
keeps only whole points inside the image. A value whose closing quote is missing may itself be cut
off ("52" of "527"), so it is not trusted.

Each point also says where it is written in the answer (``start``, ``end``: character offsets), so
that :mod:`molmo_backend.pointing.confidence` can find the tokens that spelled it. :func:`parse_count` reads
the total of a counting answer ("... shows a total of N.").
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Point:
    """One point in percent of the image (0..100), with the text the model gave it.

    ``start``: offset in the parsed answer of the first character of the point's first number
    (Molmo2: its point id; v1: its ``x``/``y`` attribute name); ``end``: just after its last
    number. Not part of equality."""

    x: float
    y: float
    label: str | None = None
    start: int | None = field(default=None, compare=False)
    end: int | None = field(default=None, compare=False)


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
        attrs, cut = _attributes(match.group(2), match.start(2))
        self_closing = match.group(2).rstrip().endswith("/")  # <point .../>: no text of its own
        label = _label(None if self_closing else match.group(3), _value(attrs.get("alt")))
        if "coords" in attrs:
            found = _molmo2_points(attrs["coords"], truncated=False)
        elif "coords" in cut:
            found = _molmo2_points(cut["coords"], truncated=True)
        else:
            found = _molmo1_points(attrs)  # a cut-off x or y is not trusted: that point is skipped
        points.extend(Point(x, y, label, start, end) for x, y, start, end in found if _inside(x, y))
    return points


#: "shows a total of 3", "a total of 1,204"
_TOTAL = re.compile(r"\btotal\s+of\s+(\d[\d,]{0,12})(?![\d.]*\d)", re.IGNORECASE)


#: how Molmo says there is nothing to point at or count (Molmo2; v1's prompt asks for the second)
def molmo2_answer(points: list[tuple[int, int]], label: str) -> str:
    """The answer Molmo2 writes for ``points`` (x, y on its 0-1000 scale) of ``label`` in one
    image, as allenai/molmo2's point formatter writes it: the points sorted by x then y,
    numbered from 1, each coordinate as ``%03d``; "There are none." for no point. The demo's
    training answers and the benchmarks' forced answers are written here."""
    if not points:
        return "There are none."
    coords = " ".join(f"{i} {x:03d} {y:03d}" for i, (x, y) in enumerate(sorted(points), 1))
    return f'<points coords="1 {coords}">{label}</points>'


NONE_PHRASES = ("there are none", "isn't in the image", "is not in the image")
#: counts above this are not believed (a runaway answer), nor are they useful in a Number field
MAX_COUNT = 100_000


def parse_count(answer: str) -> int | None:
    """The number a counting answer gives.

    The stated total when the answer has one ("Counting the <points ...>cats</points> shows a
    total of 3."), else the number of points in it, else 0 when it says there is nothing ("There
    are none."), else None: an answer that neither counts, points nor denies is no count."""
    if not isinstance(answer, str):
        return None
    totals = _TOTAL.findall(answer)
    if totals:
        total = int(totals[-1].replace(",", ""))
        return total if total <= MAX_COUNT else None
    points = parse_points(answer)
    if points:
        return len(points)
    lowered = answer.lower()
    return 0 if any(phrase in lowered for phrase in NONE_PHRASES) else None


@dataclass(frozen=True)
class _Attr:
    value: str
    name_start: int  # offsets in the whole answer
    value_start: int
    value_end: int


def _attributes(text: str, offset: int = 0) -> tuple[dict[str, _Attr], dict[str, _Attr]]:
    """(attributes, attributes whose closing quote is missing), names lower-cased; ``offset`` is
    where ``text`` starts in the answer."""
    closed: dict[str, _Attr] = {}
    cut: dict[str, _Attr] = {}
    for match in _ATTR.finditer(text):
        name, dq_value, dq_end, sq_value, sq_end = match.groups()
        group = 2 if dq_value is not None else 4
        value, is_closed = (dq_value, bool(dq_end)) if dq_value is not None else (sq_value, bool(sq_end))
        attr = _Attr(value, offset + match.start(1), offset + match.start(group), offset + match.end(group))
        (closed if is_closed else cut)[name.lower()] = attr
    return closed, cut


def _value(attr: _Attr | None) -> str | None:
    return None if attr is None else attr.value


def _label(body: str | None, alt: str | None) -> str | None:
    """The tag's text, else its alt; None when both are missing or blank."""
    for text in (body, alt):
        text = html.unescape(text or "").strip()
        if text:
            return text
    return None


_Found = tuple[float, float, int, int]  # x %, y %, start, end


def _molmo2_points(attr: _Attr, truncated: bool) -> list[_Found]:
    """(x, y) in percent from a Molmo2 coords value (0-1000 scale), with where each is written."""
    coords = attr.value
    if truncated:
        # the last number may be cut ("52" of "527"): drop it unless a separator follows it
        end = len(coords)
        while end and not (coords[end - 1].isspace() or coords[end - 1] == ";"):
            end -= 1
        coords = coords[:end]
    out = []
    for group in re.finditer(r"[^\t;]+", coords):
        words = [
            (w.group(), attr.value_start + group.start() + w.start())
            for w in re.finditer(r"\S+", group.group())
        ]
        triples = _leading_numbers(words)[1:]  # [0] is the image index (a timestamp for video)
        for i in range(0, len(triples) - 2, 3):
            (_, start, _), (x, _, _), (y, _, end) = triples[i : i + 3]
            out.append((x / 10, y / 10, start, end))
    return out


def _molmo1_points(attrs: dict[str, _Attr]) -> list[_Found]:
    """(x, y) in percent from v1 attributes: x/y, or x1/y1, x2/y2, ... (already 0-100)."""
    xs: dict[str, tuple[float, _Attr]] = {}
    ys: dict[str, tuple[float, _Attr]] = {}
    for name, attr in attrs.items():
        key = _V1_KEY.fullmatch(name)
        number = _number(attr.value)
        if key and number is not None:
            (xs if key.group(1) == "x" else ys)[key.group(2)] = (number, attr)
    ordered = sorted(xs, key=lambda k: int(k) if k else 0)
    out = []
    for k in ordered:
        if k in ys:
            (x, x_attr), (y, y_attr) = xs[k], ys[k]
            out.append(
                (x, y, min(x_attr.name_start, y_attr.name_start), max(x_attr.value_end, y_attr.value_end))
            )
    return out


def _leading_numbers(words: list[tuple[str, int]]) -> list[tuple[float, int, int]]:
    """(number, start, end) of the words before the first one that is not a number (the rest
    cannot be aligned)."""
    numbers = []
    for word, start in words:
        number = _number(word)
        if number is None:
            break
        numbers.append((number, start, start + len(word)))
    return numbers


def _number(text: str) -> float | None:
    text = text.strip()
    return float(text) if _NUMBER.fullmatch(text) else None


def _inside(x: float, y: float) -> bool:
    return math.isfinite(x) and math.isfinite(y) and 0 <= x <= 100 and 0 <= y <= 100
