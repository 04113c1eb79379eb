"""The transformers engine on the tiny demo Molmo2: real processor -> generate -> decode on CPU."""

from __future__ import annotations

import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from molmo_backend.app.model_choice import choose_model, resolve_model
from molmo_backend.demo.models import SHIPPED_DEMO, demo_info
from molmo_backend.engine.base import PointQuery, Row
from molmo_backend.engine.molmo2 import TransformersEngine
from molmo_backend.engine.slots import INTERACTIVE_SLOTS
from molmo_backend.settings import Settings
from tests.support.forcing import ForceAnswers, by_label

RED = Image.new("RGB", (640, 480), (200, 30, 30))
GREEN = Image.new("RGB", (300, 500), (30, 200, 30))


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    choice = choose_model(Settings(model=str(demo_model_dir), demo="0"))  # as the server picks and names it
    return TransformersEngine.load(
        choice.path, model_id=choice.model_id, demo=choice.demo, max_new_tokens=24, max_batch=8
    )


def test_loads_through_the_auto_classes_and_reports_what_it_is(engine):
    assert type(engine.model).__name__ == "Molmo2ForConditionalGeneration"
    assert type(engine.processor).__name__ == "Molmo2Processor"
    assert engine.family == "molmo2" and engine.demo and engine.model_id == "molmo2-demo"
    assert len(engine.revision) == 10


def test_chat_text_puts_the_image_first_and_asks_for_the_assistant(engine):
    text = engine.chat_text("Point to cat")
    assert text == "<|image|><|im_start|>user\nPoint to cat<|im_end|>\n<|im_start|>assistant\n"


def test_forced_answers_come_through_real_generate(engine):
    answers = {"cat": '<points coords="1 1 461 527 2 481 521">cat</points>', "dog": "There are none."}
    engine.logits_processors.append(ForceAnswers(engine.processor.tokenizer, by_label(answers)))
    try:
        out = engine.generate([PointQuery(RED, "Point to cat"), PointQuery(GREEN, "Point to dog")])
    finally:
        engine.logits_processors.clear()
    assert [a.text for a in out] == [answers["cat"], answers["dog"]]
    assert all(a.score == 1.0 for a in out)  # forced tokens have probability 1


def test_batched_answers_equal_one_at_a_time_answers(engine):
    queries = [PointQuery(img, f"Point to thing {i}") for i, img in enumerate([RED, GREEN, RED, GREEN, RED])]
    batched = engine.generate(queries)
    single = [engine.generate([q])[0] for q in queries]
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(a.text for a in batched)  # the random model says something
    assert [a.score for a in batched] == pytest.approx([a.score for a in single], abs=1e-3)


MIXED = [RED, Image.new("RGB", (300, 900), (10, 200, 10)), Image.effect_noise((500, 500), 60).convert("RGB")]
PROMPTS = [
    "Point to cat",
    "Point to the big brown dog",
    "Point to a",
    "Point to every window",
    "x",
    "Point to cat",
]


@pytest.mark.parametrize("max_batch,interactive", [(8, False), (2, False), (8, True)])
def test_fast_decoder_equals_plain_generate_with_mixed_rows_everywhere(
    demo_model_dir, max_batch, interactive
):
    """Images with different token counts, prompts of different lengths, labels sharing images,
    rows admitted all at once or two at a time as slots free up, in the bulk or the opened
    tasks' slots: the slot decoder gives generate()'s tokens and scores."""
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=32, max_batch=max_batch)
    engine.processor.image_processor.max_crops = 4
    queries = [PointQuery(MIXED[i % 3], p, image_key=i % 3) for i, p in enumerate(PROMPTS)]
    fast, plain = engine.generate(queries, interactive=interactive), engine.generate_plain(queries)
    assert [a.text for a in fast] == [a.text for a in plain]
    assert [a.score for a in fast] == pytest.approx([a.score for a in plain], abs=1e-3)
    assert [a.tokens for a in fast] == [a.tokens for a in plain]  # per-point confidence from either
    for f, p in zip(fast, plain):
        assert "".join(f.tokens) == f.text or "".join(f.tokens).strip() == f.text
        assert f.token_logprobs == pytest.approx(p.token_logprobs, abs=1e-3)
    lengths = {engine.prepare(PointQuery(image, "x")).length for image in MIXED}
    assert len(lengths) > 1, "test images must give prefixes of different lengths"
    assert engine.free_slots(False) == engine.max_batch and engine.free_slots(True) == INTERACTIVE_SLOTS


