"""Build regions (keypoints, <Number> counts, <TextArea> texts) and per-task predictions in the
shape Label Studio stores.

Label Studio does not validate regions (seen on 1.23.2): a point at x=150, or a label that is not
in the config, is stored and shown.
So every region is checked here, and an invalid one is dropped (None) rather than sent.
"""

from __future__ import annotations

import math
import numbers
import uuid

from molmo_backend.pointing.points import Point


def keypoint_region(
    point: Point,
    *,
    from_name: str,
    to_name: str,
    label: str,
    image_width: int,
    image_height: int,
    point_width: float,
    score: float | None = None,
) -> dict | None:
    """One keypoint region, or None when the point or image size cannot be a valid region.

    A non-finite ``score`` is left out (JSON has no NaN); a bad ``point_width`` is a setting error
    and raises ValueError.
    """
    if not (_finite(point_width) and point_width > 0):
        raise ValueError(f"point_width must be a positive number, not {point_width!r}")
    if not (_percent(point.x) and _percent(point.y)):
        return None
    if not (_positive_int(image_width) and _positive_int(image_height)):
        return None
    region = {
        "id": uuid.uuid4().hex[:10],
        "from_name": from_name,
        "to_name": to_name,
        "type": "keypointlabels",
        "original_width": int(image_width),
        "original_height": int(image_height),
        "image_rotation": 0,
        "value": {
            "x": float(point.x),
            "y": float(point.y),
            "width": float(point_width),
            "keypointlabels": [label],
        },
    }
    if score is not None and _finite(score):
        region["score"] = float(score)
    return region


def number_region(*, from_name: str, to_name: str, number: int) -> dict | None:
    """A <Number>'s value as Label Studio stores it, or None for anything but a whole number >= 0."""
    if not (_finite(number) and number >= 0 and float(number).is_integer()):
        return None
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": from_name,
        "to_name": to_name,
        "type": "number",
        "value": {"number": int(number)},
    }


#: longest text put into a <TextArea> (an answer that ran to the token limit is far shorter)
MAX_TEXT_CHARS = 10_000


def textarea_region(*, from_name: str, to_name: str, text: str) -> dict | None:
    """A <TextArea>'s text as Label Studio stores it, or None when there is no text."""
    if not isinstance(text, str) or not text.strip():
        return None
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": from_name,
        "to_name": to_name,
        "type": "textarea",
        "value": {"text": [text.strip()[:MAX_TEXT_CHARS]]},
    }


def task_prediction(regions: list[dict], model_version: str, score: float | None = None) -> dict:
    """One task's prediction: ``{"result", "score", "model_version"}``.

    Without ``score``: the mean of the regions' scores, or 0.0 when no region has one (an empty
    result, or a model that gives no confidence). Always a finite float, so LS can sort by it.
    """
    if score is None:
        scores = [r["score"] for r in regions if _finite(r.get("score"))]
        score = sum(scores) / len(scores) if scores else 0.0
    elif not _finite(score):
        raise ValueError(f"score must be a finite number, not {score!r}")
    return {"result": list(regions), "score": float(score), "model_version": model_version}


def empty_prediction(model_version: str) -> dict:
    """A prediction with no regions: still one item per task, as Label Studio requires."""
    return {"result": [], "score": 0.0, "model_version": model_version}


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _percent(value) -> bool:
    return _finite(value) and 0 <= value <= 100


def _positive_int(value) -> bool:
    return _finite(value) and value > 0 and float(value).is_integer()
