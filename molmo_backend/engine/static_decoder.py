"""The previous engine, kept only to be measured against the slot decoder (bench/throughput.py
``--decoder static``, ``MOLMO_DECODER=static``): one padded batch at a time, run until its
longest answer ends. It is run as a whole batch by the scheduler and never paused, so no other
batch can run inside it and touch its reused buffers. To be removed once the bench shows the
slot decoder (decoding.py) ahead on every workload.

Greedy decoding for Molmo2 built for pointing: one prefill per image, a static KV cache, and an
optional CUDA graph for the decode step.

Why not plain ``generate()``: every label of an image repeats the same ~1000 image tokens, so
``generate`` prefills each image once per label; and its per-step work (growing caches, masks
rebuilt every step, Python per layer) costs far more than reading the weights once. Here:

1. the image prefix (bos + image tokens) of each distinct image is prefilled once, through the
   model's own forward (vision tower, adapter, bidirectional image-token mask);
2. its keys/values are copied into a static cache row for every (image, prompt) pair, and the
   prompt suffixes are prefilled behind them (left-padded, so all rows stay aligned);
3. decode steps write into the static cache in place; on CUDA one step is captured as a graph
   and replayed. Rows stop at their end token; the loop stops when all rows have.
4. optionally (``compile_step``), the decode step of small batches (opened tasks) is compiled
   with ``torch.compile`` once, before it is captured: fusing its small kernels (norms, rotary,
   activation, residuals) took the 8B's step from 11.6 to 10.4 ms on an H100, for a compile of
   minutes at start (bench/RESULTS.md).

Numerics are those of greedy ``generate()`` on the same inputs (a test checks equal answers).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache

log = logging.getLogger(__name__)
#: the all-done flag is read back from the GPU every this many steps (each read is a sync)
DONE_CHECK_EVERY = 4
_CAPTURE_LOCK = threading.Lock()

#: images prefilled per forward; between chunks, waiting interactive work may run
PREFILL_CHUNK_IMAGES = 8
#: batches of at most this many queries reuse cached buffers and CUDA graphs (rows rounded up to
#: a power of two, at least 2, cache length to a multiple of SLOT_LENGTH_STEP); at most
#: SLOT_CACHE_SIZE kept. (At least 2 rows: torch.compile specialises a size of 1, which would
#: cost a second compile.)
SLOT_MAX_ROWS, SLOT_LENGTH_STEP, SLOT_CACHE_SIZE = 16, 512, 3
#: prompt suffixes of small batches are padded to a multiple of this, so the suffix prefill of a
#: slot is captured once per length step and replayed
SUFFIX_LENGTH_STEP = 16


@dataclass
class _Slot:
    rows: int
    length: int
    kv: "StaticKV"
    key_valid: torch.Tensor
    state: "_DecodeState"
    step: "_Step"
    graph: "torch.cuda.CUDAGraph | None" = None
    suffix_graphs: dict = field(default_factory=dict)  # suffix length -> _SuffixGraph


class StaticKV:
    """Preallocated keys/values of every layer. The model calls :meth:`update`; the caller sets
    :attr:`write_at` (positions, a device tensor) before each forward, so a step is graph-safe."""

    is_initialized = True
    is_compileable = False

    def __init__(self, num_layers: int, batch: int, kv_heads: int, length: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.write_at: torch.Tensor | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_at, key_states)
        self.values[layer_idx].index_copy_(2, self.write_at, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


@dataclass
class Prepared:
    """A batch ready for the GPU: distinct image prefixes plus one prompt suffix per query."""

    prefix_chunks: list[dict]  # processor outputs for PREFILL_CHUNK_IMAGES distinct images each
    image_of: list[int]  # query -> distinct image index (chunk = index // PREFILL_CHUNK_IMAGES)
    suffix_ids: list[list[int]]  # query -> token ids of its prompt suffix


def prepare(processor, queries: Sequence, suffix_of, device: torch.device) -> Prepared:
    """Run the processor once per distinct image (``image_key``, else identity)."""
    rows: dict = {}
    images = []
    image_of = []
    for q in queries:
        key = q.image_key if q.image_key is not None else id(q.image)
        if key not in rows:
            rows[key] = len(images)
            images.append(q.image)
        image_of.append(rows[key])
    chunks = []
    for start in range(0, len(images), PREFILL_CHUNK_IMAGES):
        part = images[start:start + PREFILL_CHUNK_IMAGES]
        encoded = processor(
            images=[[image] for image in part], text=[processor.image_token] * len(part),
            padding=True, return_tensors="pt", device=device,  # crops are resized on the GPU
        )
        chunks.append({k: v.to(device) for k, v in encoded.items()})
    tokenizer = processor.tokenizer
    suffix_ids = [tokenizer(suffix_of(q.prompt), add_special_tokens=False)["input_ids"] for q in queries]
    return Prepared(chunks, image_of, suffix_ids)


class GreedyDecoder:
    """Runs :class:`Prepared` batches through a Molmo2ForConditionalGeneration."""

    def __init__(self, model, eos_ids: Sequence[int], pad_id: int, use_cuda_graph: bool = True,
                 compile_step: bool = False):
        self.model = model
        self.lm = model.model.language_model
        self.embed = self.lm.embed_tokens
        self.lm_head = model.lm_head
        text = model.config.text_config
        self.num_layers = text.num_hidden_layers
        self.kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        #: bytes one cached token takes in a batch's static cache (keys and values of every layer)
        self.kv_bytes_per_token = 2 * self.num_layers * self.kv_heads * self.head_dim * self.embed.weight.element_size()
        self.eos = torch.tensor(sorted(set(eos_ids)), device=model.device)
        self.pad_id = pad_id
        self.use_cuda_graph = use_cuda_graph and model.device.type == "cuda"
        #: set to a dict to collect seconds per phase (synchronises the GPU: for benchmarks only)
        self.profile: dict | None = None
        self._slots: dict = {}
        #: reuse small-batch buffers even without CUDA graphs (lets CPU tests cover that path)
        self.reuse_buffers = False
        #: torch.compile the decode step of small batches (one compile, dynamic shapes, shared by
        #: every slot); switched off for good if compiling fails
        self.compile_step = compile_step
        self._compiled_forward = None

    def run(self, batch: Prepared, max_new_tokens: int, logits_processors=()) -> tuple[list[list[int]], list[list[float]]]:
        """Generated token ids and their log-probabilities per query, cut at the end token."""
        if self.model.device.type != "cuda":
            return self._run(batch, max_new_tokens, logits_processors)
        with torch.cuda.device(self.model.device):  # each GPU replica runs in its own thread
            return self._run(batch, max_new_tokens, logits_processors)

    @torch.inference_mode()
    def _run(self, batch, max_new_tokens, logits_processors):
        model, device = self.model, self.model.device
        dtype = self.embed.weight.dtype
        neg = torch.finfo(dtype).min
        timer = _PhaseTimer(self.profile, device)

        n_real = len(batch.suffix_ids)
        plen = max(chunk["input_ids"].shape[1] for chunk in batch.prefix_chunks)
        slen = max(len(s) for s in batch.suffix_ids)
        use_graph = self.use_cuda_graph and not logits_processors and max_new_tokens > 1
        reuse = (use_graph or (self.reuse_buffers and not logits_processors)) and n_real <= SLOT_MAX_ROWS
        if reuse:  # suffix length in steps too, so its prefill graph is reused across prompts
            slen = -(-slen // SUFFIX_LENGTH_STEP) * SUFFIX_LENGTH_STEP
        total = plen + slen + max_new_tokens
        slot = self._slot(n_real, total, max_new_tokens, dtype) if reuse else None
        if slot is not None:  # small batch: reuse buffers and graph; extra rows repeat query 0
            n, total = slot.rows, slot.length
            image_of = batch.image_of + [batch.image_of[0]] * (n - n_real)
            suffix_ids = batch.suffix_ids + [batch.suffix_ids[0]] * (n - n_real)
            batch = Prepared(batch.prefix_chunks, image_of, suffix_ids)
            kv, key_valid, state = slot.kv, slot.key_valid, slot.state
            key_valid.zero_()
        else:
            n = n_real
            kv = StaticKV(self.num_layers, n, self.kv_heads, total, self.head_dim, dtype, device)
            key_valid = torch.zeros((n, total), dtype=torch.bool, device=device)
            state = _DecodeState(n, max_new_tokens, device)
        prefix_len = torch.zeros((n,), dtype=torch.long, device=device)
        prompt_ids = torch.full((n, plen + slen), self.pad_id, dtype=torch.long, device=device)

        # 1. prefix prefill, once per distinct image, through the model's own forward (vision
        #    tower, adapter, image-token block mask); each chunk is copied right-aligned into the
        #    static cache rows of the queries that show its images
        for c, chunk in enumerate(batch.prefix_chunks):
            first = c * PREFILL_CHUNK_IMAGES
            mask = chunk["attention_mask"].bool()
            width = mask.shape[1]
            cache = DynamicCache(config=model.config.get_text_config())
            model.model(**chunk, position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0),
                        past_key_values=cache, use_cache=True)
            queries = [i for i, image in enumerate(batch.image_of) if first <= image < first + mask.shape[0]]
            rows = torch.tensor(queries, device=device)
            local = torch.tensor([batch.image_of[i] - first for i in queries], device=device)
            for layer in range(self.num_layers):
                kv.keys[layer][:, :, plen - width:plen].index_copy_(0, rows, cache.layers[layer].keys[local])
                kv.values[layer][:, :, plen - width:plen].index_copy_(0, rows, cache.layers[layer].values[local])
            key_valid[:, plen - width:plen].index_copy_(0, rows, mask[local])
            prefix_len.index_copy_(0, rows, mask.sum(-1)[local])
            prompt_ids[:, plen - width:plen].index_copy_(0, rows, chunk["input_ids"][local])
            del cache
            timer.lap("prefix")

        # 2. prompt suffixes, left-padded behind the prefixes so every row stays aligned
        suffix = torch.full((n, slen), self.pad_id, dtype=torch.long, device=device)
        suffix_mask = torch.zeros((n, slen), dtype=torch.bool, device=device)
        for i, ids in enumerate(batch.suffix_ids):
            suffix[i, slen - len(ids):] = torch.tensor(ids, device=device)
            suffix_mask[i, slen - len(ids):] = True
        key_valid[:, plen:plen + slen] = suffix_mask
        prompt_ids[:, plen:] = suffix
        suffix_pos = prefix_len[:, None] + (suffix_mask.long().cumsum(-1) - 1).clamp(min=0)
        key_index = torch.arange(total, device=device)
        query_index = torch.arange(slen, device=device)
        causal = (key_index[None, :] < plen) | (key_index[None, :] <= plen + query_index[:, None])
        allowed = key_valid[:, None, :] & causal[None] & (key_index < plen + slen)[None, None, :]
        mask = torch.where(allowed, 0.0, neg).to(dtype)[:, None]
        write_at = torch.arange(plen, plen + slen, device=device)
        if slot is not None and use_graph:
            if slen not in slot.suffix_graphs:
                slot.suffix_graphs[slen] = _SuffixGraph(self, kv, n, slen, total, dtype, device)
            logits = slot.suffix_graphs[slen].run(suffix, mask, suffix_pos, write_at)
        else:
            logits = self._suffix_logits(kv, suffix, mask, suffix_pos, write_at)

        # 3. decode
        state.reset(plen + slen, prefix_len + suffix_mask.sum(-1))
        first_pick = self._pick(logits, state, prompt_ids, logits_processors)
        state.record(first_pick, self.eos)
        timer.lap("suffix")
        step = slot.step if slot is not None else _Step(self, kv, key_valid, state, neg, dtype)
        graph = None
        if use_graph:
            graph = slot.graph if slot is not None and slot.graph is not None else step.capture()
            if slot is not None:
                slot.graph = graph
            timer.lap("capture")
        steps = 1
        for t in range(1, max_new_tokens):
            if t % DONE_CHECK_EVERY == 0 and bool(state.done.all()):
                break
            if graph is not None:
                graph.replay()
            elif logits_processors:
                step.run_eager(lambda logits: self._pick(logits, state, prompt_ids, logits_processors))
            else:
                step()
            steps += 1
            timer.lap("decode")
        timer.count("steps", steps)
        tokens, logprobs = state.results(self.eos, max_new_tokens)
        return tokens[:n_real], logprobs[:n_real]

    def _slot(self, rows: int, length: int, max_new_tokens: int, dtype) -> "_Slot":
        """Reusable buffers + captured graph for small batches (opened tasks): capturing a graph
        costs about as much as 15 replays, so one per call would eat the gain."""
        rows = max(2, 1 << (rows - 1).bit_length())
        length = -(-length // SLOT_LENGTH_STEP) * SLOT_LENGTH_STEP
        key = (rows, length, max_new_tokens)
        if key not in self._slots:
            while len(self._slots) >= SLOT_CACHE_SIZE:
                self._slots.pop(next(iter(self._slots)))
            device = self.model.device
            kv = StaticKV(self.num_layers, rows, self.kv_heads, length, self.head_dim, dtype, device)
            key_valid = torch.zeros((rows, length), dtype=torch.bool, device=device)
            state = _DecodeState(rows, max_new_tokens, device)
            step = _Step(self, kv, key_valid, state, torch.finfo(dtype).min, dtype, compilable=True)
            self._slots[key] = _Slot(rows, length, kv, key_valid, state, step)
        return self._slots[key]

    def compiled_logits(self, step: "_Step") -> torch.Tensor:
        """:meth:`_Step.forward_logits` through torch.compile, compiled on first use (outside
        any graph capture: a capture warms up first). Dynamic shapes: one compile serves every
        slot (rows and cache length vary). Casts are rounded where eager rounds them, so greedy
        picks stay those of the eager step. If compiling fails, the step runs eagerly from then
        on (same answers, slower) and the log says why."""
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(
                _Step.forward_logits, dynamic=True, options={"emulate_precision_casts": True})
        try:
            return self._compiled_forward(step)
        except torch._dynamo.exc.TorchDynamoException:  # raised while compiling, before any work
            log.warning("torch.compile of the decode step failed: decoding without it "
                        "(MOLMO_COMPILE=0 skips the attempt)", exc_info=True)
            self.compile_step = False
            return step.forward_logits()

    def _suffix_logits(self, kv, suffix, mask, positions, write_at):
        """Prefill the prompt suffixes into ``kv``; the logits of each row's last token."""
        kv.write_at = write_at
        hidden = self.lm(inputs_embeds=self.embed(suffix), attention_mask=mask, position_ids=positions,
                         past_key_values=kv, use_cache=True).last_hidden_state
        return self.lm_head(hidden[:, -1]).float()

    def _pick(self, logits, state, prompt_ids, logits_processors):
        """Greedy choice, after the processors (tests force answers through them)."""
        if logits_processors:
            input_ids = torch.cat([prompt_ids, state.tokens_so_far()], dim=1)
            for processor in logits_processors:
                logits = processor(input_ids, logits)
        return torch.log_softmax(logits, dim=-1).max(dim=-1)


