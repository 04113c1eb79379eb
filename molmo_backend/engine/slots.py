"""The cache slots of the fast decoder: one static K/V cache that every admitted row lives in.

:class:`SlotCache` holds every layer's keys and values, ``[slots, length, kv_heads, head_dim]``;
:class:`CacheView` tells it, before each forward, where that forward writes and what it reads.
The sizes here (read lengths, row buckets, the opened tasks' region) bound how many distinct
decode steps (CUDA graphs) exist. :mod:`.decoding` drives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: attention reads a multiple of this many cache positions (fewer distinct graphs; at most this
#: many positions read in vain per row)
LENGTH_STEP = 256
#: decode steps over the bulk region use row counts rounded up to these (then multiples of 64)
BULK_ROW_BUCKETS = (16, 32, 48, 64, 96, 128)
#: the opened tasks' region; its steps use 2, 4, 8 or 16 rows (at least 2: torch.compile
#: specialises a size of 1, which would cost a second compile)
INTERACTIVE_SLOTS = 16


#: share of the GPU memory free after loading that the cache slots may take; the rest is headroom
#: for the prefill (about 10 images' activations and cache at a time), logits and graphs
KV_MEMORY_FRACTION = 0.7


def head_dim(text_config) -> int:
    return (
        getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    )


def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """Bytes one cached token takes: keys and values of every layer."""
    text = text_config
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim(text) * dtype.itemsize


def kv_token_budget(free_bytes: int, bytes_per_token: int, fraction: float = KV_MEMORY_FRACTION) -> int:
    """Cache tokens (rows x length) that fit in ``fraction`` of ``free_bytes``."""
    return max(0, int(free_bytes * fraction) // bytes_per_token)


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def row_bucket(rows: int, interactive: bool) -> int:
    if interactive:
        return max(2, 1 << (rows - 1).bit_length())
    return next((b for b in BULK_ROW_BUCKETS if b >= rows), round_up(rows, 64))


class SlotCache:
    """Preallocated keys/values of every layer, ``[slots, length, kv_heads, head_dim]``
    (slot-major, so each slot's positions are one contiguous block, which the variable-length
    decode attention of :mod:`.slot_attention` reads as one sequence).

    The model calls :meth:`update` once per layer; the caller sets :attr:`view` (where this
    forward writes, which rows and positions it reads) before each forward, with device tensors
    only, so a captured graph replays it."""

    is_initialized = True
    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        slots: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (slots, length, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = length
        self.view: CacheView | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        view = self.view
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # key_states: [rows, heads, tokens, dim] -> slot view.write_rows[r, t], position view.write_at[r, t]
        keys[view.write_rows, view.write_at] = key_states.transpose(1, 2)
        values[view.write_rows, view.write_at] = value_states.transpose(1, 2)
        if not view.read:  # the attention reads the slots in place (slot_attention's plan)
            return key_states, value_states
        length = view.key_positions.shape[0]
        return keys[view.gather, :length].transpose(1, 2), values[view.gather, :length].transpose(1, 2)


@dataclass
class CacheView:
    """Where one forward writes and what it reads; tensors only (and a flag), so that a compiled
    step keeps its sizes dynamic."""

    write_rows: torch.Tensor  # [rows, tokens] slot of each written token
    write_at: torch.Tensor  # [rows, tokens] its position in the slot
    key_positions: torch.Tensor  # positions 0..n-1 read per slot
    gather: torch.Tensor  # the slot of each row, in row order: a copy of theirs is read
    read: bool = True  # False: the attention reads the slots itself, nothing is copied
