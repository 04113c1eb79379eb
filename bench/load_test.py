"""Bounded load test of the real server on 127.0.0.1: concurrent clients mixing opened-task and
bulk requests, every result checked, /health timed throughout.

    .venv/bin/python bench/load_test.py --clients 8 --duration 120 --out bench/load-2min

It starts everything itself and stops by itself: a static image server and the backend (real
gunicorn, the tiny demo Molmo2 with answers forced per label, tests/support/forced_backend.py),
both on 127.0.0.1 only. Each task shows an image of its own size, so a result that belongs to
another task (reordered) or is missing (lost) is caught; about one bulk task in ten points at a
missing image and must come back empty, in its place. It writes OUT.json and OUT.md and prints
the markdown; the exit status is 1 when any result was lost, reordered or wrong, any request
failed, or /health p99 reached 1 s (Label Studio's ML_TIMEOUT_HEALTH).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.processes import BackendServer  # noqa: E402

MAX_CLIENTS, MAX_DURATION = 64, 600.0
N_IMAGES = 48
FORCED = {
    "cat": '<points coords="1 1 250 500 2 750 100">cat</points>',  # -> (25, 50), (75, 10)
    "dog": '<point x="12.5" y="80.0" alt="dog">dog</point>',  # -> (12.5, 80)
}
EXPECTED_POINTS = [("cat", 25.0, 50.0), ("cat", 75.0, 10.0), ("dog", 12.5, 80.0)]
CONFIG = (
    '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="cat"/><Label value="dog"/></KeyPointLabels></View>'
)
HEALTH_LIMIT_S = 1.0


def image_size(i: int) -> tuple[int, int]:
    """Every image a size of its own: the size in a result says which task it belongs to."""
    return 40 + i, 30 + (i * 7) % 41


def _png(size) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (40 + size[0] % 200, 90, 160)).save(buf, "PNG")
    return buf.getvalue()


class ImageServer:
    """Serves /img/<i>.png (image i) on 127.0.0.1; anything else is 404."""

    def __init__(self):
        files = {f"/img/{i}.png": _png(image_size(i)) for i in range(N_IMAGES)}

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                body = files.get(self.path)
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.1,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: dict = field(default_factory=lambda: {"open": 0, "bulk": 0})
    latencies: dict = field(default_factory=lambda: {"open": [], "bulk": []})
    tasks: int = 0
    ok: int = 0  # tasks with exactly their own keypoints
    empty_as_expected: int = 0  # missing-image tasks that came back empty, in their place
    lost: int = 0  # a task without its result (missing, or empty though its image exists)
    reordered: int = 0  # a task holding another task's result
    wrong: int = 0  # a result with other keypoints than the forced ones
    errors: list = field(default_factory=list)  # requests that failed outright
    health: list = field(default_factory=list)  # (seconds since start, latency)
    health_failures: list = field(default_factory=list)  # seconds since start


def check(results, expected, tally: Tally) -> None:
    """``expected[i]``: the (w, h) of task i's image, or None when it must come back empty."""
    if not isinstance(results, list) or len(results) != len(expected):
        tally.lost += len(expected)
        return
    for result, want in zip(results, expected):
        regions = result.get("result") if isinstance(result, dict) else None
        if not isinstance(regions, list):
            tally.lost += 1
        elif want is None:
            if regions:
                tally.reordered += 1
            else:
                tally.empty_as_expected += 1
        elif not regions:
            tally.lost += 1
        elif {(r["original_width"], r["original_height"]) for r in regions} != {want}:
            tally.reordered += 1
        elif sorted(
            (r["value"]["keypointlabels"][0], r["value"]["x"], r["value"]["y"]) for r in regions
        ) != sorted(EXPECTED_POINTS):
            tally.wrong += 1
        else:
            tally.ok += 1


def client(
    n: int,
    backend: str,
    images: str,
    deadline: float,
    budget: list,
    tally: Tally,
    bulk_fraction: float,
    bulk_tasks: tuple[int, int],
    seed: int,
) -> None:
    rng = random.Random(seed * 1000 + n)
    session = requests.Session()
    next_id = n * 10_000_000
    while time.monotonic() < deadline:
        with tally.lock:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        kind = "bulk" if rng.random() < bulk_fraction else "open"
        count = rng.randint(*bulk_tasks) if kind == "bulk" else 1
        tasks, expected = [], []
        for _ in range(count):
            next_id += 1
            i = rng.randrange(N_IMAGES)
            missing = kind == "bulk" and rng.random() < 0.1
            tasks.append({"id": next_id, "data": {"image": f"{images}/img/{'x' if missing else i}.png"}})
            expected.append(None if missing else image_size(i))
        body = {
            "tasks": tasks,
            "project": "1.1700000000",
            "label_config": CONFIG,
            "params": {"login": None, "password": None, "context": None},
        }
        started = time.monotonic()
        try:
            response = session.post(f"{backend}/predict", json=body, timeout=120)
            took = time.monotonic() - started
            results = response.json().get("results") if response.status_code == 200 else None
        except (requests.RequestException, ValueError) as exc:
            with tally.lock:
                tally.errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
            continue
        with tally.lock:
            tally.requests[kind] += 1
            tally.tasks += count
            if response.status_code != 200:
                tally.errors.append(f"{kind}: HTTP {response.status_code}: {response.text[:200]}")
                tally.lost += count
                continue
            tally.latencies[kind].append(took)
            check(results, expected, tally)


