import re

import pytest

from molmo_backend.pointing.prompts import DEFAULT_PROMPT_TEMPLATE, build_prompt, prompt_fingerprint
from molmo_backend.pointing.prompts import DEFAULT_PROMPT_TEMPLATE as SETTINGS_TEMPLATE


def test_default_template_is_the_settings_one():
    assert DEFAULT_PROMPT_TEMPLATE is SETTINGS_TEMPLATE


def test_default_prompt():
    assert build_prompt("cat") == ("Point to cat\nPlease say 'There are none.' if it is not in the image.")


def test_override_replaces_the_label():
    assert build_prompt("LE", "Point to {label}.", override="the left eye") == ("Point to the left eye.")


def test_whitespace_is_stripped():
    assert build_prompt("  cat \n", "Point to {label}.") == "Point to cat."
    assert build_prompt("cat", "Point to {label}.", override="  big cat ") == "Point to big cat."


@pytest.mark.parametrize(
    "label", ["{0}", "{label}", "a {b} c", "}{", "100%", "x\\n", 'say "hi"', "Tom & Jerry", "café 猫"]
)
def test_odd_labels_pass_through_untouched(label):
    assert build_prompt(label, "Point to {label}.") == f"Point to {label}."


def test_every_placeholder_is_replaced():
    assert build_prompt("dog", 'Point to all occurrences of "{label}" ({label})') == (
        'Point to all occurrences of "dog" (dog)'
    )


def test_other_braces_in_template_stay():
    assert build_prompt("dog", "{x} Point to {label} {}") == "{x} Point to dog {}"


@pytest.mark.parametrize("label, override", [("", None), ("   ", None), ("cat", ""), ("cat", "  \t")])
def test_empty_text_is_an_error(label, override):
    with pytest.raises(ValueError):
        build_prompt(label, override=override)


def test_template_without_placeholder_is_an_error():
    with pytest.raises(ValueError):
        build_prompt("cat", "Point to the thing.")


def test_fingerprint_is_short_stable_hex():
    fp = prompt_fingerprint(DEFAULT_PROMPT_TEMPLATE)
    assert re.fullmatch(r"[0-9a-f]{8}", fp)
    assert fp == prompt_fingerprint(str(DEFAULT_PROMPT_TEMPLATE))
    # pinned: model_version must not drift between releases for the same template
    assert prompt_fingerprint("Point to {label}.") == "f3fa3310"


def test_fingerprint_changes_with_template():
    fps = {
        prompt_fingerprint(t)
        for t in ["Point to {label}.", "Point to {label}", "point to {label}.", "", "猫 {label}"]
    }
    assert len(fps) == 5
