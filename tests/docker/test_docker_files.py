"""What can be checked of the Docker packaging without a Docker engine.

(The images are built and the compose stack run for real by CI's Docker stage, .ci/docker.sh and
tests/docker/test_docker_compose.py; these checks run everywhere, in seconds.) The Dockerfile is parsed for the essentials (slim Python base, pinned requirements per install
profile, non-root user, HF cache volume, HEALTHCHECK, gunicorn entry through the CLI); its HEALTHCHECK
program and its profile-selecting RUN script are executed here against stand-ins; the build context
that .dockerignore leaves is computed and the package is built from it alone. The compose files are
parsed for the wiring (LS image and env flags, GPU reservation, HF cache volume, LABEL_STUDIO_URL)
and every variable they hand the backend must be a setting it knows. When a compose client is
installed (`docker compose` or `docker-compose`), its `config` must accept both files.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from tests.support.docker_stack import (
    ci_compose,
    compose_client,
    docker_time,
    seconds_to_healthy,
    write_ci_compose,
)

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_EXISTING = ROOT / "docker-compose.existing-ls.yml"
LS_IMAGE = "heartexlabs/label-studio:1.23.2"

yaml = pytest.importorskip("yaml")


# -- Dockerfile -----------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuations joined, comments dropped (as Docker does)."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions():
    return dockerfile_instructions(DOCKERFILE.read_text())


def _all(instructions, name):
    return [args for word, args in instructions if word == name]


def _exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form: {args}"
    return json.loads(args)


def _arg_default(instructions, name):
    for args in _all(instructions, "ARG"):
        key, _, default = args.partition("=")
        if key == name:
            return default
    return None


def test_base_is_slim_python_311(instructions):
    [base] = _all(instructions, "FROM")
    image = _arg_default(instructions, "PYTHON_IMAGE") if base == "${PYTHON_IMAGE}" else base
    assert image and re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*(@sha256:[0-9a-f]{64})?", image), image


def test_runs_as_a_non_root_user(instructions):
    users = _all(instructions, "USER")
    assert users, "no USER: the container would run as root"
    assert users[-1] not in ("root", "0", "0:0")
    words = [w for w, _ in instructions]
    last_user = max(i for i, w in enumerate(words) if w == "USER")
    assert last_user < words.index("HEALTHCHECK") and last_user < words.index("CMD")
    assert not any(w == "RUN" for w in words[last_user:]), "RUN after USER: do root work first"


def test_hf_cache_on_a_volume(instructions):
    env = " ".join(_all(instructions, "ENV"))
    assert re.search(r"\bHF_HOME=/data/hf\b", env)
    # torch.compile's kernels (MOLMO_COMPILE) persist on the volume too: restarts reuse them
    assert re.search(r"\bTORCHINDUCTOR_CACHE_DIR=/data/hf/\S+", env)
    assert re.search(r"\bTRITON_CACHE_DIR=/data/hf/\S+", env)  # Triton's too
    volumes = [
        v
        for args in _all(instructions, "VOLUME")
        for v in (json.loads(args) if args.startswith("[") else args.split())
    ]
    assert "/data/hf" in volumes
    assert any("chown" in r and "/data/hf" in r for r in _all(instructions, "RUN")), (
        "the volume must belong to the runtime user (named volumes copy this ownership)"
    )


def test_entry_is_the_cli_serving_with_gunicorn(instructions):
    entry = _exec_form(_all(instructions, "ENTRYPOINT")[-1])
    cmd = _exec_form(_all(instructions, "CMD")[-1])
    assert entry + cmd == ["molmo-backend", "serve"]
    assert "9090" in " ".join(_all(instructions, "EXPOSE"))
    env = " ".join(_all(instructions, "ENV"))
    assert "HOST=0.0.0.0" in env and "PORT=9090" in env
    # the CLI serves with gunicorn: the image's requirements must carry it
    assert re.search(r"^gunicorn==", (ROOT / "requirements.txt").read_text(), re.M)


def test_config_is_env_only(instructions):
    """Only defaults in ENV, no secrets or model choice baked into the image."""
    env = " ".join(_all(instructions, "ENV"))
    for secret in ("LABEL_STUDIO_API_KEY", "HF_TOKEN", "BASIC_AUTH_PASS", "MOLMO_MODEL="):
        assert secret not in env
    for args in _all(instructions, "COPY"):
        assert ".env" not in args.split()


def test_healthcheck_probes_health(instructions):
    [hc] = _all(instructions, "HEALTHCHECK")
    options, _, command = hc.partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    argv = _exec_form(command)
    assert argv[:2] == ["python", "-c"] and "/health" in argv[2]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        code = self.status if self.path == "/health" else 404
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "UP"}')

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False), (500, False)])
def test_healthcheck_program_runs(instructions, status, healthy):
    """The HEALTHCHECK program itself, against a stand-in /health on PORT."""
    [hc] = _all(instructions, "HEALTHCHECK")
    program = _exec_form(hc.partition("CMD ")[2])[2]
    handler = type("H", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "PORT": str(server.server_address[1])}
        rc = subprocess.run(
            [sys.executable, "-c", program], env=env, capture_output=True, timeout=30
        ).returncode
    finally:
        server.shutdown()
        server.server_close()
    assert (rc == 0) == healthy


def test_healthcheck_program_fails_when_nothing_listens(instructions):
    [hc] = _all(instructions, "HEALTHCHECK")
    program = _exec_form(hc.partition("CMD ")[2])[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        rc = subprocess.run(
            [sys.executable, "-c", program],
            env={**os.environ, "PORT": str(port)},
            capture_output=True,
            timeout=30,
        ).returncode
    assert rc == 1


def _profile_run(instructions) -> str:
    [run] = [r for r in _all(instructions, "RUN") if "PROFILE" in r]
    return run


def test_profiles_install_their_pinned_requirements(instructions, tmp_path):
    """The profile RUN step, run by /bin/sh with a stand-in `python` that records its arguments:
    molmo2 (the default) installs requirements.txt, molmo1 requirements-molmo1.txt, others fail."""
    assert _arg_default(instructions, "PROFILE") == "molmo2"
    script = _profile_run(instructions)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python"
    fake.write_text('#!/bin/sh\necho "$@" >> "$RECORD"\n')
    fake.chmod(0o755)
    workdir = tmp_path / "app"
    workdir.mkdir()
    for req in ROOT.glob("requirements*.txt"):
        shutil.copy(req, workdir / req.name)
    script = script.replace("/app/", f"{workdir}/")

    def run(profile: str):
        record = tmp_path / f"record-{profile}"
        env = {"PATH": f"{bindir}:{os.environ['PATH']}", "PROFILE": profile, "RECORD": str(record)}
        proc = subprocess.run(
            ["/bin/sh", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=30
        )
        return proc, record.read_text() if record.exists() else ""

    proc, record = run("molmo2")
    assert proc.returncode == 0, proc.stderr
    assert "-r requirements.txt" in record
    if (ROOT / "requirements-molmo1.txt").exists():
        proc, record = run("molmo1")
        assert proc.returncode == 0, proc.stderr
        assert "-r requirements-molmo1.txt" in record
    proc, record = run("nonsense")
    assert proc.returncode != 0 and "unknown PROFILE" in proc.stderr and not record


def test_profiles_share_the_torch_layer(instructions, tmp_path):
    """torch and torchvision are installed by a RUN of their own before PROFILE is declared (a
    declared build argument is part of every later RUN's cache key), and both profiles pin the same
    versions: so both images share that 5.5 GB layer and the profile layer adds only the rest."""
    words = [w for w, _ in instructions]
    runs = [(i, args) for i, (w, args) in enumerate(instructions) if w == "RUN"]
    [(torch_at, torch_run)] = [(i, r) for i, r in runs if "torch" in r]
    profile_arg = next(
        i for i, (w, args) in enumerate(instructions) if w == "ARG" and args.startswith("PROFILE")
    )
    assert torch_at < profile_arg and "PROFILE" not in torch_run
    assert words.index("COPY") < torch_at  # the requirement files are there

    def pins(name: str) -> dict[str, str]:
        return dict(re.findall(r"^(torch|torchvision)==(\S+)", (ROOT / name).read_text(), re.M))

    assert set(pins("requirements.txt")) == {"torch", "torchvision"}
    if (ROOT / "requirements-molmo1.txt").exists():
        assert pins("requirements-molmo1.txt") == pins("requirements.txt")

    # the step itself, by /bin/sh with a stand-in `python` that records what pip would install
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").write_text('#!/bin/sh\nfor a; do [ -f "$a" ] && cat "$a"; done >> "$RECORD"\n')
    (bindir / "python").chmod(0o755)
    shutil.copy(ROOT / "requirements.txt", tmp_path / "requirements.txt")
    record = tmp_path / "record"
    script = torch_run.replace("/tmp/torch.txt", str(tmp_path / "torch.txt"))
    proc = subprocess.run(
        ["/bin/sh", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": f"{bindir}:{os.environ['PATH']}", "RECORD": str(record)},
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    installed = dict(line.split("==") for line in record.read_text().split())
    assert installed == pins("requirements.txt")
    assert not (tmp_path / "torch.txt").exists()


def test_requirement_files_are_pinned():
    """Reproducible builds: the heavy packages are pinned exactly in every profile."""
    for req in ROOT.glob("requirements*.txt"):
        if req.name == "requirements-test.txt":
            continue
        text = req.read_text()
        for package in ("torch", "transformers", "label-studio-sdk", "flask", "gunicorn"):
            assert re.search(rf"^{package}==\S+", text, re.M), f"{req.name}: pin {package}"


# -- .dockerignore and the build context ----------------------------------------------------------


def _ignore_regex(pattern: str) -> re.Pattern:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            j = pattern.index("]", i)
            out += pattern[i : j + 1]
            i = j + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def build_context(root: Path = ROOT) -> list[str]:
    """Files that .dockerignore lets into the build context (Docker's rules: patterns in order,
    the last match wins, a pattern matching a folder covers what is inside it). Excluded folders
    that no ``!`` pattern reaches into are not walked (.venv holds torch)."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, pattern, _ignore_regex(pattern)))

    def included(rel: str) -> bool:
        prefixes = [rel] + ["/".join(rel.split("/")[:n]) for n in range(1, rel.count("/") + 1)]
        keep = True
        for negate, _, regex in rules:
            if any(regex.match(p) for p in prefixes):
                keep = negate
        return keep

    def may_reinclude(rel_dir: str) -> bool:
        return any(
            negate and (pattern.startswith(rel_dir + "/") or pattern[:1] in "*?[")
            for negate, pattern, _ in rules
        )

    kept = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [
            d for d in dirnames if d != ".git" and (included(rel_dir + d) or may_reinclude(rel_dir + d))
        ]
        kept += [rel_dir + f for f in filenames if included(rel_dir + f)]
    return sorted(kept)


@pytest.fixture(scope="module")
def context_files():
    return build_context()


def test_build_context_is_lean(context_files):
    for rel in context_files:
        top = rel.split("/")[0]
        assert not top.startswith((".venv", ".git", "tests", "bench", ".out", ".whl")), rel
        assert "__pycache__" not in rel and not rel.endswith(".pyc"), rel
    assert "pyproject.toml" in context_files and "requirements.txt" in context_files
    assert "molmo_backend/commands/cli.py" in context_files


def test_copy_sources_are_in_the_context(instructions, context_files):
    for args in _all(instructions, "COPY"):
        parts = shlex.split(args)
        if any(p.startswith("--from") for p in parts):
            continue
        for source in parts[:-1]:
            if source.startswith("--"):
                continue
            matched = [
                f
                for f in context_files
                if fnmatch.fnmatch(f, source) or f.startswith(source.rstrip("/") + "/")
            ]
            if "*" not in source:
                assert matched, f"COPY {source}: not in the build context"
            elif source.startswith("requirements"):
                assert "requirements.txt" in matched


def _has_build_backend() -> bool:
    """This venv holds the setuptools that pyproject.toml's build-system asks for (else pip builds
    in isolation and fetches it, as `docker build` does)."""
    from importlib.metadata import PackageNotFoundError, version

    want = re.search(r'"setuptools>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    try:
        have = version("setuptools")
    except PackageNotFoundError:
        return False
    as_tuple = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:3])  # noqa: E731
    return not want or as_tuple(have) >= as_tuple(want.group(1))


