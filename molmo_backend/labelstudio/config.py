"""Read a Label Studio label config: which keypoint labels to ask Molmo about, on which image.

The config is parsed with label-studio-sdk's ``LabelInterface`` so that names, label values and
entity decoding match what Label Studio itself uses. Facts checked on label-studio-sdk 2.1.2:

- A ``<Label>`` with ``alias`` is listed under its alias, because Label Studio stores the alias in
  results. The alias is then a poor prompt, so the visible ``value`` becomes that label's prompt
  text (unless the label has its own ``prompt`` attribute).
- Every ``<Label>`` attribute is kept (``labels_attrs[label].attr``), the ``prompt`` one included.
- ``ImageTag.value_name`` blindly drops the first character (a URL ``https://..`` gives
  ``ttps://..``), so the data key is taken from the raw ``value`` here.
- Duplicate label values collapse into one (the last one's attributes win).

Besides keypoints, :func:`parse_label_config` finds what else the backend fills for an image
(conventions in docs/interactive.md):

- ``<Number name="n" toName="image" count="cat"/>``: the count of what ``count`` names (a keypoint
  label of that image, by value or alias, else the text itself).
- ``<TextArea name="caption" toName="image" prompt="What is the weather?"/>``: the answer to its
  ``prompt``, or a caption (``MOLMO_CAPTION_PROMPT``) when it has none.
- ``<TextArea name="prompt" toName="image" smart="true"/>``: the interactive prompt box, marked by
  ``smart="true"`` or by the name ``prompt``; interactive requests are read from it only. Never
  filled.

Per-region Numbers and TextAreas (``perRegion="true"``) describe regions, not the image: skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import KeyPointLabelsTag, NumberTag, TextAreaTag
from label_studio_sdk.label_interface.object_tags import ImageTag

from molmo_backend.errors import BadInput

PROMPT_ATTRIBUTE = "prompt"
#: on a <Number>: what to count
COUNT_ATTRIBUTE = "count"
#: a <TextArea> with this name (or smart="true") is the interactive prompt box
PROMPT_INPUT_NAME = "prompt"

HOW_TO = (
    'Add <KeyPointLabels name="kp" toName="image"> with <Label value="..."/> children '
    'pointing at an <Image name="image" value="$image"/>'
)


class LabelConfigError(BadInput, ValueError):
    """The label config gives the backend nothing to do; the message says what to add or fix
    (HTTP 400, exit code 2)."""


@dataclass(frozen=True)
class PointTarget:
    """One KeyPointLabels -> Image pair: the labels to point at and where the image comes from."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    prompts: Mapping[str, str] = field(default_factory=dict)
    #: label as stored -> its ``value``, for labels stored under an alias
    values: Mapping[str, str] = field(default_factory=dict, compare=False)

    def find_label(self, name: str) -> str | None:
        """The label (as stored) that ``name`` is, by stored name or value, case-insensitively."""
        wanted = name.strip().casefold()
        for label in self.labels:
            if label.casefold() == wanted:
                return label
        for label in self.labels:
            if self.values.get(label, label).strip().casefold() == wanted:
                return label
        return None


@dataclass(frozen=True)
class CountTarget:
    """A <Number count="..."> for an image: filled with how many of ``text`` Molmo counts."""

    from_name: str
    to_name: str
    data_key: str
    #: what Molmo is asked to count: the keypoint label's prompt text, or ``count`` as written
    text: str
    #: when ``count`` names a keypoint label of this image: that label (as stored) and its control;
    #: the counting answer's points then also become that label's keypoints
    label: str | None = None
    keypoints_from: str | None = None


@dataclass(frozen=True)
class TextTarget:
    """A <TextArea> for an image, filled with the answer to ``question`` (None: a caption)."""

    from_name: str
    to_name: str
    data_key: str
    question: str | None = None


@dataclass(frozen=True)
class PromptInput:
    """The interactive prompt box: a <TextArea> whose text is a pointing request."""

    from_name: str
    to_name: str
    data_key: str


@dataclass(frozen=True)
class LabelConfig:
    """Everything the backend asks Molmo about for one label config."""

    points: tuple[PointTarget, ...] = ()
    counts: tuple[CountTarget, ...] = ()
    texts: tuple[TextTarget, ...] = ()
    prompt_inputs: tuple[PromptInput, ...] = ()

    def point_target(self, to_name: str | None = None, from_name: str | None = None) -> PointTarget | None:
        """The first keypoint target of that image / control (None: any)."""
        for target in self.points:
            if (to_name is None or target.to_name == to_name) and (
                from_name is None or target.from_name == from_name
            ):
                return target
        return None


def parse_label_config(label_config: str) -> LabelConfig:
    """Keypoint targets, counts, captions/questions and interactive prompt boxes of a config.

    Raises LabelConfigError when the config cannot be parsed or gives the backend nothing to fill
    (no keypoints, counts or text answers for an image)."""
    interface = _interface(label_config)
    points, skipped = _point_targets(interface)
    counts = tuple(_count_targets(interface, points))
    texts, prompt_inputs = _text_targets(interface)
    if not (points or counts or texts):
        raise _nothing_to_do(skipped)
    return LabelConfig(tuple(points), counts, tuple(texts), tuple(prompt_inputs))


