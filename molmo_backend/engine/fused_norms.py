"""Molmo2's RMS norms as one kernel each.

Hugging Face's ``Molmo2RMSNorm`` runs seven elementwise kernels per call (cast to float32,
square, mean, add and rsqrt, multiply, cast back, multiply by the weight). Molmo2-8B has four
norms in each of its 36 layers (before attention, on the queries, on the keys, before the MLP),
so a decode step launches about a thousand of them on tensors of a few hundred kB, where each
costs its launch and not its bytes. torch's ``rms_norm`` does the same arithmetic in one kernel,
in float32 inside, rounding once at the end where Hugging Face rounds twice (before and after
the weight): outputs differ by at most one bf16 step.

:func:`fuse` swaps the forward of every such norm of one model instance, so the engine's steps
and plain ``generate()`` on the same model compute the same thing. :func:`unfuse` restores them
(the benchmark's side-by-side variant).
"""

from __future__ import annotations

import torch

from molmo_backend.engine import forwards

NORM_CLASS = "Molmo2RMSNorm"


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.dtype != self.weight.dtype:  # Hugging Face promotes; keep its arithmetic
        return type(self).forward(self, hidden_states)
    return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)


def fuse(model: torch.nn.Module) -> int:
    """Make every Molmo2 RMS norm of ``model`` one kernel; returns how many there are."""
    norms = forwards.of_class(model, NORM_CLASS)
    forwards.swap(norms, _fused_forward)
    return len(norms)


def unfuse(model: torch.nn.Module) -> int:
    """Undo :func:`fuse`; returns how many norms went back to Hugging Face's forward."""
    return forwards.restore(model, NORM_CLASS)