def poll_health(backend: str, stop: threading.Event, tally: Tally, every: float, t0: float) -> None:
    session = requests.Session()
    while not stop.is_set():
        started = time.monotonic()
        try:
            ok = session.get(f"{backend}/health", timeout=5).status_code == 200
        except requests.RequestException:
            ok = False
        took = time.monotonic() - started
        with tally.lock:
            if ok:
                tally.health.append((started - t0, took))
            else:
                tally.health_failures.append(started - t0)
        stop.wait(max(0.0, every - took))


def health_windows(tally: Tally, width: float = 10.0) -> list[dict]:
    """/health per ``width``-second window of the run: "p99 < 1 s throughout", not on average."""
    end = max([t for t, _ in tally.health] + tally.health_failures + [0.0])
    windows = []
    for k in range(int(end // width) + 1):
        lo, hi = k * width, (k + 1) * width
        took = [d for t, d in tally.health if lo <= t < hi]
        windows.append(
            {
                "from_s": lo,
                "count": len(took),
                "p99_s": percentile(took, 99),
                "max_s": round(max(took), 4) if took else None,
                "failures": sum(lo <= t < hi for t in tally.health_failures),
            }
        )
    return windows


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 4)


def stats(values: list[float]) -> dict:
    return {
        "count": len(values),
        "p50_s": percentile(values, 50),
        "p90_s": percentile(values, 90),
        "p99_s": percentile(values, 99),
        "max_s": round(max(values), 4) if values else None,
    }


def machine() -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - only a description
        gpu = None
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run(
    clients: int,
    duration: float,
    threads: int = 8,
    bulk_fraction: float = 0.3,
    bulk_tasks: tuple[int, int] = (8, 32),
    max_requests: int = 100_000,
    seed: int = 0,
    health_every: float = 0.1,
    workdir: Path | None = None,
    env: dict | None = None,
) -> dict:
    """Start the servers, run the load, stop everything; the summary as a dict."""
    if not 1 <= clients <= MAX_CLIENTS or not 0 < duration <= MAX_DURATION:
        raise ValueError(f"clients must be 1..{MAX_CLIENTS} and duration 0..{MAX_DURATION} s")
    tmp = Path(workdir or tempfile.mkdtemp(prefix="molmo-load-"))
    env = {
        "MOLMO_ALLOWED_HOSTS": "127.0.0.1",
        "MOLMO_MAX_NEW_TOKENS": "32",
        "THREADS": str(threads),
        "LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    images = ImageServer()
    tally = Tally()
    load_before = os.getloadavg()
    try:
        with BackendServer(tmp, env=env, answers=FORCED) as backend:
            assert backend.url.startswith("http://127.0.0.1:") and images.url.startswith("http://127.0.0.1:")
            stop = threading.Event()
            started = time.monotonic()
            poller = threading.Thread(
                target=poll_health, args=(backend.url, stop, tally, health_every, started)
            )
            poller.start()
            deadline = started + duration
            budget = [max_requests]
            workers = [
                threading.Thread(
                    target=client,
                    args=(
                        n,
                        backend.url,
                        images.url,
                        deadline,
                        budget,
                        tally,
                        bulk_fraction,
                        bulk_tasks,
                        seed,
                    ),
                )
                for n in range(clients)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(timeout=duration + 180)
            wall = time.monotonic() - started
            stop.set()
            poller.join(timeout=10)
            metrics = requests.get(f"{backend.url}/metrics?format=json", timeout=5).json()
            alive = (
                backend.proc.poll() is None
                and requests.get(f"{backend.url}/health", timeout=5).status_code == 200
            )
            server_log_errors = sum('"level": "ERROR"' in line for line in backend.log.splitlines())
    finally:
        images.close()
    load_after = os.getloadavg()
    total = tally.requests["open"] + tally.requests["bulk"]
    health = [d for _, d in tally.health]
    windows = health_windows(tally)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "bench/load_test.py " + " ".join(sys.argv[1:]) if __name__ == "__main__" else None,
        "config": {
            "clients": clients,
            "duration_s": duration,
            "server_threads": threads,
            "bulk_fraction": bulk_fraction,
            "bulk_tasks": list(bulk_tasks),
            "labels": 2,
            "model": "tiny random demo Molmo2 (answers forced), CPU",
            "seed": seed,
        },
        "machine": {
            **machine(),
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(load_after[0], 2),
        },
        "wall_s": round(wall, 1),
        "requests": {
            "total": total,
            **tally.requests,
            "failed": len(tally.errors),
            "per_s": round(total / wall, 2),
        },
        "tasks": {
            "total": tally.tasks,
            "ok": tally.ok,
            "empty_as_expected": tally.empty_as_expected,
            "lost": tally.lost,
            "reordered": tally.reordered,
            "wrong": tally.wrong,
            "per_s": round(tally.tasks / wall, 2),
        },
        "latency": {"open": stats(tally.latencies["open"]), "bulk": stats(tally.latencies["bulk"])},
        "health": {
            **stats(health),
            "failures": len(tally.health_failures),
            "over_1s": sum(t >= HEALTH_LIMIT_S for t in health),
            "worst_10s_window_p99_s": max((w["p99_s"] or 0.0 for w in windows), default=None),
            "windows_10s": windows,
        },
        "server": {
            "alive": alive,
            "error_log_lines": server_log_errors,
            "server_errors": metrics["requests"].get("server_errors", 0),
            "scheduler": metrics.get("scheduler", {}),
        },
        "errors": tally.errors[:20],
    }


def passed(summary: dict) -> bool:
    t, h = summary["tasks"], summary["health"]
    return (
        t["lost"] == 0
        and t["reordered"] == 0
        and t["wrong"] == 0
        and not summary["errors"]
        and h["failures"] == 0
        and h["p99_s"] is not None
        and h["p99_s"] < HEALTH_LIMIT_S
        and all(w["count"] and w["p99_s"] < HEALTH_LIMIT_S for w in h["windows_10s"])
        and summary["server"]["alive"]
        and summary["server"]["server_errors"] == 0
    )


def markdown(s: dict) -> str:
    c, m, r, t, h = s["config"], s["machine"], s["requests"], s["tasks"], s["health"]

    def row(name, st):
        return f"| {name} | {st['count']} | {st['p50_s']} | {st['p90_s']} | {st['p99_s']} | {st['max_s']} |"

    return "\n".join(
        [
            f"### Load test, {s['date']}: {'PASSED' if passed(s) else 'FAILED'}",
            "",
            f"`{s['command'] or 'bench/load_test.run(...)'}`",
            "",
            f"- {c['clients']} clients for {c['duration_s']} s ({s['wall_s']} s wall), "
            f"{round(100 * (1 - c['bulk_fraction']))}% opened-task requests (1 task), the rest bulk "
            f"({c['bulk_tasks'][0]}-{c['bulk_tasks'][1]} tasks, ~10% of them a missing image); "
            f"{c['labels']} labels a task; server THREADS={c['server_threads']}; {c['model']}",
            f"- machine: {m['cpus']} CPUs ({m['cpu']}), GPU: {m['gpu'] or 'none'}; load average "
            f"{m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after (shared machine)",
            f"- requests: {r['total']} ({r['open']} opened-task, {r['bulk']} bulk), {r['per_s']}/s, "
            f"failed: {r['failed']}",
            f"- tasks: {t['total']} ({t['per_s']}/s): {t['ok']} with exactly their keypoints, "
            f"{t['empty_as_expected']} empty as expected (missing image); "
            f"**lost {t['lost']}, reordered {t['reordered']}, wrong {t['wrong']}**",
            f"- /health every 0.1 s: {h['count']} answered, {h['failures']} failed (5 s time-out), "
            f"{h['over_1s']} took 1 s or more; worst 10 s window p99 {h['worst_10s_window_p99_s']} s "
            f"(windows: {len(h['windows_10s'])})",
            f"- server: alive {s['server']['alive']}, 5xx {s['server']['server_errors']}, ERROR log lines "
            f"{s['server']['error_log_lines']}, scheduler {json.dumps(s['server']['scheduler'])}",
            "",
            "| latency | count | p50 s | p90 s | p99 s | max s |",
            "|---|---|---|---|---|---|",
            row("/health", h),
            row("opened task (/predict, 1 task)", s["latency"]["open"]),
            row("bulk (/predict)", s["latency"]["bulk"]),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (at most 600)")
    parser.add_argument("--threads", type=int, default=32, help="server THREADS (the product default: 32)")
    parser.add_argument("--bulk-fraction", type=float, default=0.3)
    parser.add_argument("--bulk-tasks", default="8:32", help="MIN:MAX tasks of a bulk request")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "load-results", help="writes OUT.json and OUT.md"
    )
    args = parser.parse_args(argv)
    low, high = (int(x) for x in args.bulk_tasks.split(":"))
    summary = run(
        args.clients,
        args.duration,
        args.threads,
        args.bulk_fraction,
        (low, high),
        args.max_requests,
        args.seed,
    )
    text = markdown(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0 if passed(summary) else 1


if __name__ == "__main__":
    raise SystemExit(main())
