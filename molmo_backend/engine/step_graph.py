"""A decode step captured as a CUDA graph (:class:`.decoding.SlotDecoder` keeps one per region,
row bucket and read length, and replays it), all of them captured at start, and the step
compiled with torch.compile (MOLMO_COMPILE) before its capture."""

from __future__ import annotations

import logging
import threading

import torch

from molmo_backend.engine.slots import LENGTH_STEP, row_bucket

log = logging.getLogger(__name__)

_CAPTURE_LOCK = threading.Lock()


class StepGraph:
    """One decode step over a region's step list (a fixed row count) and read length, captured as
    a CUDA graph.

    Its first use runs the step eagerly on a side stream (that is this call's real result, and
    where a compiled step compiles), then captures the same work without running it; later uses
    replay it."""

    def __init__(self, decoder, interactive: bool, count: int, read_length: int, compiled: bool):
        self.decoder, self.args, self.compiled = decoder, (interactive, count, read_length), compiled
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


@torch.inference_mode()
def capture_all(decoder) -> int:
    """Capture the decode step for every row bucket and read length now, while no slot is in use
    (a capture runs one real step over its slots), so that no step waits for one later. Returns
    how many were captured; a no-op without CUDA graphs."""
    if not decoder.use_cuda_graph:
        return 0
    if decoder.space.held:
        raise RuntimeError("capture_graphs needs every slot free")
    before = len(decoder._graphs)
    with decoder.on_device():
        for interactive, size in ((True, decoder.interactive_slots), (False, decoder.bulk_slots)):
            counts = sorted({min(row_bucket(n, interactive), size) for n in range(1, size + 1)})
            first = decoder.space.regions[interactive].first
            decoder.step_entries[interactive].zero_()
            decoder.step_entries[interactive][0].copy_(torch.arange(first, first + size))
            for count in counts:
                for read_length in range(LENGTH_STEP, decoder.max_length + 1, LENGTH_STEP):
                    decoder._graph(interactive, count, read_length).replay()
        decoder.lengths.zero_()
        decoder.last_token.zero_()
    return len(decoder._graphs) - before


def compiled_logits(decoder, *inputs) -> torch.Tensor:
    """The decoder's ``_step_logits`` through torch.compile, compiled on first use (outside any
    graph capture: a capture warms up first). Dynamic shapes: one compile serves every row count
    and cache length. Casts are rounded where eager rounds them, so greedy picks stay those of
    the eager step. If compiling fails, the step runs eagerly from then on (same answers,
    slower) and the log says why."""
    if decoder._compiled is None:
        decoder._compiled = torch.compile(
            decoder._step_logits, dynamic=True, options={"emulate_precision_casts": True}
        )
    try:
        return decoder._compiled(*inputs)
    except torch._dynamo.exc.TorchDynamoException:  # raised while compiling, before any work
        log.warning(
            "torch.compile of the decode step failed: decoding without it (MOLMO_COMPILE=0 skips the attempt)",
            exc_info=True,
        )
        decoder.compile_step = False
        return decoder._step_logits(*inputs)