def _nothing_to_do(skipped: list[str]) -> LabelConfigError:
    why = "; ".join(skipped) + ". " if skipped else ""
    return LabelConfigError(f"The label config has no keypoint labels for an image. {why}{HOW_TO}.")


def _interface(label_config: str) -> LabelInterface:
    if not isinstance(label_config, str) or not label_config.strip():
        raise LabelConfigError(f"The label config is empty. {HOW_TO}.")
    if "<!DOCTYPE" in label_config.upper() or "<!ENTITY" in label_config.upper():
        # Label configs never need a DTD; refusing one avoids entity-expansion tricks.
        raise LabelConfigError("The label config must not contain a <!DOCTYPE> or <!ENTITY>.")
    try:
        return LabelInterface(label_config)
    except Exception as exc:  # the SDK raises its own non-ValueError types
        raise LabelConfigError(f"The label config is not valid XML ({exc}). {HOW_TO}.") from exc


def _point_targets(interface: LabelInterface) -> tuple[list[PointTarget], list[str]]:
    targets: list[PointTarget] = []
    skipped: list[str] = []
    for control in interface.find_tags_by_class(KeyPointLabelsTag):
        labels, prompts, values = _labels_and_prompts(control)
        if not labels:
            skipped.append(f'<KeyPointLabels name="{control.name}"> has no <Label value="..."/>')
            continue
        objects = {obj.name: obj for obj in control.objects}
        for to_name in control.to_name:
            obj = objects.get(to_name)
            reason = _unusable_image(obj, control.name, to_name)
            if reason:
                skipped.append(reason)
                continue
            targets.append(
                PointTarget(
                    from_name=control.name,
                    to_name=to_name,
                    data_key=obj.attr["value"][1:],
                    labels=labels,
                    prompts=prompts,
                    values=values,
                )
            )
    return targets, skipped


def _image_controls(interface: LabelInterface, tag_class):
    """(control, to_name, data key) for each image this kind of control is for; per-region
    controls and controls of other objects are left out (they are not the backend's to fill)."""
    for control in interface.find_tags_by_class(tag_class):
        if str(control.attr.get("perRegion", "")).lower() == "true":
            continue
        objects = {obj.name: obj for obj in control.objects}
        for to_name in control.to_name:
            if _unusable_image(objects.get(to_name), control.name, to_name) is None:
                yield control, to_name, objects[to_name].attr["value"][1:]


def _count_targets(interface: LabelInterface, points: list[PointTarget]):
    for control, to_name, data_key in _image_controls(interface, NumberTag):
        what = (control.attr.get(COUNT_ATTRIBUTE) or "").strip()
        if not what:
            continue  # a Number for something else (a rating, a measure)
        for target in points:
            label = target.find_label(what) if target.to_name == to_name else None
            if label is not None:
                yield CountTarget(
                    control.name,
                    to_name,
                    data_key,
                    target.prompts.get(label, label),
                    label=label,
                    keypoints_from=target.from_name,
                )
                break
        else:
            yield CountTarget(control.name, to_name, data_key, what)


def _text_targets(interface: LabelInterface) -> tuple[list[TextTarget], list[PromptInput]]:
    texts, inputs = [], []
    for control, to_name, data_key in _image_controls(interface, TextAreaTag):
        smart = str(control.attr.get("smart", "")).lower() == "true"
        if smart or control.name == PROMPT_INPUT_NAME:
            inputs.append(PromptInput(control.name, to_name, data_key))
        else:
            question = (control.attr.get(PROMPT_ATTRIBUTE) or "").strip() or None
            texts.append(TextTarget(control.name, to_name, data_key, question))
    return texts, inputs


def _labels_and_prompts(control) -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
    """Labels as Label Studio stores them, the prompt text of those that have their own, and the
    value of each."""
    labels: list[str] = []
    prompts: dict[str, str] = {}
    values: dict[str, str] = {}
    for label, tag in (control.labels_attrs or {}).items():
        attr = tag.attr or {}
        prompt = (attr.get(PROMPT_ATTRIBUTE) or "").strip()
        if not prompt and attr.get("alias") and (attr.get("value") or "").strip():
            prompt = attr["value"].strip()  # an alias is a storage key; the value reads better
        if not label.strip() and not prompt:
            continue  # nothing to ask the model about
        labels.append(label)
        value = (attr.get("value") or "").strip()
        if value and value != label:
            values[label] = value
        if prompt:
            prompts[label] = prompt
    return tuple(labels), prompts, values


def _unusable_image(obj, from_name: str, to_name: str, tag: str = "KeyPointLabels") -> str | None:
    """Why this control's target cannot be used, or None when it is a usable <Image>."""
    where = f'<{tag} name="{from_name}"> points at "{to_name}"'
    if obj is None:
        return f"{where}, which is not in the config"
    if not isinstance(obj, ImageTag):
        return f"{where}, which is a <{obj.tag}>, not an <Image>"
    if "valueList" in obj.attr:
        return f'{where}, an <Image valueList="..."> (multi-image tasks are not supported)'
    value = obj.attr.get("value") or ""
    if not value.startswith("$") or len(value) < 2:
        return f'{where}, whose value="{value}" is not a task field such as "$image"'
    return None
