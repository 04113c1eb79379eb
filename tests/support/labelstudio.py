"""A real Label Studio for end-to-end tests: install it, start it headless, drive it like a user.

Label Studio (LS) 1.23.2 lives in its own virtual environment, apart from the backend's (it pins
packages of its own and weighs about 1 GB). :func:`ensure_label_studio_venv` finds a working one or
builds it (``python3 -m venv`` + ``pip install label-studio==1.23.2``, about 1.5 min on a fresh
machine). :class:`LabelStudio` starts ``label-studio start`` on 127.0.0.1 with a free port and a
temporary data dir, in one of two token modes:

- ``legacy_tokens=True``: the organisation is created with legacy tokens on; ``Authorization: Token
  <user token>`` works everywhere (and is what LS hands a backend in ``/setup``'s access_token).
- ``legacy_tokens=False``: LS 1.23's default. The legacy token is refused (401); a user logs in,
  creates a personal access token (PAT, a JWT *refresh* token: ``POST /api/token/``), and every API
  client exchanges it at ``POST /api/token/refresh/`` for a short-lived access token sent as
  ``Bearer``.

LS's first start on an empty database runs about 30-50 s of migrations. The harness runs them once
per LS version into a template database (``label-studio version`` migrates and exits without creating
a user) and copies that file into each fresh data dir, so every start after the first takes seconds.

The helper methods are what a user does by clicks (create a project, import files, connect an ML
backend, "Retrieve predictions", open a task), through LS's REST API. Every process started here is
started in its own process group and killed with it in :meth:`LabelStudio.stop`.

Environment knobs: ``LS_VENV`` (venv path, default ``~/.cache/molmo-backend/ls-1.23.2``),
``LS_PYTHON`` (interpreter that creates the venv, default ``python3``), ``LS_PIP_ARGS`` (extra pip
arguments), ``LS_DB_TEMPLATE`` (migrated database template path, ``0`` to migrate every start).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import requests

from tests.support.processes import free_port, stop_process_group

LS_VERSION = "1.23.2"
CACHE_ROOT = Path.home() / ".cache" / "molmo-backend"
DEFAULT_VENV = CACHE_ROOT / f"ls-{LS_VERSION}"
DB_NAME = "label_studio.sqlite3"
# seconds spent starting Label Studio and driving it, printed by the e2e tests
E2E_TIMINGS: dict[str, float] = {}


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed, started or driven; the message says what LS said."""


# --------------------------------------------------------------------------------------------------
# the virtual environment


