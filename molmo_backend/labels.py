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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import KeyPointLabelsTag
from label_studio_sdk.label_interface.object_tags import ImageTag

PROMPT_ATTRIBUTE = "prompt"

HOW_TO = ('Add <KeyPointLabels name="kp" toName="image"> with <Label value="..."/> children '
          'pointing at an <Image name="image" value="$image"/>')


class LabelConfigError(ValueError):
    """The label config gives the backend nothing to do; the message says what to add or fix."""


@dataclass(frozen=True)
class PointTarget:
    """One KeyPointLabels -> Image pair: the labels to point at and where the image comes from."""

    from_name: str
    to_name: str
    data_key: str
    labels: tuple[str, ...]
    prompts: Mapping[str, str] = field(default_factory=dict)


def parse_point_targets(label_config: str) -> list[PointTarget]:
    """Every KeyPointLabels -> Image pair of ``label_config``, in config order.

    Raises LabelConfigError when the config cannot be parsed or holds no usable pair; pairs that
    cannot be used (no labels, not an Image, no ``$key``) are skipped, and named in that error.
    """
    if not isinstance(label_config, str) or not label_config.strip():
        raise LabelConfigError(f"The label config is empty. {HOW_TO}.")
    if "<!DOCTYPE" in label_config.upper() or "<!ENTITY" in label_config.upper():
        # Label configs never need a DTD; refusing one avoids entity-expansion tricks.
        raise LabelConfigError("The label config must not contain a <!DOCTYPE> or <!ENTITY>.")
    try:
        interface = LabelInterface(label_config)
    except Exception as exc:  # the SDK raises its own non-ValueError types
        raise LabelConfigError(f"The label config is not valid XML ({exc}). {HOW_TO}.") from exc

    targets: list[PointTarget] = []
    skipped: list[str] = []
    for control in interface.find_tags_by_class(KeyPointLabelsTag):
        labels, prompts = _labels_and_prompts(control)
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
            targets.append(PointTarget(
                from_name=control.name,
                to_name=to_name,
                data_key=obj.attr["value"][1:],
                labels=labels,
                prompts=prompts,
            ))
    if not targets:
        why = "; ".join(skipped) + ". " if skipped else ""
        raise LabelConfigError(f"The label config has no keypoint labels for an image. {why}{HOW_TO}.")
    return targets


def _labels_and_prompts(control) -> tuple[tuple[str, ...], dict[str, str]]:
    """Labels as Label Studio stores them, and the prompt text of those that have their own."""
    labels: list[str] = []
    prompts: dict[str, str] = {}
    for label, tag in (control.labels_attrs or {}).items():
        attr = tag.attr or {}
        prompt = (attr.get(PROMPT_ATTRIBUTE) or "").strip()
        if not prompt and attr.get("alias") and (attr.get("value") or "").strip():
            prompt = attr["value"].strip()  # an alias is a storage key; the value reads better
        if not label.strip() and not prompt:
            continue  # nothing to ask the model about
        labels.append(label)
        if prompt:
            prompts[label] = prompt
    return tuple(labels), prompts


def _unusable_image(obj, from_name: str, to_name: str) -> str | None:
    """Why this control's target cannot be used, or None when it is a usable <Image>."""
    where = f'<KeyPointLabels name="{from_name}"> points at "{to_name}"'
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
