"""Security through the real HTTP server: basic auth as Label Studio sends it, the request-size
cap, the fetch allow-list by default, and no secret in the server's log.

One server for the module, with basic auth on, a personal access token for Label Studio
(tests/support/http_fixtures.FakeLabelStudio on 127.0.0.1), no MOLMO_ALLOWED_HOSTS (the default: only
Label Studio's host) and LOG_LEVEL=DEBUG, so that even debug lines are searched for secrets. It
runs under ``tests/support/forced_backend.py serve --net-guard``: a connect to anything but
loopback would be refused and recorded (the last test reads the record). Address checks: tests/images/test_fetch_security.py.
"""

from __future__ import annotations

import base64
import io
import json
import socket

import pytest
import requests
from PIL import Image
from requests.auth import HTTPBasicAuth

from tests.support.http_fixtures import FakeLabelStudio, HttpServer, Reply, Request
from tests.support.net_guard import read_events
from tests.support.processes import BackendServer

USER = "label-studio"
PASSWORD = "pässwörd:S3CRET-basic"  # latin-1 characters and a colon, as a real password may have
WRONG_PASSWORD = "wrong-S3CRET-attempt"
SETUP_TOKEN = "feedface" * 5  # a legacy token, as Label Studio's /setup sends it
MAX_REQUEST_BYTES = 300_000
CAT = '<points coords="1 1 250 500 2 750 100">cat</points>'
CONFIG = (
    '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="cat"/></KeyPointLabels></View>'
)
A_SIZE = (64, 48)
LS_AUTH = HTTPBasicAuth(USER, PASSWORD)  # exactly what Label Studio 1.23 uses (ml/api_connector.py)


def png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def basic(user: str, password: str, encoding: str = "utf-8") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode(encoding)).decode()


class World:
    def __init__(self, backend, ls, web, attacker, attacker2, issued, net_log):
        self.backend, self.ls, self.web, self.net_log = backend, ls, web, net_log
        self.attacker, self.attacker2, self.issued = attacker, attacker2, issued
        self.url = backend.url

    def predict(self, tasks, **kw) -> requests.Response:
        return requests.post(
            f"{self.url}/predict",
            auth=LS_AUTH,
            timeout=60,
            json={"tasks": tasks, "project": "1.1", "label_config": CONFIG, "params": {"context": None}},
            **kw,
        )

    def setup(self, hostname: str) -> requests.Response:
        return requests.post(
            f"{self.url}/setup",
            auth=LS_AUTH,
            timeout=10,
            json={"project": "1.1", "schema": CONFIG, "hostname": hostname, "access_token": SETUP_TOKEN},
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("security")
    ls = FakeLabelStudio(access_lifetime=300)
    ls.serve_file("/data/upload/1/a.png", png(A_SIZE))
    issued: list[str] = []
    exchange = ls.routes["/api/token/refresh/"]

    def recording_exchange(request: Request) -> Reply:
        reply = exchange(request)
        if reply.status == 200:
            issued.append(json.loads(reply.body)["access"])
        return reply

    ls.route("/api/token/refresh/", recording_exchange)
    web = HttpServer()  # 127.0.0.1 like Label Studio, another port
    web.route("/a.png", Reply(200, png(A_SIZE)))
    attacker, attacker2 = HttpServer("127.0.0.2"), HttpServer("127.0.0.2")
    for server in (attacker, attacker2):
        server.route("/a.png", Reply(200, png(A_SIZE)))
        server.route("/data/upload/1/a.png", Reply(200, png(A_SIZE)))
    env = {
        "BASIC_AUTH_USER": USER,
        "BASIC_AUTH_PASS": PASSWORD,
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.pat,
        "MOLMO_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "LOG_LEVEL": "DEBUG",
        "MOLMO_MAX_NEW_TOKENS": "32",
        "MOLMO_ALLOWED_HOSTS": "",
        "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
        "MOLMO_TEST_NET_LOG": str(tmp / "net.jsonl"),
    }
    try:
        with BackendServer(tmp, env=env, answers={"cat": CAT}, net_guard=True) as backend:
            yield World(backend, ls, web, attacker, attacker2, issued, tmp / "net.jsonl")
    finally:
        for server in (ls, web, attacker, attacker2):
            server.close()


def sizes_of(response: requests.Response) -> list:
    assert response.status_code == 200, response.text
    out = []
    for result in response.json()["results"]:
        regions = result["result"]
        out.append((regions[0]["original_width"], regions[0]["original_height"]) if regions else None)
        assert len(regions) in (0, 2)
    return out


# -- basic auth ------------------------------------------------------------------------------

PROTECTED = [
    ("POST", "/predict"),
    ("POST", "/setup"),
    ("POST", "/webhook"),
    ("GET", "/versions"),
    ("GET", "/metrics"),
]
BAD_CREDENTIALS = {
    "none": None,
    "wrong password": basic(USER, WRONG_PASSWORD),
    "wrong user": basic("admin", PASSWORD),
    "password only": basic("", PASSWORD),
    "no colon": "Basic " + base64.b64encode(USER.encode()).decode(),
    "password as a Bearer token": f"Bearer {PASSWORD}",
    "not base64": "Basic !!!not-base64!!!",
    "empty Basic": "Basic ",
    "non-ASCII header": "Basic Zm9v\u00e9",
    "password prefix": basic(USER, PASSWORD[:-1]),
    "password with a suffix": basic(USER, PASSWORD + "x"),
}


@pytest.mark.parametrize("credentials", list(BAD_CREDENTIALS), ids=list(BAD_CREDENTIALS))
@pytest.mark.parametrize("method, path", PROTECTED, ids=[p for _, p in PROTECTED])
def test_protected_routes_refuse_missing_or_wrong_credentials(world, method, path, credentials):
    header = BAD_CREDENTIALS[credentials]
    headers = {"Authorization": header} if header is not None else {}
    response = requests.request(
        method,
        f"{world.url}{path}",
        headers=headers,
        timeout=10,
        json={"tasks": [], "label_config": CONFIG, "schema": CONFIG},
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="molmo-backend"'
    assert response.json() == {"error": "authentication required"}


@pytest.mark.parametrize("path", ["/", "/health"])
def test_health_stays_open_for_container_health_checks(world, path):
    response = requests.get(f"{world.url}{path}", timeout=5)
    assert response.status_code == 200 and response.json()["status"] == "UP"


@pytest.mark.parametrize(
    "how", ["requests HTTPBasicAuth (Label Studio)", "latin-1 header", "UTF-8 header", "lower-case scheme"]
)
def test_label_studio_credentials_are_accepted_on_every_route(world, how):
    """Label Studio 1.23 sends ``HTTPBasicAuth(user, pass)`` from requests, which encodes latin-1;
    curl and browsers send UTF-8. Both must pass for a password such as 'pässwörd'."""
    if how.startswith("requests"):
        kw = {"auth": LS_AUTH}
    else:
        header = basic(USER, PASSWORD, "latin-1" if how.startswith("latin") else "utf-8")
        if how.startswith("lower"):
            header = "basic" + header[len("Basic") :]
        kw = {"headers": {"Authorization": header}}
    setup = requests.post(
        f"{world.url}/setup", json={"schema": CONFIG, "hostname": world.ls.url}, timeout=10, **kw
    )
    assert setup.status_code == 200 and setup.json()["model_version"]
    predict = requests.post(
        f"{world.url}/predict",
        timeout=60,
        **kw,
        json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}], "label_config": CONFIG},
    )
    assert sizes_of(predict) == [A_SIZE]
    assert (
        requests.post(
            f"{world.url}/webhook", json={"action": "PROJECT_UPDATED"}, timeout=10, **kw
        ).status_code
        == 200
    )
    for path in ("/versions", "/metrics"):
        assert requests.get(f"{world.url}{path}", timeout=10, **kw).status_code == 200


