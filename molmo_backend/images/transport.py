"""The HTTP(S) transport of image fetches: it connects only where the address policy allows.

requests (urllib3) looks a host name up when it connects; a check of the name's addresses made
beforehand would leave that second lookup to DNS, whose answer may have changed (DNS rebinding).
Here the connection itself resolves the name once, asks :class:`AddressPolicy` about every address,
and connects to an allowed one: the very address that was checked. The ``Host`` header, TLS SNI
and certificate verification still use the URL's host name, as without this transport.

Proxies from the environment (``HTTP_PROXY``...) are not used: through a proxy the address
connected to would be the proxy's, and the target's would go unchecked.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from molmo_backend.errors import MolmoError
from molmo_backend.images.address_policy import AddressPolicy, parse_ip

log = logging.getLogger(__name__)

#: ``socket.getaddrinfo``'s signature: (host, port, family, type) -> [(family, type, proto,
#: canonname, sockaddr)]
Resolver = Callable[..., list]


class AddressRefused(MolmoError):
    """No address of the host may be connected to; the message says which and why, e.g.
    "images.test resolves to 10.0.0.5, a private address" (no URL).

    Not an OSError on purpose: urllib3 and requests let it through unchanged. The image loader
    turns it into that task's FetchRefused, so its status and exit code (MolmoError's) are unused."""


class AddressOpener:
    """Resolve once, check every address, connect to an allowed one."""

    def __init__(self, policy: AddressPolicy, resolver: Resolver | None = None):
        self.policy = policy
        self._resolver = resolver

    def resolve(self, host: str, port: int) -> list:
        if self._resolver is not None:
            return self._resolver(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
        return socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)

    def open(self, host: str, port: int, timeout, source_address=None, socket_options=None) -> socket.socket:
        """A socket connected to an allowed address of ``host``; AddressRefused when there is
        none, OSError when none answers."""
        host = host.strip("[]")
        literal = parse_ip(host)
        if literal is not None:  # decided without a lookup (a zone id may not even resolve)
            verdict = self.policy.check(host, port, literal)
            if not verdict.allowed:
                raise AddressRefused(f"{host} is {verdict.reason}")
        allowed, refused = [], []
        for family, kind, proto, _, sockaddr in self.resolve(host, port):
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            verdict = self.policy.check(host, port, sockaddr[0])
            (allowed if verdict.allowed else refused).append((family, kind, proto, sockaddr, verdict))
        if not allowed:
            found = ", and to ".join(dict.fromkeys(f"{a[0]}, {v.reason}" for *_, a, v in refused))
            raise AddressRefused(f"{host} resolves to {found or 'no IP address'}")
        if refused:
            log.debug(
                "addresses skipped",
                extra={"host": host, "skipped": [f"{a[0]}: {v.reason}" for *_, a, v in refused]},
            )
        error: OSError | None = None
        for family, kind, proto, sockaddr, _ in allowed:
            sock = socket.socket(family, kind, proto)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                if timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error  # type: ignore[misc]  # allowed is not empty


class _CheckedConnectionMixin:
    """urllib3's ``_new_conn`` with the opener in place of ``socket.create_connection``."""

    opener: AddressOpener  # set on the per-adapter subclass

    def _new_conn(self) -> socket.socket:
        try:
            sock = self.opener.open(
                self._dns_host, self.port, self.timeout, self.source_address, self.socket_options
            )
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})"
            ) from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock


class CheckedAdapter(HTTPAdapter):
    """A requests adapter whose every new connection goes through an :class:`AddressOpener`."""

    def __init__(self, policy: AddressPolicy, resolver: Resolver | None = None, **kwargs):
        opener = AddressOpener(policy, resolver)
        http = type("CheckedHTTPConnection", (_CheckedConnectionMixin, HTTPConnection), {"opener": opener})
        https = type("CheckedHTTPSConnection", (_CheckedConnectionMixin, HTTPSConnection), {"opener": opener})
        self._pool_classes = {
            "http": type("CheckedHTTPConnectionPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("CheckedHTTPSConnectionPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
        }
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies={})
