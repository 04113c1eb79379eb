"""URL helpers of the fetch path: Label Studio's base URL and origin, and the URL check that keeps
the allow-list judging the host actually connected to."""

from __future__ import annotations

from urllib.parse import urlsplit

import urllib3.exceptions
from urllib3.util import parse_url

from molmo_backend.images.address_policy import normalize_name, parse_ip
from molmo_backend.images.errors import BadReference
from molmo_backend.redaction import describe_url


def base_url(url: str | None) -> str | None:
    """``http://host:port[/prefix]`` without a trailing slash; a bare ``host:port`` gets http."""
    url = (url or "").strip().rstrip("/")
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def split_checked(url: str):
    """``urlsplit(url)``, refused when requests (urllib3) would read another host or port in it:
    the allow-list must judge the host that is connected to (``http://a\\@b/``, ``%2e`` ...)."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a malformed port
        theirs = parse_url(url)
    except (ValueError, urllib3.exceptions.LocationParseError):
        raise BadReference(f"invalid URL {describe_url(url)}") from None
    if parts.scheme.lower() in ("http", "https") and (
        _host_key(parts.hostname) != _host_key(theirs.host) or parts.port != theirs.port
    ):
        raise BadReference(f"ambiguous URL {describe_url(url)}: URL parsers disagree on its host")
    return parts._replace(scheme=parts.scheme.lower())


def _host_key(host: str | None) -> str:
    host = (host or "").strip("[]")
    ip = parse_ip(host)
    return str(ip) if ip is not None else normalize_name(host)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port: what "the same origin" compares."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


def strip_prefix(path: str, prefix: str) -> str:
    """Drop LS's sub-path (LS served under ``/prefix``) when a task path already carries it."""
    prefix = prefix.rstrip("/")
    if prefix and (path == prefix or path.startswith((prefix + "/", prefix + "?"))):
        return path[len(prefix) :] or "/"
    return path


def ls_relative(url: str, aliases: tuple[str, ...]) -> str | None:
    """``/path?query`` when ``url`` is one of LS's own URLs, else None."""
    for alias in aliases:
        if origin(url) == origin(alias):
            parts = urlsplit(url)
            path = parts.path or "/"
            path = strip_prefix(path, urlsplit(alias).path)
            return path + (f"?{parts.query}" if parts.query else "")
    return None
