"""Where the real server may connect, shown through it (gunicorn on 127.0.0.1, the demo Molmo2
with forced answers) under ``tests/support/forced_backend.py serve --net-guard``: inside the
server process, names resolve from a test table (to loopback addresses, or to the refused ranges themselves), and every
connect to anything but loopback is refused by the guard before it happens and recorded. The
guard's record (one JSON line per lookup and connect) is read after each request.

Server "star" sets what a project with images on many hosts sets, ``MOLMO_ALLOWED_HOSTS=*``, plus
explicit entries (names, a CIDR, an IPv6 address with a port), and no LABEL_STUDIO_URL, so
/setup's hostname is Label Studio. Server "compose" is the docker-compose layout: LABEL_STUDIO_URL
names Label Studio by a service name that resolves to a private-network address (here loopback),
LOCAL_FILES_DOCUMENT_ROOT is set, MOLMO_ALLOWED_HOSTS is empty.

Every refused case sends [good, bad, good] and checks: both good tasks answered with their
points, in order; the bad one empty with its reason logged; no connect attempted anywhere but the
good tasks' address; no bait server reached.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.support.http_fixtures import FakeLabelStudio, HttpServer, Reply
from tests.support.net_guard import read_events
from tests.support.processes import BackendServer

CAT = '<points coords="1 1 250 500 2 750 100">cat</points>'
CAT_POINTS = [(25.0, 50.0), (75.0, 10.0)]
CONFIG = (
    '<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image">'
    '<Label value="cat"/></KeyPointLabels></View>'
)
A_SIZE, B_SIZE, BAIT_SIZE = (64, 48), (30, 50), (11, 7)
LEGACY = "c0ffee00" * 5

IMAGES_IP, LS_LISTED_IP, CIDR_IP, COMPOSE_LS_IP, MINIO_IP = (
    "127.0.0.3",
    "127.0.0.4",
    "127.0.0.70",
    "127.0.0.6",
    "127.0.0.5",
)

#: names -> what the test resolver answers, inside the server process
NAMES = {
    "images.test": [IMAGES_IP],
    "ls.test": [LS_LISTED_IP],
    "cidr.test": [CIDR_IP],
    "label-studio.test": [COMPOSE_LS_IP],
    "minio.test": [MINIO_IP],
    "loop.test": ["127.0.0.1"],
    "loop6.test": ["::1"],
    "private10.test": ["10.0.0.5"],
    "private172.test": ["172.16.5.4"],
    "private192.test": ["192.168.1.20"],
    "ula.test": ["fd00::5"],
    "metadata.test": ["169.254.169.254"],
    "linklocal6.test": ["fe80::1"],
    "cgnat.test": ["100.64.0.7"],
    "multicast.test": ["224.0.0.251"],
    "multicast6.test": ["ff02::fb"],
    "unspecified.test": ["0.0.0.0"],
    "unspecified6.test": ["::"],
    "reserved.test": ["240.0.0.1"],
    "broadcast.test": ["255.255.255.255"],
    "doc.test": ["192.0.2.10"],
    "doc6.test": ["2001:db8::10"],
    "mapped.test": ["::ffff:127.0.0.1"],
    "mapped10.test": ["::ffff:10.0.0.5"],
    "mappedmeta.test": ["::ffff:169.254.169.254"],
    "nat64meta.test": ["64:ff9b::a9fe:a9fe"],
    "twobad.test": ["10.0.0.5", "169.254.169.254"],
    "listed-meta.test": ["169.254.169.254"],  # a listed name that points at the metadata service
    "rebind.test": [[IMAGES_IP], ["169.254.169.254"]],  # listed; its second answer changes
    "internal-ls.test": ["10.20.30.40"],
}


def png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def bait(host: str) -> HttpServer:
    """A server that must never be reached; if it were, its image would show up (11x7)."""
    server = HttpServer(host)
    for path in ("/a.png", "/data/upload/1/a.png", "/latest/meta-data/"):
        server.route(path, Reply(200, png(BAIT_SIZE)))
    return server


@dataclass
class World:
    """One server under test and its neighbours: ``world.images`` is ``world.servers["images"]``;
    servers named ``bait...`` must never be reached."""

    backend: object
    net_log: Path
    servers: dict[str, HttpServer]
    log_seen: int = 0
    seen_events: int = 0
    task_ids: Callable = field(default_factory=lambda: iter(range(1000, 10**6)).__next__)

    @property
    def url(self) -> str:
        return self.backend.url

    def __getattr__(self, name):
        servers = self.__dict__.get("servers", {})
        if name in servers:
            return servers[name]
        raise AttributeError(name)

    def predict(self, tasks) -> list:
        response = requests.post(
            f"{self.url}/predict",
            timeout=60,
            json={"tasks": tasks, "label_config": CONFIG, "params": {"context": None}},
        )
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == len(tasks)
        return results

    def setup(self, hostname: str) -> None:
        response = requests.post(
            f"{self.url}/setup",
            timeout=10,
            json={"schema": CONFIG, "hostname": hostname, "access_token": LEGACY},
        )
        assert response.status_code == 200, response.text

    def new_events(self) -> list[dict]:
        events = read_events(self.net_log)
        fresh, self.seen_events = events[self.seen_events :], len(events)
        return fresh

    def reasons(self, task_id: int) -> list[str]:
        text = self.backend.log
        fresh, self.log_seen = text[self.log_seen :], len(text)
        out = []
        for line in fresh.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("msg") == "image unavailable" and entry.get("task") == task_id:
                out.append(entry["reason"])
        return out

    def bait_hits(self) -> int:
        return sum(len(s.requests) for name, s in self.servers.items() if name.startswith("bait"))


def sizes(results) -> list:
    out = []
    for result in results:
        regions = result["result"]
        if not regions:
            out.append(None)
            continue
        assert [(r["value"]["x"], r["value"]["y"]) for r in regions] == CAT_POINTS
        assert all(0 <= r["value"]["x"] <= 100 and 0 <= r["value"]["y"] <= 100 for r in regions)
        out.append((regions[0]["original_width"], regions[0]["original_height"]))
    return out


def refused(
    world: World, value: str, reason: str, may_connect: frozenset = frozenset({IMAGES_IP})
) -> list[str]:
    """[good, value, good]: the middle task empty with ``reason`` logged, nothing connected but
    the good tasks' address (and ``may_connect``), no bait reached. Returns the reasons logged."""
    world.new_events()
    world.reasons(-1)
    baits = world.bait_hits()
    task_id = world.task_ids()
    good = f"http://images.test:{world.images.port}"
    results = world.predict(
        [
            {"id": 1, "data": {"image": f"{good}/a.png"}},
            {"id": task_id, "data": {"image": value}},
            {"id": 3, "data": {"image": f"{good}/b.png"}},
        ]
    )
    assert sizes(results) == [A_SIZE, None, B_SIZE]
    reasons = world.reasons(task_id)
    assert any(reason in r for r in reasons), (reason, reasons)
    events = world.new_events()
    connects = [e for e in events if e["event"] == "connect"]
    assert [e for e in connects if e["blocked"]] == [], "a non-loopback connect was attempted"
    assert {e["address"] for e in connects} <= may_connect, connects
    assert world.bait_hits() == baits
    return reasons


