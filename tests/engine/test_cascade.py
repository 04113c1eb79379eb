"""Cascade decode attention (molmo_backend/engine/cascade.py) on the CPU.

The CUDA kernel is not on this machine, so a dense reference stands in for it with the same
variable-length contract (sequences by start and length, query heads folded into rows, log-sum-
exps laid out ``[sequences, kv heads, query rows rounded up to 32]``). On the GPU the engine runs
the same check (:func:`cascade.works`) against the real kernel before it uses the cascade."""

from __future__ import annotations

import pytest
import torch

from molmo_backend.engine import cascade, slot_attention, suffix_attention


def reference_kernel(
    q, flat_keys, flat_values, seqstart_q, seqstart_k, seqlen_k, max_q, max_k, scaling, lse=False
):
    out = torch.full_like(q, float("nan"))
    sequences, kv = seqlen_k.shape[0], q.shape[2]
    sums = torch.full((sequences, kv, -(-max_q // 32) * 32), float("nan"))
    for s in range(sequences):
        first, end = int(seqstart_q[s]), int(seqstart_q[s + 1])
        start, count = int(seqstart_k[s]), int(seqlen_k[s])
        if end <= first:
            continue
        assert end - first <= max_q and 0 < count <= max_k
        k, v = flat_keys[start : start + count].double(), flat_values[start : start + count].double()
        scores = torch.einsum("qhd,khd->hqk", q[0, first:end].double(), k) * scaling
        out[0, first:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
        sums[s, :, : end - first] = torch.logsumexp(scores, -1).float()
    return (out, sums) if lse else out


@pytest.fixture
def reference(monkeypatch):
    monkeypatch.setattr(cascade, "efficient_attention", reference_kernel)
    monkeypatch.setattr(slot_attention, "efficient_attention", reference_kernel)


@pytest.mark.parametrize("rows_per_sequence", [16, 2])
def test_rows_reading_their_shared_prefix_once_get_what_reading_all_their_keys_gives(
    reference, monkeypatch, rows_per_sequence
):
    """Three rows of one image (split over two sequences when a sequence holds 2), two rows
    alone, a padding row: the cascade's merged output equals each row reading all its keys."""
    monkeypatch.setattr(cascade, "CASCADE_ROWS", rows_per_sequence)
    assert cascade.works(torch.device("cpu"), torch.float32, kv_heads=2, head_dim=16, groups=4)


def test_a_wrong_log_sum_exp_place_is_caught(reference, monkeypatch):
    """The check is not vacuous: reading another row's log-sum-exp fails it."""
    real = cascade.layout

    def shifted(*args):
        starts_q, starts_k, lengths, prefix, lse_at = real(*args)
        return starts_q, starts_k, lengths, prefix, lse_at[1:] + lse_at[:1]

    monkeypatch.setattr(cascade, "layout", shifted)
    assert not cascade.works(torch.device("cpu"), torch.float32, kv_heads=2, head_dim=16, groups=4)


def test_layout_keeps_an_images_rows_in_one_sequence_up_to_the_cap():
    groups, kv, length = 4, 8, 100
    rows = [(10 + i, "a", 30) for i in range(cascade.CASCADE_ROWS + 2)] + [(5, "b", 20), (0, None, 0)]
    starts_q, starts_k, lengths, prefix, lse_at = cascade.layout(rows, kv, groups, length)
    n = len(rows)
    assert len(starts_q) == len(starts_k) == n + 1 and len(lengths) == len(prefix) == n
    # sequences: the first 16 rows of "a", its last 2, "b", the padding row; then unused ones
    cap = cascade.CASCADE_ROWS
    assert starts_q[:5] == [0, cap * groups, (cap + 2) * groups, (cap + 3) * groups, n * groups]
    assert starts_q[4:] == [n * groups] * (n + 1 - 4)
    assert starts_k[:4] == [10 * length, (10 + cap) * length, 5 * length, 0]
    assert lengths[:4] == [30, 30, 20, 1] and set(lengths[4:]) == {1}
    assert prefix == [30] * (cap + 2) + [20, 0]
    width = 64  # 16 rows x 4 heads, rounded up to 32
    assert lse_at[: groups + 1] == [0, 1, 2, 3, 4]  # row 0 of sequence 0, then row 1
    assert lse_at[cap * groups] == 1 * kv * width  # the 17th row opens sequence 1
    assert len(lse_at) == n * groups


def test_merging_two_partial_softmaxes_gives_the_whole():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 3, 40, generator=gen, dtype=torch.float64) * 4
    values = torch.randn(5, 3, 40, 8, generator=gen, dtype=torch.float64)

    def part(keys):
        s = scores[..., keys]
        return torch.einsum("nhk,nhkd->nhd", s.softmax(-1), values[:, :, keys]), torch.logsumexp(s, -1)

    whole, _ = part(slice(0, 40))
    merged = cascade.merge_partials(*part(slice(0, 33)), *part(slice(33, 40)))
    assert torch.allclose(merged.double(), whole, atol=1e-5)


def test_the_engine_on_the_kernel_path_with_cascade_answers_as_on_the_cpu_path(
    demo_model_dir, reference, monkeypatch
):
    """The GPU's attention path (each row's keys read in place, image prefixes read once by the
    decode steps and by the prompt suffixes, padding rows) run on the CPU through the reference
    kernel gives the CPU path's answers
    (which equal ``generate()``'s, tests/engine/test_engine.py): labels sharing images, images of
    different sizes, rows ending at different steps."""
    from PIL import Image

    from molmo_backend.engine.base import PointQuery
    from molmo_backend.engine.molmo2 import TransformersEngine

    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=8)
    decoder = engine.decoder
    images = [
        Image.new("RGB", (640, 480), (200, 30, 30)),
        Image.effect_noise((500, 500), 60).convert("RGB"),
        Image.new("RGB", (300, 900), (10, 200, 10)),
    ]
    asks = [("Point to cat", 9), ("Point to a dog", 3), ("x", 12), ("Point to cat", 1), ("Point to y", 6)]
    queries = [
        PointQuery(images[i % 3], prompt, image_key=i % 3, answer_tokens=n)
        for i, (prompt, n) in enumerate(asks)
    ]
    cpu_path = engine.generate(queries)
    slot_attention.install()
    decoder.varlen = decoder.cascade = decoder.suffix_pass = True
    suffix_attends = []
    two_pass = suffix_attention.attend
    monkeypatch.setattr(
        suffix_attention,
        "attend",
        lambda *a: suffix_attends.append(a[3].seqstart_q.numel() - 1) or two_pass(*a),
    )
    steps = []
    load = decoder._load_step

    def recording_load(interactive, entries):
        steps.append([row.group for row, *_ in entries])
        return load(interactive, entries)

    decoder._load_step = recording_load
    monkeypatch.setattr(cascade, "MIN_ROWS", 1)  # this engine's steps are small
    attends = []
    attend = cascade.Cascade.attend
    monkeypatch.setattr(cascade.Cascade, "attend", lambda self, *a: attends.append(1) or attend(self, *a))
    try:
        kernel_path = engine.generate(queries)
    finally:
        decoder.varlen = decoder.cascade = decoder.suffix_pass = False
    assert [len(a.token_logprobs) for a in kernel_path] == [n for _, n in asks]
    assert [a.text for a in kernel_path] == [a.text for a in cpu_path]
    for a, b in zip(kernel_path, cpu_path):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    assert any(len(set(groups)) < len(groups) for groups in steps), "some step must share a prefix"
    assert attends, "the decode steps went through the cascade"
    # the 5 rows' suffixes in the first packed step: one sequence per image (3 images)
    assert suffix_attends and suffix_attends[0] == 3, "suffixes read each image's prefix once"


def test_a_captured_step_with_the_cascade_is_not_replayed_without_it(demo_model_dir):
    """A CUDA graph replays the attention it was captured with, so the cascade is part of a
    graph's key: switching it off (the bench's ablation) must give other graphs, not replay the
    cascade's kernels over a stale layout (the 2026-12-07 bench run did, before this key)."""
    from molmo_backend.engine.molmo2 import TransformersEngine

    decoder = TransformersEngine.load(str(demo_model_dir), max_new_tokens=4, max_batch=8).decoder
    decoder.varlen = decoder.cascade = True
    big, small = cascade.MIN_ROWS, cascade.MIN_ROWS // 2
    with_cascade = decoder._graph(False, big, 256)
    assert decoder._graph(False, big, 256) is with_cascade
    decoder.cascade = False
    assert decoder._graph(False, big, 256) is not with_cascade
    without = decoder._graph(False, small, 256)
    decoder.cascade = True
    assert decoder._graph(False, small, 256) is without  # below the threshold: no cascade either way
    decoder.varlen = decoder.cascade = False
