"""The fetch transport (molmo_backend/images/transport.py) in this process, under the NetGuard:
one lookup per connection, the connect goes to the address checked, TLS still verifies the
host name, environment proxies are not used. And the guard itself: it stops a connect that the
code under test should never have tried.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from PIL import Image

from molmo_backend.errors import MolmoError
from molmo_backend.images.errors import ImageLoadError
from molmo_backend.images.loader import ImageLoader
from molmo_backend.images.transport import AddressRefused
from molmo_backend.settings import Settings
from tests.support.http_fixtures import HttpServer, Reply
from tests.support.processes import free_port

TLS = Path(__file__).resolve().parents[1] / "data" / "tls"


def png(size=(20, 10)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def loader(*entries: str, resolver=None, session=None, **kw) -> ImageLoader:
    return ImageLoader(
        Settings(allowed_hosts=entries, fetch_timeout=5.0, **kw), session=session, resolver=resolver
    )


def error_of(image_loader: ImageLoader, value: str) -> str:
    with pytest.raises(ImageLoadError) as info:
        image_loader.load(value)
    return str(info.value)


@pytest.fixture
def web():
    server = HttpServer()
    server.route("/a.png", Reply(200, png()))
    yield server
    server.close()


class CountingResolver:
    """A resolver with one answer per call (the last repeats), counting its calls."""

    def __init__(self, *answers: list[str]):
        self.answers, self.calls = answers, 0

    def __call__(self, host, port, family=0, kind=0):
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port, 0, 0) if ":" in a else (a, port),
            )
            for a in answer
        ]


def test_one_lookup_per_connection_and_the_connect_goes_to_the_address_checked(web, net_guard):
    """DNS rebinding: the name answers 127.0.0.1 (allowed: a listed name), then the metadata
    address. The connection uses the one answer it checked; a second lookup never happens."""
    resolver = CountingResolver(["127.0.0.1"], ["169.254.169.254"])
    first = loader("rebind.test", resolver=resolver)
    assert first.load(f"http://rebind.test:{web.port}/a.png").width == 20
    assert resolver.calls == 1
    assert [(c["address"], c["blocked"]) for c in net_guard.connects()] == [("127.0.0.1", False)]
    assert web.requests[-1].headers["host"] == f"rebind.test:{web.port}"
    # a new connection (another loader, so no pooled one) looks up again, and is refused
    second = loader("rebind.test", resolver=resolver)
    message = error_of(second, f"http://rebind.test:{web.port}/a.png")
    assert "rebind.test resolves to 169.254.169.254, a link-local address" in message
    assert "does not open: list its IP or a CIDR" in message
    assert resolver.calls == 2 and len(net_guard.connects()) == 1


def test_the_refusal_is_no_oserror_so_urllib3_and_requests_pass_it_on_unchanged():
    assert issubclass(AddressRefused, MolmoError) and not issubclass(AddressRefused, OSError)


def test_refused_addresses_are_skipped_and_only_allowed_ones_connected(web, net_guard):
    resolver = CountingResolver(["10.0.0.9", "169.254.169.254", "127.0.0.1"])
    assert loader("*", "127.0.0.1", resolver=resolver).load(f"http://mixed.test:{web.port}/a.png").width == 20
    assert [c["address"] for c in net_guard.connects()] == ["127.0.0.1"]


def test_next_allowed_address_is_tried_when_one_does_not_answer(web, net_guard):
    resolver = CountingResolver(["127.0.0.9", "127.0.0.1"])  # nothing listens on 127.0.0.9
    assert loader("two.test", resolver=resolver).load(f"http://two.test:{web.port}/a.png").width == 20
    assert [c["address"] for c in net_guard.connects()] == ["127.0.0.9", "127.0.0.1"]


def test_a_name_that_resolves_nowhere_is_reported(net_guard):
    message = error_of(loader("*"), f"http://nowhere.test:{free_port()}/a.png")
    assert "could not fetch" in message and net_guard.connects() == []


def test_environment_proxies_are_not_used(web, net_guard, monkeypatch):
    """Through a proxy the address connected to would be the proxy's: proxies are ignored."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(var, "http://10.9.9.9:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert loader("127.0.0.1").load(f"{web.url}/a.png").width == 20
    assert [c["address"] for c in net_guard.connects()] == ["127.0.0.1"]


@pytest.fixture
def tls_web():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TLS / "images.test.pem", TLS / "images.test.key")
    server = HttpServer(tls=context)
    server.route("/a.png", Reply(200, png((30, 15))))
    yield server
    server.close()


def test_tls_verifies_the_host_name_not_the_address_connected_to(tls_web, net_guard, monkeypatch):
    """images.test resolves to 127.0.0.1; the connection goes to that checked address, yet SNI,
    the Host header and certificate verification use the name."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # how an operator names a private CA
        monkeypatch.setenv(var, str(TLS / "ca.pem"))
    net_guard.add("images.test", ["127.0.0.1"])
    net_guard.add("other.test", ["127.0.0.1"])
    image_loader = loader("images.test", "other.test", "127.0.0.1")
    assert image_loader.load(f"https://images.test:{tls_web.port}/a.png").width == 30
    assert tls_web.sni == ["images.test"]
    assert tls_web.requests[-1].headers["host"] == f"images.test:{tls_web.port}"
    # the same server (same certificate, same IP) under a name the certificate does not hold
    for url in (f"https://other.test:{tls_web.port}/a.png", f"https://127.0.0.1:{tls_web.port}/a.png"):
        message = error_of(image_loader, url)
        assert "CERTIFICATE_VERIFY_FAILED" in message and "mismatch" in message, message
    assert len(tls_web.requests) == 1
    assert {c["address"] for c in net_guard.connects()} == {"127.0.0.1"}


def test_guard_stops_a_connect_the_code_should_not_have_tried(net_guard):
    """The guard is what keeps a wrong policy from sending packets: with every address opened
    (0.0.0.0/0, as a buggy policy would), the fetch of a private address is tried, and the guard
    refuses the connect before it happens."""
    net_guard.add("internal.test", ["10.1.2.3"])
    message = error_of(loader("*", "0.0.0.0/0"), "http://internal.test:8080/a.png")
    assert "could not fetch" in message
    assert net_guard.non_loopback_connects() == [
        {"event": "connect", "address": "10.1.2.3", "port": 8080, "blocked": True}
    ]
    with pytest.raises(PermissionError):
        socket.create_connection(("10.255.255.1", 9), timeout=1)
    with socket.socket() as sock, pytest.raises(PermissionError):
        sock.connect(("example.com", 80))  # a name: the C library would look it up
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("example.com", 80)  # unknown names never reach DNS
    assert len(net_guard.non_loopback_connects()) == 3
    net_guard.events.clear()  # these attempts were the point of the test