def test_rows_of_different_lengths_leave_when_they_end_and_others_take_their_slots(demo_model_dir):
    """Continuous batching in the engine: with 2 bulk slots, a row forced to 2 tokens ends and
    frees its slot while a 20-token row is still decoding; the next row joins beside it. Each
    answer is what the query gives alone, with exactly the forced number of tokens."""
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=2)
    lengths = [20, 2, 2, 7, 1]
    queries = [
        PointQuery(MIXED[i % 3], f"Point to thing {i}", answer_tokens=n) for i, n in enumerate(lengths)
    ]
    admitted = []
    prefill = engine.prefill

    def recording_prefill(rows):
        admitted.append([r.query.answer_tokens for r in rows])
        return prefill(rows)

    engine.prefill = recording_prefill
    together = engine.generate(queries)
    engine.prefill = prefill
    assert [len(a.token_logprobs) for a in together] == lengths
    assert admitted[:2] == [[20, 2], [2]], "the third row must join while the first still runs"
    alone = [engine.generate([q])[0] for q in queries]
    assert [a.text for a in together] == [a.text for a in alone]
    for a, b in zip(together, alone):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_a_decode_step_runs_the_rows_still_running_not_every_slot_up_to_the_highest(demo_model_dir):
    """18 short rows in the low slots end after 2 tokens; the 2 long rows in the highest slots go
    on in steps of 16 rows (their bucket), not 24 (the slot range they span), and the freed slots
    that pad those steps keep length 0 (they read one key). Answers are those of each query alone."""
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=24)
    lengths = [2] * 18 + [12, 12]
    queries = [
        PointQuery(RED, f"Point to thing {i}", image_key=0, answer_tokens=n) for i, n in enumerate(lengths)
    ]
    counts = []
    step = engine.decoder._step

    def recording_step(interactive, count, read_length, compiled=False):
        counts.append(count)
        return step(interactive, count, read_length, compiled)

    engine.decoder._step = recording_step
    together = engine.generate(queries)
    engine.decoder._step = step
    assert [len(a.token_logprobs) for a in together] == lengths
    assert counts == [24] + [16] * 10, counts  # 24 while all 20 run (the region holds 24)
    assert int(engine.decoder.lengths.max()) == 0, "every slot is free again and reads nothing"
    alone = [engine.generate([q])[0] for q in queries[-3:]]
    assert [a.text for a in together[-3:]] == [a.text for a in alone]
    for a, b in zip(together[-3:], alone):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_an_answer_stopped_by_the_cap_says_it_was_cut(demo_model_dir):
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=5, max_batch=4)
    (capped,) = engine.generate([PointQuery(RED, "Point to cat")])
    assert len(capped.token_logprobs) == 5 and capped.truncated
    (forced,) = engine.generate([PointQuery(RED, "Point to cat", answer_tokens=3)])
    assert len(forced.token_logprobs) == 3 and not forced.truncated  # the seam is not the cap


def test_fast_decoder_answers_each_query_like_it_was_alone(demo_model_dir):
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=8)
    queries = [
        PointQuery(img, f"Point to item number {i}" + " please" * i)
        for i, img in enumerate([RED, GREEN, RED])
    ]
    together = engine.generate(queries)
    alone = [engine.generate([q])[0] for q in queries]
    assert [a.text for a in together] == [a.text for a in alone]


def test_demo_auto_falls_back_only_without_gpu_and_local_weights(tmp_path, demo_model_dir):
    path, demo = resolve_model(Settings(model="allenai/not-downloaded", demo="auto", cache_dir=tmp_path))
    assert demo and path == str(SHIPPED_DEMO) and demo_info(path)["kind"] == "shapes"  # the trained one
    path, demo = resolve_model(Settings(model="allenai/not-downloaded", demo="random", cache_dir=tmp_path))
    assert demo and demo_info(path)["kind"] == "random" and path.startswith(str(tmp_path))
    assert resolve_model(Settings(model="allenai/not-downloaded", demo="0", cache_dir=tmp_path)) == (
        "allenai/not-downloaded",
        False,
    )
    assert resolve_model(Settings(model=str(demo_model_dir), demo="auto", cache_dir=tmp_path)) == (
        str(demo_model_dir),
        True,
    )


