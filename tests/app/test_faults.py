"""Faults through the real HTTP server: Label Studio going away, access tokens expiring or revoked
mid-run, an exception or GPU out-of-memory inside one batch, clients that hang up mid-request.

One forced-answer server (tests/support/forced_backend.py) for the module. Its engine fails on
purpose through MOLMO_TEST_FAULTS: any batch holding a 77x55 image raises RuntimeError, a 78x56
image raises torch.cuda.OutOfMemoryError, any batch of more than 6 queries raises
OutOfMemoryError (as a real GPU does for too big a batch), and a prompt about "slowpoke" takes 3 s.
Label Studio is tests/support/http_fixtures.FakeLabelStudio with personal access tokens whose access
tokens it really expires.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import threading
import time

import pytest
import requests
from PIL import Image

from tests.support.http_fixtures import FakeLabelStudio, HttpServer, Reply, Request
from tests.support.processes import BackendServer

CAT = '<points coords="1 1 250 500 2 750 100">cat</points>'
CAT_POINTS = [(25.0, 50.0), (75.0, 10.0)]
CONFIG = (
    '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="cat"/></KeyPointLabels></View>'
)
SLOW_CONFIG = CONFIG.replace('<Label value="cat"/>', '<Label value="slowpoke"/>')
A_SIZE, B_SIZE = (64, 48), (30, 50)
RUNTIME_POISON, OOM_POISON = (77, 55), (78, 56)
FAULTS = [
    {"image_size": list(RUNTIME_POISON), "error": "runtime"},
    {"image_size": list(OOM_POISON), "error": "oom"},
    {"batch_over": 6, "error": "oom"},
    {"prompt": "slowpoke", "sleep": 3.0},
]
FETCH_TIMEOUT = 2.0
ACCESS_LIFETIME = 2  # seconds: the backend must renew its access token several times a minute


def png(size, color=(200, 30, 30)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


class ExpiringLabelStudio(FakeLabelStudio):
    """Label Studio that also refuses access tokens past their ``exp``, on its own clock, and
    that can go down (every connection cut, kept-alive ones too) and come back on its port."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._connections: list[socket.socket] = []
        self._track_connections()

    def _track_connections(self) -> None:
        accept = self._httpd.get_request

        def get_request():
            sock, address = accept()
            self._connections.append(sock)
            return sock, address

        self._httpd.get_request = get_request

    def close(self) -> None:
        super().close()
        for sock in self._connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._connections.clear()

    def authorized(self, request: Request) -> bool:
        if not super().authorized(request):
            return False
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return True  # a legacy token
        payload = auth[len("Bearer ") :].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims["exp"] > time.time()

    def restart(self) -> None:
        """Listen again on the same port after :meth:`close`, keeping routes and tokens."""
        httpd = self._httpd
        self._httpd = type(httpd)((self.host, self.port), httpd.RequestHandlerClass)
        self._track_connections()
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()


class World:
    def __init__(self, backend, ls: ExpiringLabelStudio, web: HttpServer):
        self.backend, self.ls, self.web = backend, ls, web
        self.url = backend.url

    def predict(self, tasks, config=CONFIG, timeout=60) -> requests.Response:
        return requests.post(
            f"{self.url}/predict",
            timeout=timeout,
            json={"tasks": tasks, "project": "1.1", "label_config": config, "params": {"context": None}},
        )

    def metrics(self) -> dict:
        return requests.get(f"{self.url}/metrics?format=json", timeout=5).json()

    def health_s(self) -> float:
        started = time.monotonic()
        response = requests.get(f"{self.url}/health", timeout=5)
        assert response.status_code == 200 and response.json()["status"] == "UP"
        return time.monotonic() - started


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("faults")
    ls = ExpiringLabelStudio(access_lifetime=ACCESS_LIFETIME)
    ls.serve_file("/data/upload/1/a.png", png(A_SIZE))
    ls.serve_file("/data/upload/1/b.png", png(B_SIZE))
    web = HttpServer()
    for size in (A_SIZE, B_SIZE, RUNTIME_POISON, OOM_POISON):
        web.route(f"/{size[0]}x{size[1]}.png", Reply(200, png(size)))
    env = {
        "MOLMO_ALLOWED_HOSTS": "127.0.0.1",
        "MOLMO_MAX_NEW_TOKENS": "32",
        "MOLMO_FETCH_TIMEOUT": str(FETCH_TIMEOUT),
        "LABEL_STUDIO_URL": ls.url,
        "LABEL_STUDIO_API_KEY": ls.pat,
        "MOLMO_TEST_FAULTS": json.dumps(FAULTS),
        "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
    }
    try:
        with BackendServer(tmp, env=env, answers={"cat": CAT, "slowpoke": CAT}) as backend:
            yield World(backend, ls, web)
    finally:
        ls.close()
        web.close()


