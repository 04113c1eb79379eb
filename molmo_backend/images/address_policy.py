"""Which addresses an image fetch may connect to: ``MOLMO_ALLOWED_HOSTS`` parsed and applied.

Task URLs are chosen by whoever can import tasks, and the backend fetches them from inside the
operator's network. A host *name* says nothing about where it leads (DNS can point any name at
127.0.0.1 or at the cloud metadata service, and change its answer between two lookups), so the
decision is taken on the IP address actually connected to, once per connection:

- a **public** address is allowed for any host that passed the name check (``*``, a listed name,
  Label Studio);
- a **special** address (loopback, private, link-local, CGNAT, multicast, unspecified, reserved:
  :data:`SPECIAL_RANGES`) only when the operator listed it: its IP or a CIDR holding it, or the
  host's name; a name never opens a link-local address (169.254.0.0/16, fe80::/10: where cloud
  metadata services answer), which needs its IP or a CIDR.

IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) and NAT64 ones (``64:ff9b::a00:1``) are judged
by the IPv4 address they carry. Pure logic: no sockets, no HTTP.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from molmo_backend.errors import BadInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")

#: (range, category), first match wins; an address in none of them is public
SPECIAL_RANGES: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), category)
    for net, category in (
        ("0.0.0.0/32", "unspecified"),
        ("0.0.0.0/8", "reserved"),  # "this network"
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "CGNAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
        ("192.0.2.0/24", "reserved"),  # documentation
        ("192.88.99.0/24", "reserved"),  # 6to4 relays
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "reserved"),  # benchmarking
        ("198.51.100.0/24", "reserved"),  # documentation
        ("203.0.113.0/24", "reserved"),  # documentation
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # and 255.255.255.255
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "private"),  # local-use NAT64
        ("100::/64", "reserved"),  # discard
        ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo
        ("2001:db8::/32", "reserved"),  # documentation
        ("2002::/16", "reserved"),  # 6to4: carries an IPv4 address
        ("3fff::/20", "reserved"),  # documentation
        ("5f00::/16", "reserved"),  # SRv6
        ("fc00::/7", "private"),  # unique local
        ("fe80::/10", "link-local"),
        ("fec0::/10", "private"),  # site-local (deprecated)
        ("ff00::/8", "multicast"),
    )
)

DESCRIPTIONS = {
    "loopback": "a loopback address",
    "private": "a private address",
    "link-local": "a link-local address (where cloud metadata services answer)",
    "CGNAT": "a shared CGNAT address (100.64.0.0/10)",
    "multicast": "a multicast address",
    "unspecified": "the unspecified address (it reaches this machine)",
    "reserved": "a reserved address",
}


class PolicyError(BadInput, ValueError):
    """An ``MOLMO_ALLOWED_HOSTS`` entry that cannot be read; the message says which and why.
    A configuration mistake: BadInput (exit code 2), and still the ValueError callers catch."""


def parse_ip(text: str) -> IPAddress | None:
    """The address ``text`` spells in canonical form (``10.0.0.1``, ``::1``, ``[::1]``,
    ``fe80::1%eth0``), mapped/NAT64 IPv6 reduced to their IPv4; None for anything else, which
    includes non-canonical IPv4 spellings (``127.1``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1``):
    those are names here, and resolved like any name."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0] if ":" in text else text  # an IPv6 zone id names no other address
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return unwrap(ip)


def unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped or NAT64 IPv6 address leads to; else ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        if ip in _MAPPED or ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def classify(ip: IPAddress | str) -> str | None:
    """The special range ``ip`` is in (a key of :data:`DESCRIPTIONS`), or None when public."""
    ip = unwrap(ipaddress.ip_address(ip) if isinstance(ip, str) else ip)
    for network, category in SPECIAL_RANGES:
        if ip.version == network.version and ip in network:
            return category
    if ip.version == 6 and ip not in _GLOBAL_UNICAST:
        return "reserved"
    return None


def normalize_name(host: str) -> str:
    """A host name as compared: lower case, no trailing dot, IDNA (``xn--``) for non-ASCII."""
    name = host.strip().lower().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            pass  # left as is: it then matches no entry
    return name


@dataclass(frozen=True)
class Entry:
    """One ``MOLMO_ALLOWED_HOSTS`` entry: ``*``, a host name, an IP or a CIDR, with an optional
    port (names and IPs only)."""

    text: str
    name: str | None = None
    network: IPNetwork | None = None
    port: int | None = None

    @property
    def is_any(self) -> bool:
        return self.text == "*"

    def port_ok(self, port: int | None) -> bool:
        return self.port is None or self.port == port


_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")
_NUMERIC = re.compile(r"[0-9.]+|0x[0-9a-fx.]*", re.IGNORECASE)


