"""Keep tests on the loopback interface, even when the code under test is wrong.

:class:`NetGuard` replaces, for as long as it is installed, Python's name lookups and socket
connects:

- ``socket.getaddrinfo`` (and ``gethostbyname``) answer numeric hosts as the C library would
  (``2130706433`` and ``0177.0.0.1`` are 127.0.0.1), ``localhost`` as 127.0.0.1 and ::1, the
  names of a test table with the addresses given there (any addresses: a name may "resolve" to
  10.0.0.5 or the metadata address), and refuse every other name: no DNS query leaves;
- ``socket.socket.connect``/``connect_ex`` raise PermissionError, before any packet is sent, for
  every address outside 127.0.0.0/8 and ::1, and for names (the C library would look them up).

Every lookup and connect is recorded (``events``; also appended as JSON lines to ``log_path``
when given, so a guard inside a server process can be read by the test that started it).

A table entry's answer is a list of addresses, or a list of such lists: one per lookup (the
last one repeats), to play a name whose answer changes (DNS rebinding).

Installed in a test process by the :func:`net_guard` fixture; in a server process by
tests/support/forced_backend.py serve --net-guard from ``MOLMO_TEST_NET_NAMES`` / ``MOLMO_TEST_NET_LOG``.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")

_real = {
    "getaddrinfo": socket.getaddrinfo,
    "gethostbyname": socket.gethostbyname,
    "gethostbyname_ex": socket.gethostbyname_ex,
    "connect": socket.socket.connect,
    "connect_ex": socket.socket.connect_ex,
}


def is_loopback(host: str) -> bool:
    """Only a numeric loopback address (127.0.0.0/8, ::1, ::ffff:127.x.x.x) is."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip in _MAPPED:
        ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return any(ip.version == net.version and ip in net for net in _LOOPBACK)


class NetGuard:
    def __init__(self, names: Mapping[str, Sequence] | None = None, log_path: Path | None = None):
        self.names = {k.lower().rstrip("."): _answers(v) for k, v in (names or {}).items()}
        self.log_path = log_path
        self.events: list[dict] = []
        self._lookups: dict[str, int] = {}
        self._lock = threading.Lock()
        self.installed = False

    def add(self, name: str, answers: Sequence) -> None:
        """Make ``name`` resolve to ``answers`` (see the module docstring)."""
        self.names[name.lower().rstrip(".")] = _answers(answers)

    # -- what tests read --------------------------------------------------------------------

    def non_loopback_connects(self) -> list[dict]:
        """Every connect attempted to anything but loopback (all were blocked)."""
        return [e for e in self.events if e["event"] == "connect" and e["blocked"]]

    def connects(self) -> list[dict]:
        return [e for e in self.events if e["event"] == "connect"]

    def lookups(self, host: str) -> int:
        return self._lookups.get(host.lower().rstrip("."), 0)

    # -- the replacements -------------------------------------------------------------------

    def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        if host is None or isinstance(host, bytes):
            host = host.decode() if isinstance(host, bytes) else host
        if host is None:  # a passive (bind) lookup: no name involved
            return _real["getaddrinfo"](host, port, family, type, proto, flags)
        name = host.lower().rstrip(".")
        try:  # numeric, spelled any way the C library reads it: no lookup leaves the process
            answer = _real["getaddrinfo"](host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
            self._record(
                {"event": "lookup", "host": host, "numeric": True, "answer": [a[4][0] for a in answer]}
            )
            return answer
        except socket.gaierror:
            pass
        with self._lock:
            count = self._lookups[name] = self._lookups.get(name, 0) + 1
        if name == "localhost":
            addresses = ["127.0.0.1", "::1"]
        elif name in self.names:
            answers = self.names[name]
            addresses = answers[min(count, len(answers)) - 1]
        else:
            self._record({"event": "lookup", "host": host, "refused": True})
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test guard)")
        self._record({"event": "lookup", "host": host, "answer": list(addresses)})
        out = []
        for address in addresses:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            if family not in (0, socket.AF_UNSPEC, fam):
                continue
            sockaddr = (address, port or 0, 0, 0) if fam == socket.AF_INET6 else (address, port or 0)
            out.append((fam, type or socket.SOCK_STREAM, proto or socket.IPPROTO_TCP, "", sockaddr))
        if not out:
            raise socket.gaierror(socket.EAI_NONAME, "no address of that family (test guard)")
        return out

    def gethostbyname(self, host):
        return self.getaddrinfo(host, None, socket.AF_INET)[0][4][0]

    def gethostbyname_ex(self, host):
        return host, [], [a[4][0] for a in self.getaddrinfo(host, None, socket.AF_INET)]

    def check_connect(self, sock, address) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # Unix sockets
        host, port = address[0], address[1]
        blocked = not is_loopback(host)
        self._record({"event": "connect", "address": host, "port": port, "blocked": blocked})
        if blocked:
            raise PermissionError(
                f"test guard: connect to {host!r} port {port} blocked (tests stay on loopback)"
            )

    # -- installing -------------------------------------------------------------------------

    def install(self) -> NetGuard:
        guard = self

        def connect(sock, address):
            guard.check_connect(sock, address)
            return _real["connect"](sock, address)

        def connect_ex(sock, address):
            guard.check_connect(sock, address)
            return _real["connect_ex"](sock, address)

        socket.getaddrinfo = self.getaddrinfo
        socket.gethostbyname = self.gethostbyname
        socket.gethostbyname_ex = self.gethostbyname_ex
        socket.socket.connect = connect
        socket.socket.connect_ex = connect_ex
        self.installed = True
        return self

    def uninstall(self) -> None:
        socket.getaddrinfo = _real["getaddrinfo"]
        socket.gethostbyname = _real["gethostbyname"]
        socket.gethostbyname_ex = _real["gethostbyname_ex"]
        socket.socket.connect = _real["connect"]
        socket.socket.connect_ex = _real["connect_ex"]
        self.installed = False

    def _record(self, event: dict) -> None:
        with self._lock:
            self.events.append(event)
            if self.log_path is not None:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(event) + "\n")


def _answers(value: Sequence) -> list[list[str]]:
    """["10.0.0.1"] -> [["10.0.0.1"]]; [["a"], ["b"]] stays (one answer per lookup)."""
    if value and all(isinstance(v, str) for v in value):
        return [list(value)]
    return [list(v) for v in value]


def read_events(log_path: Path) -> list[dict]:
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


@pytest.fixture
def net_guard():
    """A :class:`NetGuard` for one test (add names to ``guard.names``); the test fails if any
    non-loopback connect was attempted, unless it emptied the record itself."""
    guard = NetGuard().install()
    try:
        yield guard
    finally:
        guard.uninstall()
    assert guard.non_loopback_connects() == [], "a non-loopback connect was attempted"
