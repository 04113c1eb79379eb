"""Decode attention that reads each row's own keys, not every row's up to the longest.

In a decode step over many slots, SDPA with a mask reads ``rows x longest row`` keys: one crowd
answer of 600 tokens on a 12 MP photo makes every row of the step read 2048 positions where most
hold ~1000 (measured on an H200, Molmo2-8B, 128 rows: attention 0.23 ms a layer at 1280
positions, 0.35 ms at 2048, a third of the step). On CUDA, the memory-efficient attention kernel
that SDPA itself runs takes per-row key lengths in its variable-length mode; here each row is one
"sequence" of its slot (the cache is laid out slot-major, so slot ``s`` starts at ``s x length``)
and the 4 query heads that share a key head are its 4 query tokens (grouped-query attention
without repeating keys).

:func:`decode_attention` is installed in front of transformers' ``sdpa`` attention and does
this only while :func:`planned` is active for a decode step (the slot decoder sets it); every
other call goes to ``sdpa`` unchanged. :func:`available` checks the kernel against SDPA once on
the device and the decoder falls back to SDPA if it is missing or disagrees.

With a :class:`.cascade.Cascade` in the plan, a decode step reads each image prefix once for all
the rows that show it (:mod:`.cascade`).

The packed steps of :mod:`.packed` read slots the same way, with many query tokens per sequence
(an image prefix's tokens all see the whole prefix): :class:`Sequences` and
:func:`varlen_attention`. Their causal prompt suffixes, and everything on the CPU, go through
:func:`dense_attention`: SDPA over the gathered slot keys with a per-token mask (:class:`Dense`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_PLAN: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("slot_attention_plan", default=None)
_SDPA = None


@dataclass
class Plan:
    keys: list  # per layer [slots, length, kv_heads, head_dim]
    values: list
    seqstart_q: torch.Tensor  # int32 [rows + 1]: row r's query "tokens" (its head groups) start
    seqstart_k: torch.Tensor  # int32 [rows + 1]: row r's slot starts in the flattened cache
    seqlen_k: torch.Tensor  # int32 [rows]: keys row r reads (its length, the new token included)
    max_keys: int
    cascade: object | None = None  # a cascade.Cascade: shared image prefixes read once


@contextlib.contextmanager
def planned(plan: Plan):
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def decode_varlen(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan, scaling: float | None
) -> torch.Tensor:
    """One query token per row ``[rows, heads, 1, dim]`` against each row's own keys; returns
    ``[rows, 1, heads, dim]`` (the layout transformers' attention functions return)."""
    rows, heads, _, dim = query.shape
    kv = keys.shape[-2]  # keys: the flat pool [tokens, kv, dim] (or [slots, length, kv, dim])
    flat_keys, flat_values = keys.view(-1, kv, dim), values.view(-1, kv, dim)
    if plan.cascade is not None:
        return plan.cascade.attend(query[:, :, 0], flat_keys, flat_values, plan, scaling)[:, None]
    out = _folded_varlen(
        query[:, :, 0],
        flat_keys,
        flat_values,
        plan.seqstart_q,
        plan.seqstart_k,
        plan.seqlen_k,
        heads // kv,
        plan.max_keys,
        scaling,
    )
    return out[:, None]


def fold_heads(query, kv):
    """``[n, heads, dim]`` -> ``[1, n x groups, kv, dim]``: the heads sharing a key head as rows."""
    count, heads, dim = query.shape
    groups = heads // kv
    return query.reshape(count, kv, groups, dim).transpose(1, 2).reshape(1, count * groups, kv, dim)


def unfold_heads(out, heads):
    """The inverse of :func:`fold_heads` on an output ``[n x groups, kv, dim]``."""
    folded, kv, dim = out.shape
    groups = heads // kv
    return out.reshape(folded // groups, groups, kv, dim).transpose(1, 2).reshape(-1, heads, dim)


def efficient_attention(
    q, flat_keys, flat_values, seqstart_q, seqstart_k, seqlen_k, max_q, max_k, scaling, lse=False
):
    """CUDA's memory-efficient attention in variable-length mode (``q`` folded)."""
    result = torch.ops.aten._efficient_attention_forward(
        q,
        flat_keys[None],
        flat_values[None],
        None,
        seqstart_q,
        seqstart_k,
        max_q,
        max_k,
        0.0,
        0,
        lse,
        scale=scaling,
        seqlen_k=seqlen_k,
    )
    return (result[0], result[1]) if lse else result[0]


def _folded_varlen(query, flat_keys, flat_values, seqstart_q, seqstart_k, seqlen_k, max_q, max_k, scaling):
    """CUDA's variable-length attention of query tokens ``[n, heads, dim]`` over slot keys
    ``[slots x length, kv_heads, dim]``, the heads that share a key head folded into query rows
    (grouped-query attention without repeating keys); every query row of a sequence sees all of
    its ``seqlen_k`` keys. ``seqstart_q`` and ``max_q`` count folded rows. Returns ``[n, heads, dim]``."""
    heads = query.shape[1]
    q = fold_heads(query, flat_keys.shape[1])
    out = efficient_attention(
        q, flat_keys, flat_values, seqstart_q, seqstart_k, seqlen_k, max_q, max_k, scaling
    )
    return unfold_heads(out[0], heads)


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    plan = _PLAN.get()
    if plan is None or query.shape[2] != 1:
        return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    return decode_varlen(query, plan.keys[layer], plan.values[layer], plan, scaling), None


def install() -> None:
    """Put :func:`decode_attention` in front of transformers' ``sdpa`` (once per process)."""
    global _SDPA
    if _SDPA is not None:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = decode_attention


def random_check_data(device, dtype, kv_heads: int, head_dim: int, rows: int, groups: int, seed: int):
    """Keys and values of 6 slots x 512 positions and one query token for each of ``rows`` rows,
    random, of the model's head geometry: what the start-up checks of the kernel paths run on."""
    gen = torch.Generator(device=device).manual_seed(seed)
    keys = torch.randn(6, 512, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    values = torch.randn(6, 512, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    query = torch.randn(rows, kv_heads * groups, 1, head_dim, device=device, dtype=dtype, generator=gen)
    return keys, values, query


def available(device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int, groups: int) -> bool:
    """Whether the variable-length kernel runs here and agrees with masked SDPA (checked on
    random data of the model's head geometry)."""
    if device.type != "cuda":
        return False
    try:
        rows = 4
        keys, values, query = random_check_data(device, dtype, kv_heads, head_dim, rows, groups, seed=0)
        length, first = keys.shape[1], 1
        lengths = torch.tensor([3, 511, 200, 64], device=device, dtype=torch.int32)
        plan = Plan(
            [keys],
            [values],
            torch.arange(rows + 1, device=device, dtype=torch.int32) * groups,
            (first + torch.arange(rows + 1, device=device, dtype=torch.int32)) * length,
            lengths,
            length,
        )
        got = decode_varlen(query, keys, values, plan, head_dim**-0.5)
        k = keys[first : first + rows].transpose(1, 2).repeat_interleave(groups, dim=1)
        v = values[first : first + rows].transpose(1, 2).repeat_interleave(groups, dim=1)
        visible = torch.arange(length, device=device)[None, :] < lengths[:, None]
        mask = torch.where(visible, 0.0, float("-inf")).to(dtype)[:, None, None, :]
        want = torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask).transpose(1, 2)
        error = (got.float() - want.float()).abs().max().item()
        if error > 2e-2:
            log.warning(
                "variable-length decode attention disagrees with SDPA: using SDPA", extra={"error": error}
            )
            return False
        error = _packed_error(keys, values, groups, head_dim**-0.5)
        if error > 2e-2:
            log.warning(
                "variable-length prefix attention disagrees with SDPA: using SDPA", extra={"error": error}
            )
            return False
        return True
    except Exception as exc:  # noqa: BLE001 - a missing or failing kernel: the masked path works
        log.info(
            "variable-length decode attention unavailable: using SDPA", extra={"reason": repr(exc)[:200]}
        )
        return False


@dataclass
class Dense:
    """Sequences of query tokens laid out for SDPA over their gathered slot keys: ``index``
    ``[sequences, most tokens]`` gives each place's token (pads repeat a real one), ``limit`` the
    last key position it may see, ``pick`` the flat places of tokens ``start``, ``start+1``, ...
    ``starts``: each sequence's first key in the flat pool (its slot x ``stride``)."""

    start: int
    index: torch.Tensor
    starts: torch.Tensor
    limit: torch.Tensor
    pick: torch.Tensor
    read: int  # key positions gathered per slot

    @classmethod
    def of(cls, sequences, stride: int, device) -> Dense:
        """``sequences``: (start, slot, each token's last visible key position), in token order,
        covering tokens start.. without a gap; slot ``s`` starts at ``s x stride`` in the pool."""
        width = max(len(limits) for _, _, limits in sequences)
        index, limit, pick = [], [], []
        for row, (start, _, limits) in enumerate(sequences):
            count = len(limits)
            index.append([start + min(i, count - 1) for i in range(width)])
            limit.append(list(limits) + [0] * (width - count))
            pick.extend(row * width + i for i in range(count))

        def tensor(values):
            return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

        return cls(
            start=sequences[0][0],
            index=tensor(index),
            starts=tensor([slot * stride for _, slot, _ in sequences]),
            limit=tensor(limit),
            pick=tensor(pick),
            read=max(max(limits) for _, _, limits in sequences) + 1,
        )

    @classmethod
    def causal(cls, suffixes, stride: int, device) -> Dense:
        """Prompt suffixes ``(start, count, slot, first position)``: each token sees its slot up to itself."""
        return cls.of(
            [(start, slot, range(first, first + count)) for start, count, slot, first in suffixes],
            stride,
            device,
        )


@dataclass
class Sequences:
    """Sequences of query tokens 0..tokens-1 that each read one slot from its start: the layout of
    CUDA's variable-length kernel (query heads folded into tokens, as in :func:`decode_varlen`),
    and the same as :class:`Dense` for the SDPA path."""

    tokens: int
    seqstart_q: torch.Tensor  # int32 [n + 1], in folded query rows (tokens x head groups)
    seqstart_k: torch.Tensor  # int32 [n + 1], flat cache index of each sequence's slot
    seqlen_k: torch.Tensor  # int32 [n], keys each sequence reads
    max_q: int
    max_k: int
    entries: list
    stride: int

    @functools.cached_property
    def dense(self) -> Dense:
        """The same reads laid out for :func:`dense_attention` (built on first use: the CUDA path
        never needs it, and it pads every sequence to the longest)."""
        return Dense.of(
            [
                (start, slot, [first] + [keys - 1] * (count - 1))
                for start, count, slot, keys, first in self.entries
            ],
            self.stride,
            self.seqlen_k.device,
        )

    @classmethod
    def of(cls, entries, stride: int, groups: int, device) -> Sequences:
        """``entries``: (start, count, slot, keys read, the first token's last visible key) in token
        order from token 0; tokens after the first see every key read. Slot ``s`` starts at
        ``s x stride`` in the flat pool."""
        starts = [start for start, *_ in entries]
        end = entries[-1][0] + entries[-1][1]

        def int32(values):
            return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)

        return cls(
            tokens=end,
            seqstart_q=int32([s * groups for s in starts] + [end * groups]),
            seqstart_k=int32([slot * stride for _, _, slot, _, _ in entries] + [0]),
            seqlen_k=int32([keys for *_, keys, _ in entries]),
            max_q=max(count for _, count, *_ in entries) * groups,
            max_k=max(keys for *_, keys, _ in entries),
            entries=list(entries),
            stride=stride,
        )


def varlen_attention(
    query: torch.Tensor, flat_keys: torch.Tensor, flat_values: torch.Tensor, seqs: Sequences, scaling
) -> torch.Tensor:
    """Query tokens ``[n, heads, dim]`` against their slots' keys (``[slots x length, kv_heads,
    dim]``), every token of a sequence seeing all ``seqlen_k`` keys; returns ``[n, heads, dim]``."""
    return _folded_varlen(
        query,
        flat_keys,
        flat_values,
        seqs.seqstart_q,
        seqs.seqstart_k,
        seqs.seqlen_k,
        seqs.max_q,
        seqs.max_k,
        scaling,
    )


def dense_attention(query, keys, values, dense: Dense, scaling) -> torch.Tensor:
    """SDPA of ``dense``'s tokens over their gathered slot keys (``keys``: the flat pool
    ``[tokens, kv_heads, dim]``), each token masked past its limit; returns ``[tokens, heads, dim]``."""
    heads, dim = query.shape[1:]
    groups = heads // keys.shape[1]
    positions = torch.arange(dense.read, device=query.device)
    at = (dense.starts[:, None] + positions).clamp(max=keys.shape[0] - 1)  # past a limit: masked
    q = query[dense.index].transpose(1, 2)  # [sequences, heads, width, dim]
    k = keys[at].transpose(1, 2).repeat_interleave(groups, dim=1)
    v = values[at].transpose(1, 2).repeat_interleave(groups, dim=1)
    mask = (positions[None, None, :] <= dense.limit[:, :, None])[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).reshape(-1, heads, dim)[dense.pick]


def _packed_error(keys, values, groups: int, scaling: float) -> float:
    """Largest difference of :func:`varlen_attention` from :func:`dense_attention` on sequences
    of several query tokens (an image prefix with its bos token, a decode token, another
    prefix), on ``keys``/``values`` ``[slots, length, kv_heads, dim]``."""
    slots, length, kv, dim = keys.shape
    entries = [(0, 5, 1, 300, 0), (5, 1, 3, 200, 199), (6, 40, 4, 512, 0)]
    seqs = Sequences.of(entries, length, groups, keys.device)
    gen = torch.Generator(device=keys.device).manual_seed(1)
    query = torch.randn(seqs.tokens, kv * groups, dim, device=keys.device, dtype=keys.dtype, generator=gen)
    flat_keys, flat_values = keys.view(-1, kv, dim), values.view(-1, kv, dim)
    got = varlen_attention(query, flat_keys, flat_values, seqs, scaling)
    want = dense_attention(query, flat_keys, flat_values, seqs.dense, scaling)
    not_bos = [t for t in range(seqs.tokens) if t not in (0, 6)]  # bos rows are the caller's (own value)
    return (got[not_bos].float() - want[not_bos].float()).abs().max().item()
