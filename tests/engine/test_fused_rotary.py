"""Molmo2's rotary embedding as one Triton kernel (molmo_backend/engine/fused_rotary.py), run here
in Triton's interpreter (tests/conftest.py), in float32 and float16: bit-for-bit Hugging Face's."""

from __future__ import annotations

import pytest
import torch
from transformers.models.molmo2 import modeling_molmo2

from molmo_backend.engine import fused_rotary

CPU = torch.device("cpu")


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(fused_rotary, "ON_CPU", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 16), (6, 3, 24)])
def test_the_kernel_gives_hugging_faces_bits(on_cpu, dtype, heads, kv_heads, head_dim):
    """A decode step's shape (5 rows, 1 token) and a packed step's (1 row, 37 tokens), queries
    and keys as transposed views, a half head size that is no power of two."""
    assert fused_rotary.works(CPU, dtype, heads, kv_heads, head_dim)


def test_a_rounding_hugging_face_does_not_do_is_caught(on_cpu, monkeypatch):
    """The check is exact: the same arithmetic without rounding each product differs in float16."""

    def unrounded(q, k, cos, sin, unsqueeze_dim=1):
        def rotate(x):
            x32, c, s = x.float(), cos.float()[:, None], sin.float()[:, None]
            turned = torch.cat((-x32[..., x.shape[-1] // 2 :], x32[..., : x.shape[-1] // 2]), -1)
            return (x32 * c + turned * s).to(x.dtype)

        return rotate(q), rotate(k)

    monkeypatch.setattr(fused_rotary, "apply_rotary_pos_emb", unrounded)
    assert not fused_rotary.works(CPU, torch.float16, 8, 2, 16)


def test_install_swaps_the_models_function_and_uninstall_restores_it(on_cpu):
    original = modeling_molmo2.apply_rotary_pos_emb
    try:
        fused_rotary.install()
        assert modeling_molmo2.apply_rotary_pos_emb is fused_rotary.apply_rotary_pos_emb
        q, k = torch.randn(2, 3, 4, 8).transpose(1, 2), torch.randn(2, 3, 1, 8).transpose(1, 2)
        cos, sin = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
        got = modeling_molmo2.apply_rotary_pos_emb(q, k, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(got, original(q, k, cos, sin)))
        mixed = modeling_molmo2.apply_rotary_pos_emb(q, k, cos.double(), sin.double())
        assert mixed[0].dtype == torch.float64, (
            "mixed types go to Hugging Face's function, its promotion kept"
        )
    finally:
        fused_rotary.uninstall()
    assert modeling_molmo2.apply_rotary_pos_emb is original
