"""URLs and errors fit for logs and messages: what a URL or a requests error says, without secrets.

A URL can carry credentials (``http://user:pass@host``) and secrets in its query (signed cloud
URLs, tokens), and the text of a requests error repeats the URL. So messages name a URL only
through :func:`describe_url` and a requests error only through :func:`error_reason`. Used by the
image fetches and by the remote engine alike.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

#: longest URL a message shows; longer ones are cut, ending in "..."
MAX_URL_CHARS = 200

#: phrases of socket and urllib3 errors that say why a connection failed, for when no OSError in
#: the exception's chain carries the reason in ``strerror`` (time-outs, a server hanging up)
_REASONS = (
    "Connection refused",
    "Name or service not known",
    "timed out",
    "Temporary failure in name resolution",
    "Connection reset",
    "RemoteDisconnected",
)


def is_local_files(reference: str) -> bool:
    """Whether ``reference`` (a URL or a path, with its query) is Label Studio's local-files
    storage (``/data/local-files/?d=<path>``, or without the slash), whose query is a file path,
    not a secret."""
    try:
        path = urlsplit(reference).path
    except ValueError:
        return False
    return path == "/data/local-files" or path.startswith("/data/local-files/")


def describe_url(url: str) -> str:
    """A URL fit for messages: no credentials, no query (signed URLs carry secrets there), no
    fragment; the query of a local-files path is kept. A data: URI is named, not shown."""
    if url[:5].lower() == "data:":
        return "a data: URI"
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed "[" of an IPv6 address
        return "<unparseable url>"
    try:
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    except ValueError:  # a port that is not a number, or out of range
        netloc = parts.hostname or ""
    query = parts.query if is_local_files(url) else ""  # ?d= is a path, not a secret
    text = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    return text if len(text) <= MAX_URL_CHARS else text[: MAX_URL_CHARS - 3] + "..."


def error_reason(exc: BaseException) -> str:
    """The root cause of a requests error, e.g. 'Connection refused', without the URL (which could
    carry user info): an OSError's ``strerror`` from the chain, else a known phrase of its text,
    else the exception's type name."""
    seen = exc
    for _ in range(10):  # the chain is short; the bound only guards against odd cycles
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__ or getattr(seen, "reason", None)
        if not isinstance(seen, BaseException):
            break
    text = str(exc)
    for reason in _REASONS:
        if reason in text:
            return reason
    return type(exc).__name__
