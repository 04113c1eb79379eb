"""Image prefixes attending among themselves (molmo_backend/engine/prefix_attention.py) on the CPU.

FlashAttention-2's kernel is not on this machine: a float64 reference with its contract (sequence
i is tokens ``bounds[i]`` to ``bounds[i + 1]``, non-causal, grouped-query heads) stands in for it,
and test_cascade's reference for CUTLASS's, so a packed step runs both ways here. On the GPU
:func:`prefix_attention.works` compares the real kernel with SDPA at start."""

from __future__ import annotations

import pytest
import torch

from molmo_backend.engine import prefix_attention, slot_attention
from molmo_backend.engine.base import PointQuery, Row
from molmo_backend.engine.molmo2 import TransformersEngine
from molmo_backend.engine.packed import PlanBuilder
from tests.engine.test_cascade import reference_kernel
from tests.engine.test_engine import MIXED

CPU = torch.device("cpu")


def reference_flash(query, key, value, bounds, longest, scaling):
    out = torch.full_like(query, float("nan"))
    groups = query.shape[1] // key.shape[1]
    for first, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        assert 0 < end - first <= longest
        k = key[first:end].double().repeat_interleave(groups, dim=1)
        v = value[first:end].double().repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[first:end].double(), k) * scaling
        out[first:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(query.dtype)
    return out


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setattr(prefix_attention, "flash_varlen", reference_flash)
    monkeypatch.setattr(slot_attention, "efficient_attention", reference_kernel)


def test_the_device_check_passes_with_a_kernel_that_keeps_its_contract(reference):
    assert prefix_attention.works(CPU, torch.float32, kv_heads=2, head_dim=16, groups=4)


def test_the_device_check_catches_prefixes_seeing_each_other(monkeypatch):
    """Not vacuous: a kernel that runs every prefix as one sequence fails it."""

    def one_sequence(query, key, value, bounds, longest, scaling):
        whole = torch.tensor([0, query.shape[0]], dtype=bounds.dtype)
        return reference_flash(query, key, value, whole, query.shape[0], scaling)

    monkeypatch.setattr(prefix_attention, "flash_varlen", one_sequence)
    assert not prefix_attention.works(CPU, torch.float32, kv_heads=2, head_dim=16, groups=4)


def test_the_device_check_fails_rather_than_raises_without_the_kernel():
    """FlashAttention's kernel on CPU tensors raises: the check says no, and prefixes read slots."""
    assert not prefix_attention.works(CPU, torch.float32, kv_heads=2, head_dim=16, groups=4)


def test_a_plan_with_flash_prefixes_leaves_only_the_decode_tokens_to_read_slots():
    plan = PlanBuilder(stride=100, image_token_id=7)
    plan.add_prefix([1, 7, 7, 9], slots=[3, 5])
    plan.add_prefix([1, 7, 9], slots=[6])
    plan.add_decode(slot=2, length=40)
    plan.add_decode(slot=4, length=10)
    plan.add_suffix([20, 21], slot=3, first_position=4)
    built = plan.build(CPU, last_token=torch.arange(10), kv_groups=2, flash_prefixes=True)
    assert built.prefixes.tokens == 7 and built.prefixes.bounds.tolist() == [0, 4, 7]
    assert built.prefixes.longest == 4
    # the two decode tokens (tokens 7 and 8) read their slots, counted from token 7
    assert built.full_start == 7 and built.full.tokens == 2
    assert built.full.seqstart_q.tolist() == [0, 2, 4] and built.full.seqlen_k.tolist() == [41, 11]
    assert built.full.seqstart_k.tolist()[:2] == [200, 400]
    plain = plan.build(CPU, last_token=torch.arange(10), kv_groups=2)
    assert plain.prefixes is None and plain.full_start == 0 and plain.full.tokens == 9


def test_answers_are_the_same_whether_prefixes_attend_among_themselves_or_read_their_slots(
    reference, demo_model_dir, monkeypatch
):
    """Two rows prefilled and decoding, then a packed step where three rows of two images join
    while those two take their next token (decode tokens read their slots behind the prefixes),
    then decode steps to the end; both ways: the same tokens and nearly the same
    log-probabilities (float32; the kernels sum in another order)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if slot_attention._SDPA is None:  # decode steps' reads go through the references too
        monkeypatch.setattr(slot_attention, "_SDPA", ALL_ATTENTION_FUNCTIONS["sdpa"])
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", slot_attention.decode_attention)
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=10, max_batch=8)
    engine.processor.image_processor.max_crops = 4
    engine.decoder.varlen = True  # the CUDA path's reads, through the references
    shown = [0, 1, 2, 2, 0]
    prompts = ["Point to cat", "Point to a", "Point to every window", "x", "Point to the dog"]
    queries = [
        PointQuery(MIXED[image], prompt, image_key=image, answer_tokens=10)
        for image, prompt in zip(shown, prompts)
    ]
    answers, built = {}, []
    real_build = PlanBuilder.build

    def recording_build(self, *args, **kwargs):
        built.append(plan := real_build(self, *args, **kwargs))
        return plan

    monkeypatch.setattr(PlanBuilder, "build", recording_build)
    for flash in (False, True):
        engine.decoder.prefix_flash = flash
        first, later = [Row(q, False) for q in queries[:2]], [Row(q, False) for q in queries[2:]]
        engine.prefill(first)
        engine.decode(first)
        engine.step(later, first)
        running = first + later
        while not all(row.finished for row in running):
            engine.decode([row for row in running if not row.finished])
        answers[flash] = [engine.answer(row) for row in running]
        engine.release(running)
    # the ride-along step with flash prefixes: two prefixes, then the two decode tokens
    assert built[-1].prefixes is not None and built[-1].prefixes.bounds.shape == (3,)
    assert built[-1].full.tokens == 2 and built[-1].full_start == built[-1].prefixes.tokens
    for slots, flash in zip(answers[False], answers[True]):
        assert slots.text == flash.text and slots.tokens == flash.tokens
        assert slots.token_logprobs == pytest.approx(flash.token_logprobs, abs=1e-4)


def test_slot_decoders_use_it_when_on_and_checked(monkeypatch):
    """On by default (``prefix_attention.ON``, measured on an H100), and only where its check at
    start passes; off when turned off."""
    from molmo_backend.engine import attention_kernels

    monkeypatch.setattr(slot_attention, "available", lambda *args: True)  # as on CUDA
    monkeypatch.setattr(slot_attention, "install", lambda: None)
    monkeypatch.setattr(prefix_attention, "works", lambda *args: True)
    geometry = (CPU, torch.float32, 2, 16, 4)
    assert attention_kernels.checked(*geometry).prefix_flash
    monkeypatch.setattr(prefix_attention, "works", lambda *args: False)
    assert not attention_kernels.checked(*geometry).prefix_flash
    monkeypatch.setattr(prefix_attention, "works", lambda *args: True)
    monkeypatch.setattr(prefix_attention, "ON", False)
    assert not attention_kernels.checked(*geometry).prefix_flash
