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
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import posixpath
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, urljoin, urlsplit, urlunsplit

import requests
import urllib3.exceptions
from PIL import Image, ImageOps
from urllib3.util import parse_url

from molmo_backend.images.address_policy import AddressPolicy, normalize_name, parse_ip
from molmo_backend.images.transport import AddressRefused, CheckedAdapter, Resolver
from molmo_backend.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
CLOUD_SCHEMES = ("s3", "gs", "azure-blob", "azure-spi")
# What browsers (hence LS) can show; also keeps Pillow away from formats such as EPS that
# hand the data to external programs.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "ICO")
TOKEN_REFRESH_MARGIN = 30.0  # renew an access token this many seconds before it expires
_CHUNK = 64 * 1024
_JWT = re.compile(r"[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*\.[A-Za-z0-9_-]+=*")

_now = time.time  # the clock for token expiry; tests move it


class ImageLoadError(Exception):
    """Why an image could not be loaded; safe to log and to show (never holds a token).
    ``reason`` names the kind of failure for /metrics (fetch failures by reason)."""

    reason = "other"


class BadReference(ImageLoadError):
    reason = "bad_reference"  # no reference, an unsupported scheme, a malformed URL or data URI


class FetchRefused(ImageLoadError):
    reason = "refused"  # a host or address the settings do not allow (docs/security.md)


class FetchTimeout(ImageLoadError):
    reason = "timeout"


class Unreachable(ImageLoadError):
    reason = "unreachable"  # connection refused, reset, DNS failure, a download broken off


class HttpStatusError(ImageLoadError):
    reason = "http_status"  # not 200, redirects without a Location or too many


class LabelStudioRefused(ImageLoadError):
    reason = "label_studio_auth"  # Label Studio refused our token, or its token exchange failed


class LocalFileError(ImageLoadError):
    reason = "local_file"


class TooLarge(ImageLoadError):
    reason = "too_large"  # bytes or pixels over their limits


class NotAnImage(ImageLoadError):
    reason = "not_an_image"  # empty, truncated, or not a supported image format


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, fully decoded
    width: int  # of the oriented image, i.e. as LS displays it
    height: int


