"""Start and stop real servers and processes on 127.0.0.1 for tests.

- :class:`BackendServer`: our backend under real gunicorn on a free port (a context manager:
  start, wait for /health, ``url``/``proc``/``log``, stop);
- :func:`forced_cli_command`: our command line with forced answers, to run as a process;
- :func:`free_port`, :func:`wait_healthy`, :func:`stop_process_group`: the pieces it is made of
  (tests/support/labelstudio.py starts Label Studio with free_port and stops it with
  stop_process_group);
- :func:`serve_directory`: static files from a folder, in a thread.

Fake HTTP peers (Label Studio's auth, image hosts) are tests/support/http_fixtures.py.
"""

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


def forced_cli_command(answers_file: Path, *argv: str, delay: float = 0.0) -> list[str]:
    """The ``molmo-backend`` command line ``argv`` (e.g. ``"predict", "a.png", "--label", "cat"``)
    run by forced_backend.py ``cli`` with the answers in ``answers_file`` (JSON: prompt text ->
    answer) and ``delay`` seconds before every prefill."""
    command = [sys.executable, str(ROOT / FORCED_BACKEND), "cli", "--answers", str(answers_file)]
    if delay:
        command += ["--delay", str(delay)]
    return [*command, "--", *argv]


class BackendServer:
    """Our real server on a free 127.0.0.1 port, as a context manager (the pattern of vLLM's
    tests/utils.py RemoteOpenAIServer)::

        with BackendServer(tmp_path, env={"MOLMO_MAX_BATCH": "4"}, answers={"cat": CAT}) as backend:
            requests.post(f"{backend.url}/predict", json=..., timeout=30)
            assert "Traceback" not in backend.log, backend.log_tail()

    Entering starts the process in its own process group, under real gunicorn:

    - without ``answers``: ``python -m molmo_backend serve`` (the product's own command);
    - with ``answers``: tests/support/forced_backend.py serve, its engine forcing those answers
      (prompt text -> answer text, or ``{"text": ..., "probs": {char index: p}}``), with
      ``--net-guard`` when ``net_guard`` (then ``MOLMO_TEST_NET_NAMES``/``_LOG`` in ``env``);

    then waits up to ``timeout`` seconds for ``GET /health`` to answer 200 (failing at once, with
    the log's tail, if the process exits). ``env`` is added to this process's environment over
    the defaults ``MOLMO_DEMO=random`` (the random demo model), ``LOG_FORMAT=json``,
    ``THREADS=32``, ``PYTHONUNBUFFERED=1``; ``MOLMO_CACHE_DIR`` defaults to ``tmp/cache``. Leaving
    stops the process group (:func:`stop_process_group`); leaving on an exception first prints the
    log's tail to stderr.

    ``url`` (``http://127.0.0.1:PORT``), ``port``, ``proc`` (the Popen), ``log`` (all the server
    printed so far, stdout and stderr, kept in ``log_path`` under ``tmp``), ``startup_s`` (seconds
    until healthy).
    """

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str] | None = None,
        answers: dict | None = None,
        *,
        net_guard: bool = False,
        timeout: float = 120.0,
    ):
        if net_guard and answers is None:
            raise ValueError("net_guard runs forced_backend.py: give answers (an empty dict for none)")
        self.tmp, self.env, self.answers = tmp, dict(env or {}), answers
        self.net_guard, self.timeout = net_guard, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"backend-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._stopped = False

    def command(self) -> list[str]:
        if self.answers is None:
            return [
                sys.executable,
                "-m",
                "molmo_backend",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        answers_file = self.tmp / f"answers-{self.port}.json"
        answers_file.write_text(json.dumps(self.answers))
        cmd = [sys.executable, str(ROOT / FORCED_BACKEND), "serve", "--port", str(self.port)]
        return cmd + ["--answers", str(answers_file)] + (["--net-guard"] if self.net_guard else [])

    def start(self) -> BackendServer:
        env = {
            **os.environ,
            "MOLMO_DEMO": "random",
            "LOG_FORMAT": "json",
            "THREADS": "32",
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        env.setdefault("MOLMO_CACHE_DIR", str(self.tmp / "cache"))
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.startup_s = wait_healthy(self.url, self.timeout, self.proc)
        except Exception as error:
            self.stop()
            raise RuntimeError(f"backend at {self.url} did not start: {error}\n{self.log_tail()}") from error
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 5000) -> str:
        return self.log[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the server's process group (once; ``proc`` stays for its return code)."""
        if self.proc is not None and not self._stopped:
            self._stopped = True
            stop_process_group(self.proc)

    def __enter__(self) -> BackendServer:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            print(self.log_tail(), file=sys.stderr)
        self.stop()


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
