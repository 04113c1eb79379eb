"""Turn a task's image reference into a decoded RGB image, safely.

Task values are untrusted: whoever can import tasks into Label Studio (LS) chooses them, and the
backend fetches them from inside its own network. So every network fetch is limited to http(s),
to an allow-list of host names, to the addresses :mod:`molmo_backend.images.address_policy` allows (checked
on the address connected to, by :mod:`molmo_backend.images.transport`), to a total time and a
byte budget, and redirects are followed by hand so each hop is checked. LS credentials are sent
only to LS's own origin.

Supported references: LS paths (``/data/upload/...``, ``/data/local-files/?d=...``, any path
starting with ``/``), http(s) URLs, cloud URIs (``s3://``, ``gs://``, ``azure-blob://``,
``azure-spi://``, signed by LS's presign endpoint) and ``data:image/...;base64,`` URIs.

This module is the fetch path; decoding is :mod:`molmo_backend.images.decode`, LS's
``Authorization`` header :mod:`molmo_backend.images.labelstudio_auth`, the URL checks
:mod:`molmo_backend.images.urls`, URLs fit for messages :mod:`molmo_backend.redaction`, and the
errors, one class per reason, :mod:`molmo_backend.images.errors`.
"""

from __future__ import annotations

import base64
import logging
import posixpath
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import requests
import urllib3.exceptions
from PIL import Image

from molmo_backend.images.address_policy import AddressPolicy, normalize_name
from molmo_backend.images.decode import LoadedImage, decode_data_uri, decode_image
from molmo_backend.images.errors import (
    BadReference,
    FetchRefused,
    FetchTimeout,
    HttpStatusError,
    ImageLoadError,
    LabelStudioRefused,
    LocalFileError,
    TooLarge,
    Unreachable,
)
from molmo_backend.images.labelstudio_auth import LabelStudioAuth
from molmo_backend.images.transport import AddressRefused, CheckedAdapter, Resolver
from molmo_backend.images.urls import base_url, ls_relative, origin, split_checked, strip_prefix
from molmo_backend.redaction import describe_url, error_reason, is_local_files
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class _LabelStudio:
    """One consistent view of where LS is, swapped whole when /setup changes it."""

    base: str | None  # where LS requests go
    auth: LabelStudioAuth
    aliases: tuple[str, ...]  # base URLs whose URLs are LS's own: ``base`` and /setup's hostname
    hosts: frozenset[str]  # LS's host names, allowed by name (their addresses: see address_policy)
    from_setup: bool = False  # ``base`` is /setup's hostname (LABEL_STUDIO_URL is unset)


