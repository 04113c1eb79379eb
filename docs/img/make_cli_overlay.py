"""Rebuild docs/img/cli-scene.png and docs/img/cli-overlay.png (the picture in docs/cli.md).

    .venv/bin/python docs/img/make_cli_overlay.py

The scene is drawn here (two cartoon cats and a dog); the answers are FORCED through the demo
model's real generate() (tests/support/forced_backend.py cli), so the picture shows exactly what
``molmo-backend predict --out`` draws for those points, not what a real Molmo would answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository's tests/ package is not installed

from tests.support.processes import forced_cli_command  # noqa: E402

W, H = 480, 300

# Molmo2 answers (x, y on a 0-1000 scale), one per label: where the cats' and the dog's noses are
ANSWERS = {
    "cat": '<points coords="1 1 229 467 2 500 400">cat</points>',
    "dog": '<points coords="1 1 869 617">dog</points>',
    "bird": "There are none.",
}


def scene() -> Image.Image:
    img = Image.new("RGB", (W, H), (190, 225, 245))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 190, W, H], fill=(120, 185, 95))
    d.ellipse([390, 20, 450, 80], fill=(250, 215, 90))  # sun

    def cat(cx, cy, r, fur):
        d.ellipse([cx - r * 1.3, cy + r * 0.6, cx + r * 1.3, cy + r * 3.0], fill=fur)  # body
        d.polygon(
            [(cx - r, cy - r * 0.4), (cx - r * 0.8, cy - r * 1.5), (cx - r * 0.2, cy - r * 0.9)], fill=fur
        )
        d.polygon(
            [(cx + r, cy - r * 0.4), (cx + r * 0.8, cy - r * 1.5), (cx + r * 0.2, cy - r * 0.9)], fill=fur
        )
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fur)  # head
        for ex in (-0.4, 0.4):
            d.ellipse(
                [cx + ex * r - 4, cy - r * 0.3 - 4, cx + ex * r + 4, cy - r * 0.3 + 4], fill=(30, 30, 30)
            )
        d.ellipse([cx - 4, cy + r * 0.3 - 3, cx + 4, cy + r * 0.3 + 3], fill=(230, 120, 140))  # nose

    cat(110, 130, 30, (235, 150, 60))
    cat(240, 110, 26, (90, 90, 100))
    # a dog, head to the right
    d.ellipse([300, 170, 420, 240], fill=(150, 100, 60))  # body
    d.ellipse([385, 150, 445, 205], fill=(150, 100, 60))  # head
    d.ellipse([395, 145, 415, 190], fill=(110, 70, 40))  # ear
    d.ellipse([413, 180, 427, 192], fill=(30, 30, 30))  # nose
    for lx in (315, 345, 375, 400):
        d.rectangle([lx, 230, lx + 10, 265], fill=(150, 100, 60))
    return img


def main() -> int:
    scene_path = HERE / "cli-scene.png"
    scene().save(scene_path, optimize=True)
    with tempfile.TemporaryDirectory() as tmp:
        answers = Path(tmp) / "answers.json"
        answers.write_text(json.dumps(ANSWERS))
        out = subprocess.run(
            forced_cli_command(
                answers,
                "predict",
                str(scene_path),
                *("--label", "cat", "--label", "dog", "--label", "bird"),
                *("--out", tmp),
            ),
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        overlay = Path(tmp) / "cli-scene.molmo.png"
        Image.open(overlay).save(HERE / "cli-overlay.png", optimize=True)
    result = json.loads(out.stdout)
    for image in result["images"]:
        image["image"] = "cli-scene.png"
        image["overlay"] = "out/cli-scene.molmo.png"
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
