"""The image prefixes of a packed step in FlashAttention-2's variable-length kernel.

A packed step (:mod:`.packed`) lays its image prefixes (bos + image tokens) end to end at its
start, and an image token sees its whole prefix both ways. Those keys and values are the step's
own, computed in the same layer, so the prefixes need not read them back from their slots: one
call of FlashAttention-2 in variable-length mode over the step's first tokens, with each
prefix's bounds, computes every prefix's attention, the query heads that share a key head
natively (PyTorch ships the kernel for sm80 and newer GPUs). The slot reads through CUTLASS's
memory-efficient kernel (:func:`.slot_attention.varlen_attention`), which ran at about a third
of the H100's attention rate on image prefixes, stay for decode tokens, on the CPU, and
wherever this kernel is missing or disagrees (:func:`works`, checked once at start).

On by default (:data:`ON`): on two H100s the realistic job ran at 42.50 and 40.86 pairs/s with
it, 40.65 and 39.96 without it in the same runs (the packed steps' GPU time ~1.1 s shorter; the
engine's greedy answers still plain ``generate()``'s, bench/RESULTS.md). ``bench/throughput.py``
times it off too (the ``prefixes`` ablation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

#: whether slot decoders use it (where :func:`works`)
ON = True


@dataclass
class Prefixes:
    """A packed step's image prefixes: its first ``tokens`` tokens, prefix i being tokens
    ``bounds[i]`` to ``bounds[i + 1]``."""

    tokens: int
    bounds: torch.Tensor  # int32 [prefixes + 1]
    longest: int

    @classmethod
    def of(cls, counts: Sequence[int], device) -> Prefixes:
        bounds = [0]
        for count in counts:
            bounds.append(bounds[-1] + count)
        return cls(
            tokens=bounds[-1],
            bounds=torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True),
            longest=max(counts),
        )


def flash_varlen(query, key, value, bounds: torch.Tensor, longest: int, scaling) -> torch.Tensor:
    """FlashAttention-2's variable-length kernel, non-causal: sequence i is tokens ``bounds[i]``
    to ``bounds[i + 1]`` of the queries and of the keys (the tests put a reference in its place)."""
    return torch.ops.aten._flash_attention_forward(
        query, key, value, bounds, bounds, longest, longest, 0.0, False, False, scale=scaling
    )[0]


def attend(query, key, value, prefixes: Prefixes, scaling) -> torch.Tensor:
    """Each prefix token's attention over its whole prefix: ``query`` ``[tokens, heads, dim]``,
    ``key``/``value`` ``[tokens, kv_heads, dim]`` (the step's tokens; the prefixes' come first);
    returns ``[prefixes.tokens, heads, dim]``."""
    n = prefixes.tokens
    return flash_varlen(query[:n], key[:n], value[:n], prefixes.bounds, prefixes.longest, scaling)


def works(device: torch.device, dtype: torch.dtype, kv_heads: int, head_dim: int, groups: int) -> bool:
    """Whether :func:`attend` runs here and gives what SDPA gives, prefix by prefix (random data
    of the model's head geometry: prefixes of 5, 300 and 40 tokens)."""
    try:
        counts = [5, 300, 40]
        gen = torch.Generator(device=device).manual_seed(4)
        tokens, heads = sum(counts), kv_heads * groups

        def randn(*shape):
            return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

        query = randn(tokens, heads, head_dim)
        key, value = randn(tokens, kv_heads, head_dim), randn(tokens, kv_heads, head_dim)
        scaling = head_dim**-0.5
        got = attend(query, key, value, Prefixes.of(counts, device), scaling)
        error, start = 0.0, 0
        for count in counts:
            part = slice(start, start + count)
            q = query[part].transpose(0, 1)[None]
            k = key[part].transpose(0, 1)[None].repeat_interleave(groups, dim=1)
            v = value[part].transpose(0, 1)[None].repeat_interleave(groups, dim=1)
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)[0].transpose(0, 1)
            error = max(error, (got[part].float() - want.float()).abs().max().item())
            start += count
        if error > 2e-2:
            log.warning(
                "FlashAttention prefix attention disagrees: prefixes read their slots", extra={"error": error}
            )
            return False
        return True
    except Exception as exc:  # noqa: BLE001 - prefixes then read their slots, which works
        log.info("FlashAttention prefix attention unavailable", extra={"reason": repr(exc)[:200]})
        return False