class _DecodeState:
    """Device buffers one decode step reads and advances; fixed addresses for graph replay."""

    def __init__(self, n, max_new_tokens, device):
        self.out_tokens = torch.zeros((n, max_new_tokens), dtype=torch.long, device=device)
        self.out_logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float, device=device)
        self.tokens = torch.zeros((n, 1), dtype=torch.long, device=device)  # last generated token
        self.positions = torch.zeros((n, 1), dtype=torch.long, device=device)  # its position id
        self.t = torch.zeros((1,), dtype=torch.long, device=device)  # tokens generated so far
        self.base = torch.zeros((1,), dtype=torch.long, device=device)  # cache slot of token t=1, minus 1
        self.write_at = torch.zeros((1,), dtype=torch.long, device=device)
        self.done = torch.zeros((n,), dtype=torch.bool, device=device)

    def reset(self, first_write: int, first_position: torch.Tensor) -> None:
        """Start a new batch in these buffers (in place: a captured graph keeps reading them)."""
        self.out_tokens.zero_()
        self.out_logprobs.zero_()
        self.tokens.zero_()
        self.positions.copy_((first_position - 1)[:, None])
        self.t.zero_()
        self.base.fill_(first_write - 1)
        self.done.zero_()

    def record(self, pick, eos):
        """Store this step's (logprob, token) at column t and advance."""
        logprob, token = pick
        self.out_tokens.index_copy_(1, self.t, token[:, None])
        self.out_logprobs.index_copy_(1, self.t, logprob[:, None])
        self.done |= torch.isin(token, eos)
        self.tokens.copy_(token[:, None])
        self.positions += 1
        self.t += 1

    def tokens_so_far(self):
        return self.out_tokens[:, : int(self.t)]

    def results(self, eos, limit: int) -> tuple[list[list[int]], list[list[float]]]:
        count = min(int(self.t), limit)
        tokens = self.out_tokens[:, :count].tolist()
        logprobs = self.out_logprobs[:, :count].tolist()
        eos_set = set(eos.tolist())
        out_tokens, out_logprobs = [], []
        for row_tokens, row_logprobs in zip(tokens, logprobs):
            end = next((i for i, tok in enumerate(row_tokens) if tok in eos_set), len(row_tokens))
            out_tokens.append(row_tokens[:end])
            out_logprobs.append(row_logprobs[:end])
        return out_tokens, out_logprobs


