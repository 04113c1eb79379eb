"""Write a tiny Molmo v1 checkpoint on local disk: config, random weights, tokenizer, remote code.

There is no model hub here, and the real Molmo v1 remote code cannot be fetched, so this writes a
stand-in that keeps the *interface* of the released checkpoints (allenai/Molmo-7B-D-0924 and its
siblings) while being a few thousand parameters:

- ``config.json`` with ``model_type: "molmo"`` and an ``auto_map`` to ``config_molmo.py`` and
  ``modeling_molmo.py``; ``preprocessor_config.json`` / ``processor_config.json`` with an
  ``auto_map`` to ``image_preprocessing_molmo.py`` and ``preprocessing_molmo.py``. So it loads only
  with ``trust_remote_code=True``, through ``AutoProcessor`` and ``AutoModelForCausalLM``.
- ``processor.process(images=, text=)`` returns *unbatched* tensors ``input_ids`` (L,), ``images``
  (crops, patches, pixels), ``image_input_idx`` (crops, tokens per crop), ``image_masks`` (crops,
  patches). The text is wrapped as ``" User: {text} Assistant:"``, image tokens come first, and
  the eos token is prepended as BOS, as v1 does. The number of crops depends on the image size.
- ``model.generate_from_batch(batch, GenerationConfig(max_new_tokens=...), **kwargs)`` reads the
  batch the way v1 does: attention from ``input_ids != -1`` (so rows are right-padded with -1),
  the first new token from each row's last valid position, padded crops are all -1 and padded
  ``image_input_idx`` entries are negative. A batch padded any other way gives different answers
  than the same rows one at a time, which is what the tests check.
- The remote code imports ``einops``, ``torchvision`` and (in a resize branch, as Molmo-7B-D's
  current processor does) ``tensorflow``. transformers checks every import of remote code before
  loading it, so a profile that lacks one of them fails to load this checkpoint too.

What differs from the real code: the network is a toy (one small transformer block, a linear patch
embedding instead of a CLIP ViT), the image tiling is simplified, and generation recomputes the
whole sequence each step instead of keeping a key/value cache. The files written here are this
project's own code, not copies of AI2's.

Writing the checkpoint needs only ``torch``, ``safetensors`` and ``tokenizers``, so it works under
any transformers version; *loading* it needs the v1 profile (transformers 4.5x).
"""

from __future__ import annotations

import json
from pathlib import Path

#: Text vocabulary of the tiny tokenizer; the five v1 image tokens follow at ids TEXT_VOCAB..
TEXT_VOCAB = 384
V1_IMAGE_TOKENS = ["<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"]
EOS = "<|endoftext|>"
EMBEDDING_SIZE = 448  # >= TEXT_VOCAB + len(V1_IMAGE_TOKENS), like v1's padded embedding
HIDDEN, HEADS, LAYERS, MLP = 32, 2, 1, 64
CROP, PATCH = 56, 14  # a crop is CROP x CROP pixels in PATCH x PATCH patches (4 x 4 = 16)
MAX_CROPS, TILE_PIXELS = 4, 320  # up to 4 tiles; about one tile per 320 source pixels a side
MAX_POSITIONS = 512

_CORPUS = [
    " User: Point to cat\nPlease say 'This isn't in the image.' if it is not in the image. Assistant:",
    " User: Point to dog Assistant:",
    " User: Point to the left eye Assistant:",
    ' <point x="61.5" y="40.6" alt="cat">cat</point>',
    ' <points x1="10.0" y1="20.5" x2="80.1" y2="55.3" alt="cats">cats</points>',
    " There are none. This isn't in the image.",
    " 0 1 2 3 4 5 6 7 8 9 10 25 50 75 99 100 . , ; : ' \" = < > / \n x y x1 y1 x2 y2 alt",
    " The quick brown fox jumps over the lazy dog. A person, a car, a tree, a window, a head.",
]

