"""The image prefixes of the fast decoder's prefill: the processor's work per image, and which
images share one forward.

Each distinct image of the admitted rows goes through the model's own forward once;
:func:`prefill_groups` decides which images pad up to share a forward, :func:`stack_images` lays
them out as the processor would batch them. :mod:`.decoding` runs the forwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: the fixed cost of one prefill forward, in image tokens: on an H200 with Molmo2-8B one
#: 1280x960 image (1004 tokens) took 150 ms, four 314 ms, eight 522 ms (2026-12-02): ~95 ms per
#: forward plus ~54 ms per image, so padding up to ~1500 tokens is cheaper than a second forward
FORWARD_OVERHEAD_TOKENS = 1500


@dataclass
class PreparedImage:
    """One image as the processor lays it out, ready to be stacked with others of the same
    token count."""

    inputs: dict  # processor outputs for this image alone (batch of one)
    length: int  # prefix tokens (bos + image tokens)
    crops: int
    patches: int  # per crop


def prepare_image(processor, image, device: torch.device | None = None) -> PreparedImage:
    """The processor's work for one image: on ``device`` when given (on a GPU its crops are
    resized there: a 12 MP photo costs a few ms instead of hundreds on the CPU), else on the
    CPU. Thread-safe: the processor holds no state."""
    kwargs = {"device": device} if device is not None else {}
    encoded = processor(images=[[image]], text=[processor.image_token], return_tensors="pt", **kwargs)
    inputs = {key: value.to(device) if device is not None else value for key, value in encoded.items()}
    pixels = inputs["pixel_values"]
    return PreparedImage(
        inputs, int(inputs["input_ids"].shape[1]), int(pixels.shape[0]), int(pixels.shape[1])
    )


def stack_images(
    images: Sequence[PreparedImage], device: torch.device, dtype: torch.dtype, pad_id: int
) -> dict:
    """Model inputs for several images, as the processor would batch them: token rows
    left-padded to the longest, crops concatenated, pooling indices shifted by the patches
    before them."""
    pooling, offset = [], 0
    for image in images:
        idx = image.inputs["image_token_pooling"]
        pooling.append(torch.where(idx >= 0, idx + offset, idx))
        offset += image.crops * image.patches
    if device.type == "cuda":  # prepared on another thread's stream: keep their memory until read here
        stream = torch.cuda.current_stream(device)
        for image in images:
            for value in image.inputs.values():
                if value.is_cuda:
                    value.record_stream(stream)
    width = max(image.length for image in images)
    text = {"input_ids": pad_id, "attention_mask": 0}
    if "mm_token_type_ids" in images[0].inputs:
        text["mm_token_type_ids"] = 0
    batch = {
        name: torch.cat(
            [torch.nn.functional.pad(im.inputs[name], (width - im.length, 0), value=fill) for im in images]
        )
        for name, fill in text.items()
    }
    for name in ("pixel_values", "image_grids", "image_num_crops"):
        batch[name] = torch.cat([im.inputs[name] for im in images])
    batch["image_token_pooling"] = torch.cat(pooling)
    out = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def prefill_groups(lengths: Sequence[int], overhead: int = FORWARD_OVERHEAD_TOKENS) -> list[list[int]]:
    """Images (by index) per prefill forward: longest first, each forward padded to its
    longest image. A forward's fixed cost is worth ``overhead`` tokens, so images of mixed
    sizes share one when padding costs less than another forward would (an exact partition of
    the sorted lengths, by dynamic programming)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted images
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # images i..j-1 in one forward, padded to the longest, order[i]
            cost = best[i] + (j - i) * lengths[order[i]] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append([order[k] for k in range(cut[j], j)])
        j = cut[j]
    return groups[::-1]
