"""Molmo2's rotary position embedding as one Triton kernel, with Hugging Face's roundings.

Hugging Face's ``apply_rotary_pos_emb`` runs about ten kernels a layer (two half-slices, a
negation and a concatenation for each of the queries and keys, four multiplications, two
additions). In a decode step that is 360 launches on tensors of a few hundred kB, each costing
its launch and not its bytes (H100: 0.082 ms a layer at 128 rows, 0.64 ms at 8,192 tokens,
bench/kernel-variants-h100.json). Here one program per token rotates all its query and key heads.
Each product is rounded to the input's type before the sum, as PyTorch rounds each operation,
so the outputs are bit-for-bit Hugging Face's. That needs floating-point fusion off: with it, the
compiler made the second product and the sum one ``fma.rn.bf16`` (one rounding where PyTorch
rounds twice), and an H100 run of this kernel failed a bit-for-bit check; with fusion off the
H100's check found it bit for bit (bench/RESULTS.md). The check at start (:mod:`.kernel_check`) allows one
rounding step of the input's type, as :mod:`.fused_norms` does; the engine's steps and plain
``generate()`` run the same function, so their answers stay equal either way.

:func:`install` swaps the function in transformers' Molmo2 module for every model in the
process (the engine's steps and plain ``generate()`` alike); :func:`uninstall` restores it.
Tensors off CUDA, mixed types or another layout go to Hugging Face's function.
"""

from __future__ import annotations

import logging

import torch

from molmo_backend.engine import kernel_check

try:  # Triton comes with torch's CUDA wheels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - a torch build without Triton
    triton = None

log = logging.getLogger(__name__)

_ORIGINAL = None
#: the kernel's compile options: a product and the sum after it fused would round once, not twice
LAUNCH = {"enable_fp_fusion": False}
#: run the kernel on CPU tensors too (tests, in Triton's interpreter)
ON_CPU = False


if triton is not None:

    @triton.jit(do_not_specialize=["seq"])  # 1 in a decode step, thousands in a packed one
    def _rotary_kernel(
        Q, K, Cos, Sin, QOut, KOut,
        seq, heads_q, heads_k,
        sqb, sqh, sqs, skb, skh, sks, scb, scs, sob, soh, sos, spb, sph, sps,
        HALF: tl.constexpr, HEADS: tl.constexpr, HALF_PAD: tl.constexpr,
    ):  # fmt: skip
        """One token (batch b, position s): ``x cos + rotate_half(x) sin`` for its heads."""
        token = tl.program_id(0)
        b, s = token // seq, token % seq
        d = tl.arange(0, HALF_PAD)
        d_ok = d < HALF
        h = tl.arange(0, HEADS)[:, None]
        at = b * scb + s * scs + d[None, :]
        cos1 = tl.load(Cos + at, mask=d_ok[None, :]).to(tl.float32)
        cos2 = tl.load(Cos + at + HALF, mask=d_ok[None, :]).to(tl.float32)
        sin1 = tl.load(Sin + at, mask=d_ok[None, :]).to(tl.float32)
        sin2 = tl.load(Sin + at + HALF, mask=d_ok[None, :]).to(tl.float32)
        for which in tl.static_range(2):
            if which == 0:
                X, Out, heads = Q, QOut, heads_q
                xb, xh, xs, ob, oh, os = sqb, sqh, sqs, sob, soh, sos
            else:
                X, Out, heads = K, KOut, heads_k
                xb, xh, xs, ob, oh, os = skb, skh, sks, spb, sph, sps
            ok = (h < heads) & d_ok[None, :]
            x_at = X + b * xb + h * xh + s * xs + d[None, :]
            x1 = tl.load(x_at, mask=ok, other=0.0)
            x2 = tl.load(x_at + HALF, mask=ok, other=0.0)
            kind = x1.dtype
            # rotate_half(x) = (-x2, x1); every product rounded to x's type, then the sum
            low = (x1.to(tl.float32) * cos1).to(kind).to(tl.float32) + (-x2.to(tl.float32) * sin1).to(
                kind
            ).to(tl.float32)
            high = (x2.to(tl.float32) * cos2).to(kind).to(tl.float32) + (x1.to(tl.float32) * sin2).to(
                kind
            ).to(tl.float32)
            out_at = Out + b * ob + h * oh + s * os + d[None, :]
            tl.store(out_at, low.to(kind), mask=ok)
            tl.store(out_at + HALF, high.to(kind), mask=ok)