CONFIG_PY = '''"""Configuration of the tiny Molmo v1 stand-in (test fixture)."""
from transformers import PretrainedConfig


class MolmoConfig(PretrainedConfig):
    model_type = "molmo"

    def __init__(self, vocab_size=448, embedding_size=448, hidden_size=32, num_attention_heads=2,
                 num_hidden_layers=1, intermediate_size=64, max_position_embeddings=512,
                 patch_pixels=588, use_position_ids=True, **kwargs):
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.patch_pixels = patch_pixels
        self.use_position_ids = use_position_ids
        super().__init__(**kwargs)
'''

MODELING_PY = '''"""A toy model with Molmo v1's generate_from_batch contract (test fixture, not the real one).

Batch contract (as v1's remote code reads it): input_ids (B, T) right-padded with -1; the
attention mask is input_ids != -1 followed by ones for the new tokens; the first new token is
predicted from each row's last valid position. images (B, crops, patches, pixels) with padded
crops all -1; image_input_idx (B, crops, tokens) with negative entries ignored.
"""
from typing import Any, Dict, Optional

import einops
import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto import AutoModelForCausalLM

from .config_molmo import MolmoConfig


class MolmoBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.attn_norm = nn.LayerNorm(d)
        self.att_proj = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ff_norm = nn.LayerNorm(d)
        self.ff_proj = nn.Linear(d, config.intermediate_size)
        self.ff_out = nn.Linear(config.intermediate_size, d)

    def forward(self, x, allowed):
        b, t, d = x.shape
        qkv = self.att_proj(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        x = x + self.attn_out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.ff_out(F.gelu(self.ff_proj(self.ff_norm(x))))


class MolmoForCausalLM(PreTrainedModel):
    config_class = MolmoConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        d = config.hidden_size
        self.wte = nn.Embedding(config.embedding_size, d)
        self.wpe = nn.Embedding(config.max_position_embeddings, d)
        self.patch_embed = nn.Linear(config.patch_pixels, d)
        self.image_projector = nn.Linear(d, d)
        self.blocks = nn.ModuleList([MolmoBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, config.embedding_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        pass  # the checkpoint holds every weight

    def encode_images(self, images):
        b, crops, patches, _ = images.shape
        side = int(round(patches ** 0.5))
        real_crop = ~torch.all(images == -1, dim=-1).all(dim=-1)  # (b, crops)
        feats = self.patch_embed(images)
        # 2x2 pooling of the patch grid: (row-major patches) -> (pooled tokens, 4, d)
        feats = einops.rearrange(feats, "b c (h dh w dw) d -> b c (h w) (dh dw) d",
                                 h=side // 2, dh=2, w=side // 2, dw=2).mean(dim=-2)
        feats = self.image_projector(feats)
        return feats * real_crop[:, :, None, None].to(feats.dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, images=None,
                image_masks=None, image_input_idx=None, append_last_valid_logits=None,
                past_key_values=None, use_cache=None, last_logits_only=False, return_dict=True,
                **kwargs):
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = input_ids != -1
        valid = attention_mask[:, :t].bool()
        positions = torch.clamp(torch.cumsum(valid.long(), dim=-1) - 1, min=0)
        x = self.wte(input_ids.clamp(min=0)) + self.wpe(positions)
        if images is not None:
            feats = self.encode_images(images.to(x.dtype))
            idx = image_input_idx.reshape(b, -1).long()
            feats = feats.reshape(b, idx.shape[1], -1)
            keep = idx >= 0
            rows = torch.arange(b, device=x.device)[:, None].expand_as(idx)
            x = x.index_put((rows[keep], idx[keep]), feats[keep], accumulate=True)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None] & valid[:, None, None, :]
        for block in self.blocks:
            x = block(x, allowed)
        x = self.ln_f(x)
        if last_logits_only:
            if append_last_valid_logits is not None:
                x = x[torch.arange(b, device=x.device), append_last_valid_logits.to(x.device)][:, None]
            else:
                x = x[:, -1:]
        return CausalLMOutputWithPast(logits=self.lm_head(x), past_key_values=None)

    @torch.no_grad()
    def generate_from_batch(self, batch: Dict[str, Any], generation_config: Optional[GenerationConfig] = None,
                            **kwargs):
        assert generation_config is not None and generation_config.max_new_tokens is not None
        input_ids = batch["input_ids"]
        b, t = input_ids.shape
        valid = input_ids != -1
        attention_mask = torch.cat([valid, valid.new_ones((b, generation_config.max_new_tokens))], dim=1)
        return super().generate(
            input_ids, generation_config, attention_mask=attention_mask, images=batch.get("images"),
            image_masks=batch.get("image_masks"), image_input_idx=batch.get("image_input_idx"),
            append_last_valid_logits=valid.long().sum(dim=-1) - 1, **kwargs,
        )

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        # no key/value cache: every step sees the whole sequence and the images again
        return {
            "input_ids": input_ids, "attention_mask": kwargs.get("attention_mask"),
            "images": kwargs.get("images"), "image_masks": kwargs.get("image_masks"),
            "image_input_idx": kwargs.get("image_input_idx"),
            "append_last_valid_logits": kwargs.get("append_last_valid_logits"),
            "last_logits_only": True,
        }

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens=1):
        model_kwargs.pop("append_last_valid_logits", None)  # only the first step reads a padded row
        if model_kwargs.get("cache_position") is not None:
            model_kwargs["cache_position"] = model_kwargs["cache_position"][-1:] + num_new_tokens
        return model_kwargs


AutoModelForCausalLM.register(MolmoConfig, MolmoForCausalLM)
'''