def _venv_version(venv: Path) -> str | None:
    """The label-studio version installed in ``venv``, or None when the venv is missing or broken."""
    python = venv / "bin" / "python"
    if not python.exists() or not (venv / "bin" / "label-studio").exists():
        return None
    try:
        out = subprocess.run(
            [
                str(python),
                "-c",
                "import importlib.metadata as m, label_studio; print(m.version('label-studio'))",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def ensure_label_studio_venv(venv: Path | str | None = None, version: str = LS_VERSION, log=print) -> Path:
    """A venv with ``label-studio==version`` in it: the cached one, or a freshly built one.

    The venv is ``venv``, else ``$LS_VENV``, else ``~/.cache/molmo-backend/ls-<version>``. A venv that
    is missing, broken (no interpreter, import fails) or holds another version is removed and built
    again with ``$LS_PYTHON -m venv`` (default ``python3``) and pip. A file lock next to it keeps two
    test runs from building it at once. Returns the venv's path.
    """
    venv = Path(venv or os.environ.get("LS_VENV") or DEFAULT_VENV).expanduser()
    if _venv_version(venv) == version:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / f".{venv.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _venv_version(venv) == version:  # someone else built it while we waited
            return venv
        if venv.is_symlink() or venv.is_file():
            venv.unlink()
        elif venv.exists():
            shutil.rmtree(venv)
        python = os.environ.get("LS_PYTHON") or shutil.which("python3") or sys.executable
        started = time.monotonic()
        log(f"installing label-studio=={version} into {venv} (about 1.5 min)")
        try:
            subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True, text=True)
            pip = [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--progress-bar",
                "off",
            ]
            pip += os.environ.get("LS_PIP_ARGS", "").split()
            subprocess.run(pip + [f"label-studio=={version}"], check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(venv, ignore_errors=True)
            raise LabelStudioError(
                f"installing label-studio=={version} failed ({exc.cmd[:4]}...):\n"
                f"{(exc.stdout or '')[-3000:]}\n{(exc.stderr or '')[-3000:]}"
            ) from exc
        found = _venv_version(venv)
        if found != version:
            raise LabelStudioError(f"{venv} holds label-studio {found!r} after install, not {version}")
        log(f"installed label-studio=={version} in {time.monotonic() - started:.0f} s")
    return venv


def _ls_env(data_dir: Path) -> dict[str, str]:
    """The environment for running LS's own commands: no proxies, nothing phoning home."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LABEL_STUDIO_", "DJANGO_", "VIRTUAL_ENV", "PYTHON"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "LATEST_VERSION_CHECK": "false",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def migrated_db_template(venv: Path, version: str = LS_VERSION, log=print) -> Path | None:
    """A database with all of LS's migrations applied and no user in it, built once per version.

    ``label-studio version`` applies the migrations (like every LS command) and exits before it
    creates a user or an organisation; its database is copied into every fresh data dir. Returns None
    when ``LS_DB_TEMPLATE=0``.
    """
    configured = os.environ.get("LS_DB_TEMPLATE")
    if configured == "0":
        return None
    template = Path(configured or CACHE_ROOT / f"ls-{version}-migrated.sqlite3").expanduser()
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with open(template.parent / f".{template.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if template.exists():
            return template
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="ls-migrate-") as tmp:
            data_dir = Path(tmp)
            out = subprocess.run(
                [str(venv / "bin" / "label-studio"), "version"],
                env=_ls_env(data_dir),
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=600,
                start_new_session=True,
            )
            db = data_dir / DB_NAME
            if out.returncode != 0 or not db.exists():
                raise LabelStudioError(
                    f"migrating a template database failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
                )
            partial = template.with_suffix(".partial")
            shutil.copyfile(db, partial)
            partial.replace(template)
        log(f"migrated LS database template in {time.monotonic() - started:.0f} s: {template}")
    return template


# --------------------------------------------------------------------------------------------------
# a running Label Studio


class LabelStudio:
    """One headless Label Studio on 127.0.0.1, for one test session.

    ``with LabelStudio(legacy_tokens=False) as ls: ...`` or ``ls.start()`` / ``ls.stop()``.
    ``ls.url`` is its base URL, ``ls.user_token`` the user's legacy token (refused when
    ``legacy_tokens`` is False), ``ls.pat()`` a personal access token, ``ls.access_token()`` a JWT
    access token. ``ls.api(method, path, ...)`` sends an authenticated request the way the mode wants
    (``Token`` or ``Bearer``) and raises :class:`LabelStudioError` on an unexpected status.
    """

    def __init__(
        self,
        legacy_tokens: bool = True,
        *,
        venv: Path | str | None = None,
        port: int | None = None,
        data_dir: Path | str | None = None,
        extra_env: dict[str, str] | None = None,
        start_timeout: float = 240.0,
        log=print,
    ):
        self.legacy_tokens = legacy_tokens
        self.venv = Path(venv) if venv else None
        self.port = port
        self._data_dir_arg = Path(data_dir) if data_dir else None
        self.extra_env = dict(extra_env or {})
        self.start_timeout = start_timeout
        self.log = log
        self.username = "e2e@example.com"
        self.password = secrets.token_urlsafe(12)
        self.user_token = secrets.token_hex(20)
        self.proc: subprocess.Popen | None = None
        self.data_dir: Path | None = None
        self.log_path: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._pat: str | None = None
        self._access: tuple[str, float] | None = None
        self._attached_url: str | None = None
        self.timings: dict[str, float] = {}

    @classmethod
    def attach(
        cls, url: str, *, username: str, password: str, user_token: str, legacy_tokens: bool, log=print
    ) -> LabelStudio:
        """A client for a Label Studio running elsewhere (a container): the same helpers, nothing
        started or stopped here. Checks that its token mode is ``legacy_tokens``."""
        ls = cls(legacy_tokens=legacy_tokens, log=log)
        ls._attached_url = url.rstrip("/")
        ls.username, ls.password, ls.user_token = username, password, user_token
        ls._check_token_mode()
        return ls

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._attached_url or f"http://127.0.0.1:{self.port}"

    def start(self) -> LabelStudio:
        if self.proc is not None:
            raise LabelStudioError("already started")
        t0 = time.monotonic()
        self.venv = ensure_label_studio_venv(self.venv, log=self.log)
        self.timings["venv_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        template = migrated_db_template(self.venv, log=self.log)
        self.timings["migrate_s"] = time.monotonic() - t1
        if self._data_dir_arg:
            self.data_dir = self._data_dir_arg
            self.data_dir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="ls-e2e-")
            self.data_dir = Path(self._tmp.name)
        if template and not (self.data_dir / DB_NAME).exists():
            shutil.copyfile(template, self.data_dir / DB_NAME)
        self.port = self.port or free_port()
        env = _ls_env(self.data_dir)
        env.update(
            {
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.user_token,
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true" if self.legacy_tokens else "false",
                "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
                # what /setup reports as "hostname", and where a backend fetches /data/upload/ from
                "LABEL_STUDIO_HOST": self.url,
                # let LS call a backend on 127.0.0.1: Label Studio 1.23 refuses a private ML backend URL
                # with 403 unless both of these are off
                "ML_BLOCK_LOCAL_IP": "false",
                "SSRF_PROTECTION_ENABLED": "false",
                "LOG_LEVEL": "WARNING",
            }
        )
        env.update(self.extra_env)
        self.log_path = self.data_dir / "label-studio.log"
        logf = open(self.log_path, "ab")
        t2 = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                [
                    str(self.venv / "bin" / "label-studio"),
                    "start",
                    "--no-browser",
                    "--internal-host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=env,
                cwd=self.data_dir,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            logf.close()
        try:
            self._wait_healthy()
            self.timings["start_s"] = time.monotonic() - t2
            self._check_token_mode()
        except BaseException:
            self.stop()
            raise
        self.log(
            f"Label Studio {LS_VERSION} up at {self.url} in {self.timings['start_s']:.1f} s "
            f"(legacy tokens {'on' if self.legacy_tokens else 'off'})"
        )
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabelStudioError(f"label-studio exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                r = requests.get(f"{self.url}/health", timeout=2)
                if r.ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise LabelStudioError(
            f"label-studio not healthy after {self.start_timeout:.0f} s:\n{self.log_tail()}"
        )

    def _check_token_mode(self) -> None:
        """The legacy token works exactly when legacy tokens were asked for (the flag is read only
        when the organisation is created, so a reused data dir could disagree)."""
        r = requests.get(
            f"{self.url}/api/current-user/whoami",
            headers={"Authorization": f"Token {self.user_token}"},
            timeout=10,
        )
        if self.legacy_tokens and r.status_code != 200:
            raise LabelStudioError(f"legacy token refused ({r.status_code}): {r.text[:300]}")
        if not self.legacy_tokens and r.status_code != 401:
            raise LabelStudioError(f"legacy token not refused ({r.status_code}) with legacy tokens off")

    def log_tail(self, chars: int = 4000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout=10.0)
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LabelStudio:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- tokens ------------------------------------------------------------------------------------

    def login_session(self) -> requests.Session:
        """A browser-like session logged in through the login form (cookie + CSRF header)."""
        s = requests.Session()
        s.trust_env = False
        s.get(f"{self.url}/user/login/", timeout=30)
        csrf = s.cookies.get("csrftoken")
        r = s.post(
            f"{self.url}/user/login/",
            timeout=30,
            allow_redirects=False,
            data={"email": self.username, "password": self.password, "csrfmiddlewaretoken": csrf},
            headers={"Referer": f"{self.url}/user/login/"},
        )
        if r.status_code != 302:
            raise LabelStudioError(f"login failed ({r.status_code}): {r.text[:300]}")
        s.headers["X-CSRFToken"] = s.cookies.get("csrftoken", csrf)
        s.headers["Referer"] = f"{self.url}/"
        return s

    def pat(self) -> str:
        """The user's personal access token, created once the way the UI does (Account & Settings
        -> Personal Access Token -> Create): ``POST /api/token/`` from a logged-in session. LS keeps
        one live PAT per user (a second create answers 409) and lists only truncated ones, so the
        full token is kept here."""
        if self._pat is None:
            s = self.login_session()
            r = s.post(f"{self.url}/api/token/", json={}, timeout=30)
            if r.status_code != 201:
                raise LabelStudioError(f"creating a PAT failed ({r.status_code}): {r.text[:300]}")
            self._pat = r.json()["token"]
        return self._pat

    def access_token(self, pat: str | None = None, fresh: bool = False) -> str:
        """A JWT access token (about 5 min) from ``POST /api/token/refresh/ {"refresh": PAT}``."""
        if pat is None and not fresh and self._access and self._access[1] > time.monotonic():
            return self._access[0]
        r = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": pat or self.pat()}, timeout=30)
        if r.status_code != 200:
            raise LabelStudioError(f"token refresh failed ({r.status_code}): {r.text[:300]}")
        access = r.json()["access"]
        if pat is None:
            self._access = (access, time.monotonic() + 120)
        return access

    def auth_headers(self) -> dict[str, str]:
        """What a script sends in this mode: the legacy token, or a Bearer access token."""
        if self.legacy_tokens:
            return {"Authorization": f"Token {self.user_token}"}
        return {"Authorization": f"Bearer {self.access_token()}"}

    @property
    def backend_api_key(self) -> str:
        """What a backend gets as LABEL_STUDIO_API_KEY: the legacy token or the PAT."""
        return self.user_token if self.legacy_tokens else self.pat()

    # -- REST --------------------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        *,
        expect: int | Sequence[int] | None = (200, 201),
        timeout: float = 180,
        headers: dict | None = None,
        **kwargs,
    ) -> requests.Response:
        """An authenticated request to ``path`` (``/api/...``); raises unless the status is in
        ``expect`` (None: any status)."""
        hdrs = self.auth_headers()
        hdrs.update(headers or {})
        r = requests.request(method, f"{self.url}{path}", headers=hdrs, timeout=timeout, **kwargs)
        if expect is not None:
            expect = (expect,) if isinstance(expect, int) else tuple(expect)
            if r.status_code not in expect:
                raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:1000]}")
        return r

    def create_project(self, label_config: str, title: str = "Molmo e2e", **fields) -> dict:
        """Projects -> Create: a title (3+ characters) and a labeling config."""
        body = {"title": title, "label_config": label_config, **fields}
        return self.api("POST", "/api/projects", json=body).json()

    def get_project(self, project_id: int) -> dict:
        return self.api("GET", f"/api/projects/{project_id}").json()

    def import_files(self, project_id: int, paths: Iterable[Path | str]) -> list[int]:
        """Import -> Upload Files: one task per file, stored under /data/upload/<project>/.

        Each file goes under its own multipart field name (several files under one name become a
        single task); LS allows DATA_UPLOAD_MAX_NUMBER_FILES (100) files per request. Returns the new
        task ids in file order."""
        paths = [Path(p) for p in paths]
        ids: list[int] = []
        for start in range(0, len(paths), 100):
            chunk = paths[start : start + 100]
            with contextlib.ExitStack() as stack:
                files = {
                    f"file{i}": (p.name, stack.enter_context(open(p, "rb"))) for i, p in enumerate(chunk)
                }
                r = self.api("POST", f"/api/projects/{project_id}/import?return_task_ids=true", files=files)
            ids += self._import_ids(r, len(chunk))
        return ids

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Import of task JSON, e.g. ``[{"image": "http://..."}]``; returns the new task ids."""
        r = self.api("POST", f"/api/projects/{project_id}/import?return_task_ids=true", json=tasks)
        return self._import_ids(r, len(tasks))

    def import_urls(self, project_id: int, urls: Iterable[str], data_key: str = "image") -> list[int]:
        """Tasks whose image is an http(s) URL that the backend fetches itself."""
        return self.import_tasks(project_id, [{data_key: u} for u in urls])

    @staticmethod
    def _import_ids(r: requests.Response, expected: int) -> list[int]:
        body = r.json()
        ids = body.get("task_ids") or []
        if len(ids) != expected:
            raise LabelStudioError(f"import made {len(ids)} tasks, expected {expected}: {body}")
        return ids

    def tasks(self, project_id: int) -> list[dict]:
        """All tasks of a project (Data Manager list)."""
        out: list[dict] = []
        page = 1
        while True:
            r = self.api(
                "GET",
                "/api/tasks",
                params={"project": project_id, "page": page, "page_size": 100},
                expect=(200, 404),
            )
            if r.status_code == 404:
                break
            body = r.json()
            batch = body["tasks"] if isinstance(body, dict) else body
            out += batch
            if len(batch) < 100:
                break
            page += 1
        return out

    def connect_ml(
        self,
        project_id: int,
        url: str,
        title: str = "Molmo",
        is_interactive: bool = False,
        expect=(200, 201),
        **fields,
    ) -> dict:
        """Settings -> Model -> Connect Model. LS calls the backend's /health and /setup on the way."""
        body = {"url": url, "project": project_id, "title": title, "is_interactive": is_interactive, **fields}
        return self.api("POST", "/api/ml", json=body, expect=expect).json()

    def ml_backends(self, project_id: int) -> list[dict]:
        return self.api("GET", "/api/ml", params={"project": project_id}).json()

    def retrieve_predictions(self, project_id: int, task_ids: Sequence[int] | None = None) -> dict:
        """Data Manager -> select tasks -> Actions -> Retrieve Predictions (all tasks when
        ``task_ids`` is None). Synchronous: all selected tasks go to the backend in one /predict."""
        if task_ids is None:
            selected = {"all": True, "excluded": []}
        else:
            selected = {"all": False, "included": list(task_ids)}
        return self.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": selected},
        ).json()

    def open_task(self, task_id: int) -> dict:
        """Opening a task in the labeling UI: ``GET /api/tasks/ID`` (predicts it when it has none)."""
        return self.api("GET", f"/api/tasks/{task_id}").json()

    def predictions(self, task_id: int) -> list[dict]:
        """What LS stored for a task: ``GET /api/predictions?task=ID``."""
        body = self.api("GET", "/api/predictions", params={"task": task_id}).json()
        return body["results"] if isinstance(body, dict) and "results" in body else body

    def fetch(self, path: str, headers: dict | None = None, **kwargs) -> requests.Response:
        """GET a path such as /data/upload/... with the mode's auth (no status check)."""
        return self.api("GET", path, expect=None, headers=headers, **kwargs)