def _compiling_engine(demo_model_dir):
    """An engine whose opened tasks' steps are compiled. The engine only turns that on with CUDA
    graphs on a GPU; on the CPU the same step runs compiled, directly."""
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24, max_batch=8)
    assert not engine.decoder.compile_step, "compiling is for CUDA only unless asked for"
    engine.decoder.compile_step = True
    return engine


def test_compiled_decode_step_gives_generates_answers_for_every_batch_size(demo_model_dir):
    """MOLMO_COMPILE: torch.compile (inductor, dynamic shapes) of the opened tasks' decode step.
    One compile at warm-up serves 1-3 rows and other cache lengths, with generate()'s answers."""
    engine = _compiling_engine(demo_model_dir)
    reference = TransformersEngine.load(
        str(demo_model_dir), max_new_tokens=24, max_batch=8, decoder="generate"
    )
    counters = __import__("torch")._dynamo.utils.counters
    engine.warm_up()
    assert engine.decoder._compiled is not None and engine.decoder.compile_step
    compiled_at_warm_up = counters["stats"]["unique_graphs"]
    assert compiled_at_warm_up >= 1
    tall = Image.new("RGB", (300, 900), (10, 200, 10))
    batches = [
        [
            PointQuery(RED, "Point to cat", 1),
            PointQuery(RED, "Point to the dog on the left", 1),
            PointQuery(RED, "Point to x", 1),
        ],
        [PointQuery(GREEN, "Point to a very long description of something " * 3, 2)],
        [PointQuery(tall, "Point to cat", 3), PointQuery(GREEN, "Point to cat", 4)],
        [PointQuery(RED, "Point to the " + "very " * 40 + "red cat", 5)],  # a longer cache read
    ]
    for i, queries in enumerate(batches):
        if i == len(batches) - 1:  # the server compiles in its loader thread, runs in a GPU worker's
            with ThreadPoolExecutor(1) as other_thread:
                fast = other_thread.submit(engine.generate, queries, True).result()
        else:
            fast = engine.generate(queries, interactive=True)
        plain = reference.generate(queries)
        assert [a.text for a in fast] == [a.text for a in plain]
        assert [a.score for a in fast] == pytest.approx([a.score for a in plain], abs=1e-3)
    assert engine.decoder.compile_step
    assert counters["stats"]["unique_graphs"] == compiled_at_warm_up, "no opened task may wait for a compile"


def test_decode_step_that_fails_to_compile_runs_eagerly_and_says_so(demo_model_dir, caplog):
    import torch

    engine = _compiling_engine(demo_model_dir)
    queries = [PointQuery(RED, "Point to cat"), PointQuery(GREEN, "Point to dog")]
    expected = [
        a.text for a in TransformersEngine.load(str(demo_model_dir), max_new_tokens=24).generate(queries)
    ]

    def fails(*args):
        raise torch._dynamo.exc.Unsupported("injected: this model cannot be compiled")

    engine.decoder._compiled = fails
    with caplog.at_level("WARNING", logger="molmo_backend.engine.decoding"):
        assert [a.text for a in engine.generate(queries, interactive=True)] == expected
    assert "torch.compile of the decode step failed" in caplog.text and "injected" in caplog.text
    assert not engine.decoder.compile_step
    assert [
        a.text for a in engine.generate(queries, interactive=True)
    ] == expected  # and stays eager, quietly


def test_compile_is_off_by_default_and_the_setting_reaches_server_and_commands(monkeypatch, demo_model_dir):
    from molmo_backend.commands import cli
    from molmo_backend.settings import SettingsError

    assert Settings.from_env({}).compile_step == "0"  # 109 s cold / 56 s warm start on an H200
    assert Settings.from_env({"MOLMO_COMPILE": "1"}).compile_step == "1"
    with pytest.raises(SettingsError, match="MOLMO_COMPILE"):
        Settings.from_env({"MOLMO_COMPILE": "yes"})
    args = cli.build_parser().parse_args(["predict", "x.png", "--label", "cat"])
    monkeypatch.delenv("MOLMO_COMPILE", raising=False)
    assert cli._command_settings(args).compile_step == "0"
    monkeypatch.setenv("MOLMO_COMPILE", "1")
    assert cli._command_settings(args).compile_step == "1"
    # on the CPU the setting is accepted and nothing is compiled (no CUDA graphs to capture)
    engine = TransformersEngine.from_settings(
        Settings(model=str(demo_model_dir), compile_step="1"), device=__import__("torch").device("cpu")
    )
    assert not engine.decoder.compile_step