IMAGE_PREPROCESSING_PY = '''"""Image processor of the tiny Molmo v1 stand-in (test fixture).

A global crop plus up to 4 tiles, each cut into patches; 2x2 pooled tokens per crop.
"""
import numpy as np
import einops
import torch
from torchvision.transforms import functional as TF
from transformers.image_processing_utils import BaseImageProcessor


class MolmoImageProcessor(BaseImageProcessor):
    model_input_names = ["images", "image_input_idx", "image_masks"]

    def __init__(self, max_crops=4, tile_pixels=320, base_image_input_size=(56, 56), image_patch_size=14,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), image_padding_mask=True,
                 resize_method="torch", **kwargs):
        super().__init__(**kwargs)
        self.resize_method = resize_method
        self.max_crops = max_crops
        self.tile_pixels = tile_pixels
        self.base_image_input_size = list(base_image_input_size)
        self.image_patch_size = image_patch_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.image_padding_mask = image_padding_mask

    def tiling(self, height, width):
        rows = max(1, round(height / self.tile_pixels))
        cols = max(1, round(width / self.tile_pixels))
        while rows * cols > self.max_crops:
            if rows >= cols:
                rows -= 1
            else:
                cols -= 1
        return rows, cols

    def _patches(self, image, height, width):
        """(crops of the resized image as (n, patches, pixels)), row-major crops and patches."""
        if self.resize_method == "tensorflow":
            # like v1's processor, which resizes with TensorFlow as its training did
            import tensorflow as tf
            resized = tf.image.resize(tf.constant(image, tf.float32) / 255.0, [height, width],
                                      method="bilinear", antialias=True)
            t = torch.from_numpy(resized.numpy()).permute(2, 0, 1)
        else:
            t = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
            t = TF.resize(t, [height, width], antialias=True)
        mean = torch.tensor(self.image_mean)[:, None, None]
        std = torch.tensor(self.image_std)[:, None, None]
        t = (t - mean) / std
        crop, p = self.base_image_input_size[0], self.image_patch_size
        return einops.rearrange(t, "c (r ch ph) (k cw pw) -> (r k) (ch cw) (ph pw c)",
                                ch=crop // p, ph=p, cw=crop // p, pw=p).numpy()

    def multimodal_preprocess(self, images, tokens, image_idx, image_patch_token_id, image_col_token_id,
                              image_start_token_id, image_end_token_id, sequence_length=None, **kwargs):
        crop, p = self.base_image_input_size[0], self.image_patch_size
        pooled = crop // p // 2  # pooled tokens per crop side
        all_crops, all_idx, all_masks, image_tokens = [], [], [], []
        for image in images:
            h, w = image.shape[:2]
            rows, cols = self.tiling(h, w)
            crops = np.concatenate([self._patches(image, crop, crop),
                                    self._patches(image, rows * crop, cols * crop)], 0)
            seq = [image_start_token_id]
            global_pos = []
            for _ in range(pooled):
                for _ in range(pooled):
                    global_pos.append(len(seq))
                    seq.append(image_patch_token_id)
                seq.append(image_col_token_id)
            seq += [image_end_token_id, image_start_token_id]
            grid = {}
            for gy in range(rows * pooled):
                for gx in range(cols * pooled):
                    grid[gy, gx] = len(seq)
                    seq.append(image_patch_token_id)
                seq.append(image_col_token_id)
            seq.append(image_end_token_id)
            idx = [global_pos]
            for r in range(rows):
                for k in range(cols):
                    idx.append([grid[r * pooled + i, k * pooled + j]
                                for i in range(pooled) for j in range(pooled)])
            offset = sum(len(s) for s in image_tokens)
            all_idx.append(np.asarray(idx, np.int32) + offset)
            all_crops.append(crops.astype(np.float32))
            all_masks.append(np.ones(crops.shape[:2], np.float32))
            image_tokens.append(np.asarray(seq, np.int64))
        input_ids = np.concatenate(image_tokens + [np.asarray(tokens, np.int64)], 0)
        if sequence_length is not None:
            input_ids = input_ids[:sequence_length]
        out = {"input_ids": input_ids, "images": np.concatenate(all_crops, 0),
               "image_input_idx": np.concatenate(all_idx, 0)}
        if self.image_padding_mask:
            out["image_masks"] = np.concatenate(all_masks, 0)
        return out


MolmoImageProcessor.register_for_auto_class()
'''

