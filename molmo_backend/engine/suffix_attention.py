"""Prompt-suffix attention in two passes: an image's rows read its prefix once, then their own keys.

A packed step's suffix tokens (the chat text around a label, ~25 a row) went through
:func:`.slot_attention.dense_attention`: every row gathered its whole slot (a ~1000-token image
prefix and its suffix) and repeated the keys for each query head. Measured on an H100, 24 rows x
25 tokens over a 1000-token prefix: 1.09 ms a layer, ~39 ms of a ~300 ms step over 36 layers. Yet
the rows of one image hold the same prefix (copied into each row's slot).

So, as :mod:`.cascade` does for decode steps: pass 1 runs CUDA's variable-length kernel with one
sequence per run of adjacent rows of one prefix, their query heads folded into rows (grouped-query
attention without repeating keys), non-causal, reading the prefix in one slot once. Pass 2, each
token against its row's own suffix keys up to itself, is small: plain float32 tensor math, rows
padded to the widest. :func:`.cascade.merge_partials` merges the two by their log-sum-exps.
:func:`layout` lays a step out on the host; :func:`works` checks it on the device once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from molmo_backend.engine import slot_attention
from molmo_backend.engine.cascade import merge_partials

log = logging.getLogger(__name__)

#: query tokens of one pass-1 sequence (more are split; a split re-reads the prefix). The kernel's
#: grid and log-sum-exps are as wide as its widest sequence for every sequence, so one image's 600
#: suffix tokens in one sequence would make each one-row image's sequence launch ~19x the blocks it
#: needs (idle ones). A guess to measure, not a measured optimum.
SEQUENCE_TOKENS = 128


@dataclass
class SuffixLayout:
    """A step's suffix tokens laid out for the two passes (device tensors, built by :func:`layout`)."""

    seqstart_q: torch.Tensor  # int32 [sequences + 1] pass 1: each sequence's first folded query row
    seqstart_k: torch.Tensor  # int32 [sequences + 1] flat cache index of the prefix it reads
    seqlen_k: torch.Tensor  # int32 [sequences] the prefix length
    lse_at: torch.Tensor  # long [tokens x groups] each folded row's place in pass 1's log-sum-exps
    query_at: torch.Tensor  # long [rows, width] pass 2: each place's token (pads repeat the last)
    key_at: torch.Tensor  # long [rows, width] flat cache index of the row's own keys (pads repeat)
    visible: torch.Tensor  # bool [rows, width, width] place i sees own key j (causal, j < count)
    pick: torch.Tensor  # long [tokens] the places of tokens 0, 1, ... in [rows x width]
    max_q: int  # folded query rows of the widest sequence
    max_k: int  # the longest prefix
    lse_width: int  # the kernel's log-sum-exp rows: max_q rounded up to 32


def layout(rows, kv_heads: int, groups: int, device) -> SuffixLayout:
    """``rows``: (start, count, prefix_at, prefix_len, own_at) in token order from token 0, without
    gaps: a row's tokens, the flat cache index and length of an image prefix (any slot holding it;
    adjacent rows naming the same one read it together) and of its own keys. At least one row;
    prefixes are not empty."""
    sequences = []  # (first token, tokens, prefix_at, prefix_len)
    end = 0
    for start, count, prefix_at, prefix_len, _ in rows:
        assert start == end and count > 0 and prefix_len > 0, "rows are contiguous, prefixes not empty"
        end = start + count
        if sequences and sequences[-1][2:] == (prefix_at, prefix_len):
            first, tokens = sequences.pop()[:2]
        else:
            first, tokens = start, 0
        tokens += count
        while tokens > SEQUENCE_TOKENS:
            sequences.append((first, SEQUENCE_TOKENS, prefix_at, prefix_len))
            first, tokens = first + SEQUENCE_TOKENS, tokens - SEQUENCE_TOKENS
        sequences.append((first, tokens, prefix_at, prefix_len))
    max_q = max(tokens for _, tokens, _, _ in sequences) * groups
    lse_width = -(-max_q // 32) * 32
    lse_at = [
        s * kv_heads * lse_width + i
        for s, (_, tokens, _, _) in enumerate(sequences)
        for i in range(tokens * groups)
    ]
    width = max(count for _, count, *_ in rows)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    counts = torch.tensor([count for _, count, *_ in rows])

    def tensor(values, dtype=torch.long):
        return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)

    return SuffixLayout(
        seqstart_q=tensor([first * groups for first, *_ in sequences] + [end * groups], torch.int32),
        seqstart_k=tensor([at for *_, at, _ in sequences] + [0], torch.int32),
        seqlen_k=tensor([length for *_, length in sequences], torch.int32),
        lse_at=tensor(lse_at),
        query_at=tensor([[start + min(i, count - 1) for i in range(width)] for start, count, *_ in rows]),
        key_at=tensor([[own + min(i, count - 1) for i in range(width)] for _, count, *_, own in rows]),
        visible=tensor(causal & (torch.arange(width) < counts[:, None, None]), torch.bool),
        pick=tensor([r * width + i for r, (_, count, *_) in enumerate(rows) for i in range(count)]),
        max_q=max_q,
        max_k=max(length for *_, length in sequences),
        lse_width=lse_width,
    )