def test_prefill_cost_is_the_prefix_the_slot_decoder_prefills(demo_model_dir):
    """The scheduler bounds a step's prefill by each query's cost: the engine must know a
    query's image and prompt tokens from the image size alone (no pixels processed), exactly."""
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=24)
    engine.processor.image_processor.max_crops = 4  # so image sizes give different token counts
    seen = set()
    for size in [(640, 480), (300, 900), (4000, 100), (1, 1), (1280, 960)]:
        query = PointQuery(Image.new("RGB", size), "Point to the big brown dog.")
        row = engine.prepare(query).length + len(engine._suffix_ids(query.prompt))
        assert engine.prefill_cost(query) == row, size
        assert engine.tokens_for(query) == row + engine.max_new_tokens
        seen.add(row)
    assert len(seen) > 2
    assert engine.token_budget() is None  # CPU: no GPU memory to budget; max_batch alone


def test_kv_token_budget_is_the_free_memory_share_over_bytes_per_token(engine):
    from molmo_backend.engine.slots import KV_MEMORY_FRACTION, kv_token_budget

    text = engine.model.config.text_config
    per_token = engine.decoder.kv_bytes_per_token
    assert per_token == 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4  # fp32
    # Molmo2-8B in bf16 (36 layers, 8 kv heads of 128): 147456 bytes a token; 60 GiB free
    assert kv_token_budget(60 * 2**30, 147456) == int(60 * 2**30 * KV_MEMORY_FRACTION) // 147456 == 305834
    assert kv_token_budget(0, 147456) == 0


def test_a_packed_step_lays_each_image_once_and_writes_it_into_every_row_that_shows_it():
    """The layout of one packed step: an image prefix (bos first) written into the slot of each
    row that shows it, decode tokens at their rows' next position, suffixes causal behind their
    prefix; what each token may see."""
    from molmo_backend.engine.packed import PlanBuilder

    plan = PlanBuilder(stride=100, image_token_id=7)
    plan.add_prefix([1, 7, 7, 9], slots=[3, 5])  # bos, two image tokens, an image end token
    assert plan.add_decode(slot=2, length=40) == 0
    assert plan.add_suffix([20, 21], slot=3, first_position=4) == 1
    assert plan.add_suffix([22], slot=5, first_position=4) == 2
    assert plan.ids == [1, 7, 7, 9, 0, 20, 21, 22]
    assert plan.positions == [0, 1, 2, 3, 40, 4, 5, 4]
    # the prefix goes into slots 3 and 5 (flat index slot x 100 + position), each other token once
    assert list(zip(plan.write_src, plan.write_dst)) == [
        (0, 300), (1, 301), (2, 302), (3, 303),
        (0, 500), (1, 501), (2, 502), (3, 503),
        (4, 240), (5, 304), (6, 305), (7, 504),
    ]  # fmt: skip
    assert plan.feature_at == [1, 2] and plan.bos == [0]
    assert plan.logits_at == [4, 6, 7]  # the decode token, each suffix's last token
    built = plan.build(torch.device("cpu"), last_token=torch.arange(10) * 11, kv_groups=2)
    assert built.ids.tolist() == [1, 7, 7, 9, 22, 20, 21, 22]  # slot 2's last token, read on the device
    full, causal = built.full.dense, built.causal
    # the prefix reads slot 3 (bos: only itself; the rest: the whole prefix); the decode token slot 2
    assert full.starts.tolist() == [300, 200] and full.limit.tolist() == [[0, 3, 3, 3], [40, 0, 0, 0]]
    assert full.pick.tolist() == [0, 1, 2, 3, 4] and built.full.tokens == 5
    assert built.full.seqlen_k.tolist() == [4, 41] and built.full.seqstart_q.tolist() == [0, 8, 10]
    # suffixes see their slot up to themselves
    assert causal.start == 5 and causal.starts.tolist() == [300, 500]
    assert causal.limit.tolist() == [[4, 5], [4, 0]] and causal.pick.tolist() == [0, 1, 2]


