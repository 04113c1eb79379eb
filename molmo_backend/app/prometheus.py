"""``/metrics`` in Prometheus' text format, from the live objects at each scrape.

Counters stay where their concern lives (the server's request counts, the scheduler's stats, the
backend's fetch failures and retrieve counters, molmo_backend/metrics.py); this module only
reads them when Prometheus scrapes, so nothing else depends on prometheus-client but the two
histograms (request seconds here, per-pair seconds in the scheduler). Every name starts with
``molmo_``; docs/metrics.md lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from molmo_backend.engine.queue import Priority

#: seconds a /predict or /setup took, as the server saw it
REQUEST_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 90.0, 120.0)
STATES = ("loading", "ready", "failed")

#: scheduler stats exported as counters: name -> help
SCHEDULER_COUNTERS = {
    "queries": "Queries (image, label pairs) the engine answered or failed",
    "failed_queries": "Queries answered with an error (a bad image, an engine failure)",
    "cancelled": "Queries dropped because nobody waited for them any more",
    "truncated": "Answers cut at MOLMO_MAX_NEW_TOKENS (points past the cap lost)",
    "prefills": "Steps admitting rows into cache slots (their prefill, in one packed forward)",
    "decode_steps": "Steps in which running rows took a token (decode-only or packed)",
    "bulk_paused_steps": "Decode steps in which bulk rows waited for opened tasks",
    "requeued": "Rows handed back to the queue when cache memory ran short (they start again)",
    "batches": "Whole batches run by a batch engine (remote, generate, Molmo v1)",
    "failed_batches": "Prefills, steps or batches that failed (then split and retried)",
}


class RequestTimer:
    """The request-seconds histogram of one app."""

    def __init__(self):
        self.histogram = Histogram(
            "molmo_request_seconds",
            "Seconds the server took to answer a request",
            ["route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=None,
        )

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.histogram.labels(route, str(status)).observe(seconds)


class _Collector:
    def __init__(self, service, requests: Callable[[], dict], timer: RequestTimer):
        self.service, self.requests, self.timer = service, requests, timer

    def collect(self) -> Iterator[Metric]:
        service = self.service
        state = GaugeMetricFamily("molmo_state", "1 for the model's current state", labels=["state"])
        for name in STATES:
            state.add_metric([name], 1.0 if service.state == name else 0.0)
        yield state
        events = CounterMetricFamily(
            "molmo_server_events", "Server events by kind (requests, errors)", labels=["event"]
        )
        for name, value in sorted(self.requests().items()):
            events.add_metric([name], value)
        yield events
        yield from self.timer.histogram.collect()
        backend = service.backend
        if backend is None:
            return
        scheduler = backend.scheduler
        stats = dict(scheduler.stats)
        for name, help_text in SCHEDULER_COUNTERS.items():
            yield CounterMetricFamily(f"molmo_scheduler_{name}", help_text, value=stats.get(name, 0))
        depth = GaugeMetricFamily(
            "molmo_queue_depth", "Queries waiting to be admitted, by priority", labels=["priority"]
        )
        for priority in Priority:
            depth.add_metric([priority.name.lower()], scheduler.pending(priority))
        yield depth
        yield GaugeMetricFamily(
            "molmo_rows_running", "Rows in the engines' cache slots (decoding)", value=scheduler.running()
        )
        yield GaugeMetricFamily(
            "molmo_pairs_per_second",
            "Queries answered per second over the last minute",
            value=scheduler.pairs_per_second(),
        )
        yield from scheduler.pair_latency.collect()
        failures = CounterMetricFamily(
            "molmo_fetch_failures", "Task images not loaded, by kind of failure", labels=["reason"]
        )
        for name, value in backend.fetch_failures.snapshot().items():
            failures.add_metric([name], value)
        yield failures
        retrieve = backend.results.stats
        for name, value in retrieve.snapshot().items():
            yield CounterMetricFamily(f"molmo_retrieve_{name}", retrieve.help[name], value=value)


def render(service, requests: Callable[[], dict], timer: RequestTimer) -> bytes:
    """The text Prometheus scrapes."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(service, requests, timer))
    return generate_latest(registry)


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
