"""The one base of the backend's own errors: each kind says which HTTP status and exit code it means.

The HTTP layer answers a ``MolmoError`` with its ``http_status`` and its message; the commands exit
with its ``exit_code``. Anything else that escapes is a bug: HTTP 500 and exit code 1.
"""

from __future__ import annotations


class MolmoError(Exception):
    """An error the user can act on, with the HTTP status and exit code it maps to."""

    http_status: int = 500
    exit_code: int = 1


class BadInput(MolmoError):
    """The request or the command line asked for something malformed: the caller must change it."""

    http_status = 400
    exit_code = 2


class Unavailable(MolmoError):
    """A dependency (model, engine server, Label Studio) is not there yet or has gone."""

    http_status = 503
    exit_code = 1
