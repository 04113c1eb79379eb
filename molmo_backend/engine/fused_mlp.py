"""Molmo2's MLP activation, SiLU of the gate times the up projection, as one Triton kernel.

Hugging Face's ``Molmo2MLP`` runs ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: a SiLU kernel
that writes its result, then a multiplication that reads it back with the up projection. At a
packed step's 8,192 tokens that is 1 GB of memory traffic a layer on Molmo2-8B (an intermediate
size of 12,288 in bf16); one kernel reads the two projections and writes the product, 0.6 GB,
and a decode step launches one kernel a layer instead of two. The arithmetic is PyTorch's: the
SiLU in float32 as ``x / (1 + exp(-x))`` (the accurate exponential and an IEEE division), rounded
to the input's type, then the product in float32, rounded again. :func:`works` checks the kernel
against PyTorch on the device once and allows one rounding step (:mod:`.kernel_check`), as
:mod:`.fused_norms` and :mod:`.fused_rotary` do.

:func:`fuse` swaps the forward of every MLP of one model instance, so the engine's steps and
plain ``generate()`` on that model compute the same thing; :func:`unfuse` restores them.

Off by default (:data:`ON`): on an H100 it added nothing on top of the FlashAttention-2 image
prefixes (the realistic job 41.90 pairs/s with both, 42.50 with the prefixes alone, 2026-12-07,
bench/RESULTS.md). ``bench/throughput.py --try mlp`` runs it beside the default engine.
"""

from __future__ import annotations

import logging

import torch

from molmo_backend.engine import forwards, kernel_check

try:  # Triton comes with torch's CUDA wheels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - a torch build without Triton
    triton = None

log = logging.getLogger(__name__)

MLP_CLASS = "Molmo2MLP"
#: values a program handles
BLOCK = 1024
#: run the kernel on CPU tensors too (tests, in Triton's interpreter)
ON_CPU = False
#: whether the engine fuses its model's MLPs (where :func:`works`); measured on an H100 at no gain
ON = False

if triton is not None:

    @triton.jit(do_not_specialize=["count"])
    def _silu_mul_kernel(Gate, Up, Out, count, BLOCK: tl.constexpr):
        at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = at < count
        gate = tl.load(Gate + at, mask=ok, other=0.0)
        up = tl.load(Up + at, mask=ok, other=0.0)
        x = gate.to(tl.float32)
        silu = tl.math.div_rn(x, 1.0 + tl.exp(-x)).to(gate.dtype)
        tl.store(Out + at, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with PyTorch's roundings, in one kernel (contiguous tensors of one
    shape and type; anything else goes to PyTorch)."""
    fits = (
        triton is not None
        and (gate.is_cuda or ON_CPU)
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.device == up.device
        and gate.is_contiguous()
        and up.is_contiguous()
    )
    if not fits:
        return torch.nn.functional.silu(gate) * up
    out = torch.empty_like(gate)
    count = gate.numel()
    if count:
        _silu_mul_kernel[(triton.cdiv(count, BLOCK),)](gate, up, out, count, BLOCK=BLOCK)
    return out


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel gives PyTorch's ``silu(gate) * up`` on ``device`` within one rounding
    step (random values over the SiLU's whole useful range, a count that is not a whole block)."""
    if triton is None or (device.type != "cuda" and not ON_CPU):
        return False

    def measure() -> float:
        gen = torch.Generator(device=device).manual_seed(5)
        gate = (torch.randn(3, 5000, device=device, generator=gen) * 6).to(dtype)
        up = torch.randn(3, 5000, device=device, generator=gen).to(dtype)
        got, want = silu_mul(gate, up), torch.nn.functional.silu(gate) * up
        step = torch.finfo(dtype).eps * want.abs().clamp(min=torch.finfo(dtype).tiny)
        return ((got.double() - want.double()).abs() / step.double()).max().item()

    return kernel_check.within_one_step(log, "fused SiLU-and-multiply", "PyTorch's", measure)


def fuse(model: torch.nn.Module) -> bool:
    """Give every Molmo2 MLP of ``model`` the one-kernel activation if :func:`works` on the
    model's device and type; returns whether it did."""
    mlps = [mlp for mlp in forwards.of_class(model, MLP_CLASS) if mlp.config.hidden_act == "silu"]
    parameter = next(model.parameters())
    if not mlps or not works(parameter.device, parameter.dtype):
        return False
    forwards.swap(mlps, _fused_forward)
    return True


def unfuse(model: torch.nn.Module) -> int:
    """Undo :func:`fuse`; returns how many MLPs went back to Hugging Face's forward."""
    return forwards.restore(model, MLP_CLASS)