def test_failed_logins_are_counted(world):
    before = requests.get(f"{world.url}/metrics?format=json", auth=LS_AUTH, timeout=5).json()["requests"]
    requests.post(f"{world.url}/predict", json={}, timeout=5)
    after = requests.get(f"{world.url}/metrics?format=json", auth=LS_AUTH, timeout=5).json()["requests"]
    assert after.get("auth_failures", 0) - before.get("auth_failures", 0) == 1


# -- request-size cap ------------------------------------------------------------------------


def test_body_over_the_cap_gets_413_json(world):
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/a.png", "pad": "x" * MAX_REQUEST_BYTES}}]
    response = world.predict(tasks)
    assert response.status_code == 413
    assert response.json() == {
        "error": f"the request body is larger than MOLMO_MAX_REQUEST_BYTES={MAX_REQUEST_BYTES} bytes"
    }


def test_body_just_under_the_cap_is_served(world):
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/a.png", "pad": "x" * (MAX_REQUEST_BYTES - 1000)}}]
    assert sizes_of(world.predict(tasks)) == [A_SIZE]


def test_chunked_body_over_the_cap_gets_413(world):
    def chunks():
        yield b'{"tasks": [], "pad": "'
        for _ in range(MAX_REQUEST_BYTES // 10_000 + 5):
            yield b"x" * 10_000
        yield b'"}'

    response = requests.post(
        f"{world.url}/predict",
        data=chunks(),
        auth=LS_AUTH,
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413 and "MOLMO_MAX_REQUEST_BYTES" in response.json()["error"]


def test_a_lying_content_length_is_refused_without_waiting_for_the_body(world):
    port = int(world.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {basic(USER, PASSWORD)}\r\n"
                "Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{"
            ).encode()
        )
        answer = b""
        while b"MOLMO_MAX_REQUEST_BYTES" not in answer and len(answer) < 65536:
            chunk = sock.recv(65536)  # headers and body may come in separate segments
            if not chunk:
                break
            answer += chunk
        answer = answer.decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "MOLMO_MAX_REQUEST_BYTES" in answer


def test_unauthenticated_big_body_gets_401_not_read(world):
    response = requests.post(
        f"{world.url}/predict",
        data=b"x" * (MAX_REQUEST_BYTES * 2),
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 401


# -- what is fetched, from where, with which credentials ---------------------------------------


def test_by_default_only_label_studio_host_is_fetched_from(world):
    assert world.setup(world.ls.url).status_code == 200
    before = len(world.attacker.requests)
    tasks = [
        {"id": 1, "data": {"image": "/data/upload/1/a.png"}},
        {"id": 2, "data": {"image": f"{world.web.url}/a.png"}},  # Label Studio's host, other port
        {"id": 3, "data": {"image": f"{world.attacker.url}/a.png"}},
    ]  # another host
    assert sizes_of(world.predict(tasks)) == [A_SIZE, A_SIZE, None]
    assert len(world.attacker.requests) == before
    assert all("authorization" not in r.headers for r in world.web.requests)  # the token stays at LS
    assert all(
        r.headers.get("authorization", "").startswith("Bearer ")
        for r in world.ls.hits("/data/upload/1/a.png")
    )


def test_setup_cannot_widen_the_allow_list_nor_attract_the_token(world):
    """A /setup naming another host (anyone may call it when basic auth is off): URLs on that
    host's origin are still fetched from LABEL_STUDIO_URL, and its other ports stay refused."""
    try:
        assert world.setup(world.attacker.url).status_code == 200
        before = len(world.attacker.requests) + len(world.attacker2.requests)
        tasks = [
            {"id": 1, "data": {"image": f"{world.attacker.url}/data/upload/1/a.png"}},
            {"id": 2, "data": {"image": f"{world.attacker2.url}/a.png"}},
            {"id": 3, "data": {"image": "/data/upload/1/a.png"}},
        ]
        assert sizes_of(world.predict(tasks)) == [A_SIZE, None, A_SIZE]
        assert len(world.attacker.requests) + len(world.attacker2.requests) == before
    finally:
        assert world.setup(world.ls.url).status_code == 200


def test_secrets_in_urls_do_not_reach_the_log(world):
    world.web.route("/signed.png", Reply(200, png(A_SIZE)))
    world.web.route("/moved", Reply(302, headers={"Location": "/gone.png?token=REDIRECTSECRET"}))
    tasks = [
        {"id": 1, "data": {"image": f"{world.web.url}/signed.png?X-Amz-Signature=SIGSECRET"}},
        {"id": 2, "data": {"image": f"{world.web.url}/missing.png?X-Amz-Signature=SIGSECRET"}},
        {"id": 3, "data": {"image": f"http://user:USERINFOSECRET@127.0.0.2:{world.attacker.port}/a.png"}},
        {"id": 4, "data": {"image": f"{world.web.url}/moved"}},
    ]
    assert sizes_of(world.predict(tasks)) == [A_SIZE, None, None, None]


def test_refused_and_revoked_tokens_are_reported_without_the_token(world):
    world.ls.revoke_access_tokens()
    real = world.ls.pat
    world.ls.pat = "another"  # Label Studio no longer accepts the backend's PAT
    try:
        assert sizes_of(world.predict([{"id": 1, "data": {"image": "/data/upload/1/a.png"}}])) == [None]
    finally:
        world.ls.pat = real
    assert "refused the personal access token" in world.backend.log


def test_no_secret_ever_reaches_the_log(world):
    """Runs last: the whole module's log (DEBUG level) against every secret it handled."""
    # one more request that carries every kind of secret at once
    assert world.setup(world.ls.url).status_code == 200
    assert sizes_of(world.predict([{"id": 1, "data": {"image": "/data/upload/1/a.png"}}])) == [A_SIZE]
    requests.post(f"{world.url}/predict", headers={"Authorization": basic(USER, WRONG_PASSWORD)}, timeout=5)
    assert world.issued, "the PAT was never exchanged: the test would prove nothing"
    secrets = {
        "LABEL_STUDIO_API_KEY": world.ls.pat,
        "LABEL_STUDIO_API_KEY signature": world.ls.pat.rsplit(".", 1)[1],
        "BASIC_AUTH_PASS": PASSWORD,
        "BASIC_AUTH_PASS (ASCII part)": "S3CRET-basic",
        "basic auth header (latin-1)": basic(USER, PASSWORD, "latin-1").split()[1],
        "basic auth header (UTF-8)": basic(USER, PASSWORD).split()[1],
        "a wrong password tried": WRONG_PASSWORD,
        "/setup access_token": SETUP_TOKEN,
        "signed URL query": "SIGSECRET",
        "redirect query": "REDIRECTSECRET",
        "URL userinfo": "USERINFOSECRET",
        **{f"access token {i}": token for i, token in enumerate(world.issued)},
    }
    log = world.backend.log
    assert "predicted" in log and "image unavailable" in log and "DEBUG" in log  # it did log
    leaked = [name for name, secret in secrets.items() if secret in log]
    assert leaked == []


def test_only_loopback_was_ever_connected_to(world):
    connects = [e for e in read_events(world.net_log) if e["event"] == "connect"]
    assert connects and [e for e in connects if e["blocked"]] == []
    assert {e["address"] for e in connects} == {"127.0.0.1"}  # LS and its host; never 127.0.0.2
