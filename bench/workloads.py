"""Models and workloads the benchmarks share.

Models: full-size Molmo2-8B / -4B built from config with random weights (no download; text dims
below, vision = the released SigLIP geometry), bf16, the demo model's small tokenizer (the text
vocabulary and lm_head keep their full 151936 rows, so the compute is the real model's).

Random weights answer garbage of random length, so every query carries ``answer_tokens``: the
engine generates exactly that many tokens (the engine's benchmark seam, PointQuery's docstring),
and baselines that cannot take it run each batch to its longest answer, as they would on real
answers of those lengths.

Workloads (3 labels per image; "pairs" are (image, label) pairs):

- ``fixed40``: 1280x960 images, every answer 40 tokens (the previous benchmark's workload).
- ``realistic``: images of mixed sizes (300x200 to 12 MP photos) and answers as pointing gives
  them, about 10 tokens a point plus ~15 for the tags: 25% "There are none." (4 tokens), 60%
  1-6 points, 12% 7-20 points, 3% crowds of 21-60 points (up to ~615 tokens, under the 1024 cap,
  so nothing is cut). Mean about 60 tokens; the sampled mean is reported with each run.
- ``mean_length``: the realistic workload's images, every answer at its mean length: what
  continuous batching should come close to (the heavy tail then costs nothing extra).
- ``realistic_text`` and ``mean_length_text`` (``throughput.py --try draft``): the same images
  and point counts, each answer forced as the text Molmo2 would write (``answer_text``: its
  point format, random points), so that guessed tokens (``MOLMO_DRAFT``) can be confirmed on
  random weights; mean_length_text gives every answer the point count whose text is nearest
  the realistic texts' mean length.

The tokenizer writes each digit as a token of its own, as Molmo2's (Qwen3's) does.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from molmo_backend.demo.models import CHAT_TEMPLATE, RANDOM_RECIPE, build_tokenizer
from molmo_backend.engine.base import PointQuery
from molmo_backend.pointing.points import molmo2_answer

LABELS = ["person", "car", "dog"]
# text dims: (hidden, layers, heads, kv heads, head_dim, mlp)
SIZES = {"8b": (4096, 36, 32, 8, 128, 12288), "4b": (2560, 36, 32, 8, 128, 9728)}
#: (width, height) of the realistic workload's images and their shares
IMAGE_SIZES = [
    ((640, 480), 0.25),
    ((1280, 960), 0.25),
    ((800, 600), 0.1),
    ((1920, 1080), 0.15),
    ((4032, 3024), 0.15),
    ((1024, 1024), 0.05),
    ((300, 200), 0.05),
]
NONE_TOKENS, TAG_TOKENS, POINT_TOKENS = 4, 15, 10
#: seeds of throughput.py's realistic workload and of its larger retrieve (``--long-images``);
#: bench/tail_model.py replays the same two
REALISTIC_SEED, LONG_SEED = 2, 6
#: the demo tokenizer's text, written a digit a token as Qwen3 (Molmo2's text model) writes numbers
RECIPE = dataclasses.replace(RANDOM_RECIPE, split_digits=True)


def build(size: str, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    """(model, processor, parameter count) of a random-weight Molmo2; ``tiny`` for CPU checks;
    ``layers`` shortens the text model (quick GPU checks of the engine's mechanics)."""
    from transformers import Molmo2Config, Molmo2ForConditionalGeneration

    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()), RECIPE)
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in [
            "<im_start>",
            "<im_end>",
            "<im_patch>",
            "<low_res_im_start>",
            "<frame_start>",
            "<frame_end>",
        ]
    }
    if size == "tiny":
        text = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
        )
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            image_size=[56, 56],
            num_position_embeddings=16,
        )
        adapter = dict(
            vision_feature_layer=[-1, -2],
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
        )
    else:
        hidden, n_layers, heads, kv, head_dim, mlp = SIZES[size]
        text = dict(
            hidden_size=hidden,
            num_hidden_layers=layers or n_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            intermediate_size=mlp,
        )
        vision = {}  # Molmo2VisionConfig() defaults are the released SigLIP geometry
        adapter = dict(intermediate_size=mlp)
    config = Molmo2Config(
        vision_config=vision,
        adapter_config=dict(
            adapter, text_hidden_size=text["hidden_size"], **({} if size == "tiny" else {"hidden_size": 1152})
        ),
        text_config=dict(text, vocab_size=151936, additional_vocab_size=128, max_position_embeddings=36864),
        image_start_token_id=ids["<im_start>"],
        image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"],
        low_res_image_start_token_id=ids["<low_res_im_start>"],
        frame_start_token_id=ids["<frame_start>"],
        frame_end_token_id=ids["<frame_end>"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Molmo2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    params = sum(p.numel() for p in model.parameters())
    return model.eval(), build_processor(size, tokenizer), params


def build_processor(size: str, tokenizer=None):
    """The processor of :func:`build`'s model (the released Molmo2 image geometry but for
    ``tiny``), without the model: it counts an image's prefix tokens."""
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

    crop = 56 if size == "tiny" else 378
    image_processor = Molmo2ImageProcessor(
        size={"height": crop, "width": crop},
        patch_size=14,
        max_crops=8,
        overlap_margins=[1, 1] if size == "tiny" else [4, 4],
        pooling_size=[2, 2],
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return Molmo2Processor(
        image_processor=image_processor,
        video_processor=Molmo2VideoProcessor(),
        tokenizer=tokenizer or build_tokenizer(Path(tempfile.mkdtemp()), RECIPE),
        chat_template=CHAT_TEMPLATE,
        image_use_col_tokens=True,
        use_single_crop_col_tokens=False,
        use_single_crop_start_token=True,
    )


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A random-noise RGB image (never a flat colour: no crop compresses to nothing)."""
    generator = torch.Generator().manual_seed(seed)
    width, height = size
    small = torch.randint(
        0, 256, (max(1, height // 8), max(1, width // 8), 3), generator=generator, dtype=torch.uint8
    )
    return Image.fromarray(small.numpy()).resize((width, height), Image.NEAREST)


def answer_length(rng: random.Random) -> int:
    draw = rng.random()
    if draw < 0.25:
        return NONE_TOKENS
    if draw < 0.85:
        points = rng.randint(1, 6)
    elif draw < 0.97:
        points = rng.randint(7, 20)
    else:
        points = rng.randint(21, 60)
    return TAG_TOKENS + POINT_TOKENS * points


@dataclass
class Workload:
    name: str
    queries: list[PointQuery]
    #: each answer's tokens where the queries force texts (else their ``answer_tokens``)
    lengths: list[int] | None = None

    @property
    def mean_tokens(self) -> float:
        return sum(self.answer_lengths) / len(self.queries)

    @property
    def max_tokens(self) -> int:
        return max(self.answer_lengths)

    @property
    def answer_lengths(self) -> list[int]:
        return self.lengths or [q.answer_tokens for q in self.queries]

    def describe(self) -> dict:
        sizes: dict[str, int] = {}
        for q in self.queries[:: len(LABELS)]:
            key = f"{q.image.width}x{q.image.height}"
            sizes[key] = sizes.get(key, 0) + 1
        return {
            "pairs": len(self.queries),
            "images": len(self.queries) // len(LABELS),
            "mean_answer_tokens": round(self.mean_tokens, 1),
            "max_answer_tokens": self.max_tokens,
            "image_sizes": sizes,
        }


def _pairs(images: list[Image.Image], lengths: list[int], key: int) -> list[PointQuery]:
    return [
        PointQuery(
            image, f"Point to the {label}.", image_key=(key, i), answer_tokens=lengths[i * len(LABELS) + j]
        )
        for i, image in enumerate(images)
        for j, label in enumerate(LABELS)
    ]


def fixed40(images: int, seed: int, size=(1280, 960)) -> Workload:
    imgs = [noise_image(size, seed * 100_000 + i) for i in range(images)]
    return Workload("fixed40", _pairs(imgs, [40] * (images * len(LABELS)), seed))


def realistic_plan(images: int, seed: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The realistic workload's image sizes and answer lengths (pairs in queue order), without
    the images."""
    rng = random.Random(seed)
    sizes = rng.choices([s for s, _ in IMAGE_SIZES], weights=[w for _, w in IMAGE_SIZES], k=images)
    return sizes, [answer_length(rng) for _ in range(images * len(LABELS))]


def realistic(images: int, seed: int) -> Workload:
    sizes, lengths = realistic_plan(images, seed)
    imgs = [noise_image(size, seed * 100_000 + i) for i, size in enumerate(sizes)]
    return Workload("realistic", _pairs(imgs, lengths, seed))


def mean_answer(lengths: list[int]) -> int:
    """The answer length every answer of a mean_length workload has."""
    return round(sum(lengths) / len(lengths))


def mean_length(workload: Workload) -> Workload:
    """The same images, every answer at the workload's mean length."""
    mean = mean_answer([q.answer_tokens for q in workload.queries])
    return Workload(
        "mean_length",
        [
            PointQuery(q.image, q.prompt, image_key=("mean",) + tuple(q.image_key), answer_tokens=mean)
            for q in workload.queries
        ],
    )


def subset(workload: Workload, pairs: int) -> Workload:
    return Workload(workload.name, workload.queries[:pairs])


def pointing_text(points: int, rng: random.Random, label: str) -> str:
    """An answer as Molmo2 writes it, of ``points`` random points."""
    return molmo2_answer([(rng.randrange(1000), rng.randrange(1000)) for _ in range(points)], label)


def points_of(length: int) -> int:
    """The point count :func:`answer_length` drew for an answer of ``length`` tokens."""
    return 0 if length == NONE_TOKENS else (length - TAG_TOKENS) // POINT_TOKENS


def _texts(workload: Workload, name: str, points: list[int], tokenizer, seed: int) -> Workload:
    rng = random.Random(seed)
    queries = [
        dataclasses.replace(
            q,
            image_key=(name,) + tuple(q.image_key),
            answer_tokens=None,
            answer_text=pointing_text(n, rng, LABELS[i % len(LABELS)]),
        )
        for i, (q, n) in enumerate(zip(workload.queries, points))
    ]
    lengths = [len(tokenizer.encode(q.answer_text, add_special_tokens=False)) for q in queries]
    return Workload(name, queries, lengths)


def realistic_text(workload: Workload, tokenizer) -> Workload:
    """``workload``'s images and point counts, each answer forced as its pointing text."""
    points = [points_of(q.answer_tokens) for q in workload.queries]
    return _texts(workload, "realistic_text", points, tokenizer, seed=11)


def mean_length_text(texts: Workload, tokenizer) -> Workload:
    """``texts``' images, every answer of the point count whose text is nearest their mean length."""
    rng, mean = random.Random(0), texts.mean_tokens
    label = LABELS[0]
    size = {
        n: len(tokenizer.encode(pointing_text(n, rng, label), add_special_tokens=False)) for n in range(30)
    }
    nearest = min(size, key=lambda n: abs(size[n] - mean))
    return _texts(texts, "mean_length_text", [nearest] * len(texts.queries), tokenizer, seed=12)
