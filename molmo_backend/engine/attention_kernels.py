"""Which attention kernels a slot decoder runs: each is checked on the device against a plain
reference once, at start, and used only where it agrees (else the slower path it replaces)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molmo_backend.engine import (
    cascade,
    flash_decode,
    fused_rotary,
    prefix_attention,
    slot_attention,
    suffix_attention,
)


@dataclass
class Kernels:
    #: attention reads each row's own keys in place (CUDA's variable-length memory-efficient
    #: kernel); else SDPA over every row up to the step's read length
    varlen: bool
    #: decode attention split over the keys in Triton (:mod:`.flash_decode`), image prefixes
    #: read once; else CUTLASS's kernel, with the cascade where it holds
    flash: bool
    #: decode steps read each image prefix once for all its rows with CUTLASS's kernel (:mod:`.cascade`)
    cascade: bool
    #: packed steps read an image's prefix once for the prompt suffixes of all its rows
    #: (:mod:`.suffix_attention`)
    suffix_pass: bool
    #: packed steps' image prefixes attend among themselves in FlashAttention-2's variable-length
    #: kernel (:mod:`.prefix_attention`) instead of reading their slots with CUTLASS's
    prefix_flash: bool
    #: the rotary embedding in one Triton kernel (:mod:`.fused_rotary`) instead of Hugging Face's
    #: ten; installed for every Molmo2 model of the process, plain ``generate()`` included
    rotary: bool


def checked(
    device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int, groups: int, triton: bool = False
) -> Kernels:
    """The kernels that run here; ``triton``: try the Triton ones too (MOLMO_TRITON_KERNELS).
    Hugging Face's rotary embedding stays where the fused one is not checked (or not wanted)."""
    geometry = (device, dtype, kv_heads, head_dim, groups)
    varlen = slot_attention.available(*geometry)
    triton = triton and device.type == "cuda"
    flash = triton and flash_decode.works(*geometry)
    if varlen or flash:
        slot_attention.install()
    rotary = triton and fused_rotary.works(device, dtype, kv_heads * groups, kv_heads, head_dim)
    if rotary:
        fused_rotary.install()
    return Kernels(
        rotary=rotary,
        varlen=varlen,
        flash=flash,
        cascade=varlen and cascade.works(*geometry),
        suffix_pass=varlen and suffix_attention.works(*geometry),
        prefix_flash=varlen and prefix_attention.ON and prefix_attention.works(*geometry),
    )