def test_package_builds_from_the_context_alone(context_files, tmp_path):
    """`pip install --no-deps .` of the image, done here on a copy of the context: the wheel holds
    the package and the `molmo-backend` entry point."""
    ctx = tmp_path / "ctx"
    for rel in context_files:
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, ctx / rel)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist")]
    if _has_build_backend():
        cmd += ["--no-build-isolation", "--no-index"]  # offline, with this venv's setuptools
    out = subprocess.run(cmd + [str(ctx)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("molmo_backend-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "molmo_backend/commands/cli.py" in names and "molmo_backend/app/routes.py" in names
    [entry_points] = [n for n in names if n.endswith("entry_points.txt")]
    assert (
        "molmo-backend = molmo_backend.commands.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


# -- compose files --------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _default(value: str) -> str | None:
    """The value as compose would see it with nothing set: a ${VAR:-default} default, a literal,
    or None for a required ${VAR:?...}."""
    m = re.fullmatch(r"\$\{(\w+)(?::?-([^}]*)|:?\?[^}]*)?\}", value)
    if not m:
        return value
    return m.group(2) if m.group(2) is not None else (None if "?" in value else "")


def _check_backend_service(svc: dict, dockerfile_instructions_: list) -> dict[str, str]:
    assert svc["build"]["context"] == "."
    assert _default(svc["build"]["args"]["PROFILE"]) == "molmo2"
    env = _env(svc)
    [device] = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") or device.get("device_ids")
    hf_home = env.get("HF_HOME", "/data/hf")
    assert any(
        v.split(":")[1] == hf_home and not v.split(":")[0].startswith((".", "/")) for v in svc["volumes"]
    ), "HF cache must be a named volume at HF_HOME"
    assert "${LABEL_STUDIO_API_KEY" in env["LABEL_STUDIO_API_KEY"]
    assert any(p.endswith(":9090") for p in svc.get("ports", [])) or svc.get("expose")
    # every variable handed to the backend is one it reads
    from molmo_backend.settings import ENV_NAMES

    known = set(ENV_NAMES.values()) | {"HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE"}
    assert set(env) <= known, f"unknown backend variables: {set(env) - known}"
    return env


def test_compose_pairs_label_studio_with_the_backend(instructions):
    compose = _load(COMPOSE)
    services = compose["services"]
    ls = services["label-studio"]
    assert ls["image"] == LS_IMAGE
    ls_env = _env(ls)
    # legacy tokens on by default; backends on the private network allowed (LS 1.23.2 answers 403 for a
    # backend on a private address unless both of these flags are off)
    assert _default(ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"]) == "true"
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    assert _default(ls_env["LABEL_STUDIO_PASSWORD"]) is None, "no default admin password"
    assert any(v.endswith(":/label-studio/data") for v in ls["volumes"])

    backend = services["molmo-backend"]
    env = _check_backend_service(backend, instructions)
    assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert set(ls.get("networks", [])) & set(backend.get("networks", []))
    named = set(compose.get("volumes") or {})
    for svc in (ls, backend):
        for v in svc["volumes"]:
            assert v.split(":")[0] in named


def test_compose_for_an_existing_label_studio(instructions):
    compose = _load(COMPOSE_EXISTING)
    assert set(compose["services"]) == {"molmo-backend"}
    backend = compose["services"]["molmo-backend"]
    env = _check_backend_service(backend, instructions)
    assert _default(env["LABEL_STUDIO_URL"]) is None, "LABEL_STUDIO_URL must be given"
    assert "host.docker.internal:host-gateway" in backend.get("extra_hosts", [])


@pytest.mark.parametrize(
    "path, env",
    [
        (COMPOSE, {"LABEL_STUDIO_PASSWORD": "pw"}),
        (COMPOSE_EXISTING, {"LABEL_STUDIO_URL": "http://ls.example:8080"}),
    ],
)
def test_compose_client_accepts_the_files(path, env, tmp_path):
    client = compose_client()
    if client is None:
        pytest.skip("no compose client (docker compose / docker-compose) installed")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "MOLMO_", "COMPOSE_"))}
    ok = subprocess.run(
        client + ["-f", str(path), "config", "-q"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(
        client + ["-f", str(path), "config", "-q"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode != 0 and any(k in missing.stderr for k in env), (
        "a required variable must be asked for"
    )


def test_ci_copy_drops_only_the_gpu_reservation_and_binds_loopback(tmp_path):
    """The CPU-only CI copy (tests/support/docker_stack.py) of docker-compose.yml: no `deploy` anywhere,
    published ports on 127.0.0.1, the CI's Label Studio image when given, an `images` web server;
    the rest of both services exactly as a user runs it, and the file itself keeps its GPU."""
    source = _load(COMPOSE)
    copy = ci_compose(source, images_dir=tmp_path, ls_image="local/ls:1")
    assert "deploy" in source["services"]["molmo-backend"], "the user's file keeps its GPU"
    assert set(copy["services"]) == set(source["services"]) | {"images"}
    for name, svc in source["services"].items():
        ci = copy["services"][name]
        assert "deploy" not in ci
        assert ci["ports"] == [f"127.0.0.1:{p}" for p in svc["ports"]]
        changed = {"deploy", "ports", "build"} | ({"image"} if name == "label-studio" else set())
        assert {k: v for k, v in ci.items() if k not in changed} == {
            k: v for k, v in svc.items() if k not in changed
        }
    assert copy["services"]["label-studio"]["image"] == "local/ls:1"
    assert Path(copy["services"]["molmo-backend"]["build"]["context"]) == ROOT
    images = copy["services"]["images"]
    assert images["image"] == source["services"]["molmo-backend"]["image"]
    assert images["volumes"] == [f"{tmp_path.resolve()}:/srv:ro"]
    assert images["networks"] == source["services"]["molmo-backend"]["networks"]
    assert ci_compose(source, images_dir=tmp_path)["services"]["label-studio"]["image"] == LS_IMAGE


def test_compose_client_accepts_the_ci_copy(tmp_path):
    client = compose_client()
    if client is None:
        pytest.skip("no compose client (docker compose / docker-compose) installed")
    path = write_ci_compose(tmp_path / "ci.yml", images_dir=tmp_path)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "MOLMO_", "COMPOSE_"))}
    out = subprocess.run(
        client + ["-f", str(path), "config"],
        cwd=tmp_path,
        capture_output=True,
        env={**clean, "LABEL_STUDIO_PASSWORD": "pw"},
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert "deploy" not in resolved["services"]["molmo-backend"]
    assert (
        resolved["services"]["molmo-backend"]["environment"]["LABEL_STUDIO_URL"] == "http://label-studio:8080"
    )


def test_seconds_to_healthy_reads_dockers_own_timestamps():
    state = {
        "StartedAt": "2026-12-02T06:17:06.123456789Z",
        "Health": {
            "Status": "healthy",
            "Log": [
                {"Start": "2026-12-02T06:17:36.2Z", "End": "2026-12-02T06:17:36.3Z", "ExitCode": 1},
                {"Start": "2026-12-02T06:18:06.2Z", "End": "2026-12-02T06:18:06.623456Z", "ExitCode": 0},
                {"Start": "2026-12-02T06:18:36.2Z", "End": "2026-12-02T06:18:36.3Z", "ExitCode": 0},
            ],
        },
    }
    assert seconds_to_healthy(state) == pytest.approx(60.5)
    assert seconds_to_healthy({"StartedAt": state["StartedAt"], "Health": {"Log": []}}) is None
    assert docker_time("2026-12-02T07:00:00+01:00") == docker_time("2026-12-02T06:00:00Z")
    with pytest.raises(ValueError):
        docker_time("yesterday")


# -- the Docker stage's gate (.ci/docker.sh exits before touching anything) -------------------------

DOCKER_STAGE = ROOT / ".ci" / "docker.sh"


def _stage(env: dict[str, str], as_nobody: bool = False) -> subprocess.CompletedProcess:
    clean = {
        k: v for k, v in os.environ.items() if k not in ("CI", "MOLMO_REQUIRE_DOCKER", "MOLMO_SKIP_DOCKER")
    }
    with tempfile.TemporaryDirectory() as tmp:
        script = DOCKER_STAGE
        cmd = [str(script)]
        if as_nobody and os.geteuid() == 0:
            # a copy that the other user can read wherever the checkout lives (the gate reads
            # nothing else before it exits)
            os.chmod(tmp, 0o755)
            (Path(tmp) / ".ci").mkdir(mode=0o755)
            script = Path(tmp) / ".ci" / "docker.sh"
            shutil.copy(DOCKER_STAGE, script)
            script.chmod(0o755)
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(script)]
        return subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, timeout=60, cwd=tmp)


@pytest.mark.parametrize("required", [{}, {"CI": "true"}, {"MOLMO_REQUIRE_DOCKER": "1"}])
def test_docker_stage_left_out_is_said_and_fails_where_required(required):
    out = _stage({"MOLMO_SKIP_DOCKER": "1", **required})
    if required:
        assert out.returncode == 1 and "required" in out.stderr, out.stderr
    else:
        assert out.returncode == 3 and "did NOT run: MOLMO_SKIP_DOCKER=1" in out.stderr, out.stderr


@pytest.mark.parametrize("required", [{}, {"CI": "true"}])
def test_docker_stage_without_root_says_why(required):
    """No root (a developer's machine): the stage says it did not run and why (exit 3, which
    scripts/test reports without failing); in CI the same is a failure."""
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot drop to another user")
    out = _stage(required, as_nobody=True)
    assert "not root" in out.stderr, out.stderr
    assert out.returncode == (1 if required else 3), out.stderr