class LabelStudioAuth:
    """Knows LS's base URL and key, and produces the ``Authorization`` header.

    A legacy key is sent as ``Token <key>``. A personal access token (PAT) is a JWT refresh
    token: LS accepts it only after exchanging it for a short-lived access token, which is cached
    until shortly before it expires (or until a 401 says LS no longer accepts it).
    """

    def __init__(self, url: str | None, api_key: str | None, session: requests.Session,
                 *, timeout: float = 15.0):
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
            raise LabelStudioRefused("timed out waiting for Label Studio to exchange the personal "
                                 "access token (MOLMO_FETCH_TIMEOUT)")
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
            raise LabelStudioRefused("a personal access token can only be used once Label Studio's "
                                 "URL is known: set LABEL_STUDIO_URL")
        url = f"{self.url}/api/token/refresh/"
        try:
            resp = self._session.post(url, json={"refresh": self._key}, timeout=timeout,
                                      allow_redirects=False)
        except requests.RequestException as exc:
            raise Unreachable(f"could not reach Label Studio at {_describe(self.url)} to "
                                 f"exchange the personal access token: {_why(exc)}") from None
        with resp:
            if resp.status_code != 200:
                raise LabelStudioRefused(
                    f"Label Studio refused the personal access token (HTTP {resp.status_code} "
                    f"from /api/token/refresh/): check that LABEL_STUDIO_API_KEY is a valid, "
                    f"unrevoked token of this Label Studio")
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

    def __init__(self, settings: Settings, session: requests.Session | None = None,
                 resolver: Resolver | None = None):
        self.settings = settings
        # LABEL_STUDIO_URL's host is the operator's own: allowed at any address it resolves to
        # (a private network, docker compose). /setup's hostname never is (see _build_ls).
        ls_host = urlsplit(_base_url(settings.label_studio_url) or "").hostname
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
        hostname = _base_url(hostname)
        with self._lock:
            if (hostname, access_token or None) == self._setup:
                return
            self._setup = (hostname, access_token or None)
            self._ls = self._build_ls(hostname, access_token, self._ls.auth)

    def _build_ls(self, setup_url: str | None, setup_token: str | None,
                  old_auth: LabelStudioAuth | None) -> _LabelStudio:
        s = self.settings
        base = _base_url(s.label_studio_url) or setup_url
        key = s.label_studio_api_key or setup_token or None
        auth = old_auth
        if auth is None or (auth.url, auth._key) != (base, key):  # keep a cached access token
            auth = LabelStudioAuth(base, key, self._session, timeout=s.fetch_timeout)
        aliases = tuple(dict.fromkeys(u for u in (base, setup_url) if u))
        # Only the host LS requests go to is allowed by name: /setup's hostname must not widen
        # the allow-list when LABEL_STUDIO_URL is set (its URLs are rewritten to LS's anyway).
        # When it is unset, /setup's host is allowed by name but not trusted by address: it is
        # connected to only at a public address, or one MOLMO_ALLOWED_HOSTS lists.
        hosts = frozenset({normalize_name(urlsplit(base).hostname or "")} if base else ()) - {""}
        from_setup = bool(base) and not _base_url(s.label_studio_url)
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
            return _decode_data_uri(value, self.settings.max_image_bytes)
        scheme = urlsplit(value).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            return self._read_cloud(value, task_id, deadline, ls)
        if scheme in ("http", "https"):
            path = _ls_relative(value, ls.aliases)
            if path is None:
                return self._fetch(value, deadline, ls)
            value = path  # LS's own URL, possibly under a hostname unusable from here
        elif scheme:
            raise BadReference(f"unsupported URL scheme {scheme!r} in {_describe(value)}: "
                                 "images are fetched only over http or https")
        if not value.startswith("/"):
            raise BadReference(f"unsupported image reference {_describe(value)}: expected a "
                                 "URL, a Label Studio path, a cloud URI or a data URI")
        if ls.base:
            value = _strip_prefix(value, urlsplit(ls.base).path)
        if _is_local_files(value) and self.settings.local_files_root:
            return self._read_local(value)
        if not ls.base:
            raise BadReference(f"{_describe(value)} is a Label Studio path but Label Studio's "
                                 "URL is unknown: set LABEL_STUDIO_URL")
        return self._fetch(ls.base + value, deadline, ls)

    def _read_cloud(self, uri: str, task_id: int | None, deadline: float,
                    ls: _LabelStudio) -> bytes:
        """Ask LS to sign the cloud URI; LS redirects to the signed URL (or streams the file)."""
        scheme = urlsplit(uri).scheme
        if task_id is None:
            raise BadReference(f"{scheme}:// images need the task id, so that Label Studio "
                                 "can sign their URL")
        if not ls.base:
            raise BadReference(f"{scheme}:// images are signed by Label Studio, whose URL is "
                                 "unknown: set LABEL_STUDIO_URL")
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
            parts = _split(url)
            if parts.scheme not in ("http", "https"):
                raise FetchRefused(f"refusing {parts.scheme or 'scheme-less'} URL "
                                     f"{_describe(url)}: only http and https are fetched")
            is_ls = ls.base is not None and _origin(url) == _origin(ls.base)
            if not (is_ls or trusted or self._host_allowed(parts, ls)):
                raise FetchRefused(f"host {parts.hostname!r} is not allowed: add it to "
                                     "MOLMO_ALLOWED_HOSTS (comma-separated names, IPs or CIDRs; "
                                     "'*' allows any public address)")
            try:
                headers = ls.auth.header(deadline) if is_ls else {}
                resp = self._get(url, headers, deadline)
            except AddressRefused as exc:
                hint = (" Label Studio's address came from its /setup call, which opens no "
                        "address by itself: set LABEL_STUDIO_URL (or list the host in "
                        "MOLMO_ALLOWED_HOSTS)" if is_ls and ls.from_setup else "")
                raise FetchRefused(
                    f"refusing {_describe(url)}: {exc}. Only public addresses are fetched unless "
                    f"MOLMO_ALLOWED_HOSTS lists the host, its IP or a CIDR holding it.{hint}") from None
            with resp:
                status = resp.status_code
                if status == 401 and is_ls and ls.auth.can_refresh and not retried:
                    ls.auth.invalidate()  # LS dropped our access token early: exchange again
                    retried = True
                    continue
                if status in REDIRECT_CODES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise HttpStatusError(f"HTTP {status} without a Location from "
                                             f"{_describe(url)}")
                    redirects += 1
                    if redirects > MAX_REDIRECTS:
                        raise HttpStatusError(f"more than {MAX_REDIRECTS} redirects fetching "
                                             f"{_describe(first)}")
                    target = urljoin(url, location)
                    if is_ls and urlsplit(target).path.startswith("/user/login"):
                        raise LabelStudioRefused(f"Label Studio wants a login for {_describe(first)}: "
                                             "set LABEL_STUDIO_API_KEY")
                    log.debug("redirect %s -> %s", _describe(url), _describe(target))
                    trusted, url = is_ls, target
                    continue
                if is_ls and status in (401, 403):
                    raise LabelStudioRefused(
                        f"Label Studio refused access (HTTP {status}) to {_describe(url)}: set "
                        "LABEL_STUDIO_API_KEY to a personal access token (legacy tokens are off "
                        "by default since Label Studio 1.23)")
                if status != 200:
                    raise HttpStatusError(f"HTTP {status} from {_describe(url)}")
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
            return self._session.get(url, headers=headers, stream=True, allow_redirects=False,
                                     timeout=(remaining, remaining))
        except requests.Timeout:
            raise self._timeout_error(url) from None
        except requests.RequestException as exc:
            raise Unreachable(f"could not fetch {_describe(url)}: {_why(exc)}") from None

    def _read_body(self, resp: requests.Response, url: str, deadline: float) -> bytes:
        """The body, within the byte budget and the deadline (checked before every read)."""
        limit = self.settings.max_image_bytes
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            raise TooLarge(f"{_describe(url)} is {int(length)} bytes, more than "
                                 f"MOLMO_MAX_IMAGE_BYTES={limit}")
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
                raise Unreachable(f"download of {_describe(url)} broke off: "
                                     f"{type(exc).__name__}") from None
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"{_describe(url)} is more than MOLMO_MAX_IMAGE_BYTES="
                                     f"{limit} bytes")
            self._remaining(deadline, url)

    def _remaining(self, deadline: float, url: str) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timeout_error(url)
        return remaining

    def _timeout_error(self, url: str) -> ImageLoadError:
        return FetchTimeout(f"fetching {_describe(url)} took longer than "
                              f"MOLMO_FETCH_TIMEOUT={self.settings.fetch_timeout} s")


