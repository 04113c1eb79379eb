"""Split-key decode attention (molmo_backend/engine/flash_decode.py): the Triton kernels run here
in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``), on the CPU, in float32
and float16 (the interpreter has no bfloat16; the engine checks bfloat16 on the GPU with the
same :func:`flash_decode.works` before it uses the kernels)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from molmo_backend.engine import flash_decode, slot_attention
from molmo_backend.engine.base import PointQuery
from molmo_backend.engine.molmo2 import TransformersEngine
from tests.support.kernel_ptx import h100_ptx

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("dtype", "kv_heads", "head_dim", "groups"),
    [(torch.float32, 2, 16, 4), (torch.float16, 2, 16, 4), (torch.float32, 3, 24, 2)],
)
def test_split_and_whole_chunks_give_what_each_row_reading_all_its_keys_gives(
    dtype, kv_heads, head_dim, groups
):
    """An image's rows over two programs, a row alone longer than a chunk, a padding row, a head
    size that is no power of two: the merged output equals plain softmax attention."""
    assert flash_decode.works(CPU, dtype, kv_heads, head_dim, groups)


def test_a_group_that_reads_a_key_too_many_is_caught(monkeypatch):
    """The check is not vacuous: a prefix one key longer than the rows' shared prefix fails it."""
    real = flash_decode.layout

    def longer(*args):
        table, prefix = real(*args)
        table[3] = [n + 1 if n else 0 for n in table[3]]
        return table, prefix

    monkeypatch.setattr(flash_decode, "layout", longer)
    assert not flash_decode.works(CPU, torch.float32, 2, 16, 4)


def test_layout_puts_an_images_rows_in_one_program_up_to_a_tile():
    groups, stride = 4, 100
    cap = flash_decode.rows_per_group(groups)
    rows = [(10 + i, "a", 30) for i in range(cap + 2)] + [(5, "b", 20), (0, None, 0)]
    (first, count, key, length), prefix = flash_decode.layout(rows, groups, stride)
    n = len(rows)
    assert cap == 4 and len(first) == len(count) == len(key) == len(length) == n
    # groups: the first 4 rows of "a", its last 2, "b", the padding row; then unused ones
    assert first[:4] == [0, cap, cap + 2, cap + 3] and count[:4] == [cap, 2, 1, 1]
    assert key[:4] == [10 * stride, (10 + cap) * stride, 5 * stride, 0] and length[:4] == [30, 30, 20, 0]
    assert set(count[4:]) == {0}
    assert prefix == [30] * (cap + 2) + [20, 0]


def test_the_engine_decoding_with_the_kernels_answers_as_without(demo_model_dir, monkeypatch):
    """The tiny model's answers and log-probabilities, decode steps through the split-key
    kernels (forced on here; the engine takes them only on CUDA) against SDPA's."""
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=8, max_batch=4)
    queries = [
        PointQuery(Image.effect_noise((64, 48), 50).convert("RGB"), f"Point to thing {i}", image_key=0)
        for i in range(3)
    ] + [PointQuery(Image.new("RGB", (40, 40), (9, 90, 200)), "Point to the sky", image_key=1)]
    plain = engine.generate(queries)
    kernels, real = [], flash_decode.attention
    monkeypatch.setattr(flash_decode, "attention", lambda *a, **k: kernels.append(1) or real(*a, **k))
    engine.decoder.flash = True
    slot_attention.install()
    split = engine.generate(queries)
    assert kernels, "decode attention went through the kernels"
    assert [a.text for a in split] == [a.text for a in plain]
    for a, b in zip(split, plain):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_molmo_triton_kernels_is_on_by_default_and_reaches_the_decoder(demo_model_dir, monkeypatch):
    """MOLMO_TRITON_KERNELS (default 1) decides whether the decoder tries the kernels; on the CPU
    they are never taken, whatever it says (Triton compiles for GPUs)."""
    from molmo_backend.engine import attention_kernels
    from molmo_backend.settings import Settings, SettingsError

    assert Settings.from_env({}).triton_kernels == "1"
    with pytest.raises(SettingsError, match="MOLMO_TRITON_KERNELS"):
        Settings.from_env({"MOLMO_TRITON_KERNELS": "yes"})
    asked, real = [], attention_kernels.checked
    monkeypatch.setattr(attention_kernels, "checked", lambda *a: asked.append(a[-1]) or real(*a))
    for value in ("1", "0"):
        settings = Settings.from_env({"MOLMO_TRITON_KERNELS": value}, model=str(demo_model_dir))
        engine = TransformersEngine.from_settings(settings, device=CPU)
        assert engine.decoder.flash is False
    assert asked == [True, False]
    assert not attention_kernels.checked(CPU, torch.float32, 2, 16, 4, True).flash


def test_a_step_captured_with_the_kernels_is_not_replayed_without_them(demo_model_dir):
    """The decode attention a graph was captured with is part of its key: switching the kernels
    off (the bench's ``cutlass`` ablation, or a failed check) gives other graphs."""
    decoder = TransformersEngine.load(str(demo_model_dir), max_new_tokens=4, max_batch=8).decoder
    decoder.flash = True
    split = decoder._graph(False, 8, 256)
    assert decoder._graph(False, 8, 256) is split
    decoder.flash = False
    assert decoder._graph(False, 8, 256) is not split


def test_compiled_for_an_h100_the_kernels_read_keys_and_parts_16_bytes_at_a_time():
    """A kernel whose head size is not specialised masks each element on its own and reads keys
    two bytes at a time: on an H100 that held decode attention at ~40% of the memory's speed.
    Compiled here for sm_90 without a GPU (tests/support/kernel_ptx.py)."""
    ptx = h100_ptx()
    assert "cp.async.cg.shared.global" in ptx["chunk"] and "ld.global.b16" not in ptx["chunk"]
    assert "ld.global.v4.b32" in ptx["merge"]