def attend(query, flat_keys, flat_values, layout: SuffixLayout, scaling) -> torch.Tensor:
    """Suffix tokens ``query`` ``[n, heads, dim]`` over flat cache keys ``[slots x length, kv_heads,
    dim]``: the prefix (pass 1, the kernel) and own keys up to themselves (pass 2, float32),
    merged. Returns ``[n, heads, dim]`` in the query's dtype."""
    n, heads, dim = query.shape
    kv = flat_keys.shape[1]
    groups = heads // kv
    shared, shared_lse = slot_attention.efficient_attention(
        slot_attention.fold_heads(query, kv), flat_keys, flat_values, layout.seqstart_q,
        layout.seqstart_k, layout.seqlen_k, layout.max_q, layout.max_k, scaling, lse=True,
    )  # fmt: skip
    if shared_lse.shape[2] != layout.lse_width:
        raise RuntimeError(f"log-sum-exps of {shared_lse.shape[2]} rows, laid out for {layout.lse_width}")
    heads_at = torch.arange(kv, device=query.device) * layout.lse_width
    shared_lse = shared_lse.reshape(-1)[layout.lse_at[:, None] + heads_at]  # [folded rows, kv]

    rows, width = layout.query_at.shape
    q = query[layout.query_at].float().view(rows, width, kv, groups, dim)
    k, v = flat_keys[layout.key_at].float(), flat_values[layout.key_at].float()  # [rows, width, kv, dim]
    scores = torch.einsum("rikgd,rjkd->rkgij", q, k) * (dim**-0.5 if scaling is None else scaling)
    scores = scores.masked_fill(~layout.visible[:, None, None], float("-inf"))
    own_lse = torch.logsumexp(scores, -1)  # [rows, kv, groups, width]
    own = torch.einsum("rkgij,rjkd->rigkd", (scores - own_lse[..., None]).exp(), v)
    own = own.reshape(rows * width, groups * kv, dim)[layout.pick].view(n * groups, kv, dim)
    own_lse = own_lse.permute(0, 3, 2, 1).reshape(rows * width, groups * kv)[layout.pick]
    merged = merge_partials(shared[0], shared_lse, own, own_lse.view(n * groups, kv))
    return slot_attention.unfold_heads(merged, heads).to(query.dtype)


def works(device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int, groups: int) -> bool:
    """Whether :func:`attend` gives what :func:`.slot_attention.dense_attention` gives (checked
    once on the device, on random keys of the model's head geometry: two rows sharing a prefix, a
    row alone, a row of the first image not adjacent to its others, rows of different lengths)."""
    try:
        gen = torch.Generator(device=device).manual_seed(3)
        slots, length = 6, 512
        keys = torch.randn(slots, length, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
        values = torch.randn(slots, length, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
        # (slot, prefix length, suffix tokens) in token order; slots 1, 2 and 5 show one image
        suffixes = [(1, 100, 7), (2, 100, 30), (3, 300, 1), (4, 60, 25), (5, 100, 12)]
        for slot in (2, 5):
            keys[slot, :100], values[slot, :100] = keys[1, :100], values[1, :100]
        rows, dense, start = [], [], 0
        for slot, prefix, count in suffixes:
            shown = 1 if prefix == 100 else slot  # the image's prefix is read in slot 1
            rows.append((start, count, shown * length, prefix, slot * length + prefix))
            dense.append((start, count, slot, prefix))
            start += count
        query = torch.randn(start, kv_heads * groups, head_dim, device=device, dtype=dtype, generator=gen)
        scaling = head_dim**-0.5
        flat = keys.view(-1, kv_heads, head_dim), values.view(-1, kv_heads, head_dim)
        got = attend(query, *flat, layout(rows, kv_heads, groups, device), scaling)
        want = slot_attention.dense_attention(
            query, *flat, slot_attention.Dense.causal(dense, length, device), scaling
        )
        error = (got.float() - want.float()).abs().max().item()
        if error > 2e-2:
            log.warning(
                "two-pass suffix attention disagrees: suffixes read their slots", extra={"error": error}
            )
            return False
        return True
    except Exception as exc:  # noqa: BLE001 - suffixes then read their whole slots, which works
        log.info("two-pass suffix attention unavailable", extra={"reason": repr(exc)[:200]})
        return False
