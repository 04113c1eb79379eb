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
"""

from __future__ import annotations

import contextlib
import contextvars
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


@contextlib.contextmanager
def planned(plan: Plan):
    token = _PLAN.set(plan)
    try:
        yield
    finally:
        _PLAN.reset(token)


def varlen_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: Plan, scaling: float | None
) -> torch.Tensor:
    """One query token per row ``[rows, heads, 1, dim]`` against each row's own keys; returns
    ``[rows, 1, heads, dim]`` (the layout transformers' attention functions return)."""
    rows, heads, _, dim = query.shape
    kv = keys.shape[2]
    groups = heads // kv
    q = query.reshape(rows, kv, groups, dim).transpose(1, 2).reshape(1, rows * groups, kv, dim)
    flat_k = keys.view(1, -1, kv, dim)
    flat_v = values.view(1, -1, kv, dim)
    out = torch.ops.aten._efficient_attention_forward(
        q,
        flat_k,
        flat_v,
        None,
        plan.seqstart_q,
        plan.seqstart_k,
        groups,
        plan.max_keys,
        0.0,
        0,
        False,
        scale=scaling,
        seqlen_k=plan.seqlen_k,
    )[0]
    return out.reshape(rows, groups, kv, dim).transpose(1, 2).reshape(rows, 1, heads, dim)


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    plan = _PLAN.get()
    if plan is None or query.shape[2] != 1:
        return _SDPA(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    return varlen_attention(query, plan.keys[layer], plan.values[layer], plan, scaling), None


def install() -> None:
    """Put :func:`decode_attention` in front of transformers' ``sdpa`` (once per process)."""
    global _SDPA
    if _SDPA is not None:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = decode_attention


def available(device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int, groups: int) -> bool:
    """Whether the variable-length kernel runs here and agrees with masked SDPA (checked on
    random data of the model's head geometry)."""
    if device.type != "cuda":
        return False
    try:
        slots, length, rows = 6, 512, 4
        gen = torch.Generator(device=device).manual_seed(0)
        keys = torch.randn(slots, length, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
        values = torch.randn(slots, length, kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
        query = torch.randn(rows, kv_heads * groups, 1, head_dim, device=device, dtype=dtype, generator=gen)
        first = 1
        lengths = torch.tensor([3, 511, 200, 64], device=device, dtype=torch.int32)
        plan = Plan(
            [keys],
            [values],
            torch.arange(rows + 1, device=device, dtype=torch.int32) * groups,
            (first + torch.arange(rows + 1, device=device, dtype=torch.int32)) * length,
            lengths,
            length,
        )
        got = varlen_attention(query, keys, values, plan, head_dim**-0.5)
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
        return True
    except Exception as exc:  # noqa: BLE001 - a missing or failing kernel: the masked path works
        log.info(
            "variable-length decode attention unavailable: using SDPA", extra={"reason": repr(exc)[:200]}
        )
        return False
