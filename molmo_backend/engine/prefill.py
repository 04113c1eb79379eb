"""The image prefixes of the fast decoder's prefill: the processor's work per image, and the
vision features of the images admitted together.

Each distinct image of the admitted rows is prepared once (:func:`prepare_image`) and its
features computed once (:func:`image_features`) for all the labels asked of it, both ahead on
a preparation thread (:func:`with_features`; on a GPU in a stream of its own, so that the vision
tower runs beside the worker's decode steps); :func:`step_features` takes those and computes
any missing in the step. :mod:`.packed` lays the image's tokens into the step's one forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PreparedImage:
    """One image as the processor lays it out (a batch of one)."""

    inputs: dict  # processor outputs for this image alone (batch of one)
    ids: list[int]  # its prefix token ids (bos + image tokens), kept on the host
    crops: int
    patches: int  # per crop
    #: its pooled vision features ``[image tokens, hidden]`` once computed ahead
    #: (:func:`with_features`), else None: the packed step computes them
    features: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Prefix tokens."""
        return len(self.ids)


def prepare_image(processor, image, device: torch.device | None = None) -> PreparedImage:
    """The processor's work for one image: on ``device`` when given (on a GPU its crops are
    resized there: a 12 MP photo costs a few ms instead of hundreds on the CPU), else on the
    CPU. Thread-safe: the processor holds no state."""
    kwargs = {"device": device} if device is not None else {}
    encoded = processor(images=[[image]], text=[processor.image_token], return_tensors="pt", **kwargs)
    inputs = {key: value.to(device) if device is not None else value for key, value in encoded.items()}
    pixels = inputs["pixel_values"]
    ids = encoded["input_ids"][0].tolist()
    return PreparedImage(inputs, ids, int(pixels.shape[0]), int(pixels.shape[1]))


def with_features(model, image: PreparedImage, dtype: torch.dtype) -> PreparedImage:
    """``image`` with its vision features computed now (ahead of its packed step, on the
    preparation thread)."""
    image.features = image_features(model, [image], dtype)
    return image


def step_features(model, images: Sequence[PreparedImage], dtype: torch.dtype) -> torch.Tensor:
    """The vision features of a packed step's ``images``, in order: those computed ahead when
    every image has them, else all computed now in one pass through the vision tower (a step
    mixing both is rare: only images admitted before their preparation started lack them)."""
    if any(image.features is None for image in images):
        return image_features(model, images, dtype)
    device = model.device
    for image in images:
        if image.features.is_cuda and image.features.device == device:
            # made on a preparation stream: keep its memory until read here
            image.features.record_stream(torch.cuda.current_stream(device))
    # another GPU's worker may have prepared some (the replicas share one queue): copied over
    return torch.cat([image.features.to(device) for image in images])


def image_features(model, images: Sequence[PreparedImage], dtype: torch.dtype) -> torch.Tensor:
    """The pooled vision features of ``images``, in order, ``[image tokens of all, hidden]``: every
    crop of every image through the vision tower at once (crops have one size whatever the
    image's), then Molmo2's adapter pools them per image token."""
    pooling, offset = [], 0
    for image in images:
        idx = image.inputs["image_token_pooling"]
        pooling.append(torch.where(idx >= 0, idx + offset, idx))
        offset += image.crops * image.patches
    if pooling[0].is_cuda:  # prepared on another thread's stream: keep their memory until read here
        stream = torch.cuda.current_stream(pooling[0].device)
        for image in images:
            for value in image.inputs.values():
                if value.is_cuda:
                    value.record_stream(stream)
    device = model.device
    pixels = torch.cat([image.inputs["pixel_values"] for image in images]).to(device, dtype)
    grids = torch.cat([image.inputs["image_grids"] for image in images]).to(device)
    features = model.model.get_image_features(pixels, torch.cat(pooling).to(device), grids).pooler_output
    return torch.cat(features)