def test_decoding_rows_ride_along_with_a_prefill_and_answer_as_if_alone(demo_model_dir):
    """A packed step that admits new rows while running rows take their next token: every row
    answers what it answers alone, with the same token log-probabilities."""
    engine = TransformersEngine.load(str(demo_model_dir), max_new_tokens=12, max_batch=8)
    engine.processor.image_processor.max_crops = 4
    shown = [0, 1, 2, 2, 0]  # the last three rows ask about two images, one of them twice
    prompts = ["Point to cat", "Point to a", "Point to every window", "x", "Point to cat"]
    queries = [
        PointQuery(MIXED[image], prompt, image_key=image, answer_tokens=12)
        for image, prompt in zip(shown, prompts)
    ]
    alone = [engine.generate([q])[0] for q in queries]
    first, later = [Row(q, False) for q in queries[:2]], [Row(q, False) for q in queries[2:]]
    engine.prefill(first)
    engine.decode(first)
    steps = []
    real_step = engine.decoder.step

    def recording_step(images, image_of, slots, suffixes, decoding=(), *args):
        steps.append((len(images), len(slots), len(decoding)))
        return real_step(images, image_of, slots, suffixes, decoding, *args)

    engine.decoder.step = recording_step
    engine.step(later, first)  # three rows (two images) join while the first two decode
    engine.decoder.step = real_step
    assert steps == [(2, 3, 2)], "one forward: two new images, three new rows, two decoding rows"
    running = first + later
    while not all(row.finished for row in running):
        engine.decode([row for row in running if not row.finished])
    together = [engine.answer(row) for row in running]
    engine.release(running)
    assert [a.text for a in together] == [a.text for a in alone]
    for a, b in zip(together, alone):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    assert engine.free_slots(False) == engine.max_batch


def test_the_packed_steps_rotary_arithmetic_is_molmo2s():
    """packed.apply_rotary is written out (the Molmo v1 profile cannot import Molmo2's modeling
    module); it must compute what transformers' Molmo2 does."""
    from transformers.models.molmo2.modeling_molmo2 import apply_rotary_pos_emb

    from molmo_backend.engine.packed import apply_rotary

    gen = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 4, 7, 16, generator=gen), torch.randn(1, 2, 7, 16, generator=gen)
    cos, sin = torch.randn(1, 7, 16, generator=gen), torch.randn(1, 7, 16, generator=gen)
    for got, want in zip(apply_rotary(query, key, cos, sin), apply_rotary_pos_emb(query, key, cos, sin)):
        assert torch.equal(got, want)


def test_the_generate_decoder_allocates_no_cache_slots(engine):
    """MOLMO_DECODER=generate keeps Hugging Face's own cache: slots sized to 70% of the free GPU
    memory would only leave generate() too little (the bench's plain variant ran out of memory
    on an H100 that way)."""
    plain = TransformersEngine(
        engine.model,
        engine.processor,
        model_id=engine.model_id,
        revision=engine.revision,
        max_new_tokens=8,
        decoder="generate",
    )
    assert plain.decoder is None and not plain.stepwise
    plain.warm_up()  # nothing to compile, and no slots to look at
    [answer] = plain.generate([PointQuery(RED, "Point to cat")])
    assert answer.error is None and answer.text


def test_warm_up_captures_every_decode_graph_before_the_server_reports_ready(engine, monkeypatch):
    """The server captures the decode steps' CUDA graphs at start (as the benchmarks run the
    engine), not on first use while preparation threads run the vision tower beside them."""
    calls = []
    monkeypatch.setattr(engine.decoder, "capture_graphs", lambda: calls.append("capture") or 0)
    engine.warm_up()
    assert calls == ["capture"]


def test_a_dropped_engine_is_freed_with_its_cache_pool(engine):
    """Its memo tables are its own: a cache on the methods kept every engine alive, so a second
    engine in one process (the benchmark's plain generate() after the fast engine) found the
    first one's cache pool still on the GPU and ran out of memory."""
    other = TransformersEngine(engine.model, engine.processor, model_id="again", revision="x", max_batch=2)
    other.generate([PointQuery(RED, "Point to the dot.")])
    assert other.chat_text("Point to the dot.") == engine.chat_text("Point to the dot.")
    pool = weakref.ref(other.decoder.cache)
    del other
    gc.collect()
    assert pool() is None


