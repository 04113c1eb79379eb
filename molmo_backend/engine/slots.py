"""The cache memory of the fast decoder: one static K/V pool that every admitted row lives in.

The pool is cut into blocks of :data:`BLOCK_TOKENS`; a row holds a run of adjacent blocks, sized
by its own length (its prompt and the answer so far), not by the longest row the model can
have, and grows as its answer grows (:class:`BlockRuns` keeps the free runs). A row is known by
its run's first block, its "slot": its keys start at ``slot x BLOCK_TOKENS`` in every layer, and
a run is one contiguous sequence, which the variable-length attention kernels read as such.
:class:`SlotCache` holds every layer's keys and values; :class:`CacheView` tells it, before each
forward, where that forward writes and what it reads. The sizes here (read lengths, row buckets,
the opened tasks' region) bound how many distinct decode steps (CUDA graphs) exist.
:mod:`.decoding` drives them.
"""

from __future__ import annotations

import bisect
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
#: the pool's unit: a row's run is a whole number of blocks (at most this many tokens unused)
BLOCK_TOKENS = 128
#: answer tokens a bulk row's run has room for when it is admitted; more as it grows
ANSWER_ROOM = 64


#: a bulk row's typical cache length, for how many rows a pool is worth: a photo's ~900 image
#: tokens, its prompt and an answer of a few points
TYPICAL_ROW_TOKENS = 1024
#: share of the memory free after loading (the GPU's; on the CPU, the RAM) that the cache pool may
#: take; the rest is headroom for the prefill (about 10 images' activations at a time) and graphs
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


