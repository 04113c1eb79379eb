"""Molmo2's rotary embedding as one Triton kernel (molmo_backend/engine/fused_rotary.py), run here
in Triton's interpreter (tests/conftest.py), in float32 and float16: bit-for-bit Hugging Face's
here; on the device the check at start allows one rounding step."""

from __future__ import annotations

import pytest
import torch
from transformers.models.molmo2 import modeling_molmo2

from molmo_backend.engine import fused_rotary
from tests.support.kernel_ptx import h100_ptx

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
    gen = torch.Generator().manual_seed(1)
    for batch, seq in ((5, 1), (1, 37)):
        q = torch.randn(batch, seq, heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
        k = torch.randn(batch, seq, kv_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
        angle = torch.rand(batch, seq, head_dim, generator=gen) * 50
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        got = fused_rotary.apply_rotary_pos_emb(q, k, cos, sin)
        want = modeling_molmo2.apply_rotary_pos_emb(q, k, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_rotation_the_wrong_way_is_caught(on_cpu, monkeypatch):
    """The check is not vacuous: sines of the wrong sign are far more than a rounding step off."""
    real = fused_rotary.apply_rotary_pos_emb

    def backwards(q, k, cos, sin, unsqueeze_dim=1):
        return real(q, k, cos, -sin, unsqueeze_dim)

    monkeypatch.setattr(fused_rotary, "apply_rotary_pos_emb", backwards)
    assert not fused_rotary.works(CPU, torch.float16, 8, 2, 16)


def test_one_rounding_step_is_allowed_and_two_are_not():
    want = torch.tensor([1.0, -0.5, 0.25], dtype=torch.bfloat16)
    step = torch.finfo(torch.bfloat16).eps
    assert fused_rotary.difference(want, want) == 0
    assert fused_rotary.difference(want + torch.tensor([step, 0, 0]).bfloat16(), want) == pytest.approx(1)
    assert fused_rotary.difference(want - torch.tensor([2 * step, 0, 0]).bfloat16(), want) > 1


def test_the_engine_installs_it_only_where_triton_kernels_are_on_and_checked():
    """On the CPU (no Triton kernels there) Hugging Face's function stays."""
    from molmo_backend.engine import attention_kernels

    original = modeling_molmo2.apply_rotary_pos_emb
    kernels = attention_kernels.checked(CPU, torch.float32, 2, 16, 4, triton=True)
    assert not kernels.rotary and modeling_molmo2.apply_rotary_pos_emb is original


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


def test_compiled_for_an_h100_each_product_is_rounded_before_the_sum():
    """With floating-point fusion on, the compiler made a product and the sum after it one fused
    multiply-add (one rounding where PyTorch rounds twice): what failed the bit-for-bit check on
    an H100. Compiled here for sm_90 without a GPU, as the kernel is launched."""
    ptx = h100_ptx()["rotary"]
    assert "mul.rn.bf16" in ptx and "fma" not in ptx


def test_packed_steps_run_the_kernel_where_it_is_installed(on_cpu, monkeypatch, demo_model_dir):
    """The packed prefill (its own layer loop, not Hugging Face's attention) rotates through the
    kernel once installed, and answers as with its written-out arithmetic."""
    from molmo_backend.engine.base import PointQuery
    from molmo_backend.engine.molmo2 import TransformersEngine
    from tests.engine.test_engine import MIXED

    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=4, max_batch=4)
    engine.processor.image_processor.max_crops = 2
    query = PointQuery(MIXED[2], "Point to the dog", image_key=0, answer_tokens=4)
    plain = engine.generate([query])[0]
    kernel, rotated = fused_rotary.apply_rotary_pos_emb, []

    def counting(q, k, cos, sin, unsqueeze_dim=1):
        rotated.append(q.shape[2])
        return kernel(q, k, cos, sin, unsqueeze_dim)

    monkeypatch.setattr(fused_rotary, "apply_rotary_pos_emb", counting)
    try:
        fused_rotary.install()
        assert fused_rotary.installed()
        fused = engine.generate([query])[0]
    finally:
        fused_rotary.uninstall()
    assert not fused_rotary.installed()
    layers = engine.model.config.text_config.num_hidden_layers
    assert max(rotated) > 1 and rotated.count(max(rotated)) == layers, "the packed step: every layer"
    assert fused.text == plain.text and fused.token_logprobs == pytest.approx(plain.token_logprobs, abs=1e-5)
