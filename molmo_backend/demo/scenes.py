"""Synthetic scenes for the tiny demo model: coloured shapes on varied backgrounds.

The demo model (:mod:`molmo_backend.demo.models`) is trained on these scenes and only knows them: labels
are a colour and a kind ("red circle", "blue square"), each at most once per scene, and the answer
is Molmo2's point format with the shape's centre on the 0-1000 scale (or "There are none.").
Everything here is pure Pillow and ``random.Random``: the training script, the sample images and
the tests draw the same scenes from the same seeds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

from molmo_backend.pointing.points import molmo2_answer

#: shape colours (RGB) the model knows; each is jittered a little per shape
COLOURS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 205, 30),
}
KINDS = ("circle", "square", "triangle")
LABELS = tuple(f"{colour} {kind}" for colour in COLOURS for kind in KINDS)
NONE_ANSWER = "There are none."


@dataclass(frozen=True)
class Shape:
    """A shape as drawn: its label, centre and radius in pixels of the image as displayed."""

    colour: str
    kind: str
    x: float
    y: float
    radius: float

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    image: Image.Image
    shapes: list[Shape]
    #: for training: an "L" image of the same size, 1 + LABELS index where a shape is, else 0
    label_map: Image.Image | None = None

    def find(self, label: str) -> Shape | None:
        return next((s for s in self.shapes if s.label == label), None)


def answer_for(scene: Scene, label: str, grid: int = 1) -> str:
    """The Molmo2 answer the model is taught for ``label`` on ``scene``: the shape's centre on
    the 0-1000 scale, rounded to a multiple of ``grid``."""
    shape = scene.find(label)
    if shape is None:
        return NONE_ANSWER
    x = to_1000(shape.x, scene.image.width, grid)
    y = to_1000(shape.y, scene.image.height, grid)
    return molmo2_answer([(x, y)], label)


def to_1000(value: float, size: int, grid: int = 1) -> int:
    """A pixel coordinate on Molmo2's 0-1000 scale, a multiple of ``grid``, kept to three digits."""
    top = (999 // grid) * grid
    return min(top, max(0, grid * round(1000 * value / size / grid)))


def _background(rng: random.Random, width: int, height: int, easy: bool = False) -> Image.Image:
    """A low-saturation background: flat or a gradient; unless ``easy``, sometimes with grey
    clutter and noise."""

    def muted() -> tuple[int, int, int]:
        grey = rng.randint(20, 240)
        return tuple(max(0, min(255, grey + rng.randint(-25, 25))) for _ in range(3))

    style = rng.random()
    if style < 0.5:
        image = Image.new("RGB", (width, height), muted())
    else:  # linear gradient between two muted colours, horizontal or vertical
        a, b = muted(), muted()
        horizontal = rng.random() < 0.5
        steps = width if horizontal else height
        strip = Image.new("RGB", (steps, 1))
        strip.putdata(
            [
                tuple(round(a[c] + (b[c] - a[c]) * i / max(1, steps - 1)) for c in range(3))
                for i in range(steps)
            ]
        )
        if not horizontal:
            strip = strip.transpose(Image.Transpose.ROTATE_270)  # a column, top to bottom
        image = strip.resize((width, height))
    if easy:
        return image
    if rng.random() < 0.35:  # grey clutter: lines and blobs that are none of the shapes
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 6)):
            grey = rng.randint(40, 220)
            colour = (grey, grey, grey)
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            x1, y1 = rng.uniform(0, width), rng.uniform(0, height)
            if rng.random() < 0.5:
                draw.line([(x0, y0), (x1, y1)], fill=colour, width=max(1, round(min(width, height) * 0.01)))
            else:
                r = min(width, height) * rng.uniform(0.02, 0.06)
                draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    if rng.random() < 0.4:  # grey noise, fine or coarse, from ``rng`` (Pillow's own noise is unseeded)
        cell = rng.choice([1, 1, 2, 4])
        size = (max(1, width // cell), max(1, height // cell))
        noise = Image.frombytes("L", size, rng.randbytes(size[0] * size[1]))
        noise = noise.resize((width, height), Image.Resampling.NEAREST).convert("RGB")
        image = Image.blend(image, noise, rng.uniform(0.05, 0.3))
    return image


def _polygon(kind: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = 3 if kind == "triangle" else 4
    start = angle - math.pi / 2 if kind == "triangle" else angle + math.pi / 4
    return [
        (
            x + r * math.cos(start + 2 * math.pi * i / corners),
            y + r * math.sin(start + 2 * math.pi * i / corners),
        )
        for i in range(corners)
    ]


def draw_shape(image: Image.Image, shape: Shape, fill, angle: float = 0.0) -> None:
    """Draw ``shape`` filled with ``fill``; its centre is the centre of its circumscribed circle
    (a triangle is equilateral, so that is also its centroid)."""
    draw = ImageDraw.Draw(image)
    x, y, r = shape.x, shape.y, shape.radius
    if shape.kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon(_polygon(shape.kind, x, y, r, angle), fill=fill)


def random_size(rng: random.Random, easy: bool = False) -> tuple[int, int]:
    """Image sizes as users have them, small enough to draw fast: 32 px to 640 px a side, aspect
    ratios from 1:3.5 to 3.5:1 (``easy``: 64-400 px, at most 1.6:1)."""
    low, high, most = (64, 400, 1.6) if easy else (32, 640, 3.5)
    area = math.exp(rng.uniform(math.log(low * low), math.log(high * high * 0.75)))
    aspect = math.exp(rng.uniform(math.log(1 / most), math.log(most)))
    width = max(16, round(math.sqrt(area * aspect)))
    height = max(16, round(math.sqrt(area / aspect)))
    return width, height


def make_scene(
    rng: random.Random,
    width: int | None = None,
    height: int | None = None,
    count: int | None = None,
    labels: list[str] | None = None,
    easy: bool = False,
    with_map: bool = False,
) -> Scene:
    """1-4 shapes (or ``labels``, in order), each label at most once, not overlapping.
    ``easy`` (the start of training): plain backgrounds, no blur, bigger shapes, near-square.
    ``with_map``: also the label map (which shape covers each pixel), for training."""
    if width is None or height is None:
        width, height = random_size(rng, easy)
    image = _background(rng, width, height, easy)
    label_map = Image.new("L", (width, height), 0) if with_map else None
    if labels is None:
        count = count or rng.randint(1, 4)
        labels = rng.sample(LABELS, count)
    short = min(width, height)
    low, high = (0.10, 0.20) if easy else (0.07, 0.16)
    shapes: list[Shape] = []
    for label in labels:
        colour, kind = label.split(" ")
        for _ in range(100):  # rejection sampling for a free spot
            r = short * rng.uniform(low, high if len(labels) > 1 else high + 0.06)
            x, y = rng.uniform(r, width - r), rng.uniform(r, height - r)
            if all(math.hypot(x - s.x, y - s.y) > (r + s.radius) * 1.1 for s in shapes):
                break
        else:
            continue  # no room: fewer shapes
        shape = Shape(colour, kind, x, y, r)
        base = COLOURS[colour]
        fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in base)
        angle = rng.uniform(-0.4, 0.4)
        draw_shape(image, shape, fill, angle)
        if label_map is not None:
            draw_shape(label_map, shape, 1 + LABELS.index(label), angle)
        shapes.append(shape)
    if not easy and rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return Scene(image, shapes, label_map)


def pick_question(rng: random.Random, scene: Scene, absent_share: float = 0.3) -> str:
    """A label to ask about: one of the scene's shapes, or (``absent_share`` of the time) a label
    that is not there, most often one sharing a colour or a kind with a shape that is."""
    present = [s.label for s in scene.shapes]
    absent = [label for label in LABELS if label not in present]
    if present and (rng.random() >= absent_share or not absent):
        return rng.choice(present)
    near = [
        label
        for label in absent
        if any(label.split(" ")[0] == s.colour or label.split(" ")[1] == s.kind for s in scene.shapes)
    ]
    return rng.choice(near if near and rng.random() < 0.7 else absent)


#: the sample scenes under docs/demo: (file name, seed, width, height)
SAMPLES = [
    ("shapes-1.jpg", 1, 640, 480),
    ("shapes-2.jpg", 2, 800, 600),
    ("shapes-3.jpg", 3, 480, 640),
    ("shapes-4.jpg", 4, 1000, 400),
    ("shapes-5.jpg", 5, 512, 512),
    ("shapes-6.jpg", 6, 900, 600),
]


def sample_scene(seed: int, width: int, height: int) -> Scene:
    """The scene a sample image shows: three or four shapes, from ``seed``."""
    rng = random.Random(f"sample-{seed}")
    return make_scene(rng, width, height, count=rng.randint(3, 4))


def label_config(labels=LABELS) -> str:
    """A Label Studio labeling config with one keypoint label per demo label."""
    lines = "\n".join(f'    <Label value="{label}"/>' for label in labels)
    return (
        '<View>\n  <Image name="image" value="$image"/>\n'
        f'  <KeyPointLabels name="kp" toName="image">\n{lines}\n  </KeyPointLabels>\n</View>\n'
    )


def write_samples(out) -> None:
    """The sample images, what they show (shapes.json) and the label config, into ``out``."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truth = {}
    for name, seed, width, height in SAMPLES:
        scene = sample_scene(seed, width, height)
        scene.image.save(out / name, quality=90)
        truth[name] = [
            {"label": s.label, "x": round(s.x, 1), "y": round(s.y, 1), "radius": round(s.radius, 1)}
            for s in scene.shapes
        ]
    (out / "shapes.json").write_text(json.dumps(truth, indent=1) + "\n")
    (out / "label_config.xml").write_text(label_config())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the demo's sample images and label config.")
    parser.add_argument("--out", default="docs/demo", help="folder (default docs/demo)")
    write_samples(parser.parse_args().out)
