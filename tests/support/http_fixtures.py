"""Real HTTP servers on the loopback interface, for tests that must not mock ``requests``.

``HttpServer`` runs a threaded ``http.server`` whose routes are plain functions returning a
``Reply``; every request is recorded so tests can check what was sent (for instance that no
``Authorization`` header left for a foreign host). ``FakeLabelStudio`` adds the parts of Label
Studio's protocol the backend relies on: token checks and the personal-access-token exchange.

These are peers the backend talks to over HTTP (Label Studio, image hosts, attackers). The
in-memory stand-in for label-studio-sdk's client object is tests/support/fake_label_studio.py;
our own backend server is started by tests/support/processes.BackendServer.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    method: str
    path: str  # without the query
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class Reply:
    """What a route answers. ``body`` may be an iterable of chunks, sent ``delay`` seconds apart."""

    status: int = 200
    body: bytes | Iterable[bytes] = b""
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = False  # Transfer-Encoding: chunked, no Content-Length
    delay: float = 0.0  # before the headers and between chunks
    length: int | None = None  # a Content-Length to announce instead of the real one


Route = Callable[[Request], Reply]


class HttpServer:
    """A threaded HTTP/1.1 server on ``host`` (a loopback address, IPv4 or IPv6) and a free port;
    HTTPS when ``tls`` (a server-side SSLContext) is given, recording the SNI names it saw."""

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
        self.routes: dict[str, Route] = {}
        self.requests: list[Request] = []
        self.sni: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else small writes wait 40 ms for delayed ACKs

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def _serve(self, method: str) -> None:
                parts = urlsplit(self.path)
                size = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    method,
                    parts.path,
                    parse_qs(parts.query),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(size) if size else b"",
                )
                server.requests.append(request)
                route = server.routes.get(parts.path)
                reply = route(request) if route else Reply(404, b"not found")
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                time.sleep(reply.delay)
                chunks = [reply.body] if isinstance(reply.body, bytes) else reply.body
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if reply.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    if not isinstance(reply.body, bytes):
                        chunks = list(chunks)
                    length = sum(map(len, chunks)) if reply.length is None else reply.length
                    if reply.length is not None:
                        self.close_connection = True  # the body may fall short: hang up after it
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                for i, chunk in enumerate(chunks):
                    if i and reply.delay:
                        time.sleep(reply.delay)
                    if reply.chunked:
                        if chunk:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    else:
                        self.wfile.write(chunk)
                    self.wfile.flush()
                if reply.chunked:
                    self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args):  # keep test output clean
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def handle_error(self, request, client_address):
                pass  # clients that gave up (time-out tests) break pipes; that is expected

        self._httpd = Server((host, 0), Handler)
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.host = host
        self.port = self._httpd.server_address[1]
        netloc = f"[{host}]" if ":" in host else host
        self.url = f"{'https' if tls else 'http'}://{netloc}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def route(self, path: str, reply: Reply | Route) -> None:
        """Answer ``path`` with a fixed reply or a function of the request."""
        self.routes[path] = reply if callable(reply) else (lambda _request: reply)

    def hits(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(claims: dict) -> str:
    """An unsigned-looking JWT (the backend never verifies signatures, only reads ``exp``)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}.{b64url(b'not-a-real-signature')}"


class FakeLabelStudio(HttpServer):
    """Label Studio's auth as the backend sees it (1.23): legacy ``Token`` keys and PATs.

    ``pat`` is a JWT refresh token; POST ``/api/token/refresh/`` trades it for an access token
    that lives ``access_lifetime`` seconds. ``files`` maps paths to bodies served only with a
    valid ``Authorization`` header; anything else gets 401, as LS does.
    """

    def __init__(
        self,
        legacy_token: str | None = None,
        access_lifetime: int = 300,
        exchange_delay: float = 0.0,
        host: str = "127.0.0.1",
    ):
        super().__init__(host)
        self.legacy_token = legacy_token
        self.pat = make_jwt(
            {"token_type": "refresh", "exp": int(time.time()) + 10**7, "jti": "pat-1", "user_id": 1}
        )
        self.access_lifetime = access_lifetime
        self.exchange_delay = exchange_delay
        self.valid_access: set[str] = set()
        self.exchanges = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.route("/api/token/refresh/", self._refresh)

    def serve_file(self, path: str, body: bytes, **headers: str) -> None:
        def answer(request: Request) -> Reply:
            if not self.authorized(request):
                return Reply(401, b'{"detail": "Authentication credentials were not provided."}')
            return Reply(200, body, headers)

        self.route(path, answer)

    def authorized(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        if self.legacy_token and auth == f"Token {self.legacy_token}":
            return True
        return auth.startswith("Bearer ") and auth[len("Bearer ") :] in self.valid_access

    def revoke_access_tokens(self) -> None:
        """Make LS forget every access token, as if they had expired on its clock."""
        self.valid_access.clear()

    def _refresh(self, request: Request) -> Reply:
        time.sleep(self.exchange_delay)
        try:
            refresh = json.loads(request.body)["refresh"]
        except (ValueError, KeyError, TypeError):
            return Reply(400, b'{"refresh": ["This field is required."]}')
        if request.method != "POST" or refresh != self.pat:
            return Reply(401, b'{"detail": "Token is invalid or expired"}')
        now = int(time.time())
        with self._lock:
            self.exchanges += 1
            access = make_jwt(
                {
                    "token_type": "access",
                    "iat": now,
                    "exp": now + self.access_lifetime,
                    "jti": f"a{next(self._ids)}",
                }
            )
            self.valid_access.add(access)
        return Reply(200, json.dumps({"access": access}).encode(), {"Content-Type": "application/json"})