def parse_entry(text: str) -> Entry:
    """Read one entry; raises PolicyError with the reason."""
    raw = text.strip()
    if raw == "*":
        return Entry("*")
    if not raw:
        raise PolicyError("empty entry")
    if "://" in raw:
        raise PolicyError(f"{raw!r}: list host names without a scheme or path (images.example.com)")
    host, port = raw, None
    if raw.startswith("["):  # [v6] or [v6]:port
        close = raw.find("]")
        if close < 0:
            raise PolicyError(f"{raw!r}: '[' without ']'")
        host, rest = raw[1:close], raw[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise PolicyError(f"{raw!r}: expected ':port' after ']'")
            port = _port(raw, rest[1:])
    elif "/" in raw:
        try:
            network = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise PolicyError(f"{raw!r} is not a CIDR such as 10.0.0.0/8 or fd00::/8") from None
        return Entry(raw, network=_unwrap_network(network))
    elif raw.count(":") == 1:  # name:port or IPv4:port
        host, port_text = raw.split(":")
        port = _port(raw, port_text)
    ip = parse_ip(host)
    if ip is not None:
        return Entry(raw, network=ipaddress.ip_network(ip), port=port)
    if ":" in host:
        raise PolicyError(f"{raw!r} is not an IPv6 address (write [addr]:port for a port)")
    name = normalize_name(host)
    if _NUMERIC.fullmatch(name):
        raise PolicyError(f"{raw!r}: write IPv4 addresses as four decimal numbers (10.0.0.1)")
    if name.startswith("*"):
        raise PolicyError(
            f"{raw!r}: wildcards are not supported; list each name, or '*' alone for any public address"
        )
    if not _NAME.fullmatch(name):
        raise PolicyError(f"{raw!r} is not a host name, IP address or CIDR")
    return Entry(raw, name=name, port=port)


def _port(raw: str, text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise PolicyError(f"{raw!r}: invalid port {text!r}")
    return int(text)


def _unwrap_network(network: IPNetwork) -> IPNetwork:
    """``::ffff:10.0.0.0/104`` -> ``10.0.0.0/8``: mapped addresses are matched as IPv4."""
    if network.version == 6 and network.prefixlen >= 96 and network.subnet_of(_MAPPED):
        return ipaddress.ip_network((int(network.network_address) & 0xFFFFFFFF, network.prefixlen - 96))
    return network


def parse_entries(entries: Iterable[str]) -> tuple[Entry, ...]:
    return tuple(parse_entry(e) for e in entries if e.strip())


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str  # what the address is, e.g. "a private address" (for logs and errors)


class AddressPolicy:
    """``MOLMO_ALLOWED_HOSTS`` plus the hosts the operator's own settings name (``trusted``:
    Label Studio's host, any port), which count as listed entries."""

    def __init__(self, entries: Iterable[str] = (), trusted: Iterable[str] = ()):
        self.entries = parse_entries(entries) + parse_entries(trusted)
        self.any_public = any(e.is_any for e in self.entries)
        self._names = [e for e in self.entries if e.name is not None]
        self._networks = [e for e in self.entries if e.network is not None]

    def name_allowed(self, host: str, port: int | None) -> bool:
        """The allow-list by name, before any lookup: ``*``, a listed name, or an IP literal
        that a listed IP or CIDR holds."""
        if self.any_public:
            return True
        ip = parse_ip(host)
        if ip is not None:
            return self._listed_network(ip, port) is not None
        return self._listed_name(host, port) is not None

    def check(self, host: str, port: int | None, address: IPAddress | str) -> Verdict:
        """May a connection for ``host`` (the URL's host) go to ``address`` (what it resolved
        to)? Call after :meth:`name_allowed`: a public address is allowed for any host."""
        ip = unwrap(ipaddress.ip_address(address) if isinstance(address, str) else address)
        category = classify(ip)
        entry = self._listed_network(ip, port)
        if entry is not None:
            return Verdict(True, f"listed as {entry.text}")
        entry = self._listed_name(host, port) if parse_ip(host) is None else None
        if entry is not None:
            if category == "link-local":
                return Verdict(
                    False,
                    f"{DESCRIPTIONS[category]}, which a host name entry "
                    f"({entry.text}) does not open: list its IP or a CIDR",
                )
            return Verdict(True, f"its host is listed as {entry.text}")
        if category is None:
            return Verdict(True, "a public address")
        return Verdict(False, DESCRIPTIONS[category])

    def _listed_network(self, ip: IPAddress, port: int | None) -> Entry | None:
        for entry in self._networks:
            if entry.port_ok(port) and ip.version == entry.network.version and ip in entry.network:
                return entry
        return None

    def _listed_name(self, host: str, port: int | None) -> Entry | None:
        name = normalize_name(host)
        for entry in self._names:
            if entry.port_ok(port) and entry.name == name:
                return entry
        return None
