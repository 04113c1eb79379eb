"""Start and stop real servers on 127.0.0.1 for tests: our backend (gunicorn) and static files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
FORCED_BACKEND = "tests/support/forced_backend.py"  # the server or CLI with forced answers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; whoever binds it
    next wins, so start the server right away)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> float:
    """Seconds until ``url``/health answered 200; raises if it never does."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


class Backend:
    """A running backend process; ``log`` holds what it printed."""

    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path, startup_s: float):
        self.url, self.proc, self.log_path, self.startup_s = url, proc, log_path, startup_s

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def run_backend(
    tmp: Path,
    env: dict[str, str] | None = None,
    answers: dict | None = None,
    timeout: float = 120.0,
    net_guard: bool = False,
):
    """Our server under real gunicorn on a free port: ``molmo-backend serve`` on the random demo
    model (``MOLMO_DEMO=random``, unless ``env`` says otherwise), or tests/support/forced_backend.py
    serve when ``answers`` are given (with ``--net-guard`` when ``net_guard``)."""
    port = free_port()
    full_env = {
        **os.environ,
        "MOLMO_DEMO": "random",
        "LOG_FORMAT": "json",
        "THREADS": "32",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    full_env.setdefault("MOLMO_CACHE_DIR", str(tmp / "cache"))
    if answers is not None:
        answers_file = tmp / f"answers-{port}.json"
        answers_file.write_text(json.dumps(answers))
        cmd = [
            sys.executable,
            str(ROOT / FORCED_BACKEND),
            "serve",
            "--port",
            str(port),
            "--answers",
            str(answers_file),
        ]
        cmd += ["--net-guard"] if net_guard else []
    else:
        cmd = [sys.executable, "-m", "molmo_backend", "serve", "--host", "127.0.0.1", "--port", str(port)]
    log_path = tmp / f"backend-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        startup = wait_healthy(url, timeout, proc)
        yield Backend(url, proc, log_path, startup)
    except Exception:
        print(log_path.read_text(errors="replace")[-5000:], file=sys.stderr)
        raise
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the process group ``proc`` leads (it was started with ``start_new_session=True``):
    SIGTERM, up to ``timeout`` seconds for the leader to exit, then SIGKILL to the whole group,
    since children (gunicorn's workers, Label Studio's) may outlive a leader that exited."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
    # the group id is the leader's pid, which stays reserved while the group has members
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve_directory(directory: Path):
    """Static files from ``directory`` at http://127.0.0.1:PORT/ in a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