@pytest.fixture(autouse=True)
def server_stays_up(world):
    yield
    assert world.backend.proc.poll() is None, "the server died"
    assert world.health_s() < 1.0


def upload(task_id: int, name: str = "a") -> dict:
    return {"id": task_id, "data": {"image": f"/data/upload/1/{name}.png"}}


def web(world: World, task_id: int, size) -> dict:
    return {"id": task_id, "data": {"image": f"{world.web.url}/{size[0]}x{size[1]}.png"}}


def sizes_of(response: requests.Response, label: str = "cat") -> list:
    """Per task: its image size when it got exactly the forced keypoints, None when empty."""
    assert response.status_code == 200, response.text
    out = []
    for result in response.json()["results"]:
        regions = result["result"]
        if not regions:
            out.append(None)
            continue
        got = [(r["value"]["keypointlabels"], r["value"]["x"], r["value"]["y"]) for r in regions]
        assert got == [([label], x, y) for x, y in CAT_POINTS]
        assert len({(r["original_width"], r["original_height"]) for r in regions}) == 1
        out.append((regions[0]["original_width"], regions[0]["original_height"]))
    return out


# -- Label Studio and its tokens ----------------------------------------------------------------


def test_uploads_come_from_label_studio_with_the_exchanged_pat(world):
    response = world.predict([upload(1, "a"), web(world, 2, B_SIZE), upload(3, "b")])
    assert sizes_of(response) == [A_SIZE, B_SIZE, B_SIZE]
    sent = {r.headers.get("authorization", "")[:7] for r in world.ls.hits("/data/upload/1/a.png")}
    assert sent == {"Bearer "}
    assert all("authorization" not in r.headers for r in world.web.requests)  # LS's token stays at LS


def test_access_token_expiring_during_a_bulk_request_is_renewed(world):
    """Access tokens live 2 s at Label Studio, which refuses them after that (the backend renews
    them after half their life). A bulk request whose uploads take 0.5 s each (48 of them, 16
    fetched at a time: three rounds, over 1.5 s) outlives its first access token's renewal
    point: the token is renewed during the request and every task gets its result. (0.5 s: a
    fetch that meets an expired token is refused, renews and fetches again, all within
    MOLMO_FETCH_TIMEOUT=2 s; with 1.5 s uploads a loaded machine pushed fetches past it.)"""
    exchanged_at: list[float] = []
    first_file_at: list[float] = []
    exchange = world.ls.routes["/api/token/refresh/"]
    image = png(A_SIZE)

    def timed_exchange(request: Request) -> Reply:
        exchanged_at.append(time.monotonic())
        return exchange(request)

    def slow_file(request: Request) -> Reply:
        first_file_at.append(time.monotonic())
        if not world.ls.authorized(request):
            return Reply(401, b'{"detail": "Given token not valid for any token type"}')
        return Reply(200, image, delay=0.5)

    world.ls.route("/api/token/refresh/", timed_exchange)
    world.ls.route("/data/upload/3/slow.png", slow_file)
    try:
        tasks = [{"id": i, "data": {"image": "/data/upload/3/slow.png"}} for i in range(48)]
        assert sizes_of(world.predict(tasks)) == [A_SIZE] * 48
        done = time.monotonic()
    finally:
        world.ls.route("/api/token/refresh/", exchange)
    assert any(min(first_file_at) < t < done for t in exchanged_at), "no renewal during the request"


