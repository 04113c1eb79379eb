"""Where a decoder's time goes: wall seconds per phase (prepare, prefill, decode...) for the
bench's phase profile. Timing a GPU phase needs a synchronise, so it is off (a no-op) unless the
engine was given a dict to add into."""

from __future__ import annotations

import time

import torch


class PhaseTimer:
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
