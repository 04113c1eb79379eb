"""Decode attention split over the keys (flash decoding), in Triton, image prefixes read once.

CUTLASS's memory-efficient kernel, which :mod:`.cascade` runs, gives each (sequence, key head)
one thread block that walks all of its keys in turn. A decode step has one query token a row,
so that is little work spread over few blocks. Here every (sequence, key head, chunk of
:data:`CHUNK` keys) is a program of its own, so even a few rows fill the GPU, and a second
kernel merges each row's chunks by their log-sum-exps (Tri Dao's "flash decoding"; FlashInfer's
and vLLM's split-KV decode). On an H100, a layer's decode attention at 16 rows: 71 us with
CUTLASS, 14 us here; at 256 rows 294 us (CUTLASS's cascade) and 156 us (bench/RESULTS.md). The
head size is specialised (not among ``do_not_specialize``): without it Triton could not prove a
row of keys unmasked and read them two bytes at a time, 1.6-1.9x slower.

A step's sequences are those of the cascade: each image group's shared prefix (the group's
query rows together, up to :func:`rows_per_group` rows: one 16-row tile of folded heads), and
each row's own keys after it. Both kinds go in one launch; the merge takes a row's prefix
chunks and its own. Two kernels a layer, against the cascade's two attention kernels and ~10
small ones for its merge.

:func:`works` checks the kernels against every row reading all its keys (plain softmax), once
per device, as the engine does before it uses them; on the CPU the tests run the same kernels
in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

try:  # Triton comes with torch's CUDA wheels; without it decode attention stays CUTLASS's
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - a torch build without Triton
    triton = None

log = logging.getLogger(__name__)

#: keys a program reads (a row's prefix and own keys are split in chunks of this many, so even
#: a few rows fill the GPU): 256 in steps of up to :data:`SMALL_STEP` rows, 512 in bigger ones,
#: whose sequences fill it already and where every chunk adds a partial result to write and
#: merge. Measured on an H100 (bench/decode_attention.py, us a layer, split 256 / 512 / none):
#: 16 rows 14.5 / 18.3 / 33.5, 64 rows 46.2 / 47.3 / 48.5, 128 rows 82.6 / 82.1 / 80.5, 256 rows
#: 162.4 / 156.8 / 143.0 (no split above 64 rows is untried in a throughput run: a 12 MP image's
#: ~2,300-token prefix in one program could hold back the rest of a step).
CHUNK = 256
BIG_CHUNK = 512
SMALL_STEP = 64
#: query rows of one program: a group's rows times their heads that share a key head
TILE_ROWS = 16
#: keys a program reads at a time, and the chunk kernel's launch: warps a program and loads in
#: flight (Triton's defaults; bench/decode_attention.py times others)
KEY_TILE = 64
WARPS, STAGES = 4, 3
#: the kernels' softmax is in powers of 2 (exp2 is one instruction): scores scaled by log2(e)
LOG2_E = 1.4426950408889634


def rows_per_group(groups: int) -> int:
    """The rows of one image that read their prefix in one program (their folded heads fill
    the 16-row tile; 4 for Molmo2-8B's 4 query heads per key head)."""
    return max(1, TILE_ROWS // groups)


if triton is not None:
    # row counts, chunk sizes and the like change from step to step: no variant compiled for each
    @triton.jit(do_not_specialize=["count", "chunk", "splits"])
    def _chunk_kernel(
        Q, K, V, PartOut, PartLse, Table,
        count, dim, chunk, splits, scale_log2,
        stride_qr, stride_qh, stride_kt, stride_kh,
        stride_or, stride_oh, stride_oc, stride_lr, stride_lh,
        GROUPS: tl.constexpr, TILE: tl.constexpr, KEYS: tl.constexpr, DIM: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """One (sequence, key head, chunk): softmax-weighted values of its keys for the
        sequence's query rows, normalised, with their log-sum-exps (base 2)."""
        sequence, head_k, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q_first = tl.load(Table + sequence)
        q_rows = tl.load(Table + 2 * count + sequence)
        k_first = tl.load(Table + 4 * count + sequence)
        k_length = tl.load(Table + 6 * count + sequence)
        low = split * chunk
        if (q_rows > 0) & (low < k_length):
            high = tl.minimum(low + chunk, k_length)
            m = tl.arange(0, TILE)
            row = q_first + m // GROUPS
            head = head_k * GROUPS + m % GROUPS
            row_ok = (m // GROUPS) < q_rows
            d = tl.arange(0, DIM)
            d_ok = d < dim
            q = tl.load(
                Q + row[:, None] * stride_qr + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            best = tl.full([TILE], float("-inf"), tl.float32)
            total = tl.zeros([TILE], tl.float32)
            acc = tl.zeros([TILE, DIM], tl.float32)
            n = tl.arange(0, KEYS)
            for start in range(low, high, KEYS):
                key_ok = (start + n) < high
                at = (k_first + start + n)[:, None] * stride_kt + head_k * stride_kh + d[None, :]
                k = tl.load(K + at, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
                if IEEE:
                    scores = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    scores = tl.dot(q, tl.trans(k))
                scores = tl.where(key_ok[None, :], scores * scale_log2, float("-inf"))
                new_best = tl.maximum(best, tl.max(scores, 1))
                p = tl.exp2(scores - new_best[:, None])
                fade = tl.exp2(best - new_best)
                total = total * fade + tl.sum(p, 1)
                v = tl.load(V + at, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
                if IEEE:
                    acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    acc = acc * fade[:, None] + tl.dot(p.to(v.dtype), v)
                best = new_best
            column = (sequence // count) * splits + split  # prefix chunks first, then own
            out_at = row[:, None] * stride_or + head[:, None] * stride_oh + column * stride_oc + d[None, :]
            tl.store(PartOut + out_at, acc / total[:, None], mask=row_ok[:, None] & d_ok[None, :])
            lse_at = row * stride_lr + head * stride_lh + column
            tl.store(PartLse + lse_at, best + tl.log2(total), mask=row_ok)

    @triton.jit(do_not_specialize=["chunk", "splits"])
    def _merge_kernel(
        PartOut, PartLse, Prefix, Own, Out,
        dim, chunk, splits, stride_or, stride_oh, stride_oc, stride_lr, stride_lh, stride_xr, stride_xh,
        COLUMNS: tl.constexpr, DIM: tl.constexpr,
    ):  # fmt: skip
        """One (row, head): its prefix chunks and own chunks, weighted by their softmax mass."""
        row, head = tl.program_id(0), tl.program_id(1)
        prefix_chunks = tl.cdiv(tl.load(Prefix + row), chunk)
        own_chunks = tl.cdiv(tl.load(Own + row), chunk)
        c = tl.arange(0, COLUMNS)
        used = (c < prefix_chunks) | ((c >= splits) & (c < splits + own_chunks))
        lse = tl.load(PartLse + row * stride_lr + head * stride_lh + c, mask=used, other=float("-inf"))
        weight = tl.where(used, tl.exp2(lse - tl.max(lse, 0)), 0.0)
        d = tl.arange(0, DIM)
        at = row * stride_or + head * stride_oh + c[:, None] * stride_oc + d[None, :]
        parts = tl.load(PartOut + at, mask=used[:, None] & (d < dim)[None, :], other=0.0)
        out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
        tl.store(Out + row * stride_xr + head * stride_xh + d, out.to(Out.dtype.element_ty), mask=d < dim)


def sequences(groups_table, prefix, seqstart_k, seqlen_k) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's sequences for the chunk kernel (once a step, for all its layers): ``groups_table``
    (int32 ``[4, rows]``: each image group's first row, its row count, 0 if unused, its
    prefix's first key and the prefix length) followed by one sequence a row for its own keys
    (row r's keys start at ``seqstart_k[r]``, ``seqlen_k[r]`` of them, the first ``prefix[r]``
    of them its image's). Returns the table ``[4, 2 x rows]`` and each row's own key count."""
    rows = prefix.shape[0]
    own_length = seqlen_k - prefix
    first_row = torch.arange(rows, device=prefix.device, dtype=torch.int32)
    own = torch.stack((first_row, torch.ones_like(prefix), seqstart_k[:rows] + prefix, own_length))
    return torch.cat((groups_table, own), dim=1).contiguous(), own_length


def attention(
    query, flat_keys, flat_values, table, prefix, own_length, max_keys: int, scaling, chunk: int | None = None
) -> torch.Tensor:
    """Decode attention of ``query`` ``[rows, heads, dim]`` (one token a row) over the flat pool
    ``[tokens, kv_heads, dim]``, the step laid out by :func:`sequences` (``table``,
    ``own_length``) with each row's ``prefix`` length; no sequence is longer than ``max_keys``.
    ``chunk``: keys a program reads (by default :data:`CHUNK`, or :data:`BIG_CHUNK` in steps of
    more than :data:`SMALL_STEP` rows). Returns ``[rows, heads, dim]``."""
    rows, heads, dim = query.shape
    kv = flat_keys.shape[1]
    groups = heads // kv
    if chunk is None:
        chunk = CHUNK if rows <= SMALL_STEP else BIG_CHUNK
    splits = -(-max_keys // chunk)
    part_out = torch.empty((rows, heads, 2 * splits, dim), device=query.device, dtype=torch.float32)
    part_lse = torch.empty((rows, heads, 2 * splits), device=query.device, dtype=torch.float32)
    size = max(16, triton.next_power_of_2(dim))
    ieee = query.dtype == torch.float32
    _chunk_kernel[(2 * rows, kv, splits)](
        query, flat_keys, flat_values, part_out, part_lse, table,
        rows, dim, chunk, splits, scaling * LOG2_E,
        query.stride(0), query.stride(1), flat_keys.stride(0), flat_keys.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        GROUPS=groups, TILE=max(TILE_ROWS, triton.next_power_of_2(groups)),
        KEYS=KEY_TILE, DIM=size, IEEE=ieee, num_warps=WARPS, num_stages=STAGES,
    )  # fmt: skip
    out = torch.empty_like(query)
    _merge_kernel[(rows, heads)](
        part_out, part_lse, prefix, own_length, out,
        dim, chunk, splits, part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        COLUMNS=triton.next_power_of_2(2 * splits), DIM=size,
    )  # fmt: skip
    return out


def layout(
    rows: list[tuple[int, object, int]], groups: int, stride: int
) -> tuple[list[list[int]], list[int]]:
    """The host side of a step over ``rows`` ``(slot, image group, prefix length)`` in step
    order, a group's rows adjacent (``None``: a row alone, e.g. padding); slot ``s`` starts at
    ``s x stride`` in the flat pool. Returns the group table (first row, row count, prefix's
    first key, prefix length; ``len(rows)`` entries, unused ones of no rows) and each row's
    prefix length."""
    cap = rows_per_group(groups)
    table: list[list[int]] = [[], [], [], []]
    last, members = object(), 0
    for index, (slot, group, length) in enumerate(rows):
        if group is None or group != last or members == cap:
            last, members = group, 0
            for part, value in zip(table, (index, 0, slot * stride, length)):
                part.append(value)
        table[1][-1] += 1
        members += 1
    unused = len(rows) - len(table[0])
    for part in table:
        part.extend([0] * unused)
    return table, [length for _, _, length in rows]


@dataclass
class FlashStep:
    """A decode step's layout on the device (views of a per-region buffer in a graph)."""

    groups_table: torch.Tensor  # int32 [4, rows]
    prefix: torch.Tensor  # int32 [rows]
    laid_out: tuple | None = None  # :func:`sequences`, made at the step's first layer

    def attend(self, query, flat_keys, flat_values, plan, scaling) -> torch.Tensor:
        """The :class:`.cascade.Cascade` interface: ``query`` ``[rows, heads, dim]`` in, the same out."""
        if self.laid_out is None:
            self.laid_out = sequences(self.groups_table, self.prefix, plan.seqstart_k, plan.seqlen_k)
        table, own_length = self.laid_out
        return attention(
            query, flat_keys, flat_values, table, self.prefix, own_length, plan.max_keys, scaling
        )


class StepBuffer:
    """A region's :class:`FlashStep` on the device for steps of up to ``size`` rows: :meth:`load`
    writes a step's layout before it runs, :meth:`view` gives a captured graph fixed places."""

    def __init__(self, size: int, groups: int, stride: int, device):
        self.size, self.groups, self.stride = size, groups, stride
        self.buffer = torch.zeros(5 * size, dtype=torch.int32, device=device)

    def load(self, rows: list[tuple[int, object, int]]) -> None:
        table, prefix = layout(rows, self.groups, self.stride)
        host = torch.zeros((5, self.size), dtype=torch.int32)
        host[:, : len(rows)] = torch.tensor(table + [prefix], dtype=torch.int32)
        self.buffer.copy_(host.view(-1))

    def view(self, count: int) -> FlashStep:
        places = self.buffer.view(5, self.size)[:, :count]
        return FlashStep(places[:4], places[4])


def works(device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int, groups: int) -> bool:
    """Whether the kernels give what every row reading all its keys gives (plain softmax in
    float64), on random keys of the model's head geometry: an image's rows sharing a prefix
    (more than one program holds), rows alone, a row longer than a chunk, a padding row."""
    if triton is None:
        return False
    try:
        cap = rows_per_group(groups)
        # (slot, image group, prefix length, row length) in step order; slot 0 is free padding
        rows = [(1 + i, "a", 300, 301 + 40 * i) for i in range(cap + 1)]
        rows += [(cap + 2, "b", 50, 60), (cap + 3, None, 0, 700), (0, None, 0, 0)]
        length, scaling = 1024, head_dim**-0.5
        gen = torch.Generator(device=device).manual_seed(3)
        shape = (len(rows) * length, kv_heads, head_dim)
        keys = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        values = torch.randn(shape, device=device, dtype=dtype, generator=gen)
        query = torch.randn(len(rows), kv_heads * groups, head_dim, device=device, dtype=dtype, generator=gen)
        for slot, *_ in rows[1 : cap + 1]:  # one image: the same 300-token prefix in each slot
            keys[slot * length : slot * length + 300] = keys[length : length + 300]
            values[slot * length : slot * length + 300] = values[length : length + 300]

        def int32(values):
            return torch.tensor(values, device=device, dtype=torch.int32)

        table, prefix = layout([(slot, group, p) for slot, group, p, _ in rows], groups, length)
        starts = int32([slot * length for slot, *_ in rows])
        seqlen = int32([n + 1 for *_, n in rows])
        error = 0.0
        for chunk in (CHUNK, length):  # split, and not
            laid_out, own_length = sequences(int32(table), int32(prefix), starts, seqlen)
            got = attention(query, keys, values, laid_out, int32(prefix), own_length, length, scaling, chunk)
            error = max(error, _error(got, query, keys, values, rows, length, groups, scaling))
        if not error <= 2e-2:  # NaN fails too
            log.warning("split-key decode attention disagrees: not used", extra={"error": error})
            return False
        return True
    except Exception as exc:  # noqa: BLE001 - decode attention then stays CUTLASS's
        log.info("split-key decode attention unavailable", extra={"reason": repr(exc)[:200]})
        return False


def _error(got, query, keys, values, rows, length: int, groups: int, scaling: float) -> float:
    """The largest difference from each row reading all its keys (plain softmax, float64)."""
    error = 0.0
    for r, (slot, *_, n) in enumerate(rows):
        k = keys[slot * length : slot * length + n + 1].double().repeat_interleave(groups, dim=1)
        v = values[slot * length : slot * length + n + 1].double().repeat_interleave(groups, dim=1)
        weights = (torch.einsum("hd,khd->hk", query[r].double(), k) * scaling).softmax(-1)
        want = torch.einsum("hk,khd->hd", weights, v)
        error = max(error, (got[r].double() - want).abs().max().item())
    return error
