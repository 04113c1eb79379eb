"""docker-compose.yml's stack on a Docker engine, for tests/docker/test_docker_compose.py.

:func:`ci_compose` turns docker-compose.yml (a user with a GPU runs it as it is) into the copy a
CPU-only CI machine runs. It changes only what that machine needs:

- no ``deploy`` GPU reservation (without a GPU the backend would not start: "could not select
  device driver nvidia"; compose v1 cannot drop it through an override file, whose lists append);
- published ports bound to 127.0.0.1, so the test talks to the stack over loopback only;
- optionally another Label Studio image (CI builds one locally: no registry is reachable there);
- the build context as an absolute path (the copy lives in a temporary folder);
- one more service, ``images``: a static web server on the compose network (the backend image's
  Python, ``http.server``) for the tasks whose image is an http URL.

:class:`ComposeStack` runs a compose client (``docker compose`` v2 when installed, else
``docker-compose`` v1) on such a file under its own project name and reads containers' state with
``docker inspect``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
IMAGES_PORT = 8000


def compose_client() -> list[str] | None:
    """``docker compose`` (v2) if the CLI has the plugin, else ``docker-compose`` (v1), else None."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def ci_compose(source: dict, *, images_dir: Path, ls_image: str | None = None, root: Path = ROOT) -> dict:
    """The CPU-only CI copy of a parsed docker-compose.yml (see the module docstring)."""
    out = copy.deepcopy(source)
    services = out["services"]
    for svc in services.values():
        svc.pop("deploy", None)
        svc["ports"] = [
            p if str(p).startswith("127.0.0.1:") else f"127.0.0.1:{p}" for p in svc.get("ports", [])
        ]
        if isinstance(svc.get("build"), dict):
            svc["build"]["context"] = str((root / svc["build"]["context"]).resolve())
    if ls_image:
        services["label-studio"]["image"] = ls_image
    backend = services["molmo-backend"]
    services["images"] = {
        "image": backend["image"],
        "entrypoint": ["python", "-m", "http.server", str(IMAGES_PORT), "--directory", "/srv"],
        "volumes": [f"{Path(images_dir).resolve()}:/srv:ro"],
        "healthcheck": {"disable": True},  # the image's own HEALTHCHECK probes the backend's port
        "networks": list(backend.get("networks", [])),
    }
    return out


def write_ci_compose(path: Path, *, images_dir: Path, ls_image: str | None = None) -> Path:
    path.write_text(
        yaml.safe_dump(
            ci_compose(yaml.safe_load(COMPOSE.read_text()), images_dir=images_dir, ls_image=ls_image),
            sort_keys=False,
        )
    )
    return path


class ComposeStack:
    """One compose project: ``up``/``down`` through the compose client, state through docker."""

    def __init__(self, compose_file: Path, project: str, env: dict[str, str]):
        client = compose_client()
        if client is None:
            raise RuntimeError("no compose client: install docker compose (v2) or docker-compose")
        self.cmd = client + ["-p", project, "-f", str(compose_file)]
        self.project = project
        self.env = dict(env)

    def _env(self) -> dict[str, str]:
        # the host's own Label Studio / backend / compose variables must not leak into the stack
        clean = {
            k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "MOLMO_", "COMPOSE_"))
        }
        return {**clean, **self.env}

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(
            self.cmd + list(args), env=self._env(), capture_output=True, text=True, timeout=timeout
        )
        if check and out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        return out

    def up(self, *services: str) -> float:
        """``up -d`` of the given services (all when none), from the images already built;
        returns when it began (time.monotonic())."""
        started = time.monotonic()
        self.run("up", "-d", "--no-build", *services)
        return started

    def down(self) -> None:
        """``down -v``: containers, network and the named volumes go."""
        self.run("down", "-v", "--remove-orphans", timeout=300)

    def container(self, service: str) -> str:
        ids = self.run("ps", "-q", service).stdout.split()
        if len(ids) != 1:
            raise RuntimeError(f"{service}: {len(ids)} containers")
        return ids[0]

    def state(self, service: str) -> dict:
        """``docker inspect``'s ``.State`` of the service's container (``Health``: its HEALTHCHECK)."""
        out = subprocess.run(
            ["docker", "inspect", "--format", "{{json .State}}", self.container(service)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env=self._env(),
        )
        return json.loads(out.stdout)

    def health(self, service: str) -> dict:
        return self.state(service).get("Health") or {}

    def wait_healthy(self, service: str, timeout: float) -> dict:
        """Polls the HEALTHCHECK status until Docker says ``healthy``; raises on ``unhealthy``."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health(service)
            if health.get("Status") == "healthy":
                return health
            if health.get("Status") == "unhealthy" or time.monotonic() > deadline:
                raise RuntimeError(f"{service} is {health.get('Status')!r}: {health.get('Log')}")
            time.sleep(1)

    def logs(self, *services: str, tail: int = 200) -> str:
        out = self.run("logs", "--no-color", f"--tail={tail}", *services, check=False, timeout=120)
        return out.stdout + out.stderr

    def leftovers(self) -> list[str]:
        """Containers, volumes and networks of this project that still exist."""
        found = []
        for kind in ("container", "volume", "network"):
            cmd = ["docker", kind, "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}"]
            if kind == "container":
                cmd.insert(3, "-a")
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=self._env())
            found += [f"{kind} {x}" for x in out.stdout.split()]
        return found


def wait_http(url: str, timeout: float) -> float:
    """Seconds until ``url`` answered 200 (polled over loopback); raises if it never does."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        try:
            r = requests.get(url, timeout=2)
            if r.status_code == 200:
                return time.monotonic() - started
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = repr(exc)[:200]
        time.sleep(0.5)
    raise TimeoutError(f"{url} not answering 200 after {timeout:.0f} s (last: {last})")


def docker_time(stamp: str) -> datetime:
    """A Docker timestamp (RFC 3339, nanoseconds, ``Z`` or an offset) as an aware datetime."""
    m = re.fullmatch(r"(\S+?T\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", stamp.strip())
    if not m:
        raise ValueError(f"not a Docker timestamp: {stamp!r}")
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}")


def seconds_to_healthy(state: dict) -> float | None:
    """Seconds from the container's start to the end of its first passing HEALTHCHECK probe, from
    Docker's own timestamps (None when that probe is no longer among the last five Docker keeps)."""
    passed = [entry for entry in (state.get("Health") or {}).get("Log") or [] if entry["ExitCode"] == 0]
    if not passed or not state.get("StartedAt"):
        return None
    return (docker_time(passed[0]["End"]) - docker_time(state["StartedAt"])).total_seconds()
