"""Molmo2's SiLU-and-multiply as one Triton kernel (molmo_backend/engine/fused_mlp.py), run here in
Triton's interpreter (tests/conftest.py). In float16: the interpreter rounds bfloat16 otherwise
than a GPU does, so bfloat16 is checked on the device at start (one rounding step allowed)."""

from __future__ import annotations

import pytest
import torch

from molmo_backend.engine import fused_mlp

CPU = torch.device("cpu")


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(fused_mlp, "ON_CPU", True)


def test_the_kernel_gives_pytorchs_silu_times_up(on_cpu):
    gen = torch.Generator().manual_seed(0)
    gate = (torch.randn(5, 3001, generator=gen) * 6).half()  # not a whole number of blocks
    up = torch.randn(5, 3001, generator=gen).half()
    got, want = fused_mlp.silu_mul(gate, up), torch.nn.functional.silu(gate) * up
    assert got.shape == want.shape and got.dtype == want.dtype
    step = torch.finfo(torch.half).eps * want.double().abs().clamp(min=torch.finfo(torch.half).tiny)
    steps = (got.double() - want.double()).abs() / step
    assert steps.max().item() <= 1 and (got == want).float().mean().item() > 0.999
    assert fused_mlp.works(CPU, torch.float16)


def test_a_wrong_activation_is_caught(on_cpu, monkeypatch):
    """Not vacuous: the product without the SiLU (the gate itself) fails the check."""
    monkeypatch.setattr(fused_mlp, "silu_mul", lambda gate, up: gate * up)
    assert not fused_mlp.works(CPU, torch.float16)


def test_other_layouts_go_to_pytorch(on_cpu):
    gate, up = torch.randn(4, 6).half().t(), torch.randn(6, 4).half()
    assert torch.equal(fused_mlp.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


def test_the_engine_fuses_only_when_asked_with_triton_kernels_on_and_checked(demo_model_dir, monkeypatch):
    """Off by default (not yet measured on a GPU). Asked for (``fused_mlp.ON``) with Triton
    kernels on, it fuses where the check passes; the demo model in float32 on the CPU fails it
    (no Triton kernels there), so Hugging Face's MLP stays. unfuse restores every MLP."""
    from molmo_backend.engine.molmo2 import TransformersEngine

    engine = TransformersEngine.load(str(demo_model_dir), max_batch=2, triton_kernels=True)
    assert not engine.fused_mlp and fused_mlp.unfuse(engine.model) == 0
    model, processor = engine.model, engine.processor

    def engine_with(triton_kernels):
        return TransformersEngine(
            model, processor, model_id="demo", revision="r", max_batch=2, triton_kernels=triton_kernels
        )

    monkeypatch.setattr(fused_mlp, "ON", True)
    assert not engine_with(True).fused_mlp, "the check fails on the CPU"
    monkeypatch.setattr(fused_mlp, "works", lambda device, dtype: True)
    assert not engine_with(False).fused_mlp and fused_mlp.unfuse(model) == 0
    assert engine_with(True).fused_mlp
    assert fused_mlp.unfuse(model) == model.config.text_config.num_hidden_layers


def test_a_fused_mlp_computes_what_hugging_faces_does(on_cpu, monkeypatch):
    from transformers import Molmo2TextConfig
    from transformers.models.molmo2.modeling_molmo2 import Molmo2MLP

    config = Molmo2TextConfig(hidden_size=32, intermediate_size=80, hidden_act="silu")
    mlp = Molmo2MLP(config).half()
    x = torch.randn(3, 7, 32).half()
    want = mlp(x)
    model = torch.nn.Sequential(mlp)
    monkeypatch.setattr(fused_mlp, "works", lambda device, dtype: dtype == torch.float16)
    assert fused_mlp.fuse(model) and "forward" in vars(mlp)
    assert torch.allclose(mlp(x), want, atol=1e-3, rtol=1e-2)