def test_access_tokens_revoked_in_the_middle_of_a_bulk_request(world):
    """Label Studio forgets every access token while the 5th of 24 uploads is being fetched:
    the fetches that then get 401 exchange the PAT again and retry; no task loses its result."""
    hits = itertools.count(1)
    statuses: list[int] = []
    image = png(A_SIZE)

    def revoking(request: Request) -> Reply:
        if next(hits) == 5:
            world.ls.revoke_access_tokens()
        if not world.ls.authorized(request):
            statuses.append(401)
            return Reply(401, b'{"detail": "Given token not valid for any token type"}')
        statuses.append(200)
        return Reply(200, image, delay=0.05)

    world.ls.route("/data/upload/2/r.png", revoking)
    exchanges = world.ls.exchanges
    tasks = [{"id": i, "data": {"image": "/data/upload/2/r.png"}} for i in range(24)]
    tasks.insert(7, web(world, 99, B_SIZE))
    response = world.predict(tasks)
    assert sizes_of(response) == [A_SIZE] * 7 + [B_SIZE] + [A_SIZE] * 17
    assert world.ls.exchanges > exchanges
    assert 401 in statuses, "no fetch ever saw the revocation"
    assert statuses.count(200) == 24


def test_a_revoked_pat_empties_only_the_upload_tasks_and_recovers(world):
    world.ls.revoke_access_tokens()
    real_pat = world.ls.pat
    world.ls.pat = "revoked"  # LS now refuses the backend's PAT at /api/token/refresh/
    try:
        response = world.predict([upload(1), web(world, 2, B_SIZE), upload(3, "b")])
        assert sizes_of(response) == [None, B_SIZE, None]
        assert "Label Studio refused the personal access token" in world.backend.log
    finally:
        world.ls.pat = real_pat
    assert sizes_of(world.predict([upload(1), upload(2, "b")])) == [A_SIZE, B_SIZE]
    assert real_pat not in world.backend.log


def test_label_studio_unreachable_then_back(world):
    world.ls.close()
    try:
        started = time.monotonic()
        response = world.predict([upload(1), web(world, 2, A_SIZE), upload(3, "b"), web(world, 4, B_SIZE)])
        assert sizes_of(response) == [None, A_SIZE, None, B_SIZE]
        assert time.monotonic() - started < 15.0  # connection refused: no waiting on time-outs
        assert world.health_s() < 1.0
    finally:
        world.ls.restart()
    world.ls.revoke_access_tokens()  # also make the backend notice that LS lost its tokens
    assert sizes_of(world.predict([upload(1), web(world, 2, A_SIZE), upload(3, "b")])) == [
        A_SIZE,
        A_SIZE,
        B_SIZE,
    ]


def test_label_studio_hanging_costs_one_fetch_timeout_not_one_per_task(world):
    """Label Studio accepts connections but answers nothing (token exchange and files): 12
    upload tasks must not wait FETCH_TIMEOUT each, one after the other."""
    time.sleep(ACCESS_LIFETIME / 2 + 0.2)  # the backend's cached access token is due for renewal
    hang = Reply(200, b"", delay=8.0)
    real_routes = dict(world.ls.routes)
    world.ls.route("/api/token/refresh/", hang)
    world.ls.route("/data/upload/1/a.png", hang)
    try:
        started = time.monotonic()
        response = world.predict([upload(i) for i in range(12)] + [web(world, 12, B_SIZE)], timeout=120)
        took = time.monotonic() - started
        assert sizes_of(response) == [None] * 12 + [B_SIZE]
        assert took < 2 * FETCH_TIMEOUT + 6, f"{took:.1f} s"
    finally:
        world.ls.routes.update(real_routes)
    assert sizes_of(world.predict([upload(1), upload(2, "b")])) == [A_SIZE, B_SIZE]


# -- faults inside a batch ------------------------------------------------------------------


def test_runtime_error_in_a_batch_costs_only_the_bad_task(world):
    before = world.metrics()["scheduler"]
    tasks = [
        web(world, 1, A_SIZE),
        web(world, 2, RUNTIME_POISON),
        web(world, 3, B_SIZE),
        web(world, 4, A_SIZE),
    ]
    assert sizes_of(world.predict(tasks)) == [A_SIZE, None, B_SIZE, A_SIZE]
    after = world.metrics()["scheduler"]
    assert after["failed_queries"] - before["failed_queries"] == 1
    assert after["failed_batches"] - before["failed_batches"] >= 2  # the batch, then its halves
    assert "injected failure" in world.backend.log


def test_out_of_memory_on_one_image_costs_only_that_task(world):
    before = world.metrics()["scheduler"]
    tasks = [web(world, 1, OOM_POISON), web(world, 2, B_SIZE), web(world, 3, A_SIZE)]
    assert sizes_of(world.predict(tasks)) == [None, B_SIZE, A_SIZE]
    assert world.metrics()["scheduler"]["failed_queries"] - before["failed_queries"] == 1
    assert "OutOfMemoryError" in world.backend.log


