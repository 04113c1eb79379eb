"""Where a decoder's time goes, for the benchmarks: wall seconds per phase (prepare, prefill,
decode...) and, step by step, the GPU's time and the idle gaps between steps.

Timing a GPU phase needs a synchronise, so the phase profile is off (a no-op) unless the engine
was given a dict to add into. The step trace records CUDA events instead (nothing waits for them
while the job runs) and is off unless the engine was given a list to append to."""

from __future__ import annotations

import time

import torch


class PhaseTimer:
    """Adds wall seconds per phase into ``sink`` (a dict), synchronising the GPU; and appends one
    entry per step to ``trace`` (a list) with three CUDA events: the step's start, its launch
    (:meth:`mark`, after the host's preparation) and its end. Each is a no-op if None."""

    def __init__(self, sink: dict | None, device: torch.device, trace: list | None = None):
        self.sink, self.device = sink, device
        self.last = time.perf_counter() if sink is not None else 0.0
        self.trace = trace if trace is not None and device.type == "cuda" else None
        self.events: list = []
        self.mark()

    def lap(self, phase: str) -> None:
        if self.sink is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.sink[phase] = self.sink.get(phase, 0.0) + now - self.last
        self.last = now

    def count(self, **values: int) -> None:
        if self.sink is not None:
            for name, value in values.items():
                self.sink[name] = self.sink.get(name, 0) + value

    def mark(self) -> None:
        """Record an event on the current stream (the step's start, then its launch)."""
        if self.trace is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)

    def traced(self, kind: str, **fields) -> None:
        """End the step: its events and ``fields`` (rows, tokens...) go into the trace."""
        if self.trace is not None:
            self.mark()
            self.trace.append({"kind": kind, "events": self.events, **fields})


def resolve(trace: list) -> list[dict]:
    """The trace's steps in milliseconds (synchronises once): ``host_ms`` from the step's start to
    its launch (the host building it; for a packed step also the vision tower's GPU work),
    ``gpu_ms`` from its launch to its end, ``gap_ms`` from the previous step's end to its start
    (the GPU idle while the scheduler ran)."""
    if not trace:
        return []
    torch.cuda.synchronize()
    steps, previous = [], None
    for entry in trace:
        start, launch, end = entry["events"][0], entry["events"][-2], entry["events"][-1]
        step = {key: value for key, value in entry.items() if key != "events"}
        step["host_ms"] = round(start.elapsed_time(launch), 3)
        step["gpu_ms"] = round(launch.elapsed_time(end), 3)
        step["gap_ms"] = round(previous.elapsed_time(start), 3) if previous is not None else 0.0
        steps.append(step)
        previous = end
    return steps