def fetched(world: World, value: str, size, addresses: set[str]) -> None:
    world.new_events()
    results = world.predict([{"id": world.task_ids(), "data": {"image": value}}])
    assert sizes(results) == [size]
    connects = [e for e in world.new_events() if e["event"] == "connect"]
    assert [e for e in connects if e["blocked"]] == []
    assert {e["address"] for e in connects} <= addresses


# -- server "star": MOLMO_ALLOWED_HOSTS='*' plus explicit entries, no LABEL_STUDIO_URL ------------


@pytest.fixture(scope="module")
def star(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("fetch-star")
    images = HttpServer(IMAGES_IP)
    images.route("/a.png", Reply(200, png(A_SIZE)))
    images.route("/b.png", Reply(200, png(B_SIZE)))
    images2 = HttpServer(IMAGES_IP)  # another port: a new connection (no pooled one)
    images2.route("/a.png", Reply(200, png(A_SIZE)))
    cidr = HttpServer(CIDR_IP)
    cidr.route("/a.png", Reply(200, png(A_SIZE)))
    v6 = HttpServer("::1")
    v6.route("/a.png", Reply(200, png(A_SIZE)))
    ls_listed = FakeLabelStudio(legacy_token=LEGACY, host=LS_LISTED_IP)
    ls_listed.serve_file("/data/upload/1/a.png", png(A_SIZE))
    ls_loop = FakeLabelStudio(legacy_token=LEGACY)  # Label Studio on 127.0.0.1, not listed
    ls_loop.serve_file("/data/upload/1/a.png", png(BAIT_SIZE))
    servers = {
        "images": images,
        "images2": images2,
        "cidr": cidr,
        "v6": v6,
        "ls_listed": ls_listed,
        "bait_loop": bait("127.0.0.1"),
        "bait_loop2": bait("127.0.0.2"),
        "bait_v6": bait("::1"),
        "bait_ls": ls_loop,
    }
    entries = [
        "*",
        "images.test",
        "ls.test",
        "rebind.test",
        "listed-meta.test",
        "127.0.0.64/26",
        f"[::1]:{v6.port}",
    ]
    net_log = tmp / "net.jsonl"
    env = {
        "MOLMO_ALLOWED_HOSTS": ",".join(entries),
        "MOLMO_FETCH_TIMEOUT": "3",
        "MOLMO_MAX_NEW_TOKENS": "32",
        "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
        "MOLMO_TEST_NET_NAMES": json.dumps(NAMES),
        "MOLMO_TEST_NET_LOG": str(net_log),
    }
    try:
        with BackendServer(tmp, env=env, answers={"cat": CAT}, net_guard=True) as backend:
            yield World(backend, net_log, servers)
    finally:
        for server in servers.values():
            server.close()


def test_allowed_fetches_connect_only_to_the_checked_addresses(star):
    fetched(star, f"http://images.test:{star.images.port}/a.png", A_SIZE, {IMAGES_IP})  # a listed name
    fetched(star, f"http://cidr.test:{star.cidr.port}/a.png", A_SIZE, {CIDR_IP})  # a CIDR, any name
    fetched(star, f"http://{CIDR_IP}:{star.cidr.port}/a.png", A_SIZE, {CIDR_IP})  # ... or its IP
    fetched(star, f"http://[::1]:{star.v6.port}/a.png", A_SIZE, {"::1"})  # [::1]:port listed
    # userinfo is not the host: this is images.test, whatever "127.0.0.1:..." says before the @
    fetched(
        star,
        f"http://127.0.0.1:{star.bait_loop.port}@images.test:{star.images.port}/a.png",
        A_SIZE,
        {IMAGES_IP},
    )
    assert star.bait_hits() == 0


def test_the_guard_sees_the_server_s_connects(star):
    """So '0 non-loopback connects' below is a measurement, not an absence of records."""
    star.new_events()
    fetched(star, f"http://images.test:{star.images2.port}/a.png", A_SIZE, {IMAGES_IP})
    events = read_events(star.net_log)
    assert any(
        e["event"] == "connect" and e["address"] == IMAGES_IP and e["port"] == star.images2.port
        for e in events
    )
    assert any(e["event"] == "lookup" and e["host"] == "images.test" for e in events)


NAME_CASES = {  # name (resolved by the test table) -> reason logged
    "loop.test": "loop.test resolves to 127.0.0.1, a loopback address",
    "loop6.test": "loop6.test resolves to ::1, a loopback address",
    "private10.test": "10.0.0.5, a private address",
    "private172.test": "172.16.5.4, a private address",
    "private192.test": "192.168.1.20, a private address",
    "ula.test": "fd00::5, a private address",
    "metadata.test": "169.254.169.254, a link-local address",
    "linklocal6.test": "fe80::1, a link-local address",
    "cgnat.test": "100.64.0.7, a shared CGNAT address",
    "multicast.test": "224.0.0.251, a multicast address",
    "multicast6.test": "ff02::fb, a multicast address",
    "unspecified.test": "0.0.0.0, the unspecified address",
    "unspecified6.test": "::, the unspecified address",
    "reserved.test": "240.0.0.1, a reserved address",
    "broadcast.test": "255.255.255.255, a reserved address",
    "doc.test": "192.0.2.10, a reserved address",
    "doc6.test": "2001:db8::10, a reserved address",
    "mapped.test": "::ffff:127.0.0.1, a loopback address",
    "mapped10.test": "::ffff:10.0.0.5, a private address",
    "mappedmeta.test": "::ffff:169.254.169.254, a link-local address",
    "nat64meta.test": "64:ff9b::a9fe:a9fe, a link-local address",
    "twobad.test": "10.0.0.5, a private address, and to 169.254.169.254, a link-local address",
    "listed-meta.test": "which a host name entry (listed-meta.test) does not open",
}


@pytest.mark.parametrize("name", list(NAME_CASES))
def test_names_resolving_to_refused_ranges(star, name):
    port = star.bait_loop.port
    refused(star, f"http://{name}:{port}/a.png", NAME_CASES[name])


LITERAL_CASES = {  # URL (BAIT: the port of a bait server on that address) -> reason logged
    "http://127.0.0.1:BAIT/a.png": "127.0.0.1 is a loopback address",
    "http://127.0.0.2:BAIT2/a.png": "127.0.0.2 is a loopback address",
    "http://[::1]:BAIT6/a.png": "::1 is a loopback address",  # [::1] listed on another port only
    "http://[0:0:0:0:0:0:0:1]:BAIT6/a.png": "is a loopback address",
    "http://[::ffff:127.0.0.1]:BAIT/a.png": "is a loopback address",
    "http://[::ffff:7f00:1]:BAIT/a.png": "is a loopback address",
    "http://0.0.0.0:BAIT/a.png": "0.0.0.0 is the unspecified address",  # Linux: reaches loopback
    "http://[::]:BAIT6/a.png": ":: is the unspecified address",
    "http://10.0.0.5/a.png": "10.0.0.5 is a private address",
    "http://192.168.0.1:8080/a.png": "192.168.0.1 is a private address",
    "http://169.254.169.254/latest/meta-data/": "169.254.169.254 is a link-local address",
    "http://[fe80::1%25lo]:8080/a.png": "is a link-local address",
    "http://[fd00::1]/a.png": "fd00::1 is a private address",
    "http://100.64.0.1/a.png": "100.64.0.1 is a shared CGNAT address",
    "http://224.0.0.1/a.png": "224.0.0.1 is a multicast address",
    "http://[::ffff:169.254.169.254]/latest/meta-data/": "is a link-local address",
    # spellings of 127.0.0.1 and 169.254.169.254 that the C library accepts: resolved, then refused
    "http://2130706433:BAIT/a.png": "2130706433 resolves to 127.0.0.1, a loopback address",
    "http://0177.0.0.1:BAIT/a.png": "0177.0.0.1 resolves to 127.0.0.1, a loopback address",
    "http://017700000001:BAIT/a.png": "resolves to 127.0.0.1, a loopback address",
    "http://0x7f000001:BAIT/a.png": "0x7f000001 resolves to 127.0.0.1, a loopback address",
    "http://0x7f.1:BAIT/a.png": "0x7f.1 resolves to 127.0.0.1, a loopback address",
    "http://127.1:BAIT/a.png": "127.1 resolves to 127.0.0.1, a loopback address",
    "http://0:BAIT/a.png": "0 resolves to 0.0.0.0, the unspecified address",
    "http://2852039166/latest/meta-data/": "resolves to 169.254.169.254, a link-local address",
    "http://012.0.0.5/a.png": "012.0.0.5 resolves to 10.0.0.5, a private address",
    # userinfo tricks: the host is what follows the last @
    "http://ls@127.0.0.1:BAIT/a.png": "127.0.0.1 is a loopback address",
    "http://images.test@127.0.0.1:BAIT/a.png": "127.0.0.1 is a loopback address",
    "http://images.test:IMAGES@127.0.0.1:BAIT/a.png": "127.0.0.1 is a loopback address",
    "http://user:pw@metadata.test/latest/meta-data/": "169.254.169.254, a link-local address",
    # URLs that URL parsers read differently are refused before anything is resolved
    "http://images.test\\@127.0.0.1:BAIT/a.png": "ambiguous URL",
    "http://%31%32%37.0.0.1:BAIT/a.png": "ambiguous URL",
    "http://images.test%2f@127.0.0.1:BAIT/a.png": "127.0.0.1 is a loopback address",
}


def _fill(world: World, url: str) -> str:
    return (
        url.replace("BAIT2", str(world.bait_loop2.port))
        .replace("BAIT6", str(world.bait_v6.port))
        .replace("BAIT", str(world.bait_loop.port))
        .replace("IMAGES", str(world.images.port))
    )


@pytest.mark.parametrize("url", list(LITERAL_CASES))
def test_addresses_spelled_in_the_url(star, url):
    refused(star, _fill(star, url), LITERAL_CASES[url])


REDIRECTS = {  # Location sent by images.test (a listed host) -> reason logged
    "http://127.0.0.1:BAIT/a.png": "127.0.0.1 is a loopback address",
    "http://metadata.test/latest/meta-data/": "169.254.169.254, a link-local address",
    "http://169.254.169.254/latest/meta-data/": "169.254.169.254 is a link-local address",
    "http://10.0.0.5/a.png": "10.0.0.5 is a private address",
    "http://[::1]:BAIT6/a.png": "::1 is a loopback address",
    "http://[::ffff:127.0.0.1]:BAIT/a.png": "is a loopback address",
    "http://2130706433:BAIT/a.png": "resolves to 127.0.0.1, a loopback address",
    "http://images.test@127.0.0.1:BAIT/a.png": "127.0.0.1 is a loopback address",
    "http://loop.test:BAIT/a.png": "loop.test resolves to 127.0.0.1, a loopback address",
    "http://images.test\\@127.0.0.1:BAIT/a.png": "ambiguous URL",
}


@pytest.mark.parametrize("location", list(REDIRECTS))
def test_redirects_are_checked_on_every_hop(star, location):
    path = f"/redirect/{abs(hash(location))}"
    star.images.route(path, Reply(302, headers={"Location": _fill(star, location)}))
    refused(star, f"http://images.test:{star.images.port}{path}", REDIRECTS[location])


def test_a_refused_hop_later_in_a_chain(star):
    """images.test -> cidr.test (allowed) -> 127.0.0.1 (refused at the third hop)."""
    star.cidr.route(
        "/onward", Reply(302, headers={"Location": f"http://127.0.0.1:{star.bait_loop.port}/a.png"})
    )
    star.images.route("/chain", Reply(302, headers={"Location": f"http://cidr.test:{star.cidr.port}/onward"}))
    refused(
        star,
        f"http://images.test:{star.images.port}/chain",
        "127.0.0.1 is a loopback address",
        may_connect=frozenset({IMAGES_IP, CIDR_IP}),
    )
    star.images.route("/ok", Reply(302, headers={"Location": f"http://cidr.test:{star.cidr.port}/a.png"}))
    fetched(star, f"http://images.test:{star.images.port}/ok", A_SIZE, {IMAGES_IP, CIDR_IP})


def test_dns_rebinding_gets_no_second_answer(star):
    """rebind.test (a listed name) answers 127.0.0.3 first, then the metadata address. The
    connection made on the first answer is the one used; a new connection (another port) asks
    again and is refused: no lookup's answer is ever used unchecked."""
    fetched(star, f"http://rebind.test:{star.images.port}/a.png", A_SIZE, {IMAGES_IP})
    refused(
        star,
        f"http://rebind.test:{star.images2.port}/a.png",
        "rebind.test resolves to 169.254.169.254, a link-local address",
    )


def test_setup_hostname_opens_no_address(star):
    """Without LABEL_STUDIO_URL, /setup's hostname is Label Studio, but it opens no address the
    settings did not: a private/loopback Label Studio is reached only when MOLMO_ALLOWED_HOSTS
    lists it, and the token goes nowhere else."""
    upload = "/data/upload/1/a.png"
    hint = "set LABEL_STUDIO_URL"
    try:
        for hostname, reason in [
            (star.bait_ls.url, "127.0.0.1 is a loopback address"),  # a real LS, not listed
            ("http://internal-ls.test:8080", "internal-ls.test resolves to 10.20.30.40, a private"),
            ("http://169.254.169.254", "169.254.169.254 is a link-local address"),
            ("http://metadata.test:80", "169.254.169.254, a link-local address"),
            (f"http://2130706433:{star.bait_ls.port}", "resolves to 127.0.0.1, a loopback address"),
            (f"http://[::1]:{star.bait_v6.port}", "::1 is a loopback address"),
            (f"http://ls@127.0.0.1:{star.bait_ls.port}", "127.0.0.1 is a loopback address"),
        ]:
            star.setup(hostname)
            for value in (upload, f"{hostname}{upload}"):  # a path, and LS's absolute URL
                reasons = refused(star, value, reason)
                assert any(hint in r for r in reasons), (hostname, reasons)
        assert star.bait_ls.requests == []
        # the operator listed ls.test: /setup may name it, and the token goes there
        star.setup(f"http://ls.test:{star.ls_listed.port}")
        fetched(star, upload, A_SIZE, {IMAGES_IP, LS_LISTED_IP})
        assert star.ls_listed.hits(upload)[-1].headers["authorization"] == f"Token {LEGACY}"
        # a URL whose userinfo names LS, at another host, is that other host: refused, no token
        refused(
            star, f"http://ls.test@127.0.0.1:{star.bait_ls.port}{upload}", "127.0.0.1 is a loopback address"
        )
        assert star.bait_ls.requests == []
    finally:
        star.setup("http://internal-ls.test:8080")


def test_no_open_door_warning_on_loopback(star):
    assert "without basic auth" not in star.backend.log  # it listens on 127.0.0.1


def test_star_server_never_attempted_a_non_loopback_connect(star):
    """Runs last in the module's star group: the whole record of the server process."""
    events = read_events(star.net_log)
    connects = [e for e in events if e["event"] == "connect"]
    assert connects, "the guard recorded nothing: it would prove nothing"
    assert [e for e in connects if e["blocked"]] == []
    assert {e["address"] for e in connects} <= {IMAGES_IP, CIDR_IP, LS_LISTED_IP, "::1"}
    v6 = [e for e in connects if e["address"] == "::1"]
    assert {e["port"] for e in v6} == {star.v6.port}  # the listed port only, never the bait's


# -- server "compose": LABEL_STUDIO_URL by service name, local files, nothing else listed --------


@pytest.fixture(scope="module")
def compose(tmp_path_factory, demo_model_dir):
    tmp = tmp_path_factory.mktemp("fetch-compose")
    files = tmp / "files"
    files.mkdir()
    (files / "a.png").write_bytes(png(A_SIZE))
    ls = FakeLabelStudio(legacy_token=LEGACY, host=COMPOSE_LS_IP)
    ls.serve_file("/data/upload/1/a.png", png(A_SIZE))
    images = HttpServer(IMAGES_IP)  # for the good tasks of refused(): listed by IP here
    images.route("/a.png", Reply(200, png(A_SIZE)))
    images.route("/b.png", Reply(200, png(B_SIZE)))
    minio = bait(MINIO_IP)
    servers = {"ls": ls, "images": images, "bait_minio": minio, "bait_loop": bait("127.0.0.1")}
    net_log = tmp / "net.jsonl"
    env = {
        "LABEL_STUDIO_URL": f"http://label-studio.test:{ls.port}",
        "MOLMO_ALLOWED_HOSTS": "images.test",
        "LOCAL_FILES_DOCUMENT_ROOT": str(files),
        "MOLMO_FETCH_TIMEOUT": "3",
        "MOLMO_MAX_NEW_TOKENS": "32",
        "MOLMO_CACHE_DIR": str(demo_model_dir.parent),
        "MOLMO_TEST_NET_NAMES": json.dumps(NAMES),
        "MOLMO_TEST_NET_LOG": str(net_log),
    }
    try:
        with BackendServer(tmp, env=env, answers={"cat": CAT}, net_guard=True) as backend:
            yield World(backend, net_log, servers)
    finally:
        for server in servers.values():
            server.close()


def test_compose_label_studio_on_a_private_network_keeps_working(compose):
    """LABEL_STUDIO_URL's host is the operator's own: reached at its (private) address, with the
    token; /setup's hostname then only aliases it; local files are read from disk."""
    compose.setup("http://localhost:8080")  # what LS says in a browser-facing setup
    fetched(compose, "/data/upload/1/a.png", A_SIZE, {COMPOSE_LS_IP, IMAGES_IP})
    fetched(compose, "http://localhost:8080/data/upload/1/a.png", A_SIZE, {COMPOSE_LS_IP})
    fetched(compose, "/data/local-files/?d=a.png", A_SIZE, set())
    assert compose.ls.hits("/data/upload/1/a.png")[-1].headers["authorization"] == f"Token {LEGACY}"


def test_compose_setup_naming_another_address_only_aliases_label_studio(compose):
    compose.setup("http://169.254.169.254")
    fetched(compose, "http://169.254.169.254/data/upload/1/a.png", A_SIZE, {COMPOSE_LS_IP})
    refused(
        compose,
        "http://169.254.169.254/latest/meta-data/",
        "HTTP 404",  # LS's 404, not AWS
        may_connect=frozenset({IMAGES_IP, COMPOSE_LS_IP}),
    )
    compose.setup("http://localhost:8080")


def test_compose_label_studio_redirect_to_an_unlisted_private_storage_is_refused(compose):
    """LS's presign redirect may name any host, but its address is checked: a MinIO on the
    private network needs its name (or IP, or CIDR) in MOLMO_ALLOWED_HOSTS."""

    def presign(request):
        return Reply(303, headers={"Location": f"http://minio.test:{compose.bait_minio.port}/a.png?sig=x"})

    compose.ls.route("/tasks/77/presign/", presign)
    compose.new_events()
    results = compose.predict([{"id": 77, "data": {"image": "s3://bucket/a.png"}}])
    assert sizes(results) == [None]
    assert any("minio.test resolves to 127.0.0.5, a loopback address" in r for r in compose.reasons(77))
    assert [e for e in compose.new_events() if e["event"] == "connect" and e["address"] == MINIO_IP] == []
    assert compose.bait_hits() == 0


def test_compose_other_hosts_stay_refused(compose):
    good = f"http://images.test:{compose.images.port}"
    assert compose.images.url.startswith("http://127.0.0.3")
    for value, reason in [
        (f"http://127.0.0.1:{compose.bait_loop.port}/a.png", "is not allowed"),
        ("http://metadata.test/latest/meta-data/", "is not allowed"),
        (f"http://label-studio.test@127.0.0.1:{compose.bait_loop.port}/a.png", "is not allowed"),
        (f"{good}/nope", "HTTP 404"),
    ]:
        refused(compose, value, reason)


def test_compose_server_never_attempted_a_non_loopback_connect(compose):
    connects = [e for e in read_events(compose.net_log) if e["event"] == "connect"]
    assert connects and [e for e in connects if e["blocked"]] == []
    assert {e["address"] for e in connects} <= {COMPOSE_LS_IP, IMAGES_IP}


# -- the start-up warning -------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, auth, warns",
    [
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("", False, True),
        ("192.168.1.5", False, True),
        ("backend.example.com", False, True),
        ("127.0.0.1", False, False),
        ("127.0.0.2", False, False),
        ("localhost", False, False),
        ("::1", False, False),
        ("0.0.0.0", True, False),
    ],
)
def test_warning_when_listening_beyond_loopback_without_basic_auth(host, auth, warns):
    from molmo_backend.app.wsgi import startup_warnings
    from molmo_backend.settings import Settings

    creds = {"basic_auth_user": "u", "basic_auth_pass": "p"} if auth else {}
    found = [w for w in startup_warnings(Settings(host=host, **creds)) if "without basic auth" in w]
    assert bool(found) is warns
    if warns:
        assert "BASIC_AUTH_USER" in found[0] and "HOST=127.0.0.1" in found[0]


def test_the_warning_is_logged_when_the_app_is_built():
    """create_app_from_env, as gunicorn's worker calls it (the model load fails at once here: only
    the log of the start matters)."""
    import subprocess
    import sys

    code = (
        "from molmo_backend.app.wsgi import create_app_from_env\n"
        "from molmo_backend.settings import Settings\n"
        "def no_model(settings): raise RuntimeError('no model in this test')\n"
        "create_app_from_env(Settings(host='0.0.0.0', port=9090), engine_factory=no_model)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    warnings = [
        json.loads(line) for line in out.stderr.splitlines() if line.startswith("{") and '"WARNING"' in line
    ]
    assert any(
        "listens on 0.0.0.0:9090" in w["msg"] and "without basic auth" in w["msg"] for w in warnings
    ), out.stderr[-2000:]