class _Step:
    """One decode step over static buffers: feed the last token, write its K/V, pick the next."""

    def __init__(self, decoder: GreedyDecoder, kv: StaticKV, key_valid, state: _DecodeState, neg, dtype,
                 compilable: bool = False):
        self.decoder, self.kv, self.key_valid, self.state = decoder, kv, key_valid, state
        self.neg, self.dtype = neg, dtype
        #: a small-batch (slot) step: compiled while the decoder's ``compile_step`` is on
        self.compilable = compilable

    def forward_logits(self):
        state = self.state
        torch.add(state.t, state.base, out=state.write_at)
        self.key_valid.index_fill_(1, state.write_at, True)
        mask = torch.where(self.key_valid, 0.0, self.neg).to(self.dtype)[:, None, None, :]
        self.kv.write_at = state.write_at
        d = self.decoder
        hidden = d.lm(inputs_embeds=d.embed(state.tokens), attention_mask=mask, position_ids=state.positions,
                      past_key_values=self.kv, use_cache=True).last_hidden_state
        return d.lm_head(hidden[:, -1]).float()

    def __call__(self):
        compiled = self.compilable and self.decoder.compile_step
        logits = self.decoder.compiled_logits(self) if compiled else self.forward_logits()
        self.state.record(torch.log_softmax(logits, dim=-1).max(dim=-1), self.decoder.eos)

    def run_eager(self, pick):
        self.state.record(pick(self.forward_logits()), self.decoder.eos)

    def capture(self) -> "torch.cuda.CUDAGraph":
        """Capture one step. Warm-up runs mutate the buffers, so they are saved and restored."""
        state, saved = self.state, {}
        names = ("out_tokens", "out_logprobs", "tokens", "positions", "t", "base", "done")
        for name in names:
            saved[name] = getattr(state, name).clone()
        saved_valid = self.key_valid.clone()
        graph = torch.cuda.CUDAGraph()
        # The warm-up (where a compiled step compiles) and the capture, one at a time in the
        # process. Own capture stream on this replica's GPU (torch's default capture stream is one
        # shared stream on whichever GPU came first); thread_local: replicas on other GPUs keep
        # working in their threads.
        try:
            with _CAPTURE_LOCK:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self()
                torch.cuda.current_stream().wait_stream(stream)
                with torch.cuda.graph(graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
                    self()
        finally:  # also after a failed attempt: the caller may capture again
            for name in names:
                getattr(state, name).copy_(saved[name])
            self.key_valid.copy_(saved_valid)
        return graph


class _PhaseTimer:
    """Adds wall seconds per phase into ``sink`` (a dict), synchronising the GPU; no-op if None."""

    def __init__(self, sink: dict | None, device: torch.device):
        self.sink, self.device = sink, device
        self.last = time.perf_counter() if sink is not None else 0.0

    def lap(self, phase: str) -> None:
        if self.sink is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.sink[phase] = self.sink.get(phase, 0.0) + now - self.last
        self.last = now

    def count(self, name: str, value: int) -> None:
        if self.sink is not None:
            self.sink[name] = self.sink.get(name, 0) + value


class _SuffixGraph:
    """The suffix prefill of one slot and suffix length as a CUDA graph: for an opened task the
    eager forward (36 layers of Python for a few dozen tokens) costs more than its arithmetic."""

    def __init__(self, decoder: GreedyDecoder, kv: StaticKV, rows: int, slen: int, length: int, dtype, device):
        self.decoder, self.kv = decoder, kv
        self.ids = torch.zeros((rows, slen), dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, 1, slen, length), dtype=dtype, device=device)
        self.positions = torch.zeros((rows, slen), dtype=torch.long, device=device)
        self.write_at = torch.zeros((slen,), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _forward(self) -> torch.Tensor:
        return self.decoder._suffix_logits(self.kv, self.ids, self.mask, self.positions, self.write_at)

    def run(self, ids, mask, positions, write_at) -> torch.Tensor:
        self.ids.copy_(ids)
        self.mask.copy_(mask)
        self.positions.copy_(positions)
        self.write_at.copy_(write_at)
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        # first use: an eager warm-up run on a side stream gives this call's real result (and
        # writes its keys/values); the capture records the same work without running it
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            logits = self._forward().clone()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _CAPTURE_LOCK, torch.cuda.graph(graph, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
            self.logits = self._forward()
        self.graph = graph
        return logits
