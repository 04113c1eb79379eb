"""A decode step captured as a CUDA graph (:class:`.decoding.SlotDecoder` keeps one per region,
row bucket and read length, and replays it)."""

from __future__ import annotations

import threading

import torch

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