def test_bulk_rows_shrink_to_what_the_pool_holds_at_typical_length(engine, monkeypatch):
    """A GPU whose cache memory holds 3 rows of typical length runs (and captures steps for) 3
    bulk rows, not MOLMO_MAX_BATCH."""
    from molmo_backend.engine import slots

    pool = 3 * slots.TYPICAL_ROW_TOKENS + 100
    monkeypatch.setattr(slots, "bulk_pool_tokens", lambda *args: pool)
    small = TransformersEngine(engine.model, engine.processor, model_id="small", revision="x", max_batch=8)
    assert small.max_batch == small.decoder.bulk_slots == 3
    assert small.generate([PointQuery(RED, "Point to the dot.")] * 4)[3].text  # rows wait their turn
    assert slots.bulk_rows_for(None, 8, 2560) == 8 and slots.bulk_rows_for(10, 8, 2560) == 1
    assert slots.bulk_rows_for(300_000, 256, 2560) == 256 and slots.bulk_rows_for(150_000, 256, 2560) == 146
    assert slots.bulk_rows_for(8 * 512, 8, 512) == 8  # rows can be no longer than the longest


def test_on_the_cpu_the_pool_is_budgeted_by_the_ram_available(engine, monkeypatch):
    """MOLMO_DEVICE=cpu with a real model: MOLMO_MAX_BATCH rows of the longest length would take
    hundreds of GB, so the pool takes its share of the RAM the kernel says is available."""
    from molmo_backend.engine import slots

    text, cpu, longest = engine.model.config.text_config, torch.device("cpu"), 1024
    per_token = slots.kv_bytes_per_token(text, torch.float32)
    ram = int((slots.INTERACTIVE_SLOTS * longest + 5000) * per_token / slots.KV_MEMORY_FRACTION) + per_token
    monkeypatch.setattr(slots, "available_ram", lambda: ram)
    assert slots.bulk_pool_tokens(text, torch.float32, cpu, 256, longest) == 5000
    assert slots.bulk_pool_tokens(text, torch.float32, cpu, 2, longest) == 2 * longest  # no more than asked
    monkeypatch.setattr(slots, "available_ram", lambda: None)
    assert slots.bulk_pool_tokens(text, torch.float32, cpu, 256, longest) is None
    monkeypatch.undo()
    assert slots.available_ram() > 0  # Linux: /proc/meminfo
    # the tiny model's rows are small: the CPU keeps MOLMO_MAX_BATCH
    assert (
        TransformersEngine(engine.model, engine.processor, model_id="c", revision="x", max_batch=8).max_batch
        == 8
    )


def test_max_batch_defaults_to_each_engine_s_own_and_the_variable_overrides_it(demo_model_dir):
    """Unset, MOLMO_MAX_BATCH is 256 bulk rows for the fast decoder (rows of their own length)
    and 128 pairs for a padded whole batch (``generate``; Molmo v1 takes the same default)."""
    from molmo_backend.engine.inprocess import BATCH_PAIRS, FAST_DECODER_ROWS
    from molmo_backend.settings import SettingsError

    cpu = torch.device("cpu")
    assert Settings.from_env({}).max_batch is None
    assert (FAST_DECODER_ROWS, BATCH_PAIRS) == (256, 128)
    fast = TransformersEngine.from_settings(Settings(model=str(demo_model_dir)), device=cpu)
    assert fast.max_batch == fast.decoder.bulk_slots == FAST_DECODER_ROWS
    plain = TransformersEngine.from_settings(
        Settings(model=str(demo_model_dir), decoder="generate"), device=cpu
    )
    assert plain.max_batch == BATCH_PAIRS
    settings = Settings.from_env({"MOLMO_MAX_BATCH": "3"}, model=str(demo_model_dir), decoder="generate")
    assert TransformersEngine.from_settings(settings, device=cpu).max_batch == 3
    with pytest.raises(SettingsError, match="MOLMO_MAX_BATCH"):
        Settings.from_env({"MOLMO_MAX_BATCH": "0"})
    with pytest.raises(SettingsError, match="MOLMO_MAX_BATCH"):
        Settings.from_env({"MOLMO_MAX_BATCH": "many"})
