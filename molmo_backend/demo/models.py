"""The tiny demo Molmo2 models, built offline: no model hub, no GPU.

Two checkpoints, each a real Molmo2 that loads with the same ``from_pretrained`` calls as a
released one (tokenizer, config, processor and weights agree in every id and shape):

- the **shapes demo** (``MOLMO_DEMO=1``/``auto``): trained on synthetic scenes of coloured shapes
  (:mod:`molmo_backend.demo.scenes`) by :mod:`molmo_backend.demo.training`, so it really points
  at "red circle" or "blue square"; it knows nothing else. Its weights ship with the package
  (``molmo_backend/demo/shapes_model``, a few MB);
- the **random model** (``MOLMO_DEMO=random``): random weights, built here in about a second;
  the test-suite forces its answers to try the protocol end to end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from molmo_backend.errors import Unavailable

log = logging.getLogger(__name__)

MOLMO2_TOKENS = [
    "<im_start>",
    "<im_end>",
    "<im_patch>",
    "<im_col>",
    "<low_res_im_start>",
    "<|image|>",
    "<im_low>",
    "<frame_start>",
    "<frame_end>",
    "<|video|>",
    "<|points|>",
    "<|token_index|>",
    "<|vit_index|>",
    "<|vit_loc|>",
]
BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: text vocabulary size of both tiny models; the 14 Molmo2 tokens follow at ids TEXT_VOCAB...
TEXT_VOCAB = 512
DEMO_VERSION = "1"  # bump when the random recipe changes, so cached random folders are rebuilt
#: where the trained shapes demo ships, inside the package
SHIPPED_DEMO = Path(__file__).resolve().parent / "shapes_model"
#: model ids (the first part of model_version) of the two demo kinds
DEMO_NAMES = {"random": "molmo2-demo", "shapes": "molmo2-demo-shapes"}
#: what the server logs when it serves the shapes demo
DEMO_BANNER = (
    "serving the tiny DEMO model (trained on synthetic shapes; not Molmo): it points only at "
    "coloured shapes named like 'red circle' or 'blue square' (README: Try it)"
)

# Single-image subset of the released Molmo2 chat template: media first, then alternating turns.
CHAT_TEMPLATE = (
    "{% set n = namespace(images=0) %}"
    "{% for message in messages %}{% if message['content'] is not string %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{% set n.images = n.images + 1 %}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% for i in range(n.images) %}{{ '<|image|>' }}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('Molmo2 has no system role') }}{% endif %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}"
    "{% set t = namespace(text='') %}{% for c in message['content'] %}{% if c['type'] == 'text' %}"
    "{% set t.text = t.text ~ ('' if not t.text else ' ') ~ c['text'] %}{% endif %}{% endfor %}"
    "{% set text = t.text %}{% endif %}"
    "{% if message['role'] == 'user' %}{% if not loop.first %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>user\\n' ~ text ~ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>assistant\\n' ~ text }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text the random model's BPE is trained on: the prompt phrasing and every answer format the
# parsers know, so forced answers tokenize into a handful of tokens.
_CORPUS = [
    "Point to the cat.\nPlease say 'There are none.' if it is not in the image.",
    'Point to all occurrences of "dog"',
    "How many birds are there in the image?",
    '<points coords="1 1 461 527 2 481 521">cat</points>',
    "There are none.",
    '<point x="61.5" y="40.6" alt="cat">cat</point>',
    '<points x1="10.0" y1="20.5" x2="80.1" y2="55.3" alt="cats">cats</points>',
    'Counting the <points coords="1 1 100 200">dogs</points> shows a total of 1.',
    "0 1 2 3 4 5 6 7 8 9 10 100 250 500 750 999 1000 . , ; : ' \" = < > / \t \n",
    "The quick brown fox jumps over the lazy dog. A person, a car, a tree, a window, a head.",
]


def _shapes_corpus() -> list[str]:
    from molmo_backend.demo.scenes import LABELS, NONE_ANSWER

    prompt = "Point to {label}\nPlease say 'There are none.' if it is not in the image."
    lines = [prompt.replace("{label}", label) for label in LABELS]
    lines += [f'<points coords="1 1 123 456">{label}</points>' for label in LABELS]
    return lines + [NONE_ANSWER, "user\n", "assistant\n"] + _CORPUS


@dataclass(frozen=True)
class Recipe:
    """Everything that fixes a tiny model's shapes: tokenizer text, image geometry, widths."""

    kind: str  # "random" or "shapes" (DEMO_NAMES)
    crop: int  # the processor's square crop, px
    patch: int
    pooling: tuple[int, int]
    vision: dict = field(default_factory=dict)  # Molmo2VisionConfig fields
    adapter: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    #: one token per digit (as Qwen, Molmo2's text model, writes numbers): coordinates are then
    #: learnable digit by digit
    split_digits: bool = False

    def corpus(self) -> list[str]:
        return _shapes_corpus() if self.kind == "shapes" else _CORPUS


#: random weights, 56 px crops: about 0.2 M parameters, for the test-suite
RANDOM_RECIPE = Recipe(
    kind="random",
    crop=56,
    patch=14,
    pooling=(2, 2),
    vision=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
    ),
    adapter=dict(
        vision_feature_layer=[-1, -2],
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=64,
    ),
    text=dict(
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=2,
        intermediate_size=64,
    ),
)