PREPROCESSING_PY = '''"""Processor of the tiny Molmo v1 stand-in (test fixture): v1's process() API."""
import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.processing_utils import ProcessorMixin

IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")


class MolmoProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "AutoImageProcessor"
    tokenizer_class = ("Qwen2Tokenizer", "Qwen2TokenizerFast")

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    def special_token_ids(self):
        ids = self.tokenizer.encode("".join(IMAGE_TOKENS), add_special_tokens=False)
        assert len(ids) == len(IMAGE_TOKENS), ids
        return dict(zip(IMAGE_TOKENS, ids))

    def process(self, text=None, images=None, message_format="role", always_start_with_space=True,
                sequence_length=1536, **kwargs):
        prompt = "User: " + text + " Assistant:" if message_format == "role" else text
        if always_start_with_space:
            prompt = " " + prompt
        tokens = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not isinstance(images, (list, tuple)):
            images = [images]
        arrays = []
        for image in images:
            if isinstance(image, Image.Image):
                arrays.append(np.array(ImageOps.exif_transpose(image).convert("RGB")))
            else:
                assert image.ndim == 3 and image.shape[-1] == 3
                arrays.append(image.astype(np.uint8))
        ids = self.special_token_ids()
        out = self.image_processor.multimodal_preprocess(
            images=arrays, tokens=np.asarray(tokens, np.int32), image_idx=[-1] * len(arrays),
            sequence_length=sequence_length, image_patch_token_id=ids["<im_patch>"],
            image_col_token_id=ids["<im_col>"], image_start_token_id=ids["<im_start>"],
            image_end_token_id=ids["<im_end>"],
        )
        bos = self.tokenizer.bos_token_id or self.tokenizer.eos_token_id
        out["input_ids"] = np.pad(out["input_ids"], [[1, 0]], constant_values=bos)
        out["image_input_idx"] = np.where(out["image_input_idx"] < 0, out["image_input_idx"],
                                          out["image_input_idx"] + 1)
        return {k: torch.from_numpy(v) for k, v in out.items()}


MolmoProcessor.register_for_auto_class()
'''


