"""Greedy decoding of Molmo2 rows held in cache slots: the GPU side of continuous batching.

Every (image, prompt) row lives in a run of blocks of a static K/V pool (:class:`.slots.SlotCache`)
from its admission to its end, at its own positions 0..length-1: its image prefix, its prompt
suffix, then its answer. A bulk row's run is sized by its own prompt and grows with its answer
(:mod:`.row_memory`: in place, or moved to a longer free run), so the pool holds as
many rows as their real lengths allow, not as many as the longest possible row allows. Rows of
different lengths, images and ages share a decode step; a row that ends frees its run at once
and the next waiting row takes it.

- **Packed steps** (:meth:`SlotDecoder.step`): the admitted rows'
  image prefixes (each distinct image once, its vision features computed once), their prompt
  suffixes and, optionally, one decode token of each running row, in one forward without padding
  (:mod:`.packed`); each image's keys/values go straight into the slot of every row that shows
  it. The new rows get their first token, the running rows their next.
- **Decode** (:meth:`SlotDecoder.decode`): one token for each given row, all in the opened
  tasks' region or all in the bulk region, wherever their slots are: the step runs over a list
  of slots (the rows', padded to a row bucket with a free block of the region, whose length stays
  0 so it reads one key), so its cost follows the rows still running, not the highest slot in
  use. A row may also give tokens guessed to follow its last one (:mod:`.drafting`): each is
  one more entry of the step's list, its slot again at the next position, so the step checks
  them all and the row keeps what the model confirms (:meth:`SlotDecoder.settle`). On CUDA
  the step is captured as a graph per (region, entry bucket, read length) and replayed;
  optionally (``compile_step``) the opened tasks' step is compiled first.

The pool's first blocks belong to opened tasks (16 rows of the longest length), the rest to
bulk work. Numerics are those of greedy ``generate()`` on the same inputs (a test checks equal
answers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from molmo_backend.engine import attention_kernels, cascade, flash_decode, packed, slot_attention
from molmo_backend.engine.packed import PlanBuilder
from molmo_backend.engine.phases import PhaseTimer
from molmo_backend.engine.prefill import PreparedImage, step_features
from molmo_backend.engine.slots import (
    BLOCK_TOKENS,
    INTERACTIVE_SLOTS,
    LENGTH_STEP,
    CacheView,
    RowSpace,
    SlotCache,
    blocks_for,
    head_dim,
    kv_bytes_per_token,
    round_up,
    row_bucket,
)
from molmo_backend.engine.step_graph import StepGraph, capture_all, compiled_logits


@dataclass
class SlotRow:
    """What the decoder knows of one admitted row."""

    slot: int  # the first block of its run
    prompt_ids: list[int]  # prefix + suffix, for logits processors (tests)
    length: int  # tokens in its slot
    prefix: int = 0  # its image prefix's tokens (the first of them in its slot)
    group: int = -1  # rows of one group hold the same prefix (one image, admitted in one step)
    draft: object = None  # the engine's guesser of this row's next tokens (:mod:`.drafting`)


class SlotDecoder:
    """Prefill and decode steps over the slots of one Molmo2ForConditionalGeneration."""

    def __init__(
        self,
        model,
        eos_ids: Sequence[int],
        pad_id: int,
        *,
        bulk_slots: int,
        max_length: int,
        bulk_tokens: int | None = None,
        interactive_slots: int = INTERACTIVE_SLOTS,
        use_cuda_graph: bool = True,
        compile_step: bool = False,
        triton: bool = False,
    ):
        self.model = model
        self.lm = model.model.language_model
        self.embed = self.lm.embed_tokens
        self.lm_head = model.lm_head
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.head_dim = head_dim(text)
        self.device, self.dtype = model.device, self.embed.weight.dtype
        self.neg = torch.finfo(self.dtype).min
        self.kv_bytes_per_token = kv_bytes_per_token(text, self.dtype)
        self.eos = sorted(set(eos_ids))
        self.pad_id = pad_id
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        #: torch.compile the opened tasks' decode step (one compile, dynamic shapes); switched
        #: off for good if compiling fails
        self.compile_step = compile_step
        self._compiled = None
        #: most rows of each region (opened tasks', bulk)
        self.interactive_slots = interactive_slots
        self.bulk_slots = bulk_slots
        #: the longest row (its largest image, a long prompt, the new-token cap)
        self.max_length = max_length
        row_blocks = blocks_for(max_length)
        # the bulk pool: ``bulk_tokens`` (what the GPU's memory holds), by default every bulk row
        # at the longest length; at least one longest row and a block per row
        bulk_blocks = blocks_for(bulk_tokens) if bulk_tokens else bulk_slots * row_blocks
        bulk_blocks = max(bulk_blocks, row_blocks, bulk_slots)
        self.space = RowSpace(interactive_slots, bulk_slots, row_blocks, bulk_blocks)
        blocks = interactive_slots * row_blocks + bulk_blocks
        self.cache = SlotCache(
            self.num_layers, blocks * BLOCK_TOKENS, self.kv_heads, self.head_dim, self.dtype, self.device
        )
        device = self.device
        # per-row state, indexed by the row's slot (its run's first block)
        self.last_token = torch.zeros((blocks,), dtype=torch.long, device=device)
        self.lengths = torch.zeros((blocks,), dtype=torch.long, device=device)
        self.positions = torch.arange(max_length, device=device)
        #: 1 for a slot holding a row; a free block's length stays 0 when a step pads with it
        self.live = torch.zeros((blocks,), dtype=torch.long, device=device)
        regions = ((True, interactive_slots), (False, bulk_slots))  # each region's steps' layouts
        #: per region (interactive or not), the next decode step's entries in its first ``count``
        #: columns, where captured graphs read them: each entry's slot, its offset past the
        #: slot's length (0; more for a guessed token checked in the step: :mod:`.drafting`) and
        #: that guessed token, its input
        self.step_entries = {i: torch.zeros((3, n), dtype=torch.long, device=device) for i, n in regions}
        #: per region, each entry's pick and its log-probability after a decode step
        self.entry_out = {
            i: (torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, device=device))
            for i, n in regions
        }
        #: rows moved to a longer run, and steps where a row waited for memory (benchmarks);
        #: whether a row waited at the last step (:mod:`.row_memory` sets them)
        self.moves, self.waits, self.short_of_memory = 0, 0, False
        self._graphs: dict = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        groups = self.kv_groups = self.lm.config.num_attention_heads // self.kv_heads
        self.image_token_id = model.config.image_token_id
        #: the attention kernels steps run (:class:`.attention_kernels.Kernels` says what each is)
        geometry = (self.device, self.dtype, self.kv_heads, self.head_dim, groups)
        kernels = attention_kernels.checked(*geometry, triton)
        self.varlen, self.flash, self.prefix_flash = kernels.varlen, kernels.flash, kernels.prefix_flash
        self.cascade, self.suffix_pass, self.rotary = kernels.cascade, kernels.suffix_pass, kernels.rotary
        self._cascade = {
            i: cascade.StepBuffer(n, self.kv_heads, groups, BLOCK_TOKENS, device) for i, n in regions
        }
        self._flash = {i: flash_decode.StepBuffer(n, groups, BLOCK_TOKENS, device) for i, n in regions}
        self._next_group = 0
        #: benchmarks only (:mod:`.phases`): a dict sums seconds per phase, a list gets each step
        self.profile: dict | None = None
        self.trace: list | None = None

    # -- slots ---------------------------------------------------------------------------------
    def free_slots(self, interactive: bool) -> int:
        """Rows of that region that can be admitted now (by row limit and free memory; none to
        the bulk region while a row waits for memory: :mod:`.row_memory`)."""
        if not interactive and self.short_of_memory:
            return 0
        return self.space.free_rows(interactive)

    def take_slot(self, interactive: bool, tokens: int) -> int | None:
        """A run for a new row of ``tokens`` prompt tokens (lowest first: live runs stay few and
        low); None if no free run is long enough."""
        return self.space.take(interactive, tokens)

    def release(self, slots: Sequence[int]) -> None:
        """Free ``slots`` (one device write for all); a later step may pad with one (reads 1 key)."""
        if not slots:
            return
        index = torch.tensor(list(slots), device=self.device)
        self.live.index_fill_(0, index, 0)
        self.lengths.index_fill_(0, index, 0)
        for slot in slots:
            self.space.release(slot)

    # -- packed steps: prefill, with decode rows riding along -----------------------------------
    @torch.inference_mode()
    def step(
        self,
        images: Sequence[PreparedImage],
        image_of: Sequence[int],
        slots: Sequence[int],
        suffixes: Sequence[list[int]],
        decoding: Sequence[SlotRow] = (),
        generated: Sequence[Sequence[int]] = (),
        logits_processors=(),
    ) -> tuple[list[SlotRow], list[int], list[float], list[int], list[float]]:
        """One packed forward (:mod:`.packed`): the new rows' prefill (row i shows
        ``images[image_of[i]]`` in slot ``slots[i]`` and asks ``suffixes[i]``), and one token for
        each of ``decoding`` (running rows; ``generated``, their tokens so far, is read
        only by logits processors). Returns the new rows' states, first tokens and
        log-probabilities, then the decode rows' tokens and log-probabilities."""
        with self.on_device():
            timer = PhaseTimer(self.profile, self.device, self.trace)
            plan = PlanBuilder(BLOCK_TOKENS, self.image_token_id)
            for image, prepared in enumerate(images):
                plan.add_prefix(
                    prepared.ids,
                    [slot for slot, shown in zip(slots, image_of) if shown == image],
                )
            decode_logits = [plan.add_decode(row.slot, row.length) for row in decoding]
            rows = []
            for slot, image, suffix in zip(slots, image_of, suffixes):
                prompt = images[image].ids + list(suffix)
                rows.append(
                    SlotRow(slot, prompt, len(prompt), images[image].length, self._next_group + image)
                )
            self._next_group += len(images)
            # suffixes by image, so an image's rows read its prefix together (in its first row's slot)
            prefix_slot = {image: slot for slot, image in reversed(list(zip(slots, image_of)))}
            new_logits = [0] * len(slots)
            for i in sorted(range(len(slots)), key=lambda i: image_of[i]):
                image = image_of[i]
                new_logits[i] = plan.add_suffix(
                    suffixes[i], slots[i], images[image].length, prefix_slot[image]
                )
            kv_heads = self.kv_heads if self.suffix_pass else None
            step = plan.build(self.device, self.last_token, self.kv_groups, kv_heads, self.prefix_flash)
            if images:
                step.features = step_features(self.model, images, self.dtype)
            timer.lap("plan")
            timer.mark()
            logits = packed.forward(self.model, step, self.cache.keys, self.cache.values, self.varlen)
            if logits_processors:
                histories = [list(row.prompt_ids) + list(done) for row, done in zip(decoding, generated)]
                histories += [row.prompt_ids for row in rows]
                logits = self._process(logits, histories, logits_processors)
            logprob, token = torch.log_softmax(logits, dim=-1).max(dim=-1)
            stepped = [row.slot for row in decoding] + list(slots)
            ends = [row.length + 1 for row in decoding] + [row.length for row in rows]
            index = torch.tensor(stepped, device=self.device)
            self.last_token.index_copy_(0, index, token)
            self.lengths.index_copy_(0, index, torch.tensor(ends, device=self.device))
            self.live.index_fill_(0, index, 1)
            tokens, logprobs = token.tolist(), logprob.tolist()
            for row in decoding:
                row.length += 1
            timer.lap("packed")
            timer.count(packed_steps=1, packed_tokens=int(step.ids.shape[0]))
            timer.traced("packed", rows=len(decoding), new=len(slots), tokens=int(step.ids.shape[0]))
            new = [tokens[i] for i in new_logits], [logprobs[i] for i in new_logits]
            running = [tokens[i] for i in decode_logits], [logprobs[i] for i in decode_logits]
            return (rows, *new, *running)

    # -- decode --------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(
        self,
        rows: Sequence[SlotRow],
        generated: Sequence[Sequence[int]] = (),
        logits_processors=(),
        guesses: Sequence[Sequence[int]] = (),
    ) -> tuple[list[list[int]], list[list[float]]]:
        """The next token of each of ``rows`` (all in the opened tasks' region or all in the bulk
        region), and its log-probability; ``generated`` (each row's tokens so far) is only read
        by logits processors. ``guesses``: token ids guessed to follow each row's last one, each
        checked in the same step as one more entry of its slot, at its own position (without
        logits processors; each row's run must hold them). Returns, per row, the pick after its
        last token and then after each guess: the caller keeps the picks up to the first that
        differs from its guess, and must then :meth:`settle` every row it gave guesses."""
        if not rows:
            return [], []
        guesses = list(guesses) or [()] * len(rows)
        with self.on_device():
            timer = PhaseTimer(self.profile, self.device, self.trace)
            interactive = self.space.interactive(rows[0].slot)
            order = sorted(range(len(rows)), key=lambda i: rows[i].group)  # an image's rows adjacent
            entries = [(rows[i], j, token) for i in order for j, token in enumerate((0, *guesses[i]))]
            generated = [generated[i] for i in order] if generated else ()
            count = self._load_step(interactive, entries)
            longest = max(row.length + offset for row, offset, _ in entries)
            read_length = min(round_up(longest + 1, LENGTH_STEP), self.max_length)
            timer.mark()
            if logits_processors:
                stepping = [row for row, offset, _ in entries]
                self._eager_step(interactive, count, read_length, stepping, generated, logits_processors)
            elif self.use_cuda_graph:
                self._graph(interactive, count, read_length).replay()
            else:
                self._step(interactive, count, read_length, compiled=interactive and self.compile_step)
            tokens, logprobs = (out[: len(entries)].tolist() for out in self.entry_out[interactive])
            for row in rows:
                row.length += 1
            timer.lap("decode")
            guessed = len(entries) - len(rows)
            timer.count(steps=1, guessed=guessed)
            timer.traced("decode", rows=len(rows), count=count, read=read_length, guessed=guessed)
            picks: list[list[int]] = [[] for _ in rows]
            picked: list[list[float]] = [[] for _ in rows]
            first = 0
            for i in order:  # the entries are in step order, each row's together
                size = 1 + len(guesses[i])
                picks[i], picked[i] = tokens[first : first + size], logprobs[first : first + size]
                first += size
            return picks, picked

    def settle(self, rows: Sequence[SlotRow], taken: Sequence[int], last: Sequence[int]) -> None:
        """After a :meth:`decode` with guesses: each row keeps ``taken[i]`` tokens more than the
        step's one, ``last[i]`` the last of them (its next step's input)."""
        with self.on_device():
            index = torch.tensor([row.slot for row in rows], device=self.device)
            for row, more in zip(rows, taken):
                row.length += more
            self.lengths.index_copy_(0, index, torch.tensor([row.length for row in rows], device=self.device))
            self.last_token.index_copy_(0, index, torch.tensor(list(last), device=self.device))

    def _load_step(self, interactive: bool, entries: Sequence[tuple[SlotRow, int, int]]) -> int:
        """Put the step's entries (row, offset past its length, guessed input token) first in the
        region's step list, padded up to a row bucket with one free block of the region (its
        writes land in a block nobody reads; it reads one key), and their cascade layout in the
        region's buffer; returns the step's entry count (exactly ``len(entries)`` if the region
        has no free block)."""
        size = self.interactive_slots if interactive else self.bulk_slots
        count = min(row_bucket(len(entries), interactive), size)
        pad = self.space.lowest_free(interactive)
        if pad is None:
            count, pad = len(entries), 0
        padding = [(pad, 0, 0)] * (count - len(entries))
        columns = [(row.slot, offset, token) for row, offset, token in entries] + padding
        self.step_entries[interactive][:, :count].copy_(torch.tensor(columns, dtype=torch.long).T)
        layout = [(row.slot, row.group, row.prefix) for row, *_ in entries] + [(pad, None, 0)] * len(padding)
        if self.flash:
            self._flash[interactive].load(layout)
        elif self._uses_cascade(count):
            self._cascade[interactive].load(layout)
        return count

    def _step_logits(self, entries, key_positions, varlen: bool = False, shared=None) -> torch.Tensor:
        """The forward of one decode step over ``entries`` (graph-safe: device tensors only, so a
        compiled step sees the row count and positions read as dynamic shapes): each entry one
        query token of a slot, its last token or a guessed one past it. ``varlen``:
        each row's attention reads its own keys in place (:mod:`.slot_attention`); else SDPA
        over a copy of the rows' first ``len(key_positions)`` positions. ``shared``: with varlen, a
        :class:`.cascade.Cascade` (image prefixes read once)."""
        slots, offsets, guessed = entries
        last_token = torch.where(offsets > 0, guessed, self.last_token[slots])
        lengths = self.lengths[slots] + offsets
        mask = torch.where(key_positions[None, :] <= lengths[:, None], 0.0, self.neg)
        mask = mask.to(self.dtype)[:, None, None, :]
        positions = lengths[:, None]
        starts = slots * BLOCK_TOKENS  # each row's first key in the pool
        read_at = None
        if not varlen:  # positions past a row's length are masked; clamped to stay in the pool
            read_at = (starts[:, None] + key_positions[None, :]).clamp(max=self.cache.tokens - 1)
        self.cache.view = CacheView(starts[:, None] + positions, read_at)
        plan = contextlib.nullcontext()
        if varlen:
            count = slots.shape[0]
            query_starts = torch.arange(count + 1, device=slots.device, dtype=torch.int32)
            plan = slot_attention.planned(
                slot_attention.Plan(
                    self.cache.keys,
                    self.cache.values,
                    query_starts * self.kv_groups,
                    torch.cat((starts, starts[-1:])).to(torch.int32),
                    (lengths + 1).to(torch.int32),
                    key_positions.shape[0],
                    shared,
                )
            )
        with plan:
            hidden = self.lm(
                inputs_embeds=self.embed(last_token[:, None]),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
            ).last_hidden_state
        return self.lm_head(hidden[:, -1]).float()

    def _step_inputs(self, interactive: bool, count: int, read_length: int) -> tuple:
        return self.step_entries[interactive][:, :count], self.positions[:read_length]

    def _uses_cascade(self, count: int) -> bool:
        return self.cascade and self.varlen and count >= cascade.MIN_ROWS

    def _attention(self, count: int) -> str:
        """Which decode attention a step of ``count`` rows runs (part of its graph's key)."""
        return "split-key" if self.flash else "cascade" if self._uses_cascade(count) else "rows"

    def _shared(self, interactive: bool, count: int):
        """The step's layout for its decode attention (None: each row reads all its keys)."""
        if self.flash:
            return self._flash[interactive].view(count)
        return self._cascade[interactive].view(count) if self._uses_cascade(count) else None

    def _step(self, interactive: bool, count: int, read_length: int, compiled: bool = False) -> None:
        """One decode step writing its picks into the state buffers (graph-safe)."""
        entries, key_positions = self._step_inputs(interactive, count, read_length)
        if compiled:
            logits = compiled_logits(self, entries, key_positions)
        else:
            shared = self._shared(interactive, count)
            logits = self._step_logits(entries, key_positions, self.varlen or self.flash, shared)
        logprob, token = torch.log_softmax(logits, dim=-1).max(dim=-1)
        self._advance(interactive, entries, token, logprob)

    def _advance(self, interactive: bool, entries, token, logprob) -> None:
        """Store the step's picks; a padding (free) slot keeps length 0. (A slot with guesses
        has several entries: what they write to its state here, :meth:`settle` corrects.)"""
        slots, count = entries[0], entries.shape[1]
        self.entry_out[interactive][0][:count] = token
        self.entry_out[interactive][1][:count] = logprob
        self.last_token[slots] = token
        grown = (self.lengths[slots] + 1) * self.live[slots]
        self.lengths[slots] = grown.clamp(max=self.max_length - 1)

    def _eager_step(self, interactive, count, read_length, rows, generated, logits_processors) -> None:
        """A step whose picks go through logits processors (tests force answers with them)."""
        entries, key_positions = self._step_inputs(interactive, count, read_length)
        logits = self._step_logits(entries, key_positions)
        history = [list(row.prompt_ids) + list(done) for row, done in zip(rows, generated)]
        picked = self._process(logits[: len(rows)], history, logits_processors)
        full = torch.cat((picked, logits[len(rows) :]))
        logprob, token = torch.log_softmax(full, dim=-1).max(dim=-1)
        self._advance(interactive, entries, token, logprob)

    def _process(self, logits, histories: list[list[int]], logits_processors) -> torch.Tensor:
        width = max(len(h) for h in histories)
        input_ids = torch.full((len(histories), width), self.pad_id, dtype=torch.long, device=self.device)
        for i, history in enumerate(histories):
            input_ids[i, width - len(history) :] = torch.tensor(history, device=self.device)
        for processor in logits_processors:
            logits = processor(input_ids, logits)
        return logits

    def capture_graphs(self) -> int:
        """Capture every decode step's graph now (:func:`.step_graph.capture_all`)."""
        return capture_all(self)

    def _graph(self, interactive: bool, count: int, read_length: int) -> StepGraph:
        compiled = interactive and self.compile_step
        # a graph replays the attention it was captured with: its kind is part of the key
        key = (interactive, count, read_length, compiled, not compiled and self._attention(count))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = StepGraph(self, interactive, count, read_length, compiled)
        return graph

    def on_device(self):
        if self.device.type == "cuda":  # each GPU replica runs in its own thread
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()
