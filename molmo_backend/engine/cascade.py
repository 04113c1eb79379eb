"""Cascade decode attention: the rows that show one image read their shared prefix once.

Every row of an image holds the same image prefix (~1000 tokens of a ~1100-token row) in its
own slot, written there by the same packed step. A decode step over 128 rows read every copy:
about 20 GB a step on Molmo2-8B, a third of its time (H100 profile, bench/RESULTS.md). With a
:class:`Cascade` in its plan, the step reads the prefix once for all of an image's rows (one
variable-length sequence per image, their query heads together) and each row's own keys after
it apart, then merges the two partial softmaxes by their log-sum-exps, as FlashInfer's and
vLLM's cascade attention do for shared prefixes. :func:`layout` lays a step out on the host;
:func:`works` checks the kernel path against every row reading all its keys, once per device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from molmo_backend.engine.slot_attention import (
    Plan,
    decode_varlen,
    efficient_attention,
    fold_heads,
    random_check_data,
    unfold_heads,
)

log = logging.getLogger(__name__)

#: rows of one image that read their shared prefix in one sequence (more are split)
CASCADE_ROWS = 16
#: steps of fewer rows read all their keys: the cascade's second pass and merge (~10 small
#: kernels a layer) cost more than the prefix reads they save there. Measured on an H100
#: (bench/decode_attention.py, us a layer, each row all its keys / cascade): 32 rows 67 / 109,
#: 64 rows 121 / 142, 128 rows 211 / 196, 256 rows 422 / 295
MIN_ROWS = 128


@dataclass
class Cascade:
    """A decode step's two passes (device tensors; views of a per-region buffer in a graph).

    Pass 1, one sequence per image group (its rows adjacent in the step): the group's folded
    query rows read the prefix in one of its slots. Pass 2, one sequence per row: its keys after
    the prefix. Unused pass-1 sequences have no query rows."""

    seqstart_q: torch.Tensor  # int32 [rows + 1] pass 1: each group's first folded query row
    seqstart_k: torch.Tensor  # int32 [rows + 1] the slot whose prefix it reads
    seqlen_k: torch.Tensor  # int32 [rows] the prefix length
    prefix: torch.Tensor  # int32 [rows] each row's prefix length (pass 2 starts there)
    lse_at: torch.Tensor  # int32 [rows x head groups] each folded row's place in pass 1's log-sum-exps

    def attend(self, query, flat_keys, flat_values, plan: Plan, scaling) -> torch.Tensor:
        """The two passes and their merge; ``query`` ``[rows, heads, dim]``, returns the same shape."""
        rows, heads, dim = query.shape
        kv = flat_keys.shape[1]
        groups = heads // kv
        q = fold_heads(query, kv)
        shared, shared_lse = efficient_attention(
            q, flat_keys, flat_values, self.seqstart_q, self.seqstart_k, self.seqlen_k,
            CASCADE_ROWS * groups, plan.max_keys, scaling, lse=True,
        )  # fmt: skip
        own_start = torch.cat((plan.seqstart_k[:-1] + self.prefix, plan.seqstart_k[-1:]))
        own, own_lse = efficient_attention(
            q, flat_keys, flat_values, plan.seqstart_q, own_start, plan.seqlen_k - self.prefix,
            groups, plan.max_keys, scaling, lse=True,
        )  # fmt: skip
        # log-sum-exps are [sequences, kv heads, query rows rounded up to 32]
        heads_at = torch.arange(kv, device=query.device) * shared_lse.shape[2]
        shared_lse = shared_lse.view(-1)[self.lse_at.long()[:, None] + heads_at]  # [folded rows, kv]
        own_lse = own_lse[:, :, :groups].transpose(1, 2).reshape(rows * groups, kv)
        merged = merge_partials(shared[0], shared_lse, own[0], own_lse)
        return unfold_heads(merged.to(query.dtype), heads)


def merge_partials(out_a, lse_a, out_b, lse_b) -> torch.Tensor:
    """Attention over keys A and B together from attention over each (outputs ``[n, h, dim]``,
    log-sum-exps ``[n, h]``): each part weighted by its share of the softmax mass. Float32."""
    top = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = (lse_a - top).exp(), (lse_b - top).exp()
    total = weight_a + weight_b
    return (out_a.float() * (weight_a / total)[..., None]) + (out_b.float() * (weight_b / total)[..., None])


def layout(
    rows: list[tuple[int, object, int]], kv_heads: int, groups: int, stride: int
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """The host side of :class:`Cascade` for a step's rows ``(slot, image group, prefix length)``
    in step order, a group's rows adjacent (``None``: a row of its own, e.g. padding); slot ``s``
    starts at ``s x stride`` in the flat pool. Returns
    ``seqstart_q``, ``seqstart_k``, ``seqlen_k`` (padded to ``len(rows)`` sequences), ``prefix``
    and ``lse_at`` as lists."""
    width = -(-CASCADE_ROWS * groups // 32) * 32  # the kernel's log-sum-exp rows, rounded to 32
    starts_q, starts_k, lengths, prefix, lse_at = [], [], [], [], []
    last, members = object(), 0
    for index, (slot, group, length) in enumerate(rows):
        if group is None or group != last or members == CASCADE_ROWS:
            last, members = group, 0
            starts_q.append(index * groups)
            starts_k.append(slot * stride)
            lengths.append(max(length, 1))
        sequence = len(lengths) - 1
        lse_at.extend(sequence * kv_heads * width + members * groups + g for g in range(groups))
        members += 1
        prefix.append(length)
    unused = len(rows) - len(lengths)
    starts_q += [len(rows) * groups] * (unused + 1)
    starts_k += [0] * (unused + 1)
    lengths += [1] * unused
    return starts_q, starts_k, lengths, prefix, lse_at


class StepBuffer:
    """A region's :class:`Cascade` on the device, laid out for steps of any row count up to
    ``size``: :meth:`load` writes a step's layout before it runs; :meth:`view` gives a captured
    graph the fields of a ``count``-row step (fixed places, so a replay reads the new layout)."""

    def __init__(self, size: int, kv_heads: int, groups: int, stride: int, device):
        self.size, self.kv_heads, self.groups, self.stride = size, kv_heads, groups, stride
        self.buffer = torch.zeros(4 * size + 2 + size * groups, dtype=torch.int32, device=device)

    def _places(self, count: int) -> list[tuple[int, int]]:
        """(offset, length) of seqstart_q, seqstart_k, seqlen_k, prefix and lse_at."""
        size = self.size
        return [
            (0, count + 1),
            (size + 1, count + 1),
            (2 * size + 2, count),
            (3 * size + 2, count),
            (4 * size + 2, count * self.groups),
        ]

    def load(self, rows: list[tuple[int, object, int]]) -> None:
        """The layout of a step over ``rows`` (see :func:`layout`), copied to the device."""
        host = torch.zeros(self.buffer.shape[0], dtype=torch.int32)
        parts = layout(rows, self.kv_heads, self.groups, self.stride)
        for part, (at, _) in zip(parts, self._places(len(rows))):
            host[at : at + len(part)] = torch.tensor(part, dtype=torch.int32)
        self.buffer.copy_(host)

    def view(self, count: int) -> Cascade:
        return Cascade(*(self.buffer[at : at + n] for at, n in self._places(count)))


def works(device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int, groups: int) -> bool:
    """Whether :class:`Cascade` decode attention gives what each row reading all its keys gives
    (checked once on the device, on random keys of the model's head geometry: three rows sharing
    a prefix, two rows alone, a padding row in a free slot, unused sequences)."""
    try:
        # (slot, image group, prefix length, row length) in step order; slot 0 is free padding
        rows = [
            (1, "a", 100, 150),
            (2, "a", 100, 400),
            (4, "a", 100, 101),
            (3, "b", 50, 60),
            (5, "c", 80, 510),
        ]
        rows.append((0, None, 0, 0))
        keys, values, query = random_check_data(device, dtype, kv_heads, head_dim, len(rows), groups, seed=2)
        length, scaling = keys.shape[1], head_dim**-0.5
        for slot in (2, 4):  # slots 1, 2 and 4 show one image: the same 100-token prefix
            keys[slot, :100], values[slot, :100] = keys[1, :100], values[1, :100]

        def int32(values):
            return torch.tensor(values, device=device, dtype=torch.int32)

        slots = [slot for slot, *_ in rows]
        plan = Plan(
            [keys],
            [values],
            int32(range(0, (len(rows) + 1) * groups, groups)),
            int32([slot * length for slot in slots + slots[-1:]]),
            int32([n + 1 for *_, n in rows]),
            length,
        )
        plain = decode_varlen(query, keys, values, plan, scaling)
        parts = layout([(slot, group, prefix) for slot, group, prefix, _ in rows], kv_heads, groups, length)
        plan.cascade = Cascade(*(int32(values) for values in parts))
        got = decode_varlen(query, keys, values, plan, scaling)
        error = (got[:-1].float() - plain[:-1].float()).abs().max().item()
        if error > 2e-2:
            log.warning(
                "cascade decode attention disagrees: each row reads all its keys", extra={"error": error}
            )
            return False
        return True
    except Exception as exc:  # noqa: BLE001 - rows then read all their keys, which works
        log.info("cascade decode attention unavailable", extra={"reason": repr(exc)[:200]})
        return False
