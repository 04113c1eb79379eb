"""Is the HTTP client of the request being handled still there?

Why: Label Studio gives a ``/predict`` ``ML_TIMEOUT_PREDICT`` (100 s), then closes the connection
and forgets the request. Under gunicorn's gthread worker the handler thread is blocked in
``predict`` meanwhile; it can only tell that nobody waits any more by looking at the socket. A
client that closed its side makes a non-blocking ``recv`` with ``MSG_PEEK`` return ``b""`` (or
fail with a reset); one that is still there makes it raise ``BlockingIOError`` (nothing to
read). Label Studio (requests/urllib3) sends nothing more on a connection while it waits for the
answer, so bytes to read also mean "still there".
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any


def client_gone_probe(environ: Mapping[str, Any]) -> Callable[[], bool] | None:
    """A cheap check, True once the client has hung up; None when the server gives no socket
    (not gunicorn, e.g. Flask's test client) or one that cannot be peeked at (TLS)."""
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return None

    def gone() -> bool:
        try:  # a non-blocking peek: nothing to read yet raises BlockingIOError
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # reset by the peer, or closed on our side already
            return True

    return gone