# -- decoding -------------------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int) -> LoadedImage:
    """Decode fully (so truncated files fail here), orient by EXIF, convert to RGB."""
    if not data:
        raise NotAnImage("the image file is empty (0 bytes)")
    Image.init()  # registers every plugin, so the filter below sees them all (cheap when done)
    formats = [f for f in IMAGE_FORMATS if f in Image.OPEN]
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            if img.width * img.height > max_pixels:
                raise TooLarge(f"image is {img.width}x{img.height} pixels, more than "
                                     f"MOLMO_MAX_IMAGE_PIXELS={max_pixels}")
            img.load()  # the first frame of an animation
            oriented = ImageOps.exif_transpose(img)
            rgb = _to_rgb(oriented)
            if rgb is img:
                rgb = img.copy()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooLarge(f"image rejected as a possible decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise NotAnImage("the file is not an image in a supported format ("
                             + ", ".join(IMAGE_FORMATS) + ")") from None
    except Exception as exc:  # Pillow raises many kinds on corrupt data
        raise NotAnImage(f"the image could not be decoded: {type(exc).__name__}: "
                             f"{exc}") from None
    return LoadedImage(rgb, rgb.width, rgb.height)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB the way a browser would show it: transparency over white, 16-bit scaled to 8-bit."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit files keep their high byte; other wide modes are scaled by their maximum
        top = 65535 if img.mode.startswith("I;16") else max(img.getextrema()[1], 255)
        img = img.convert("F").point(lambda v: v * 255.0 / top).convert("L")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decode_data_uri(value: str, limit: int) -> bytes:
    header, comma, payload = value.partition(",")
    header = header.lower().replace(" ", "")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise BadReference("only base64 data:image/...;base64, URIs are supported")
    payload = "".join(payload.split()).translate(str.maketrans("-_", "+/"))
    if len(payload) * 3 // 4 > limit + 3:
        raise TooLarge(f"data URI image is more than MOLMO_MAX_IMAGE_BYTES={limit} bytes")
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadReference("the data URI is not valid base64") from None
    if len(data) > limit:
        raise TooLarge(f"data URI image is more than MOLMO_MAX_IMAGE_BYTES={limit} bytes")
    return data


# -- URL helpers ----------------------------------------------------------------------------


def _jwt_claims(token: str) -> dict:
    """The payload of a JWT, unverified (only ``exp``, ``iat`` and ``token_type`` are read)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _base_url(url: str | None) -> str | None:
    """``http://host:port[/prefix]`` without a trailing slash; a bare ``host:port`` gets http."""
    url = (url or "").strip().rstrip("/")
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _split(url: str):
    """``urlsplit(url)``, refused when requests (urllib3) would read another host or port in it:
    the allow-list must judge the host that is connected to (``http://a\\@b/``, ``%2e`` ...)."""
    parts = urlsplit(url)
    try:
        parts.port  # raises on a malformed port
        theirs = parse_url(url)
    except (ValueError, urllib3.exceptions.LocationParseError):
        raise BadReference(f"invalid URL {_describe(url)}") from None
    if parts.scheme.lower() in ("http", "https") and (
            _host_key(parts.hostname) != _host_key(theirs.host) or parts.port != theirs.port):
        raise BadReference(f"ambiguous URL {_describe(url)}: URL parsers disagree on its host")
    return parts._replace(scheme=parts.scheme.lower())


def _host_key(host: str | None) -> str:
    host = (host or "").strip("[]")
    ip = parse_ip(host)
    return str(ip) if ip is not None else normalize_name(host)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port


def _strip_prefix(path: str, prefix: str) -> str:
    """Drop LS's sub-path (LS served under ``/prefix``) when a task path already carries it."""
    prefix = prefix.rstrip("/")
    if prefix and (path == prefix or path.startswith((prefix + "/", prefix + "?"))):
        return path[len(prefix):] or "/"
    return path


def _ls_relative(url: str, aliases: tuple[str, ...]) -> str | None:
    """``/path?query`` when ``url`` is one of LS's own URLs, else None."""
    for alias in aliases:
        if _origin(url) == _origin(alias):
            parts = urlsplit(url)
            path = parts.path or "/"
            path = _strip_prefix(path, urlsplit(alias).path)
            return path + (f"?{parts.query}" if parts.query else "")
    return None


def _is_local_files(path: str) -> bool:
    return path.startswith("/data/local-files/") or path.startswith("/data/local-files?")


def _describe(url: str) -> str:
    """A URL fit for messages: no credentials, no query (signed URLs carry secrets there)."""
    if url[:5].lower() == "data:":
        return "a data: URI"
    parts = urlsplit(url)
    try:
        netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    except ValueError:
        netloc = parts.hostname or ""
    query = parts.query if _is_local_files(parts.path) else ""  # ?d= is a path, not a secret
    text = urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    return text if len(text) <= 200 else text[:197] + "..."


def _why(exc: BaseException) -> str:
    """The root cause of a requests error, e.g. 'Connection refused', without the URL."""
    seen = exc
    for _ in range(10):  # the chain is short; the bound only guards against odd cycles
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__ or getattr(seen, "reason", None)
        if not isinstance(seen, BaseException):
            break
    return type(exc).__name__