#: the trained shapes demo: 112 px crops of 14 px patches, one image token per patch (8x8 per
#: view, no pooling: position is read off the token); about 1 M parameters
SHAPES_RECIPE = Recipe(
    kind="shapes",
    crop=112,
    patch=14,
    pooling=(1, 1),
    split_digits=True,
    vision=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
    ),
    adapter=dict(
        vision_feature_layer=[-1, -3],
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        intermediate_size=256,
    ),
    text=dict(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=4,
        intermediate_size=384,
    ),
)


def build_tokenizer(out: Path, recipe: Recipe = RANDOM_RECIPE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if recipe.split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB - 64,
        special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(recipe.corpus() * 20, trainer=trainer)
    fillers = [f"<|filler_{i}|>" for i in range(TEXT_VOCAB - tok.get_vocab_size())]
    tok.add_tokens(fillers)
    assert tok.get_vocab_size() == TEXT_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens(MOLMO2_TOKENS)  # ids TEXT_VOCAB.., before the wrapper adds anything
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_end|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    for i, token in enumerate(MOLMO2_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == TEXT_VOCAB + i, token
    tokenizer.save_pretrained(out)
    return tokenizer


def build_config(tokenizer, recipe: Recipe = RANDOM_RECIPE):
    from transformers import Molmo2Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MOLMO2_TOKENS}
    vision_width = recipe.vision["hidden_size"]
    return Molmo2Config(
        vision_config=dict(
            recipe.vision,
            image_size=[recipe.crop, recipe.crop],
            patch_size=recipe.patch,
            num_position_embeddings=(recipe.crop // recipe.patch) ** 2,
        ),
        adapter_config=dict(
            recipe.adapter, hidden_size=vision_width, text_hidden_size=recipe.text["hidden_size"]
        ),
        text_config=dict(
            recipe.text, vocab_size=TEXT_VOCAB, additional_vocab_size=64, max_position_embeddings=4096
        ),
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


def build_processor(tokenizer, recipe: Recipe = RANDOM_RECIPE):
    """The processor of the released checkpoints, at the recipe's geometry: one crop (max_crops 1)
    plus the low-resolution view, both the whole image resized to ``crop`` x ``crop``."""
    from transformers import Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor

    size = {"height": recipe.crop, "width": recipe.crop}
    image_processor = Molmo2ImageProcessor(
        size=size,
        patch_size=recipe.patch,
        overlap_margins=[1, 1],
        max_crops=1,
        pooling_size=list(recipe.pooling),
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    video_processor = Molmo2VideoProcessor(
        size=size, patch_size=recipe.patch, pooling_size=list(recipe.pooling)
    )
    return Molmo2Processor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_use_col_tokens=True,
        use_single_crop_col_tokens=False,
        use_single_crop_start_token=True,
    )


def new_model(recipe: Recipe, seed: int, scratch: Path):
    """(model, processor) with fresh random weights; the tokenizer is trained into ``scratch``."""
    import torch
    from transformers import Molmo2ForConditionalGeneration

    tokenizer = build_tokenizer(scratch, recipe)
    config = build_config(tokenizer, recipe)
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, build_processor(tokenizer, recipe)


def save_model(model, processor, out: str | Path, recipe: Recipe, **about) -> Path:
    """Write a loadable checkpoint and the DEMO_MODEL.json that marks it as a demo."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"demo_version": DEMO_VERSION, "kind": recipe.kind, **about}
    (out / "DEMO_MODEL.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def build_random_model(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny random Molmo2 (config, weights, tokenizer, processor) to ``out``."""
    out = Path(out)
    model, processor = new_model(RANDOM_RECIPE, seed, out)
    save_model(model, processor, out, RANDOM_RECIPE, seed=seed)
    log.info("built the random demo model", extra={"path": str(out)})
    return out


def demo_info(path: str | Path) -> dict | None:
    """What DEMO_MODEL.json says about a demo checkpoint; None for any other model."""
    try:
        return json.loads((Path(path) / "DEMO_MODEL.json").read_text())
    except (OSError, ValueError):
        return None


def is_demo_model(path: str | Path) -> bool:
    return (Path(path) / "DEMO_MODEL.json").is_file()


def demo_name(path: str | Path) -> str:
    """The model id a demo checkpoint reports: molmo2-demo-shapes (trained) or molmo2-demo."""
    info = demo_info(path) or {}
    return DEMO_NAMES.get(info.get("kind", "random"), DEMO_NAMES["random"])


def ensure_random_model(cache_dir: str | Path) -> Path:
    """The random model under ``cache_dir``, built once and reused."""
    out = Path(cache_dir) / f"molmo2-demo-v{DEMO_VERSION}"
    if not is_demo_model(out):
        tmp = out.with_name(out.name + ".tmp")
        build_random_model(tmp)
        tmp.rename(out)
    return out


class DemoModelMissing(Unavailable, FileNotFoundError):
    pass


def ensure_demo_model(cache_dir: str | Path) -> Path:
    """The trained shapes demo, ready to load: the copy shipped in the package.

    ``cache_dir`` is not written: the weights ship (a few MB) rather than train at start
    (training takes tens of minutes on a CPU; :mod:`molmo_backend.demo.training` rebuilds them).
    """
    if not (SHIPPED_DEMO / "model.safetensors").is_file() or not is_demo_model(SHIPPED_DEMO):
        raise DemoModelMissing(
            f"the demo model's weights are missing from {SHIPPED_DEMO} (a broken install?): "
            "reinstall molmo-backend, or rebuild them with python -m molmo_backend.demo.training "
            "--out molmo_backend/demo/shapes_model; MOLMO_DEMO=random serves the untrained random model"
        )
    return SHIPPED_DEMO
