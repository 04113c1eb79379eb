"""The demo's training data: scenes, the questions asked about them, and the encoded batches.

Every example is drawn from a seed that depends only on (seed, step), so a batch is the same
whichever DataLoader worker makes it. Inputs are built by the model's own processor and chat
template with the backend's default prompt, exactly as the server builds them; the labels score
only the answer tokens (and the end token after them).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import torch

from molmo_backend.demo.models import SHAPES_RECIPE
from molmo_backend.demo.scenes import Scene, answer_for, make_scene, pick_question
from molmo_backend.pointing.prompts import DEFAULT_PROMPT_TEMPLATE


def prompt_for(label: str) -> str:
    """The backend's default Molmo2 prompt for ``label`` (molmo_backend.pointing.prompts.build_prompt)."""
    return DEFAULT_PROMPT_TEMPLATE.replace("{label}", label)


def chat_text(processor, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def jpeg_roundtrip(rng: random.Random, scene: Scene) -> Scene:
    from PIL import Image

    buffer = io.BytesIO()
    scene.image.save(buffer, "JPEG", quality=rng.randint(50, 95))
    buffer.seek(0)
    return Scene(Image.open(buffer).convert("RGB"), scene.shapes, scene.label_map)


@dataclass
class Example:
    scene: Scene
    label: str
    answer: str


def draw_scene(rng: random.Random, hard: bool = True) -> Scene:
    """A full-variety scene, or (not ``hard``) an easy one with one or two shapes."""
    if not hard:
        return make_scene(rng, count=rng.randint(1, 2), easy=True, with_map=True)
    scene = make_scene(rng, with_map=True)
    return jpeg_roundtrip(rng, scene) if rng.random() < 0.25 else scene


def draw_example(rng: random.Random, hard: bool = True, grid: int = 25) -> Example:
    """A scene and one question about it (about 30 % name a shape that is not there)."""
    scene = draw_scene(rng, hard)
    label = pick_question(rng, scene)
    return Example(scene, label, answer_for(scene, label, grid))


def questions_about(rng: random.Random, scene: Scene, count: int, grid: int = 25) -> list[Example]:
    """``count`` different questions about one scene: up to ``count - 1`` of its shapes, the rest
    shapes that are not there (mostly sharing a colour or a kind with one that is). Asking one
    image several labels is what teaches the model that the answer depends on the label."""
    present = [s.label for s in scene.shapes]
    asked = rng.sample(present, min(len(present), count - 1))
    while len(asked) < count:
        label = pick_question(rng, scene, absent_share=1.0)
        if label not in asked:
            asked.append(label)
    return [Example(scene, label, answer_for(scene, label, grid)) for label in asked]


def encode(processor, examples: list[Example]) -> dict:
    """Model inputs with the answers appended, and ``labels`` that score only the answer tokens
    (and the end token after them)."""
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    texts = [chat_text(processor, prompt_for(e.label)) + e.answer + eos for e in examples]
    batch = processor(
        images=[[e.scene.image] for e in examples], text=texts, padding=True, return_tensors="pt"
    )
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    for row, example in enumerate(examples):
        answer_ids = tokenizer(example.answer + eos, add_special_tokens=False)["input_ids"]
        n = len(answer_ids)
        # left padding: the answer is the end of every row; the same ids as tokenizing it alone
        assert ids[row, -n:].tolist() == answer_ids, "answer tokens differ in context"
        labels[row, -n:] = ids[row, -n:]
    mask = batch["attention_mask"]
    batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    batch["labels"] = labels
    if all(e.scene.label_map is not None for e in examples):
        batch["patch_labels"] = torch.stack([patch_labels(e.scene) for e in examples])
    return dict(batch)


def patch_labels(scene: Scene, side: int | None = None) -> torch.Tensor:
    """What each image token's patch shows (1 + LABELS index, 0: background), row-major: the
    label map sampled at the patch centres of the crop the processor stretches the image to."""
    side = side or SHAPES_RECIPE.crop // SHAPES_RECIPE.patch
    width, height = scene.label_map.size
    return torch.tensor(
        [
            scene.label_map.getpixel(
                (
                    min(width - 1, int((j + 0.5) * width / side)),
                    min(height - 1, int((i + 0.5) * height / side)),
                )
            )
            for i in range(side)
            for j in range(side)
        ],
        dtype=torch.long,
    )


class Batches(torch.utils.data.IterableDataset):
    """Encoded training batches; batch ``step`` depends only on (seed, step), whichever worker
    makes it (the DataLoader hands batches back in step order)."""

    def __init__(
        self,
        processor,
        seed: int,
        steps: int,
        batch_size: int,
        ramp_steps: int,
        grid: int,
        per_image: int = 4,
    ):
        self.processor, self.seed, self.steps = processor, seed, steps
        self.batch_size, self.ramp_steps, self.grid = batch_size, ramp_steps, grid
        self.per_image = per_image

    def batch(self, step: int) -> dict:
        """``batch_size`` rows: one question per scene, or ``per_image`` about each."""
        rng = random.Random(f"train-{self.seed}-{step}")
        hard_share = min(1.0, step / self.ramp_steps) if self.ramp_steps else 1.0
        if self.per_image == 1:
            examples = [
                draw_example(rng, rng.random() < hard_share, self.grid) for _ in range(self.batch_size)
            ]
            return encode(self.processor, examples)
        examples: list[Example] = []
        while len(examples) < self.batch_size:
            scene = draw_scene(rng, rng.random() < hard_share)
            examples += questions_about(rng, scene, self.per_image, self.grid)
        return encode(self.processor, examples[: self.batch_size])

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first, stride = (info.id, info.num_workers) if info else (0, 1)
        if info:
            torch.set_num_threads(1)
        for step in range(first, self.steps, stride):
            yield self.batch(step)


def held_out(seed: int, count: int, grid: int) -> list[Example]:
    """A fixed evaluation set of full-variety scenes, from a seed training never uses; about 30 %
    of the questions name a shape that is not there (mostly sharing its colour or kind with one
    that is)."""
    rng = random.Random(f"held-out-{seed}")
    return [draw_example(rng, True, grid) for _ in range(count)]