class ImageLoader:
    """Loads task images; one instance is shared by all request threads.

    ``resolver`` (``socket.getaddrinfo``'s shape, the default) is what host names are looked up
    with; tests give one that maps names to loopback addresses."""

    def __init__(
        self, settings: Settings, session: requests.Session | None = None, resolver: Resolver | None = None
    ):
        self.settings = settings
        # LABEL_STUDIO_URL's host is the operator's own: allowed at any address it resolves to
        # (a private network, docker compose). /setup's hostname never is (see _build_ls).
        ls_host = urlsplit(base_url(settings.label_studio_url) or "").hostname
        self.policy = AddressPolicy(settings.allowed_hosts, trusted=[ls_host] if ls_host else ())
        self._session = session or requests.Session()
        adapter = CheckedAdapter(self.policy, resolver)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._lock = threading.Lock()
        self._setup: tuple[str | None, str | None] = (None, None)
        self._ls = self._build_ls(None, None, None)
        # Pillow's own bomb guard is process-wide; only ever raise it to our limit, never lower
        # it, because other code in the process may open bigger images legitimately.
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if pillow_limit is not None and pillow_limit < settings.max_image_pixels:
            Image.MAX_IMAGE_PIXELS = settings.max_image_pixels

    def configure_label_studio(self, hostname: str | None, access_token: str | None) -> None:
        """Take LS's hostname and token from its /setup call (settings, when set, win)."""
        hostname = base_url(hostname)
        with self._lock:
            if (hostname, access_token or None) == self._setup:
                return
            self._setup = (hostname, access_token or None)
            self._ls = self._build_ls(hostname, access_token, self._ls.auth)

    def _build_ls(
        self, setup_url: str | None, setup_token: str | None, old_auth: LabelStudioAuth | None
    ) -> _LabelStudio:
        s = self.settings
        base = base_url(s.label_studio_url) or setup_url
        key = s.label_studio_api_key or setup_token or None
        auth = old_auth
        if auth is None or not auth.is_for(base, key):  # keep a cached access token
            auth = LabelStudioAuth(base, key, self._session, timeout=s.fetch_timeout)
        aliases = tuple(dict.fromkeys(u for u in (base, setup_url) if u))
        # Only the host LS requests go to is allowed by name: /setup's hostname must not widen
        # the allow-list when LABEL_STUDIO_URL is set (its URLs are rewritten to LS's anyway).
        # When it is unset, /setup's host is allowed by name but not trusted by address: it is
        # connected to only at a public address, or one MOLMO_ALLOWED_HOSTS lists.
        hosts = frozenset({normalize_name(urlsplit(base).hostname or "")} if base else ()) - {""}
        from_setup = bool(base) and not base_url(s.label_studio_url)
        return _LabelStudio(base, auth, aliases, hosts, from_setup)

    def load(self, value: str, task_id: int | None = None) -> LoadedImage:
        """Fetch and decode the image a task refers to; raises ImageLoadError."""
        if not isinstance(value, str) or not value.strip():
            raise BadReference("the task has no image reference")
        value = value.strip()
        deadline = time.monotonic() + self.settings.fetch_timeout
        data = self._read(value, task_id, deadline, self._ls)
        return decode_image(data, self.settings.max_image_pixels)

    # -- where the bytes come from --------------------------------------------------------

    def _read(self, value: str, task_id: int | None, deadline: float, ls: _LabelStudio) -> bytes:
        if value[:5].lower() == "data:":
            return decode_data_uri(value, self.settings.max_image_bytes)
        try:
            scheme = urlsplit(value).scheme.lower()
        except ValueError as exc:  # e.g. "http://[::1/a.png": an unclosed IPv6 bracket
            raise BadReference(f"the image reference is not a valid URL ({exc})") from None
        if scheme in CLOUD_SCHEMES:
            return self._read_cloud(value, task_id, deadline, ls)
        if scheme in ("http", "https"):
            path = ls_relative(value, ls.aliases)
            if path is None:
                return self._fetch(value, deadline, ls)
            value = path  # LS's own URL, possibly under a hostname unusable from here
        elif scheme:
            raise BadReference(
                f"unsupported URL scheme {scheme!r} in {describe_url(value)}: "
                "images are fetched only over http or https"
            )
        if not value.startswith("/"):
            raise BadReference(
                f"unsupported image reference {describe_url(value)}: expected a "
                "URL, a Label Studio path, a cloud URI or a data URI"
            )
        if ls.base:
            value = strip_prefix(value, urlsplit(ls.base).path)
        if is_local_files(value) and self.settings.local_files_root:
            return self._read_local(value)
        if not ls.base:
            raise BadReference(
                f"{describe_url(value)} is a Label Studio path but Label Studio's "
                "URL is unknown: set LABEL_STUDIO_URL"
            )
        return self._fetch(ls.base + value, deadline, ls)

    def _read_cloud(self, uri: str, task_id: int | None, deadline: float, ls: _LabelStudio) -> bytes:
        """Ask LS to sign the cloud URI; LS redirects to the signed URL (or streams the file)."""
        scheme = urlsplit(uri).scheme
        if task_id is None:
            raise BadReference(
                f"{scheme}:// images need the task id, so that Label Studio can sign their URL"
            )
        if not ls.base:
            raise BadReference(
                f"{scheme}:// images are signed by Label Studio, whose URL is unknown: set LABEL_STUDIO_URL"
            )
        try:
            task_id = int(task_id)
        except (TypeError, ValueError):
            raise BadReference(f"invalid task id {task_id!r}") from None
        fileuri = quote(base64.urlsafe_b64encode(uri.encode()).decode(), safe="")
        return self._fetch(f"{ls.base}/tasks/{task_id}/presign/?fileuri={fileuri}", deadline, ls)

    def _read_local(self, value: str) -> bytes:
        """Read LS's local-files storage straight from disk, as LS itself would serve it."""
        d = (parse_qs(urlsplit(value).query).get("d") or [""])[0]
        if not d:
            raise BadReference("local-files reference without a ?d= path")
        rel = posixpath.normpath(d).lstrip("/")  # the same normalisation LS applies
        try:
            root = Path(self.settings.local_files_root).resolve()
            path = (root / rel).resolve()  # follows symlinks, so links out of the root are caught
            if not path.is_relative_to(root):
                raise LocalFileError(f"local file {d!r} is outside LOCAL_FILES_DOCUMENT_ROOT")
            if not path.is_file():
                raise LocalFileError(f"local file {d!r} not found under LOCAL_FILES_DOCUMENT_ROOT")
            limit = self.settings.max_image_bytes
            with path.open("rb") as f:
                data = f.read(limit + 1)
        except (OSError, ValueError) as exc:  # permissions, NUL bytes in the path...
            raise LocalFileError(f"cannot read local file {d!r}: {type(exc).__name__}") from None
        if len(data) > limit:
            raise TooLarge(f"local file {d!r} is larger than MOLMO_MAX_IMAGE_BYTES={limit}")
        return data

    # -- the network ----------------------------------------------------------------------

    def _fetch(self, url: str, deadline: float, ls: _LabelStudio) -> bytes:
        """GET ``url`` following redirects by hand, with LS auth only on LS's origin.

        A redirect issued by LS itself (presigned cloud URLs, uploads kept in a bucket) may go to
        any http(s) host name: LS chose it. Every other hop must be on the allow-list. Every hop,
        LS's included, connects only to an address the policy allows.
        """
        first = url
        redirects = 0
        retried = False
        trusted = False  # the previous hop was LS
        while True:
            parts = split_checked(url)
            if parts.scheme not in ("http", "https"):
                raise FetchRefused(
                    f"refusing {parts.scheme or 'scheme-less'} URL "
                    f"{describe_url(url)}: only http and https are fetched"
                )
            is_ls = ls.base is not None and origin(url) == origin(ls.base)
            if not (is_ls or trusted or self._host_allowed(parts, ls)):
                raise FetchRefused(
                    f"host {parts.hostname!r} is not allowed: add it to "
                    "MOLMO_ALLOWED_HOSTS (comma-separated names, IPs or CIDRs; "
                    "'*' allows any public address)"
                )
            try:
                headers = ls.auth.header(deadline) if is_ls else {}
                resp = self._get(url, headers, deadline)
            except AddressRefused as exc:
                hint = (
                    " Label Studio's address came from its /setup call, which opens no "
                    "address by itself: set LABEL_STUDIO_URL (or list the host in "
                    "MOLMO_ALLOWED_HOSTS)"
                    if is_ls and ls.from_setup
                    else ""
                )
                raise FetchRefused(
                    f"refusing {describe_url(url)}: {exc}. Only public addresses are fetched unless "
                    f"MOLMO_ALLOWED_HOSTS lists the host, its IP or a CIDR holding it.{hint}"
                ) from None
            with resp:
                status = resp.status_code
                if status == 401 and is_ls and ls.auth.can_refresh and not retried:
                    ls.auth.invalidate()  # LS dropped our access token early: exchange again
                    retried = True
                    continue
                if status in REDIRECT_CODES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise HttpStatusError(f"HTTP {status} without a Location from {describe_url(url)}")
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise HttpStatusError(
                            f"more than {MAX_REDIRECTS} redirects fetching {describe_url(first)}"
                        )
                    target = urljoin(url, location)
                    if is_ls and urlsplit(target).path.startswith("/user/login"):
                        raise LabelStudioRefused(
                            f"Label Studio wants a login for {describe_url(first)}: set LABEL_STUDIO_API_KEY"
                        )
                    log.debug("redirect %s -> %s", describe_url(url), describe_url(target))
                    trusted, url = is_ls, target
                    continue
                if is_ls and status in (401, 403):
                    raise LabelStudioRefused(
                        f"Label Studio refused access (HTTP {status}) to {describe_url(url)}: set "
                        "LABEL_STUDIO_API_KEY to a personal access token (legacy tokens are off "
                        "by default since Label Studio 1.23)"
                    )
                if status != 200:
                    raise HttpStatusError(f"HTTP {status} from {describe_url(url)}")
                return self._read_body(resp, url, deadline)

    def _host_allowed(self, parts, ls: _LabelStudio) -> bool:
        host = parts.hostname or ""
        if normalize_name(host) in ls.hosts:
            return True
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
        return self.policy.name_allowed(host, port)

    def _get(self, url: str, headers: dict[str, str], deadline: float) -> requests.Response:
        remaining = self._remaining(deadline, url)
        try:
            return self._session.get(
                url, headers=headers, stream=True, allow_redirects=False, timeout=(remaining, remaining)
            )
        except requests.Timeout:
            raise self._timeout_error(url) from None
        except requests.RequestException as exc:
            raise Unreachable(f"could not fetch {describe_url(url)}: {error_reason(exc)}") from None

    def _read_body(self, resp: requests.Response, url: str, deadline: float) -> bytes:
        """The body, within the byte budget and the deadline (checked before every read)."""
        limit = self.settings.max_image_bytes
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise TooLarge(
                f"{describe_url(url)} is {int(length)} bytes, more than MOLMO_MAX_IMAGE_BYTES={limit}"
            )
        body = bytearray()
        while True:
            sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
            if sock is not None:  # so a server trickling bytes cannot outlast the deadline
                sock.settimeout(self._remaining(deadline, url))
            try:
                chunk = resp.raw.read1(_CHUNK, decode_content=True)
            except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
                raise self._timeout_error(url) from None
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise Unreachable(
                    f"download of {describe_url(url)} broke off: {type(exc).__name__}"
                ) from None
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"{describe_url(url)} is more than MOLMO_MAX_IMAGE_BYTES={limit} bytes")
            self._remaining(deadline, url)

    def _remaining(self, deadline: float, url: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout_error(url)
        return remaining

    def _timeout_error(self, url: str) -> ImageLoadError:
        return FetchTimeout(
            f"fetching {describe_url(url)} took longer than "
            f"MOLMO_FETCH_TIMEOUT={self.settings.fetch_timeout} s"
        )