def _fits(q, k, cos, sin, unsqueeze_dim) -> bool:
    tensors = (q, k, cos, sin)
    return (
        triton is not None
        and unsqueeze_dim == 1
        and (q.is_cuda or ON_CPU)
        and len({t.dtype for t in tensors}) == 1
        and len({t.device for t in tensors}) == 1
        and q.dim() == k.dim() == 4
        and cos.dim() == sin.dim() == 3
        and q.shape[-1] % 2 == 0
        and q.shape[0] == k.shape[0] == cos.shape[0] == sin.shape[0]
        and q.shape[2] == k.shape[2] == cos.shape[1] == sin.shape[1]
        and cos.shape[2] == sin.shape[2] == q.shape[-1] == k.shape[-1]
        and all(t.stride(-1) == 1 for t in tensors)
        and cos.stride() == sin.stride()
    )


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Hugging Face's signature and results: ``q``, ``k`` ``[batch, heads, seq, dim]`` (any
    strides), ``cos``, ``sin`` ``[batch, seq, dim]``."""
    if not _fits(q, k, cos, sin, unsqueeze_dim):
        return _ORIGINAL(q, k, cos, sin, unsqueeze_dim)
    batch, heads_q, seq, dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if batch * seq == 0:
        return q_out, k_out
    half = dim // 2
    _rotary_kernel[(batch * seq,)](
        q, k, cos, sin, q_out, k_out,
        seq, heads_q, k.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), cos.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        HALF=half, HEADS=triton.next_power_of_2(max(heads_q, k.shape[1])), HALF_PAD=triton.next_power_of_2(half),
        **LAUNCH,
    )  # fmt: skip
    return q_out, k_out


def _module():
    from transformers.models.molmo2 import modeling_molmo2

    return modeling_molmo2


def difference(got, want) -> float:
    """The largest difference, in rounding steps of the type at the largest magnitude."""
    step = torch.finfo(want.dtype).eps * want.abs().max().clamp(min=torch.finfo(want.dtype).tiny).item()
    return (got.double() - want.double()).abs().max().item() / step


def works(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel gives Hugging Face's results on ``device`` within one rounding step (a
    decode step's and a packed step's shapes, queries and keys as transposed views, as Molmo2's
    attention has them)."""
    if triton is None or (device.type != "cuda" and not ON_CPU):
        return False

    def measure() -> float:
        original = _ORIGINAL or _module().apply_rotary_pos_emb
        gen = torch.Generator(device=device).manual_seed(4)
        error = 0.0
        for batch, seq in ((5, 1), (1, 37)):
            q = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, generator=gen).transpose(
                1, 2
            )
            k = torch.randn(
                batch, seq, kv_heads, head_dim, device=device, dtype=dtype, generator=gen
            ).transpose(1, 2)
            angle = torch.rand(batch, seq, head_dim, device=device, generator=gen) * 50
            cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
            got, want = apply_rotary_pos_emb(q, k, cos, sin), original(q, k, cos, sin)
            error = max(error, *(difference(a, b) for a, b in zip(got, want)))
        return error

    return kernel_check.within_one_step(log, "fused rotary embedding", "Hugging Face's", measure)


def install() -> None:
    """Put :func:`apply_rotary_pos_emb` in place of Hugging Face's (once per process)."""
    global _ORIGINAL
    module = _module()
    if _ORIGINAL is None:
        _ORIGINAL = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = apply_rotary_pos_emb


def installed() -> bool:
    """Whether :func:`install` put the kernel in place (and :func:`uninstall` has not undone it)."""
    return _ORIGINAL is not None and _module().apply_rotary_pos_emb is apply_rotary_pos_emb


def uninstall() -> None:
    """Hugging Face's function back (the benchmark's side-by-side variant)."""
    if _ORIGINAL is not None:
        _module().apply_rotary_pos_emb = _ORIGINAL
