"""Two-pass prompt-suffix attention (molmo_backend/engine/suffix_attention.py) on the CPU.

The CUDA kernel of pass 1 is not on this machine: test_cascade's reference kernel stands in for it
with the same contract (log-sum-exps included), patched into :mod:`.slot_attention` only, where
the module looks it up at call time. On the GPU :func:`suffix_attention.works` runs the same
comparison against the real kernel."""

from __future__ import annotations

import pytest
import torch

from molmo_backend.engine import slot_attention, suffix_attention
from tests.engine.test_cascade import reference_kernel

CPU = torch.device("cpu")


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setattr(slot_attention, "efficient_attention", reference_kernel)


def _cache(slots, length, kv, dim, images, seed):
    """Random keys/values ``[slots, length, kv, dim]`` in which every slot of an image holds the
    same prefix: ``images`` maps a prefix length to the slots that show it."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(slots, length, kv, dim, generator=gen)
    values = torch.randn(slots, length, kv, dim, generator=gen)
    for prefix, shown in images:
        keys[shown, :prefix], values[shown, :prefix] = keys[shown[0], :prefix], values[shown[0], :prefix]
    return keys, values, gen


@pytest.mark.parametrize("sequence_tokens", [128, 8, 1])
def test_two_passes_give_what_reading_each_whole_slot_gives(reference, monkeypatch, sequence_tokens):
    """Four images, 1-3 rows each, suffixes of 1-17 tokens, each image's prefix read in one of its
    slots (not always the first row's), one image's rows not adjacent: the merged output equals
    SDPA over each row's gathered slot with the causal mask the engine uses today. A cap of 8 or
    1 token splits runs (and rows) over several pass-1 sequences."""
    monkeypatch.setattr(suffix_attention, "SEQUENCE_TOKENS", sequence_tokens)
    kv, groups, dim, length = 2, 4, 16, 64
    images = {"a": (20, [1, 2, 4]), "b": (35, [3]), "c": (10, [5, 6, 0]), "d": (40, [7])}
    keys, values, gen = _cache(8, length, kv, dim, images.values(), seed=0)
    read_in = {"a": 2, "b": 3, "c": 6, "d": 7}  # the slot whose copy of the prefix pass 1 reads
    # (image, slot, suffix tokens) in token order; a's slot 4 row comes after b's
    suffixes = [("a", 1, 5), ("a", 2, 9), ("b", 3, 1), ("a", 4, 3), ("c", 5, 12), ("c", 6, 7)]
    suffixes += [("c", 0, 2), ("d", 7, 17)]
    rows, dense, start = [], [], 0
    for image, slot, count in suffixes:
        prefix = images[image][0]
        rows.append((start, count, read_in[image] * length, prefix, slot * length + prefix))
        dense.append((start, count, slot, prefix))
        start += count
    query = torch.randn(start, kv * groups, dim, generator=gen)
    flat = keys.view(-1, kv, dim), values.view(-1, kv, dim)

    got = suffix_attention.attend(query, *flat, suffix_attention.layout(rows, kv, groups, CPU), 0.3)
    want = slot_attention.dense_attention(query, *flat, slot_attention.Dense.causal(dense, length, CPU), 0.3)
    assert got.shape == query.shape and got.dtype == query.dtype
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("sequence_tokens", [128, 4])
def test_the_device_check_passes_with_a_kernel_that_keeps_its_contract(
    reference, monkeypatch, sequence_tokens
):
    monkeypatch.setattr(suffix_attention, "SEQUENCE_TOKENS", sequence_tokens)
    assert suffix_attention.works(CPU, torch.float32, kv_heads=2, head_dim=16, groups=4)


def _broken(monkeypatch, breaking):
    real = suffix_attention.layout

    def broken(*args):
        result = real(*args)
        breaking(result)
        return result

    monkeypatch.setattr(suffix_attention, "layout", broken)


def test_the_device_check_catches_a_wrong_log_sum_exp_place(reference, monkeypatch):
    """Not vacuous: each folded row reading its neighbour's pass-1 log-sum-exp fails it."""

    def shift(result):
        result.lse_at = result.lse_at.roll(1)

    _broken(monkeypatch, shift)
    assert not suffix_attention.works(CPU, torch.float32, kv_heads=2, head_dim=16, groups=4)


def test_the_device_check_catches_a_suffix_token_seeing_later_ones(reference, monkeypatch):
    def see_all(result):
        result.visible = result.visible[:, -1:].expand_as(result.visible)

    _broken(monkeypatch, see_all)
    assert not suffix_attention.works(CPU, torch.float32, kv_heads=2, head_dim=16, groups=4)


def test_the_device_check_fails_rather_than_raises_without_the_kernel():
    """CUDA's kernel on CPU tensors raises: the check says no, and the engine keeps dense attention."""
    assert not suffix_attention.works(CPU, torch.float32, kv_heads=2, head_dim=16, groups=4)


def test_layout_of_a_small_step():
    """kv 3, groups 2. Rows: image at 100 (3 tokens, 2 tokens), image at 500 (4), image at 100
    again (1, not adjacent: a sequence of its own)."""
    rows = [(0, 3, 100, 10, 210), (3, 2, 100, 10, 310), (5, 4, 500, 7, 507), (9, 1, 100, 10, 610)]
    lay = suffix_attention.layout(rows, kv_heads=3, groups=2, device=CPU)
    assert lay.seqstart_q.tolist() == [0, 10, 18, 20]  # folded rows: tokens x 2
    assert lay.seqstart_k.tolist() == [100, 500, 100, 0]
    assert lay.seqlen_k.tolist() == [10, 7, 10]
    assert (lay.max_q, lay.max_k, lay.lse_width) == (10, 10, 32)
    # sequence s, folded row f: s x kv x width + (f - seqstart_q[s]), kv head 0
    assert lay.lse_at.tolist() == list(range(10)) + list(range(96, 104)) + [192, 193]
    assert lay.query_at.tolist() == [[0, 1, 2, 2], [3, 4, 4, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    assert lay.key_at.tolist() == [
        [210, 211, 212, 212],
        [310, 311, 311, 311],
        [507, 508, 509, 510],
        [610, 610, 610, 610],
    ]
    assert lay.pick.tolist() == [0, 1, 2, 4, 5, 8, 9, 10, 11, 12]
    assert lay.visible[1].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert lay.visible[2].int().tolist() == torch.ones(4, 4).tril().int().tolist()


def test_layout_splits_a_long_run_at_the_token_cap(monkeypatch):
    """Two rows of one image, 6 tokens, at most 4 a sequence: tokens 0-3 and 4-5, the split
    inside the second row; both sequences read the same prefix."""
    monkeypatch.setattr(suffix_attention, "SEQUENCE_TOKENS", 4)
    rows = [(0, 3, 100, 10, 210), (3, 3, 100, 10, 310)]
    lay = suffix_attention.layout(rows, kv_heads=3, groups=2, device=CPU)
    assert lay.seqstart_q.tolist() == [0, 8, 12]
    assert lay.seqstart_k.tolist() == [100, 100, 0]
    assert lay.seqlen_k.tolist() == [10, 10]
    assert (lay.max_q, lay.lse_width) == (8, 32)
    assert lay.lse_at.tolist() == list(range(8)) + [96, 97, 98, 99]
