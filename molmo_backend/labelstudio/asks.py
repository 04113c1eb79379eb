"""What to ask Molmo about each task's image for a label config, and where each answer goes.

One :class:`Ask` is one (image, prompt) query plus the controls its answer fills: keypoints of a
label, a <Number>'s count, a <TextArea>'s text. A label that is both a keypoint label and counted
by a <Number> of the same image is asked once, with the counting prompt: its answer's points
become the keypoints and its total fills the Number, so the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from molmo_backend.labelstudio.config import CountTarget, LabelConfig, PointTarget, TextTarget
from molmo_backend.pointing.prompts import build_count_prompt, build_prompt


@dataclass(frozen=True)
class Ask:
    """One question about the image of a task's ``data_key``, and where its answer goes."""

    data_key: str
    prompt: str
    #: keypoints: the control and label (as stored) that the answer's points are stored under
    keypoints: PointTarget | None = None
    label: str | None = None
    #: the <Number> that the answer's count fills
    count: CountTarget | None = None
    #: the <TextArea> that the answer's text fills
    text: TextTarget | None = None
    #: points (x %, y %) the annotator already placed: suggestions on top of them are dropped
    placed: tuple[tuple[float, float], ...] = ()


def bulk_asks(config: LabelConfig, template: str, caption_prompt: str) -> tuple[Ask, ...]:
    """Every question a (non-interactive) prediction asks about each task, in config order:
    keypoint labels, then Numbers not merged into them, then TextAreas."""
    merged: dict[tuple[str, str, str], CountTarget] = {}
    for count in config.counts:
        if count.label is not None and count.keypoints_from is not None:
            merged.setdefault((count.to_name, count.keypoints_from, count.label), count)
    asks: list[Ask] = []
    for target in config.points:
        for label in target.labels:
            count = merged.get((target.to_name, target.from_name, label))
            if count is not None:
                prompt = build_count_prompt(count.text)
            else:
                prompt = build_prompt(label, template, target.prompts.get(label))
            asks.append(Ask(target.data_key, prompt, keypoints=target, label=label, count=count))
    used = {id(ask.count) for ask in asks if ask.count is not None}
    for count in config.counts:
        if id(count) not in used:
            asks.append(Ask(count.data_key, build_count_prompt(count.text), count=count))
    for text in config.texts:
        asks.append(Ask(text.data_key, text.question or caption_prompt, text=text))
    return tuple(asks)