def bulk_pool_tokens(text_config, dtype: torch.dtype, device: torch.device, max_batch: int, longest: int):
    """Tokens of the bulk pool: the share of the free memory (the GPU's; on the CPU, the RAM
    available) the cache may take, less the opened tasks' region; at most what ``max_batch``
    rows of the longest length need, at least one such row. None where the free memory is
    unknown (every bulk row then gets room for the longest length)."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_ram()
    if free is None:
        return None
    budget = kv_token_budget(free, kv_bytes_per_token(text_config, dtype)) - INTERACTIVE_SLOTS * longest
    return max(min(budget, max_batch * longest), longest)


def available_ram() -> int | None:
    """Bytes of RAM the kernel says can be allocated without swapping (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def bulk_rows_for(pool_tokens: int | None, max_batch: int, longest: int) -> int:
    """Bulk rows worth running in a pool of ``pool_tokens``: ``max_batch``, or fewer where the
    pool holds fewer rows of typical length (no longer than ``longest``), so a smaller GPU
    captures and runs smaller decode steps, whose graphs and activations fit beside the pool.
    None (free memory unknown): ``max_batch``."""
    if pool_tokens is None:
        return max_batch
    return max(1, min(max_batch, pool_tokens // min(TYPICAL_ROW_TOKENS, longest)))


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def row_bucket(rows: int, interactive: bool) -> int:
    if interactive:
        return max(2, 1 << (rows - 1).bit_length())
    return next((b for b in BULK_ROW_BUCKETS if b >= rows), round_up(rows, 64))


class BlockRuns:
    """The free blocks of one region of the pool, as sorted free runs ``[start, end)``: a row
    takes the lowest run that fits (first fit), grows in place when the blocks after its run
    are free, and gives its run back when it ends (adjacent free runs merge)."""

    def __init__(self, first: int, count: int):
        self.first, self.count = first, count
        self._starts: list[int] = [first]  # free runs, sorted by start
        self._ends: list[int] = [first + count]

    @property
    def free_blocks(self) -> int:
        return sum(end - start for start, end in zip(self._starts, self._ends))

    def lowest_free(self) -> int | None:
        return self._starts[0] if self._starts else None

    def take(self, blocks: int) -> int | None:
        """The first block of a free run of ``blocks`` taken now, or None if none is that long."""
        for i, (start, end) in enumerate(zip(self._starts, self._ends)):
            if end - start >= blocks:
                self._cut(i, start, start + blocks)
                return start
        return None

    def extend(self, start: int, blocks: int, more: int) -> bool:
        """Take the ``more`` blocks right after the run ``[start, start + blocks)`` if all are free."""
        at = start + blocks
        i = bisect.bisect_right(self._starts, at) - 1
        if i < 0 or self._starts[i] != at or self._ends[i] - at < more:
            return False
        self._cut(i, at, at + more)
        return True

    def release(self, start: int, blocks: int) -> None:
        end = start + blocks
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._ends[i - 1] > start or i < len(self._starts) and self._starts[i] < end:
            raise ValueError(f"blocks {start}..{end - 1} are already free")
        if i < len(self._starts) and self._starts[i] == end:  # merge with the run after
            end = self._ends.pop(i)
            self._starts.pop(i)
        if i > 0 and self._ends[i - 1] == start:  # and with the run before
            self._ends[i - 1] = end
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)

    def _cut(self, i: int, start: int, end: int) -> None:
        """Take ``[start, end)`` out of free run ``i`` (which begins at ``start``)."""
        if end == self._ends[i]:
            del self._starts[i], self._ends[i]
        else:
            self._starts[i] = end


class SlotCache:
    """Preallocated keys/values of every layer, ``[pool tokens, kv_heads, head_dim]`` each.

    The model calls :meth:`update` once per layer; the caller sets :attr:`view` (where this
    forward writes, which positions it reads) before each forward, with device tensors only,
    so a captured graph replays it."""

    is_initialized = True
    is_compileable = False

    def __init__(
        self,
        num_layers: int,
        tokens: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (tokens, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.tokens = tokens
        self.view: CacheView | None = None

    def move(self, source: int, target: int, count: int) -> None:
        """Copy ``count`` tokens at flat index ``source`` to ``target`` in every layer."""
        for pool in (*self.keys, *self.values):
            pool[target : target + count] = pool[source : source + count]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        view = self.view
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # key_states: [rows, heads, tokens, dim] -> flat index view.write_at[r, t]
        keys[view.write_at] = key_states.transpose(1, 2)
        values[view.write_at] = value_states.transpose(1, 2)
        if view.read_at is None:  # the attention reads the pool in place (slot_attention's plan)
            return key_states, value_states
        return keys[view.read_at].transpose(1, 2), values[view.read_at].transpose(1, 2)


@dataclass
class CacheView:
    """Where one forward writes and what it reads; tensors only, so that a compiled step keeps
    its sizes dynamic."""

    write_at: torch.Tensor  # [rows, tokens] flat pool index of each written token
    read_at: torch.Tensor | None  # [rows, positions] flat index of each key read; None: read in place


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


class RowSpace:
    """Which run of blocks each row holds (a row is known by its run's first block, its slot), in
    two regions: the opened tasks' (each row a run of the longest row's length, so an opened task
    never waits for memory) and the bulk region, where a row's run fits its own prompt plus
    :data:`ANSWER_ROOM` and grows with its answer (:meth:`grow`)."""

    def __init__(self, interactive_rows: int, bulk_rows: int, row_blocks: int, bulk_blocks: int):
        self.row_blocks = row_blocks
        first_bulk = interactive_rows * row_blocks
        self.regions = {True: BlockRuns(0, first_bulk), False: BlockRuns(first_bulk, bulk_blocks)}
        self.limit = {True: interactive_rows, False: bulk_rows}
        self.held: dict[int, int] = {}  # slot -> blocks of its run
        self._rows = {True: 0, False: 0}
        #: blocks a new bulk row takes, a running average: how many more rows fit
        self.typical = max(1.0, row_blocks / 2)

    def interactive(self, slot: int) -> bool:
        return slot < self.regions[False].first

    def rows(self, interactive: bool) -> int:
        return self._rows[interactive]

    def free_rows(self, interactive: bool) -> int:
        """Rows that can be admitted now: within the region's row limit and, in the bulk region,
        its free blocks less one block of growth for every running row."""
        left = self.limit[interactive] - self._rows[interactive]
        region = self.regions[interactive]
        if interactive:
            return min(left, region.free_blocks // self.row_blocks)
        spare = region.free_blocks - self._rows[False]
        return max(0, min(left, int(spare // self.typical)))

    def take(self, interactive: bool, tokens: int) -> int | None:
        """A run for a new row of ``tokens`` prompt tokens, or None if none is free."""
        if self._rows[interactive] >= self.limit[interactive]:
            return None
        blocks = self.row_blocks if interactive else min(self.row_blocks, blocks_for(tokens + ANSWER_ROOM))
        slot = self.regions[interactive].take(blocks)
        if slot is not None:
            self.held[slot] = blocks
            self._rows[interactive] += 1
            if not interactive:
                self.typical = 0.9 * self.typical + 0.1 * blocks
        return slot

    def capacity(self, slot: int) -> int:
        return self.held[slot] * BLOCK_TOKENS

    def grow(self, slot: int, need: int, want: int) -> int | None:
        """Room for at least ``need`` tokens (``want`` if it can) for the row in ``slot``: its run
        extended in place (returns ``slot``), or a new run (returns its slot: the caller moves the
        row there, then releases ``slot``), or None if no free run is long enough."""
        blocks, region = self.held[slot], self.regions[self.interactive(slot)]
        for size in dict.fromkeys((min(self.row_blocks, blocks_for(want)), blocks_for(need))):
            if size > blocks and region.extend(slot, blocks, size - blocks):
                self.held[slot] = size
                return slot
        for size in dict.fromkeys((min(self.row_blocks, blocks_for(want)), blocks_for(need))):
            new = region.take(size)
            if new is not None:
                self.held[new] = size
                self._rows[self.interactive(slot)] += 1  # until the caller releases the old run
                return new
        return None

    def release(self, slot: int) -> None:
        interactive = self.interactive(slot)
        self.regions[interactive].release(slot, self.held.pop(slot))
        self._rows[interactive] -= 1

    def lowest_free(self, interactive: bool) -> int | None:
        return self.regions[interactive].lowest_free()