def test_out_of_memory_on_an_opened_task_and_the_next_one_works(world):
    assert sizes_of(world.predict([web(world, 1, OOM_POISON)])) == [None]
    assert sizes_of(world.predict([web(world, 2, A_SIZE)])) == [A_SIZE]


def test_out_of_memory_for_a_big_batch_is_split_and_every_task_answered(world):
    """16 queries at once exceed the (injected) memory; halves of 8 too; quarters of 4 fit."""
    before = world.metrics()["scheduler"]
    tasks = [web(world, i, (A_SIZE, B_SIZE)[i % 2]) for i in range(16)]
    assert sizes_of(world.predict(tasks)) == [A_SIZE, B_SIZE] * 8
    after = world.metrics()["scheduler"]
    assert after["failed_queries"] == before["failed_queries"]
    assert after["failed_batches"] - before["failed_batches"] == 3  # 16, then 8 and 8


def test_all_faults_in_one_bulk_request(world):
    tasks = [web(world, i, (A_SIZE, B_SIZE)[i % 2]) for i in range(12)]
    tasks[3] = web(world, 3, RUNTIME_POISON)
    tasks[8] = web(world, 8, OOM_POISON)
    tasks[10] = upload(10, "b")
    want = [(A_SIZE, B_SIZE)[i % 2] for i in range(12)]
    want[3] = want[8] = None
    want[10] = B_SIZE
    assert sizes_of(world.predict(tasks)) == want
    assert world.metrics()["scheduler"]["pending"] == 0


# -- clients that hang up ------------------------------------------------------------------------


def raw_request(
    world: World, body: bytes, path: str = "/predict", send_body_bytes: int | None = None, read: bool = False
) -> bytes:
    """Send (part of) a POST by hand; returns what was read (nothing unless ``read``)."""
    port = int(world.url.rsplit(":", 1)[1])
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body[:send_body_bytes])
        if not read:
            return b""
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def predict_bytes(world: World, tasks, config=CONFIG) -> bytes:
    return json.dumps({"tasks": tasks, "label_config": config}).encode()


def test_clients_that_send_half_a_request_and_hang_up(world):
    body = predict_bytes(world, [web(world, 1, A_SIZE)])
    for i in range(20):  # more than the server's 8 threads
        raw_request(world, body, send_body_bytes=len(body) // 2 if i % 2 else 0)
    port = int(world.url.rsplit(":", 1)[1])
    for i in range(10):  # and some that hang up inside the request line or headers
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nContent-Le"[: 10 + i * 3])
    assert sizes_of(world.predict([web(world, 1, A_SIZE), web(world, 2, B_SIZE)])) == [A_SIZE, B_SIZE]
    assert world.metrics()["requests"].get("server_errors", 0) == 0


def test_client_that_hangs_up_while_its_prediction_runs(world):
    """The answer has nowhere to go; the work finishes, the server stays up and answers others."""
    before = world.metrics()
    raw_request(world, predict_bytes(world, [web(world, 1, A_SIZE)] * 2, SLOW_CONFIG))  # 3 s batch
    time.sleep(0.5)
    assert world.health_s() < 1.0
    # an opened task: it runs between decode steps of the slow bulk batch, or after it
    assert sizes_of(world.predict([web(world, 2, B_SIZE)])) == [B_SIZE]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the abandoned request still completes its work
        after = world.metrics()
        if after["requests"]["predict_requests"] - before["requests"]["predict_requests"] == 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the abandoned prediction never finished")
    assert after["requests"].get("server_errors", 0) == 0 and after["scheduler"]["pending"] == 0
    assert sizes_of(world.predict([web(world, 3, A_SIZE), web(world, 4, B_SIZE)])) == [A_SIZE, B_SIZE]


def test_clients_that_stall_mid_body_do_not_block_the_others(world):
    """Three clients send half a body and wait; /health and predictions go on meanwhile."""
    port = int(world.url.rsplit(":", 1)[1])
    body = predict_bytes(world, [web(world, 1, A_SIZE)])
    head = (
        f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        for sock in stalled:
            sock.sendall(head + body[:10])
        time.sleep(0.3)
        assert world.health_s() < 1.0
        assert sizes_of(world.predict([web(world, 2, B_SIZE)])) == [B_SIZE]
    finally:
        for sock in stalled:
            sock.close()
    assert world.health_s() < 1.0
