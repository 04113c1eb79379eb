"""Interactive pre-annotation: what the annotator typed or clicked becomes one pointing question.

What Label Studio 1.23.2 sends (checked against the real LS in tests/e2e/test_e2e_interactive.py;
docs/interactive.md has the details): ``POST /api/ml/ID/interactive-annotating {"task": ID,
"context": {...}}`` reaches the backend as a one-task ``/predict`` whose ``params.context`` is
that ``context``, unchanged. Its labeling UI sends ``{"result": [...]}``: the serialized
results of the region the annotator just finished (with Auto-Annotation on; controls are smart
unless ``smart="false"``) and of the other regions of the same type, label and image, e.g.

    {"result": [{"from_name": "prompt", "to_name": "image", "type": "textarea",
                 "value": {"text": ["every window of the left building"]}, ...}]}
    {"result": [{"from_name": "kp", "to_name": "image", "type": "keypointlabels",
                 "value": {"x": 20.1, "y": 30.5, "width": 0.6, "keypointlabels": ["window"]}, ...}]}

The answer goes under one keypoint label, chosen in this order: a label named at the start of
the text ("window: the left building's windows"; the text may also be just a label); the label of
a keypoint in the context; the first label of the image's KeyPointLabels. With no text, a keypoint
in the context asks for every other instance of its label (points on top of the annotator's own
are dropped). Label Studio's UI does not send which label is selected in the label bar, hence
the ``label:`` prefix. Text typed into other TextAreas (a caption edit) asks nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from molmo_backend.labelstudio.asks import Ask
from molmo_backend.labelstudio.config import LabelConfig, PointTarget
from molmo_backend.pointing.prompts import build_prompt

#: longest prompt text taken from the annotator (a prompt, not a document)
MAX_PROMPT_CHARS = 500


def interactive_asks(
    config: LabelConfig, context: Mapping[str, Any] | None, template: str
) -> tuple[Ask, ...]:
    """The question for this context: one Ask, or none when the context holds no prompt text of
    the config's prompt box and no keypoint of its KeyPointLabels."""
    items = context.get("result") if isinstance(context, Mapping) else None
    items = [item for item in items if isinstance(item, Mapping)] if isinstance(items, list) else []
    text, text_to = _prompt_text(config, items)
    keypoints = _keypoints(config, items)

    if text is not None:
        target = next(
            (t for t, _, _ in reversed(keypoints) if t.to_name == text_to), None
        ) or config.point_target(to_name=text_to)
        if target is None:
            return ()
        label, override = _label_prefix(target, text)
        if label is None:
            label = next((lab for t, lab, _ in reversed(keypoints) if t is target), target.labels[0])
            override = text
        if override is None:
            override = target.prompts.get(label)
    elif keypoints:
        target, label, _ = keypoints[-1]
        override = target.prompts.get(label)
    else:
        return ()
    placed = tuple(xy for t, lab, xy in keypoints if t is target and lab == label)
    prompt = build_prompt(label, template, override)
    return (Ask(target.data_key, prompt, keypoints=target, label=label, placed=placed),)


def _prompt_text(config: LabelConfig, items: list[Mapping]) -> tuple[str | None, str | None]:
    """The last non-empty text of a prompt box in the context, and the image it is for."""
    boxes = {box.from_name: box.to_name for box in config.prompt_inputs}
    found: tuple[str | None, str | None] = (None, None)
    for item in items:
        if item.get("type") != "textarea" or item.get("from_name") not in boxes:
            continue
        to_name = boxes[item["from_name"]]
        if item.get("to_name") not in (None, to_name):
            continue
        value = item.get("value")
        texts = value.get("text") if isinstance(value, Mapping) else None
        texts = [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else []
        for text in texts:
            if isinstance(text, str) and text.strip():
                found = (" ".join(text.split())[:MAX_PROMPT_CHARS], to_name)
    return found


def _keypoints(
    config: LabelConfig, items: list[Mapping]
) -> list[tuple[PointTarget, str, tuple[float, float]]]:
    """(control, label as stored, (x, y)) of each keypoint of the config's controls in the context."""
    out = []
    for item in items:
        if item.get("type") != "keypointlabels":
            continue
        target = config.point_target(to_name=item.get("to_name"), from_name=item.get("from_name"))
        value = item.get("value")
        if target is None or not isinstance(value, Mapping):
            continue
        names = value.get("keypointlabels")
        label = (
            target.find_label(names[0])
            if isinstance(names, list) and names and isinstance(names[0], str)
            else None
        )
        x, y = value.get("x"), value.get("y")
        if label is None or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)):
            continue
        out.append((target, label, (float(x), float(y))))
    return out


_PREFIX = re.compile(r"^\s*([^:]{1,100}?)\s*:\s*(.*)$", re.DOTALL)


def _label_prefix(target: PointTarget, text: str) -> tuple[str | None, str | None]:
    """(label, prompt text) when the text is a label, or starts with "label:"; (None, None) else.
    A bare label keeps that label's own prompt (None here)."""
    label = target.find_label(text)
    if label is not None:
        return label, None
    match = _PREFIX.match(text)
    if match:
        label = target.find_label(match.group(1))
        if label is not None:
            return label, match.group(2).strip() or None
    return None, None