def _param_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (EMBEDDING_SIZE, HIDDEN),
        "wpe.weight": (MAX_POSITIONS, HIDDEN),
        "patch_embed.weight": (HIDDEN, PATCH * PATCH * 3),
        "patch_embed.bias": (HIDDEN,),
        "image_projector.weight": (HIDDEN, HIDDEN),
        "image_projector.bias": (HIDDEN,),
        "ln_f.weight": (HIDDEN,),
        "ln_f.bias": (HIDDEN,),
        "lm_head.weight": (EMBEDDING_SIZE, HIDDEN),
    }
    for i in range(LAYERS):
        shapes.update(
            {
                f"blocks.{i}.attn_norm.weight": (HIDDEN,),
                f"blocks.{i}.attn_norm.bias": (HIDDEN,),
                f"blocks.{i}.att_proj.weight": (3 * HIDDEN, HIDDEN),
                f"blocks.{i}.att_proj.bias": (3 * HIDDEN,),
                f"blocks.{i}.attn_out.weight": (HIDDEN, HIDDEN),
                f"blocks.{i}.attn_out.bias": (HIDDEN,),
                f"blocks.{i}.ff_norm.weight": (HIDDEN,),
                f"blocks.{i}.ff_norm.bias": (HIDDEN,),
                f"blocks.{i}.ff_proj.weight": (MLP, HIDDEN),
                f"blocks.{i}.ff_proj.bias": (MLP,),
                f"blocks.{i}.ff_out.weight": (HIDDEN, MLP),
                f"blocks.{i}.ff_out.bias": (HIDDEN,),
            }
        )
    return shapes


def _write_weights(out: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in _param_shapes().items():
        if name.endswith("norm.weight") or name == "ln_f.weight":
            tensors[name] = torch.ones(shape)
        elif name.endswith(".bias"):  # non-zero, so a badly padded crop adds something visible
            tensors[name] = torch.randn(shape, generator=gen) * 0.5
        else:
            tensors[name] = torch.randn(shape, generator=gen) * 0.5
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB - 32,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    tok.add_tokens([f"<|filler_{i}|>" for i in range(TEXT_VOCAB - tok.get_vocab_size())])
    assert tok.get_vocab_size() == TEXT_VOCAB, tok.get_vocab_size()
    tok.add_special_tokens(V1_IMAGE_TOKENS)
    for i, token in enumerate(V1_IMAGE_TOKENS):
        assert tok.token_to_id(token) == TEXT_VOCAB + i, token
    tok.save(str(out / "tokenizer.json"))
    # Qwen2's conventions, as in Molmo-7B-D: no bos (the processor prepends eos), eos = pad
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "Qwen2Tokenizer",
                "bos_token": None,
                "eos_token": EOS,
                "pad_token": EOS,
                "unk_token": None,
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
                "auto_map": {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
            },
            indent=1,
        )
    )
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS, "pad_token": EOS}))


def write_molmo1_checkpoint(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny v1 checkpoint to ``out`` (created) and return it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out)
    _write_weights(out, seed)
    for name, source in [
        ("config_molmo.py", CONFIG_PY),
        ("modeling_molmo.py", MODELING_PY),
        ("preprocessing_molmo.py", PREPROCESSING_PY),
        ("image_preprocessing_molmo.py", IMAGE_PREPROCESSING_PY),
    ]:
        (out / name).write_text(source)
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["MolmoForCausalLM"],
                "auto_map": {
                    "AutoConfig": "config_molmo.MolmoConfig",
                    "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM",
                },
                "model_type": "molmo",
                "vocab_size": EMBEDDING_SIZE,
                "embedding_size": EMBEDDING_SIZE,
                "hidden_size": HIDDEN,
                "num_attention_heads": HEADS,
                "num_hidden_layers": LAYERS,
                "intermediate_size": MLP,
                "max_position_embeddings": MAX_POSITIONS,
                "patch_pixels": PATCH * PATCH * 3,
                "use_position_ids": True,
                "torch_dtype": "float32",
                "use_cache": True,
                "tie_word_embeddings": False,
            },
            indent=1,
        )
    )
    (out / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "auto_map": {
                    "AutoImageProcessor": "image_preprocessing_molmo.MolmoImageProcessor",
                    "AutoProcessor": "preprocessing_molmo.MolmoProcessor",
                },
                "image_processor_type": "MolmoImageProcessor",
                "processor_class": "MolmoProcessor",
                "max_crops": MAX_CROPS,
                "tile_pixels": TILE_PIXELS,
                "base_image_input_size": [CROP, CROP],
                "image_patch_size": PATCH,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "image_padding_mask": True,
            },
            indent=1,
        )
    )
    (out / "processor_config.json").write_text(
        json.dumps(
            {
                "auto_map": {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
                "processor_class": "MolmoProcessor",
            },
            indent=1,
        )
    )
    return out
