"""Turn a keypoint label into the text Molmo is asked, and fingerprint the template.

The fingerprint goes into model_version: Label Studio skips tasks that already hold a prediction of
the same version, so changing the template must change the version to get fresh predictions.
"""

from __future__ import annotations

import hashlib

#: Molmo2's pointing prompt: the first of the pointing templates its training data sampled from
DEFAULT_PROMPT_TEMPLATE = "Point to {label}\nPlease say 'There are none.' if it is not in the image."

__all__ = [
    "COUNT_TEMPLATE",
    "DEFAULT_PROMPT_TEMPLATE",
    "build_count_prompt",
    "build_prompt",
    "default_prompt_template",
    "prompt_fingerprint",
]

PLACEHOLDER = "{label}"

#: each model family's trained pointing phrasing: the first of the pointing templates its training
#: sampled from (Molmo2: its training prompts in allenai/molmo2; v1: GENERAL_PROMPTS_V1["pointing"][0] in allenai/molmo's
#: olmo/data/data_formatter.py). v1's target for a missing object is still "There are none.",
#: although this prompt names another phrase; either way no point is parsed from it.
FAMILY_TEMPLATES = {
    "molmo2": DEFAULT_PROMPT_TEMPLATE,
    "molmo": "Point to {label}\nPlease say 'This isn't in the image.' if it is not in the image.",
}


#: Molmo2's trained counting phrasing (one of its training prompts). The answer points at every instance and states
#: the total: "Counting the <points coords=...>cats</points> shows a total of 3." Used for both
#: families (Molmo v1's own counting phrasing is not known here).
COUNT_TEMPLATE = "How many {label} are there in the image? Point to them and output the total count."


def build_count_prompt(text: str) -> str:
    """The counting question about ``text`` (a label's prompt text, or a Number's ``count``)."""
    return build_prompt(text, COUNT_TEMPLATE)


def default_prompt_template(family: str) -> str:
    """The template a family was trained with; Molmo2's for families we do not know."""
    return FAMILY_TEMPLATES.get(family, DEFAULT_PROMPT_TEMPLATE)


def build_prompt(label: str, template: str = DEFAULT_PROMPT_TEMPLATE, override: str | None = None) -> str:
    """``template`` with ``{label}`` replaced by ``override`` (the config's prompt) or the label.

    str.replace, not str.format: labels such as "{0}" or "a {b}" must pass through untouched.
    """
    if PLACEHOLDER not in template:
        raise ValueError(f"the prompt template must contain {PLACEHOLDER}: {template!r}")
    text = (override if override is not None else label).strip()
    if not text:
        raise ValueError("cannot build a prompt for an empty label")
    return template.replace(PLACEHOLDER, text)


def prompt_fingerprint(template: str) -> str:
    """8 hex characters that change whenever the template does."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:8]
