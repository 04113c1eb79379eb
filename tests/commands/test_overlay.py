"""overlay.py: dots in the label's colour exactly at the points, nothing changed far from them."""

from __future__ import annotations

from PIL import Image

from molmo_backend.commands.overlay import PALETTE, RING, OverlayPoint, dot_radius, draw_overlay, label_colors

BACKGROUND = (17, 34, 51)


def test_each_point_gets_a_dot_of_its_labels_colour_and_far_pixels_stay():
    image = Image.new("RGB", (400, 300), BACKGROUND)
    points = [
        OverlayPoint("cat", 100, 150),
        OverlayPoint("dog", 300.6, 60.2),
        OverlayPoint("cat", 399.9, 299.9),
    ]
    out = draw_overlay(image, points)
    colors = label_colors(["cat", "dog"])
    assert colors == {"cat": PALETTE[0], "dog": PALETTE[1]}
    assert out.getpixel((100, 150)) == colors["cat"]
    assert out.getpixel((300, 60)) == colors["dog"]
    assert out.getpixel((399, 299)) == colors["cat"]  # the very corner still belongs to the image
    r = dot_radius(400, 300)
    # the white ring just outside the dot, on the side away from the label
    assert out.getpixel((100 - r - 1, 150)) == RING
    # far from every point (and every label box): untouched
    for far in [(10, 10), (200, 280), (20, 290)]:
        assert out.getpixel(far) == BACKGROUND
    assert image.getpixel((100, 150)) == BACKGROUND  # the input is not drawn on


def test_dots_stay_visible_under_other_points_labels_and_outside_points_are_skipped():
    image = Image.new("RGB", (200, 100), BACKGROUND)
    a = OverlayPoint("a long label", 40, 50)
    b = OverlayPoint("b", 60, 50)  # where a's label box goes (right of a's dot)
    out = draw_overlay(image, [a, b, OverlayPoint("c", 250, 50), OverlayPoint("c", -1, 5)])
    colors = label_colors(["a long label", "b", "c"])
    assert out.getpixel((40, 50)) == colors["a long label"]
    assert out.getpixel((60, 50)) == colors["b"]
    assert out.getpixel((199, 50)) == BACKGROUND and out.getpixel((0, 5)) == BACKGROUND


def test_labels_get_distinct_colours_in_order_and_grey_or_rgba_input_works():
    labels = [f"l{i}" for i in range(len(PALETTE))]
    assert len(set(label_colors(labels).values())) == len(PALETTE)
    grey = Image.new("LA", (50, 50), (128, 255))
    out = draw_overlay(
        grey, [OverlayPoint("x", 25, 25)], colors={"x": (1, 2, 3)}, radius=4, show_labels=False
    )
    assert out.mode == "RGB" and out.getpixel((25, 25)) == (1, 2, 3)
    assert out.getpixel((25 + 4 + 3, 25)) == (128, 128, 128)  # just outside dot and ring
