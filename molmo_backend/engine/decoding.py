"""Greedy decoding of Molmo2 rows held in cache slots: the GPU side of continuous batching.

Every (image, prompt) row lives in one slot of a static K/V cache (:class:`.slots.SlotCache`)
from its admission to its end, at its own positions 0..length-1: its image prefix, its prompt
suffix, then its answer. Rows of different lengths, images and ages share a decode step; a row that ends frees
its slot at once and the next waiting row takes it.

- **Prefill** (:meth:`SlotDecoder.prefill`): each distinct image of the admitted rows goes through
  the model's own forward once (vision tower, adapter, the image tokens' bidirectional mask),
  images of equal token count together, so mixed sizes cost no padding. Its keys/values are
  copied into the slot of every row that asks about it; then the rows' prompt suffixes are
  prefilled against their slots, which gives each row its first token.
- **Decode** (:meth:`SlotDecoder.decode`): one token for a contiguous range of slots: the opened
  tasks' region, or the bulk region. Attention reads only the first ``bucket`` positions, the
  longest live row rounded up. On CUDA the step is captured as a graph per (range, bucket) and
  replayed; optionally (``compile_step``) the opened tasks' step is compiled first.

Slots 0..interactive-1 belong to opened tasks, the next ``bulk`` slots to bulk work, and one
scratch slot takes the padding rows of a captured prefill. Numerics are those of greedy
``generate()`` on the same inputs (a test checks equal answers).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from molmo_backend.engine import slot_attention
from molmo_backend.engine.phases import PhaseTimer
from molmo_backend.engine.prefill import PreparedImage, prefill_groups, stack_images
from molmo_backend.engine.slots import (
    INTERACTIVE_SLOTS,
    LENGTH_STEP,
    CacheView,
    SlotCache,
    round_up,
    row_bucket,
)

log = logging.getLogger(__name__)

_CAPTURE_LOCK = threading.Lock()


@dataclass
class SlotRow:
    """What the decoder knows of one admitted row."""

    slot: int
    prompt_ids: list[int]  # prefix + suffix, for logits processors (tests)
    length: int  # tokens in its slot


class SlotDecoder:
    """Prefill and decode steps over the slots of one Molmo2ForConditionalGeneration."""

    def __init__(
        self,
        model,
        eos_ids: Sequence[int],
        pad_id: int,
        *,
        bulk_slots: int,
        slot_length: int,
        interactive_slots: int = INTERACTIVE_SLOTS,
        use_cuda_graph: bool = True,
        compile_step: bool = False,
    ):
        self.model = model
        self.lm = model.model.language_model
        self.embed = self.lm.embed_tokens
        self.lm_head = model.lm_head
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.device, self.dtype = model.device, self.embed.weight.dtype
        self.neg = torch.finfo(self.dtype).min
        #: bytes one cached token takes (keys and values of every layer)
        self.kv_bytes_per_token = (
            2 * self.num_layers * self.kv_heads * self.head_dim * self.embed.weight.element_size()
        )
        self.eos = sorted(set(eos_ids))
        self.pad_id = pad_id
        self.use_cuda_graph = use_cuda_graph and self.device.type == "cuda"
        #: torch.compile the opened tasks' decode step (one compile, dynamic shapes); switched
        #: off for good if compiling fails
        self.compile_step = compile_step
        self._compiled = None
        self.interactive_slots = interactive_slots
        self.bulk_slots = bulk_slots
        self.scratch = interactive_slots + bulk_slots  # padding rows of captured prefills write here
        self.slots = self.scratch + 1
        self.cache = SlotCache(
            self.num_layers, self.slots, self.kv_heads, slot_length, self.head_dim, self.dtype, self.device
        )
        self.slot_length = slot_length
        device = self.device
        self.last_token = torch.zeros((self.slots,), dtype=torch.long, device=device)
        self.lengths = torch.ones((self.slots,), dtype=torch.long, device=device)
        self.out_token = torch.zeros((self.slots,), dtype=torch.long, device=device)
        self.out_logprob = torch.zeros((self.slots,), dtype=torch.float, device=device)
        self.positions = torch.arange(slot_length, device=device)
        self.slot_index = torch.arange(self.slots, device=device)
        self._free = {
            True: list(range(interactive_slots)),
            False: list(range(interactive_slots, self.scratch)),
        }
        self._graphs: dict = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_cuda_graph else None
        groups = self.lm.config.num_attention_heads // self.kv_heads
        #: decode attention reads each row's own keys (CUDA's variable-length kernel, checked
        #: against SDPA here first); else SDPA reads every row up to the step's read length
        self.varlen = slot_attention.available(self.device, self.dtype, self.kv_heads, self.head_dim, groups)
        if self.varlen:
            slot_attention.install()
        #: set to a dict to collect seconds per phase (synchronises the GPU: benchmarks only)
        self.profile: dict | None = None

    # -- slots ---------------------------------------------------------------------------------
    def free_slots(self, interactive: bool) -> int:
        return len(self._free[interactive])

    def take_slot(self, interactive: bool) -> int:
        free = self._free[interactive]
        free.sort()
        return free.pop(0)  # lowest first: keeps the stepped range short

    def release(self, slot: int) -> None:
        interactive = slot < self.interactive_slots
        self._free[interactive].append(slot)

    # -- prefill -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        images: Sequence[PreparedImage],
        image_of: Sequence[int],
        slots: Sequence[int],
        suffixes: Sequence[list[int]],
        logits_processors=(),
    ) -> tuple[list[SlotRow], list[int], list[float]]:
        """Prefill rows (row i shows ``images[image_of[i]]`` in slot ``slots[i]`` and asks
        ``suffixes[i]``); returns each row's state and its first token and log-probability."""
        with self._on_device():
            timer = PhaseTimer(self.profile, self.device)
            rows = [SlotRow(slot, [], 0) for slot in slots]
            for members in prefill_groups([image.length for image in images]):
                self._prefill_images(images, members, image_of, rows)
            timer.lap("prefix")
            for i, row in enumerate(rows):
                row.prompt_ids = images[image_of[i]].inputs["input_ids"][0].tolist() + list(suffixes[i])
            tokens, logprobs = self._prefill_suffixes(rows, suffixes, logits_processors)
            timer.lap("suffix")
            return rows, tokens, logprobs

    def _prefill_images(self, images, members: list[int], image_of, rows: list[SlotRow]) -> None:
        """One forward for these images (left-padded to the longest); copies each image's K/V
        into the slots of the rows that show it, at positions 0..its length-1."""
        inputs = stack_images([images[i] for i in members], self.device, self.dtype, self.pad_id)
        mask = inputs["attention_mask"].bool()
        width = mask.shape[1]
        cache = DynamicCache(config=self.model.config.get_text_config())
        self.model.model(
            **inputs,
            position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
        )
        local = {image: k for k, image in enumerate(members)}
        by_length: dict[int, list[int]] = {}
        for i, image in enumerate(image_of):
            if image in local:
                by_length.setdefault(images[image].length, []).append(i)
        for length, targets in by_length.items():
            slots = torch.tensor([rows[i].slot for i in targets], device=self.device)
            sources = torch.tensor([local[image_of[i]] for i in targets], device=self.device)
            for layer in range(self.num_layers):
                keys = cache.layers[layer].keys[sources, :, width - length :].transpose(1, 2)
                values = cache.layers[layer].values[sources, :, width - length :].transpose(1, 2)
                self.cache.keys[layer][:, :length].index_copy_(0, slots, keys)
                self.cache.values[layer][:, :length].index_copy_(0, slots, values)
            for i in targets:
                rows[i].length = length

    def _prefill_suffixes(
        self, rows: list[SlotRow], suffixes, logits_processors
    ) -> tuple[list[int], list[float]]:
        """The prompt suffixes behind their prefixes, right-padded; each row's first pick."""
        device = self.device
        count, width = len(rows), max(len(s) for s in suffixes)
        ids = torch.full((count, width), self.pad_id, dtype=torch.long)
        for i, suffix in enumerate(suffixes):
            ids[i, : len(suffix)] = torch.tensor(suffix, dtype=torch.long)
        starts = torch.tensor([row.length for row in rows])
        ends = torch.tensor([row.length + len(s) for row, s in zip(rows, suffixes)])
        read_length = min(round_up(int(ends.max()), LENGTH_STEP), self.slot_length)
        positions = starts[:, None] + torch.arange(width)[None, :]
        slots = torch.tensor([row.slot for row in rows])
        visible = torch.arange(read_length)[None, None, :] <= positions[:, :, None]
        mask = torch.where(visible, 0.0, self.neg).to(self.dtype)[:, None]
        ids, positions, slots, mask = (t.to(device, non_blocking=True) for t in (ids, positions, slots, mask))
        self.cache.view = CacheView(
            slots[:, None].expand(count, width),
            positions.clamp(max=self.slot_length - 1),
            self.positions[:read_length],
            gather=slots,
        )
        hidden = self.lm(
            inputs_embeds=self.embed(ids),
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        ).last_hidden_state
        last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
        logits = self.lm_head(hidden[torch.arange(count, device=device), last]).float()
        if logits_processors:
            logits = self._process(logits, [row.prompt_ids for row in rows], logits_processors)
        logprob, token = torch.log_softmax(logits, dim=-1).max(dim=-1)
        for row, suffix in zip(rows, suffixes):
            row.length += len(suffix)
        self.last_token.index_copy_(0, slots, token)
        self.lengths.index_copy_(0, slots, ends.to(device))
        return token.tolist(), logprob.tolist()

    # -- decode --------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(
        self, rows: Sequence[SlotRow], generated: Sequence[Sequence[int]] = (), logits_processors=()
    ) -> tuple[list[int], list[float]]:
        """One token for each of ``rows`` (all in the opened tasks' region or all in the bulk
        region); ``generated`` (each row's tokens so far) is only read by logits processors."""
        with self._on_device():
            timer = PhaseTimer(self.profile, self.device)
            interactive = rows[0].slot < self.interactive_slots
            first = 0 if interactive else self.interactive_slots
            top = max(row.slot for row in rows) + 1 - first
            count = min(
                row_bucket(top, interactive), self.interactive_slots if interactive else self.bulk_slots
            )
            read_length = min(round_up(max(row.length for row in rows) + 1, LENGTH_STEP), self.slot_length)
            if logits_processors:
                self._eager_step(first, count, read_length, rows, generated, logits_processors)
            elif self.use_cuda_graph:
                self._graph(first, count, read_length, interactive).replay()
            else:
                self._step(first, count, read_length, compiled=interactive and self.compile_step)
            slots = [row.slot for row in rows]
            tokens = self.out_token[first : first + count].tolist()
            logprobs = self.out_logprob[first : first + count].tolist()
            for row in rows:
                row.length += 1
            timer.lap("decode")
            timer.count("steps", 1)
            return [tokens[s - first] for s in slots], [logprobs[s - first] for s in slots]

    def _step_logits(
        self, first: int, last_token, lengths, slot_index, key_positions, varlen: bool = False
    ) -> torch.Tensor:
        """The forward of one decode step over the slots ``first``.. (graph-safe). Its tensors are
        views of the state buffers for those slots, so a compiled step sees their sizes (rows,
        positions read) as dynamic shapes, not as constants to recompile for. ``varlen``: each
        row's attention reads its own keys only (:mod:`.slot_attention`)."""
        mask = torch.where(key_positions[None, :] <= lengths[:, None], 0.0, self.neg)
        mask = mask.to(self.dtype)[:, None, None, :]
        positions = lengths[:, None]
        self.cache.view = CacheView(slot_index[:, None], positions, key_positions, first)
        plan = contextlib.nullcontext()
        if varlen:
            count, length = last_token.shape[0], self.slot_length
            starts = torch.arange(count + 1, device=last_token.device, dtype=torch.int32)
            plan = slot_attention.planned(
                slot_attention.Plan(
                    self.cache.keys,
                    self.cache.values,
                    starts * (self.lm.config.num_attention_heads // self.kv_heads),
                    (starts + first) * length,
                    (lengths + 1).to(torch.int32),
                    key_positions.shape[0],
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

    def _step_inputs(self, first: int, count: int, read_length: int) -> tuple:
        window = slice(first, first + count)
        return (
            first,
            self.last_token[window],
            self.lengths[window],
            self.slot_index[window],
            self.positions[:read_length],
        )

    def _step(self, first: int, count: int, read_length: int, compiled: bool = False) -> None:
        """One decode step writing its picks into the state buffers (graph-safe)."""
        inputs = self._step_inputs(first, count, read_length)
        logits = (
            self._compiled_logits(*inputs[1:]) if compiled else self._step_logits(*inputs, varlen=self.varlen)
        )
        logprob, token = torch.log_softmax(logits, dim=-1).max(dim=-1)
        self._advance(first, count, token, logprob)

    def _advance(self, first, count, token, logprob) -> None:
        window = slice(first, first + count)
        self.out_token[window] = token
        self.out_logprob[window] = logprob
        self.last_token[window] = token
        self.lengths[window] += 1
        self.lengths[window] = self.lengths[window].clamp(max=self.slot_length - 1)

    def _eager_step(self, first, count, read_length, rows, generated, logits_processors) -> None:
        """A step whose picks go through logits processors (tests force answers with them)."""
        logits = self._step_logits(*self._step_inputs(first, count, read_length))
        history = [list(row.prompt_ids) + list(done) for row, done in zip(rows, generated)]
        picked = self._process(logits[[row.slot - first for row in rows]], history, logits_processors)
        full = logits.clone()
        full[[row.slot - first for row in rows]] = picked
        logprob, token = torch.log_softmax(full, dim=-1).max(dim=-1)
        self._advance(first, count, token, logprob)

    def _process(self, logits, histories: list[list[int]], logits_processors) -> torch.Tensor:
        width = max(len(h) for h in histories)
        input_ids = torch.full((len(histories), width), self.pad_id, dtype=torch.long, device=self.device)
        for i, history in enumerate(histories):
            input_ids[i, width - len(history) :] = torch.tensor(history, device=self.device)
        for processor in logits_processors:
            logits = processor(input_ids, logits)
        return logits

    def _interactive_step_logits(self, *inputs) -> torch.Tensor:
        """:meth:`_step_logits` of the opened tasks' region, which starts at slot 0 (a constant to
        the compiler: a start it had to trace as a number specialised the row count)."""
        return self._step_logits(0, *inputs)

    def _compiled_logits(self, *inputs) -> torch.Tensor:
        """:meth:`_step_logits` through torch.compile, compiled on first use (outside any graph
        capture: a capture warms up first). Dynamic shapes: one compile serves every row count
        and cache length. Casts are rounded where eager rounds them, so greedy picks stay those
        of the eager step. If compiling fails, the step runs eagerly from then on (same
        answers, slower) and the log says why."""
        if self._compiled is None:
            self._compiled = torch.compile(
                self._interactive_step_logits, dynamic=True, options={"emulate_precision_casts": True}
            )
        try:
            return self._compiled(*inputs)
        except torch._dynamo.exc.TorchDynamoException:  # raised while compiling, before any work
            log.warning(
                "torch.compile of the decode step failed: decoding without it "
                "(MOLMO_COMPILE=0 skips the attempt)",
                exc_info=True,
            )
            self.compile_step = False
            return self._interactive_step_logits(*inputs)

    @torch.inference_mode()
    def capture_graphs(self) -> int:
        """Capture the decode step for every row bucket and read length now, while no slot is
        in use (a capture runs one real step over its slots), so that no step waits for one
        later. Returns how many were captured; a no-op without CUDA graphs."""
        if not self.use_cuda_graph:
            return 0
        if self.free_slots(True) < self.interactive_slots or self.free_slots(False) < self.bulk_slots:
            raise RuntimeError("capture_graphs needs every slot free")
        before = len(self._graphs)
        with self._on_device():
            for interactive, size in ((True, self.interactive_slots), (False, self.bulk_slots)):
                counts = sorted({min(row_bucket(n, interactive), size) for n in range(1, size + 1)})
                first = 0 if interactive else self.interactive_slots
                for count in counts:
                    for read_length in range(LENGTH_STEP, self.slot_length + 1, LENGTH_STEP):
                        self._graph(first, count, read_length, interactive).replay()
            self.lengths.fill_(1)
            self.last_token.zero_()
        return len(self._graphs) - before

    def _graph(self, first: int, count: int, read_length: int, interactive: bool) -> _StepGraph:
        compiled = interactive and self.compile_step
        key = (first, count, read_length, compiled)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = _StepGraph(self, first, count, read_length, compiled)
        return graph

    def _on_device(self):
        if self.device.type == "cuda":  # each GPU replica runs in its own thread
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()


class _StepGraph:
    """One decode step over a fixed slot range and read length, captured as a CUDA graph.

    Its first use runs the step eagerly on a side stream (that is this call's real result, and
    where a compiled step compiles), then captures the same work without running it; later uses
    replay it."""

    def __init__(self, decoder: SlotDecoder, first: int, count: int, read_length: int, compiled: bool):
        self.decoder, self.args, self.compiled = decoder, (first, count, read_length), compiled
        self.graph: torch.cuda.CUDAGraph | None = None

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        decoder = self.decoder
        with _CAPTURE_LOCK:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                decoder._step(*self.args, compiled=self.compiled)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph, pool=decoder._graph_pool, stream=torch.cuda.Stream(), capture_error_mode="thread_local"
            ):
                decoder._step(*self.args, compiled=self.compiled)
        self.graph = graph
