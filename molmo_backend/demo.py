"""Build a tiny random-weight Molmo2 checkpoint on local disk.

No model hub is needed: the tokenizer is trained on a few KB of text, the config is sized so that
every id and shape agrees (see FACTS §3), and the result loads with the same ``from_pretrained``
calls as a real checkpoint. Its answers are random: it exists to try the protocol end to end
(``molmo-backend serve --demo``) and for the test-suite.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: Text vocabulary size of the tiny model; the 14 Molmo2 tokens follow at ids TEXT_VOCAB...
TEXT_VOCAB = 512
MOLMO2_TOKENS = [
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>",
    "<im_low>", "<frame_start>", "<frame_end>", "<|video|>", "<|points|>", "<|token_index|>",
    "<|vit_index|>", "<|vit_loc|>",
]
BASE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CROP, PATCH = 56, 14
DEMO_VERSION = "1"  # bump when the recipe changes, so cached demo folders are rebuilt

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

# Text the BPE is trained on: the prompt phrasing and every answer format the parsers know, so
# forced answers tokenize into a handful of tokens.
_CORPUS = [
    "Point to the cat.\nPlease say 'There are none.' if it is not in the image.",
    'Point to all occurrences of "dog"', "How many birds are there in the image?",
    '<points coords="1 1 461 527 2 481 521">cat</points>', "There are none.",
    '<point x="61.5" y="40.6" alt="cat">cat</point>',
    '<points x1="10.0" y1="20.5" x2="80.1" y2="55.3" alt="cats">cats</points>',
    "Counting the <points coords=\"1 1 100 200\">dogs</points> shows a total of 1.",
    "0 1 2 3 4 5 6 7 8 9 10 100 250 500 750 999 1000 . , ; : ' \" = < > / \t \n",
    "The quick brown fox jumps over the lazy dog. A person, a car, a tree, a window, a head.",
]


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB - 64, special_tokens=BASE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fillers = [f"<|filler_{i}|>" for i in range(TEXT_VOCAB - tok.get_vocab_size())]
    tok.add_tokens(fillers)
    assert tok.get_vocab_size() == TEXT_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens(MOLMO2_TOKENS)  # ids TEXT_VOCAB.., before the wrapper adds anything
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_end|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"},
    )
    for i, token in enumerate(MOLMO2_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == TEXT_VOCAB + i, token
    tokenizer.save_pretrained(out)
    return tokenizer


def build_config(tokenizer):
    from transformers import Molmo2Config

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in MOLMO2_TOKENS}
    width, text_width = 32, 32
    return Molmo2Config(
        vision_config=dict(
            hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=16, image_size=[CROP, CROP], patch_size=PATCH,
            num_position_embeddings=(CROP // PATCH) ** 2,
        ),
        adapter_config=dict(
            vision_feature_layer=[-1, -2], hidden_size=width, num_attention_heads=2,
            num_key_value_heads=2, head_dim=16, intermediate_size=64, text_hidden_size=text_width,
        ),
        text_config=dict(
            hidden_size=text_width, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            vocab_size=TEXT_VOCAB, additional_vocab_size=64, num_hidden_layers=2,
            intermediate_size=64, max_position_embeddings=4096,
        ),
        image_start_token_id=ids["<im_start>"], image_end_token_id=ids["<im_end>"],
        image_patch_id=ids["<im_patch>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
        frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_demo_model(out: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Molmo2 (config, weights, tokenizer, processor) to ``out``."""
    import torch
    from transformers import (
        Molmo2ForConditionalGeneration, Molmo2ImageProcessor, Molmo2Processor, Molmo2VideoProcessor,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out)
    image_processor = Molmo2ImageProcessor(
        size={"height": CROP, "width": CROP}, patch_size=PATCH, overlap_margins=[1, 1], max_crops=1,
        pooling_size=[2, 2], image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    video_processor = Molmo2VideoProcessor(
        size={"height": CROP, "width": CROP}, patch_size=PATCH, pooling_size=[2, 2],
    )
    processor = Molmo2Processor(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE, image_use_col_tokens=True, use_single_crop_col_tokens=False,
        use_single_crop_start_token=True,
    )
    processor.save_pretrained(out)
    (out / "DEMO_MODEL.json").write_text(json.dumps({"demo_version": DEMO_VERSION, "seed": seed}))
    log.info("built demo model", extra={"path": str(out)})
    return out


def is_demo_model(path: str | Path) -> bool:
    return (Path(path) / "DEMO_MODEL.json").is_file()


def ensure_demo_model(cache_dir: str | Path) -> Path:
    """The demo model under ``cache_dir``, built once and reused."""
    out = Path(cache_dir) / f"molmo2-demo-v{DEMO_VERSION}"
    if not is_demo_model(out):
        tmp = out.with_name(out.name + ".tmp")
        build_demo_model(tmp)
        tmp.rename(out)
    return out
