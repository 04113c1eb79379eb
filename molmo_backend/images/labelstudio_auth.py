"""The ``Authorization`` header for Label Studio: a legacy token as is, a personal access token
exchanged for short-lived access tokens (JWTs, read unverified for their expiry)."""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
import time

import requests

from molmo_backend.images.errors import LabelStudioRefused, Unreachable
from molmo_backend.redaction import describe_url, error_reason

TOKEN_REFRESH_MARGIN = 30.0  # renew an access token this many seconds before it expires
_JWT = re.compile(r"[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*")

_now = time.time  # the clock for token expiry; tests move it


class LabelStudioAuth:
    """Knows LS's base URL and key, and produces the ``Authorization`` header.

    A legacy key is sent as ``Token <key>``. A personal access token (PAT) is a JWT refresh
    token: LS accepts it only after exchanging it for a short-lived access token, which is cached
    until shortly before it expires (or until a 401 says LS no longer accepts it).
    """

    def __init__(
        self, url: str | None, api_key: str | None, session: requests.Session, *, timeout: float = 15.0
    ):
        self.url = url.rstrip("/") if url else None
        self._key = api_key or None
        self._session = session
        self._timeout = timeout
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_until = 0.0
        if not self._key:
            self.kind = "none"
        elif not _JWT.fullmatch(self._key):
            self.kind = "legacy"
        elif _jwt_claims(self._key).get("token_type") == "access":
            self.kind = "access"  # an access token given directly: usable as is until it expires
        else:
            self.kind = "pat"

    @property
    def can_refresh(self) -> bool:
        return self.kind == "pat"

    def is_for(self, url: str | None, api_key: str | None) -> bool:
        """Whether this is the auth of ``url`` with ``api_key`` (so its cached token still holds)."""
        return (self.url, self._key) == (url, api_key)

    def header(self, deadline: float | None = None) -> dict[str, str]:
        """The header for LS; a PAT exchange (and the wait for another thread's) ends by
        ``deadline`` (``time.monotonic()``), so a hanging LS costs each image its own fetch
        time-out, not one time-out per image queued behind the lock."""
        if self.kind == "none":
            return {}
        if self.kind == "legacy":
            return {"Authorization": f"Token {self._key}"}
        if self.kind == "access":
            return {"Authorization": f"Bearer {self._key}"}
        remaining = None if deadline is None else deadline - time.monotonic()
        if not self._lock.acquire(timeout=-1 if remaining is None else max(remaining, 0.0)):
            raise LabelStudioRefused(
                "timed out waiting for Label Studio to exchange the personal "
                "access token (MOLMO_FETCH_TIMEOUT)"
            )
        try:  # one exchange at a time; the other threads then reuse its result
            if self._access is None or _now() >= self._access_until:
                timeout = self._timeout
                if deadline is not None:
                    timeout = max(min(timeout, deadline - time.monotonic()), 0.001)
                self._access, self._access_until = self._exchange(timeout)
            return {"Authorization": f"Bearer {self._access}"}
        finally:
            self._lock.release()

    def invalidate(self) -> None:
        with self._lock:
            self._access = None

    def _exchange(self, timeout: float) -> tuple[str, float]:
        if not self.url:
            raise LabelStudioRefused(
                "a personal access token can only be used once Label Studio's "
                "URL is known: set LABEL_STUDIO_URL"
            )
        url = f"{self.url}/api/token/refresh/"
        try:
            resp = self._session.post(
                url, json={"refresh": self._key}, timeout=timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            raise Unreachable(
                f"could not reach Label Studio at {describe_url(self.url)} to "
                f"exchange the personal access token: {error_reason(exc)}"
            ) from None
        with resp:
            if resp.status_code != 200:
                raise LabelStudioRefused(
                    f"Label Studio refused the personal access token (HTTP {resp.status_code} "
                    f"from /api/token/refresh/): check that LABEL_STUDIO_API_KEY is a valid, "
                    f"unrevoked token of this Label Studio"
                )
            try:
                access = resp.json()["access"]
            except (ValueError, KeyError, TypeError):
                access = None
        if not isinstance(access, str) or not access:
            raise LabelStudioRefused("Label Studio's /api/token/refresh/ answer holds no access token")
        return access, self._valid_until(_jwt_claims(access))

    @staticmethod
    def _valid_until(claims: dict) -> float:
        """Local time at which to renew; uses the token's lifetime so clock skew does not matter."""
        now = _now()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, (int, float)):
            return float("inf")  # no expiry given: keep it until LS answers 401
        lifetime = exp - iat if isinstance(iat, (int, float)) else exp - now
        lifetime = max(lifetime, 0.0)
        return now + lifetime - min(TOKEN_REFRESH_MARGIN, lifetime / 2)


def _jwt_claims(token: str) -> dict:
    """The payload of a JWT, unverified (only ``exp``, ``iat`` and ``token_type`` are read)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}
