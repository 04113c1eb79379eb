"""ImageLoader against real HTTP servers on the loopback interface (nothing mocked).

Every test runs under tests/support/net_guard.NetGuard: names resolve from its table (to loopback
addresses), and a connect to anything but loopback fails the test before a packet leaves.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

from molmo_backend.errors import MolmoError
from molmo_backend.images import errors, labelstudio_auth
from molmo_backend.images.decode import decode_image
from molmo_backend.images.errors import BadReference, ImageLoadError
from molmo_backend.images.labelstudio_auth import LabelStudioAuth
from molmo_backend.images.loader import ImageLoader
from molmo_backend.metrics import FETCH_FAILURES
from molmo_backend.settings import Settings
from tests.support.http_fixtures import FakeLabelStudio, HttpServer, Reply, make_jwt

LEGACY = "0123456789abcdef0123456789abcdef01234567"


# -- helpers --------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def quadrants(w: int = 60, h: int = 40) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: shows any turn."""
    img = Image.new("RGB", (w, h), WHITE)
    img.paste(RED, (0, 0, w // 2, h // 2))
    img.paste(GREEN, (w // 2, 0, w, h // 2))
    img.paste(BLUE, (0, h // 2, w // 2, h))
    return img


def quadrant_colors(img: Image.Image) -> list[tuple[int, int, int]]:
    w, h = img.size
    return [
        img.getpixel(p)
        for p in ((w // 4, h // 4), (3 * w // 4, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4))
    ]


def close(a, b, tol: int = 40) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


PNG = encode(quadrants())


def settings(**kw) -> Settings:
    kw.setdefault("fetch_timeout", 3.0)
    return Settings(**kw)


@pytest.fixture(autouse=True)
def guarded(net_guard):  # noqa: F811
    return net_guard


@pytest.fixture
def server():
    srv = HttpServer()
    yield srv
    srv.close()


@pytest.fixture
def other_host():
    """A second server on another loopback address: a host that is not LS's."""
    srv = HttpServer("127.0.0.2")
    yield srv
    srv.close()


@pytest.fixture
def ls():
    srv = FakeLabelStudio(legacy_token=LEGACY)
    srv.serve_file("/data/upload/1/img.png", PNG)
    yield srv
    srv.close()


def loader_for(srv: HttpServer, **kw) -> ImageLoader:
    return ImageLoader(settings(allowed_hosts=("127.0.0.1",), **kw))


def error_of(loader: ImageLoader, value: str, task_id: int | None = None) -> str:
    with pytest.raises(ImageLoadError) as info:
        loader.load(value, task_id)
    return str(info.value)


# -- plain http -----------------------------------------------------------------------------


def test_plain_http_image(server):
    server.route("/a.png", Reply(200, PNG, {"Content-Type": "image/png"}))
    loaded = loader_for(server).load(f"{server.url}/a.png")
    assert (loaded.width, loaded.height) == (60, 40)
    assert loaded.image.mode == "RGB"
    assert quadrant_colors(loaded.image) == [RED, GREEN, BLUE, WHITE]
    assert "authorization" not in server.hits("/a.png")[0].headers


def test_http_error_status(server):
    message = error_of(loader_for(server), f"{server.url}/missing.png?sig=SECRET")
    assert "HTTP 404" in message and "/missing.png" in message
    assert "SECRET" not in message  # queries may hold signatures


@pytest.mark.parametrize(
    "body, why",
    [
        (b"<html>hello</html>", "not an image"),
        (b"", "empty"),
        (PNG[: len(PNG) // 2], "could not be decoded"),
    ],
)
def test_bad_bodies(server, body, why):
    server.route("/x", Reply(200, body))
    assert why in error_of(loader_for(server), f"{server.url}/x")


def test_truncated_jpeg(server):
    jpeg = encode(quadrants(200, 200), "JPEG")
    server.route("/t.jpg", Reply(200, jpeg[: len(jpeg) * 2 // 3]))
    assert "could not be decoded" in error_of(loader_for(server), f"{server.url}/t.jpg")


def test_body_cut_short_of_content_length(server):
    server.route("/short", Reply(200, PNG[:100], length=len(PNG)))
    assert "broke off" in error_of(loader_for(server), f"{server.url}/short")


def test_too_big_by_content_length(server):
    server.route("/big", Reply(200, b"x" * 5000))
    message = error_of(loader_for(server, max_image_bytes=1000), f"{server.url}/big")
    assert "5000 bytes" in message and "MOLMO_MAX_IMAGE_BYTES=1000" in message


def test_too_big_chunked_without_length(server):
    server.route("/big", Reply(200, [b"x" * 600] * 10, chunked=True))
    message = error_of(loader_for(server, max_image_bytes=1000), f"{server.url}/big")
    assert "more than MOLMO_MAX_IMAGE_BYTES=1000" in message


def test_chunked_image_within_budget(server):
    server.route("/c", Reply(200, [PNG[:100], PNG[100:]], chunked=True))
    assert loader_for(server).load(f"{server.url}/c").width == 60


def test_trickling_server_hits_total_deadline(server):
    # each chunk arrives well within any per-read time-out; only a total deadline stops this
    server.route("/slow", Reply(200, [b"x"] * 100, delay=0.1))
    started = time.monotonic()
    message = error_of(loader_for(server, fetch_timeout=0.6), f"{server.url}/slow")
    assert "MOLMO_FETCH_TIMEOUT=0.6" in message
    assert time.monotonic() - started < 4.0  # without the deadline: 10 s (room for a busy machine)


def test_stall_mid_body_ends_at_deadline(server):
    # headers at 1.5 s, the next chunk at 3 s: a per-read time-out of the whole 2 s budget would
    # wait for it (and the last at 4.5 s); the deadline must cut the read off at 2 s
    server.route("/stall", Reply(200, [b"x", b"y", b"z"], delay=1.5))
    started = time.monotonic()
    message = error_of(loader_for(server, fetch_timeout=2.0), f"{server.url}/stall")
    assert "MOLMO_FETCH_TIMEOUT=2.0" in message
    assert time.monotonic() - started < 2.8


def test_server_silent_before_headers(server):
    server.route("/sleepy", Reply(200, PNG, delay=5))
    started = time.monotonic()
    message = error_of(loader_for(server, fetch_timeout=0.5), f"{server.url}/sleepy")
    assert "MOLMO_FETCH_TIMEOUT" in message
    assert time.monotonic() - started < 3.0  # without the deadline: 5 s


def test_connection_refused(server):
    server.close()
    assert "Connection refused" in error_of(loader_for(server), f"{server.url}/a.png")


# -- redirects, schemes, hosts -------------------------------------------------------------


def test_redirect_followed_within_allowed_host(server):
    server.route("/old", Reply(302, headers={"Location": "/new.png"}))
    server.route("/new.png", Reply(200, PNG))
    assert loader_for(server).load(f"{server.url}/old").width == 60


def test_redirect_loop(server):
    server.route("/loop", Reply(302, headers={"Location": "/loop"}))
    assert "more than 5 redirects" in error_of(loader_for(server), f"{server.url}/loop")
    assert len(server.hits("/loop")) == 6


def test_redirect_to_disallowed_host(server, other_host):
    other_host.route("/x.png", Reply(200, PNG))
    server.route("/go", Reply(302, headers={"Location": f"{other_host.url}/x.png"}))
    assert "'127.0.0.2' is not allowed" in error_of(loader_for(server), f"{server.url}/go")
    assert other_host.requests == []


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x.png"])
def test_redirect_to_disallowed_scheme(server, target):
    server.route("/go", Reply(302, headers={"Location": target}))
    assert "only http and https" in error_of(loader_for(server), f"{server.url}/go")


@pytest.mark.parametrize("value", ["file:///etc/passwd", "ftp://127.0.0.1/x.png", "gopher://127.0.0.1/x"])
def test_disallowed_schemes(value):
    message = error_of(ImageLoader(settings(allowed_hosts=("*",))), value)
    assert "only over http or https" in message


def test_host_not_in_allow_list(server):
    server.route("/a.png", Reply(200, PNG))
    message = error_of(ImageLoader(settings()), f"{server.url}/a.png")
    assert "'127.0.0.1' is not allowed" in message and "MOLMO_ALLOWED_HOSTS" in message
    assert server.requests == []


def test_star_and_host_port_entries_allow(server):
    server.route("/a.png", Reply(200, PNG))
    for allowed in [("*", "127.0.0.1"), (f"127.0.0.1:{server.port}",), ("127.0.0.0/8",)]:
        assert ImageLoader(settings(allowed_hosts=allowed)).load(f"{server.url}/a.png").width == 60
    # '*' alone is any *public* address: loopback needs an entry of its own
    assert "127.0.0.1 is a loopback address" in error_of(
        ImageLoader(settings(allowed_hosts=("*",))), f"{server.url}/a.png"
    )
    assert len(server.hits("/a.png")) == 3  # the refused one never connected
    assert "not allowed" in error_of(
        ImageLoader(settings(allowed_hosts=("127.0.0.1:1",))), f"{server.url}/a.png"
    )


@pytest.mark.parametrize("value", ["", "   ", "images/cat.png", "C:\\images\\cat.png"])
def test_unsupported_references(value):
    with pytest.raises(ImageLoadError):
        ImageLoader(settings(allowed_hosts=("*",))).load(value)


@pytest.mark.parametrize("value", ["http://[::1/a.png", "https://[not-an-ip]/a.png"])
def test_a_reference_that_is_no_url_is_that_task_s_bad_reference(value):
    with pytest.raises(BadReference, match="not a valid URL"):
        ImageLoader(settings(allowed_hosts=("*",))).load(value)


def test_data_uri():
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert ImageLoader(settings()).load(uri).height == 40
    assert "base64" in error_of(ImageLoader(settings()), "data:image/png;base64,@@@@")
    assert "data:image" in error_of(ImageLoader(settings()), "data:text/html,<b>hi</b>")
    assert "MOLMO_MAX_IMAGE_BYTES" in error_of(ImageLoader(settings(max_image_bytes=100)), uri)


# -- Label Studio: legacy tokens -------------------------------------------------------------


def test_upload_with_legacy_token_from_setup(ls):
    # /setup's hostname alone opens no loopback/private address: the operator lists LS's
    loader = ImageLoader(settings(allowed_hosts=("127.0.0.1",)))
    loader.configure_label_studio(ls.url, LEGACY)
    assert loader.load("/data/upload/1/img.png").width == 60
    assert ls.hits("/data/upload/1/img.png")[0].headers["authorization"] == f"Token {LEGACY}"


def test_setup_hostname_alone_opens_no_private_address(ls):
    """Without LABEL_STUDIO_URL, /setup's hostname is Label Studio: reached only at a public
    address or one MOLMO_ALLOWED_HOSTS lists (anyone may call /setup when basic auth is off)."""
    loader = ImageLoader(settings())
    loader.configure_label_studio(ls.url, LEGACY)
    message = error_of(loader, "/data/upload/1/img.png")
    assert "127.0.0.1 is a loopback address" in message and "set LABEL_STUDIO_URL" in message
    assert ls.requests == []


def test_upload_with_legacy_token_from_settings(ls):
    loader = ImageLoader(settings(label_studio_url=ls.url, label_studio_api_key=LEGACY))
    loader.configure_label_studio("http://wrong-host.invalid:8080", "setup-token-ignored")
    assert loader.load("/data/upload/1/img.png").width == 60  # settings win over /setup
    assert ls.hits("/data/upload/1/img.png")[0].headers["authorization"] == f"Token {LEGACY}"


def test_ls_path_without_ls_url():
    assert "LABEL_STUDIO_URL" in error_of(ImageLoader(settings()), "/data/upload/1/img.png")


def test_wrong_legacy_token_says_why_without_leaking_it(ls):
    loader = ImageLoader(settings(label_studio_url=ls.url, label_studio_api_key="f" * 40))
    message = error_of(loader, "/data/upload/1/img.png")
    assert "HTTP 401" in message and "LABEL_STUDIO_API_KEY" in message
    assert "f" * 40 not in message
    assert len(ls.hits("/data/upload/1/img.png")) == 1  # a legacy key is not retried


def test_login_redirect_is_explained(ls):
    ls.route("/data/upload/2/x.png", Reply(302, headers={"Location": "/user/login/?next=/x"}))
    loader = ImageLoader(settings(label_studio_url=ls.url))
    assert "wants a login" in error_of(loader, "/data/upload/2/x.png")


def test_absolute_ls_url_gets_auth_other_origins_do_not(ls, server):
    server.route("/a.png", Reply(200, PNG))
    loader = ImageLoader(settings(label_studio_url=ls.url, label_studio_api_key=LEGACY))
    assert loader.load(f"{ls.url}/data/upload/1/img.png").width == 60
    assert ls.hits("/data/upload/1/img.png")[0].headers["authorization"] == f"Token {LEGACY}"
    # same host name (127.0.0.1, so allowed) but another port: another origin, no credentials
    assert loader.load(f"{server.url}/a.png").width == 60
    assert "authorization" not in server.hits("/a.png")[0].headers


def test_urls_on_setup_hostname_go_to_label_studio_url(ls):
    # in Docker, /setup's hostname (what browsers use) is often unreachable from the backend
    loader = ImageLoader(settings(label_studio_url=ls.url, label_studio_api_key=LEGACY))
    loader.configure_label_studio("http://ls-public.invalid:8080", None)
    assert loader.load("http://ls-public.invalid:8080/data/upload/1/img.png").width == 60
    assert len(ls.hits("/data/upload/1/img.png")) == 1


def test_label_studio_under_a_sub_path(ls):
    ls.serve_file("/ls/data/upload/1/img.png", PNG)
    loader = ImageLoader(settings(label_studio_url=ls.url + "/ls/", label_studio_api_key=LEGACY))
    assert loader.load("/data/upload/1/img.png").width == 60
    assert loader.load("/ls/data/upload/1/img.png").width == 60
    assert len(ls.hits("/ls/data/upload/1/img.png")) == 2


# -- Label Studio: personal access tokens ---------------------------------------------------


@pytest.fixture
def pat_ls():
    srv = FakeLabelStudio()
    srv.serve_file("/data/upload/1/img.png", PNG)
    yield srv
    srv.close()


def test_pat_is_exchanged_once_and_cached(pat_ls):
    loader = ImageLoader(settings(label_studio_url=pat_ls.url, label_studio_api_key=pat_ls.pat))
    for _ in range(3):
        assert loader.load("/data/upload/1/img.png").width == 60
    assert pat_ls.exchanges == 1
    sent = pat_ls.hits("/data/upload/1/img.png")[0].headers["authorization"]
    assert sent.startswith("Bearer ") and sent != f"Bearer {pat_ls.pat}"
    assert pat_ls.hits("/api/token/refresh/")[0].method == "POST"


def test_pat_from_setup_token(pat_ls):
    loader = ImageLoader(settings(allowed_hosts=("127.0.0.1",)))
    loader.configure_label_studio(pat_ls.url, pat_ls.pat)
    assert loader.load("/data/upload/1/img.png").width == 60
    assert pat_ls.exchanges == 1


def test_pat_re_exchanged_before_expiry(pat_ls, monkeypatch):
    loader = ImageLoader(settings(label_studio_url=pat_ls.url, label_studio_api_key=pat_ls.pat))
    loader.load("/data/upload/1/img.png")
    monkeypatch.setattr(labelstudio_auth, "_now", lambda: time.time() + 260)  # 40 s left: still fine
    loader.load("/data/upload/1/img.png")
    assert pat_ls.exchanges == 1
    monkeypatch.setattr(labelstudio_auth, "_now", lambda: time.time() + 290)  # inside the 30 s margin
    loader.load("/data/upload/1/img.png")
    assert pat_ls.exchanges == 2


def test_pat_re_exchanged_after_401(pat_ls):
    loader = ImageLoader(settings(label_studio_url=pat_ls.url, label_studio_api_key=pat_ls.pat))
    loader.load("/data/upload/1/img.png")
    pat_ls.revoke_access_tokens()  # LS's clock says the cached token expired
    assert loader.load("/data/upload/1/img.png").width == 60
    assert pat_ls.exchanges == 2
    statuses = [r.headers["authorization"] for r in pat_ls.hits("/data/upload/1/img.png")]
    assert len(statuses) == 3 and statuses[1] != statuses[2]


def test_persistent_401_is_retried_only_once(pat_ls):
    pat_ls.route("/data/upload/9/x.png", Reply(401, b"no"))
    loader = ImageLoader(settings(label_studio_url=pat_ls.url, label_studio_api_key=pat_ls.pat))
    assert "HTTP 401" in error_of(loader, "/data/upload/9/x.png")
    assert len(pat_ls.hits("/data/upload/9/x.png")) == 2


def test_revoked_pat_says_why_without_leaking_it(pat_ls):
    bad = make_jwt({"token_type": "refresh", "exp": 4_000_000_000, "jti": "other"})
    loader = ImageLoader(settings(label_studio_url=pat_ls.url, label_studio_api_key=bad))
    message = error_of(loader, "/data/upload/1/img.png")
    assert "refused the personal access token" in message and "HTTP 401" in message
    assert bad not in message and bad.split(".")[1] not in message


def test_concurrent_loads_share_one_exchange():
    ls = FakeLabelStudio(exchange_delay=0.2)
    ls.serve_file("/data/upload/1/img.png", PNG)
    try:
        loader = ImageLoader(settings(label_studio_url=ls.url, label_studio_api_key=ls.pat))
        results, errors = [], []

        def work():
            try:
                results.append(loader.load("/data/upload/1/img.png").width)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and results == [60] * 12
        assert ls.exchanges == 1
    finally:
        ls.close()


def test_auth_kinds():
    session = None  # header() of these kinds never touches the network
    assert LabelStudioAuth("http://ls", None, session).header() == {}
    assert LabelStudioAuth("http://ls", "abc", session).header() == {"Authorization": "Token abc"}
    access = make_jwt({"token_type": "access", "exp": 4_000_000_000})
    assert LabelStudioAuth("http://ls", access, session).header() == {"Authorization": f"Bearer {access}"}
    assert LabelStudioAuth("http://ls", make_jwt({"token_type": "refresh"}), session).can_refresh


def test_setup_repeated_keeps_cached_access_token(pat_ls):
    loader = ImageLoader(settings(allowed_hosts=("127.0.0.1",)))
    for _ in range(3):  # LS calls /setup before every retrieve
        loader.configure_label_studio(pat_ls.url + "/", pat_ls.pat)
        loader.load("/data/upload/1/img.png")
    assert pat_ls.exchanges == 1


# -- cloud storage via LS's presign endpoint ------------------------------------------------


def test_cloud_uri_signed_by_label_studio(ls, other_host, guarded):
    """LS's redirect to the signed URL may name any host; its address is still checked. The
    bucket (bucket.test at 127.0.0.2) stands for a storage on a private network, opened by
    its IP entry."""
    guarded.add("bucket.test", ["127.0.0.2"])
    other_host.route("/bucket/cat.png", Reply(200, PNG))
    bucket = f"http://bucket.test:{other_host.port}"

    def presign(request):
        if request.headers.get("authorization") != f"Token {LEGACY}":
            return Reply(401)
        uri = base64.urlsafe_b64decode(request.query["fileuri"][0]).decode()
        return Reply(
            303, headers={"Location": f"{bucket}/bucket/{uri.rsplit('/', 1)[1]}?X-Amz-Signature=SECRET"}
        )

    ls.route("/tasks/7/presign/", presign)
    loader = ImageLoader(
        settings(label_studio_url=ls.url, label_studio_api_key=LEGACY, allowed_hosts=("127.0.0.2",))
    )
    assert loader.load("s3://my-bucket/dir/cat.png", task_id=7).width == 60
    signed = other_host.hits("/bucket/cat.png")
    assert len(signed) == 1 and "authorization" not in signed[0].headers
    assert signed[0].query["X-Amz-Signature"] == ["SECRET"]
    assert signed[0].headers["host"] == f"bucket.test:{other_host.port}"
    # only LS's own redirects reach host names off the allow-list; a direct fetch does not
    assert "not allowed" in error_of(loader, f"{bucket}/bucket/cat.png")
    # nor does LS's redirect open an address the operator did not list
    unlisted = ImageLoader(settings(label_studio_url=ls.url, label_studio_api_key=LEGACY))
    message = error_of(unlisted, "s3://my-bucket/dir/cat.png", 7)
    assert "bucket.test resolves to 127.0.0.2, a loopback address" in message
    assert len(other_host.hits("/bucket/cat.png")) == 1


def test_cloud_uri_needs_task_id_and_ls(ls):
    loader = ImageLoader(settings(label_studio_url=ls.url, label_studio_api_key=LEGACY))
    assert "task id" in error_of(loader, "gs://bucket/x.png")
    assert "LABEL_STUDIO_URL" in error_of(ImageLoader(settings()), "azure-blob://c/x.png", 3)


# -- local files ----------------------------------------------------------------------------


def test_local_files_read_from_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub dir").mkdir(parents=True)
    (root / "sub dir" / "img.png").write_bytes(PNG)
    loader = ImageLoader(settings(local_files_root=root))
    assert loader.load("/data/local-files/?d=sub%20dir/img.png").width == 60
    assert loader.load("/data/local-files/?d=/sub%20dir/./img.png").width == 60
    assert "not found" in error_of(loader, "/data/local-files/?d=sub%20dir/none.png")
    assert "?d=" in error_of(loader, "/data/local-files/")


def test_local_files_escape_attempts(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(PNG)
    (root / "link.png").symlink_to(secret)
    (root / "linkdir").symlink_to(tmp_path)
    loader = ImageLoader(settings(local_files_root=root))
    for d in ["../secret.png", "link.png", "linkdir/secret.png", "sub/../../secret.png"]:
        assert "outside LOCAL_FILES_DOCUMENT_ROOT" in error_of(loader, f"/data/local-files/?d={d}")


def test_local_files_symlink_inside_root_is_fine(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    assert ImageLoader(settings(local_files_root=tmp_path)).load("/data/local-files/?d=b.png").width == 60


def test_local_files_size_cap(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    loader = ImageLoader(settings(local_files_root=tmp_path, max_image_bytes=100))
    assert "MOLMO_MAX_IMAGE_BYTES" in error_of(loader, "/data/local-files/?d=a.png")


def test_local_files_without_root_come_from_ls(ls):
    ls.serve_file("/data/local-files/", PNG)
    loader = ImageLoader(settings(label_studio_url=ls.url, label_studio_api_key=LEGACY))
    assert loader.load("/data/local-files/?d=sub/img.png").width == 60
    hit = ls.hits("/data/local-files/")[0]
    assert hit.query == {"d": ["sub/img.png"]} and hit.headers["authorization"] == f"Token {LEGACY}"


# -- decoding -------------------------------------------------------------------------------

# EXIF orientation n says how the stored pixels must be turned to be displayed upright.
# Build each stored image from the displayed one with the inverse turn (Pillow's ROTATE_90 is
# counter-clockwise): 6 means "rotate 90 degrees clockwise to display", so store it 90 CCW.
STORED_FROM_DISPLAYED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,  # mirrored
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,  # mirrored along the main diagonal
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,  # mirrored along the other diagonal
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation):
    displayed = quadrants(60, 40)
    op = STORED_FROM_DISPLAYED[orientation]
    stored = displayed.transpose(op) if op is not None else displayed
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    loaded = decode_image(data, 10**8)
    assert (loaded.width, loaded.height) == (60, 40)
    assert loaded.image.size == (60, 40)
    for got, want in zip(quadrant_colors(loaded.image), [RED, GREEN, BLUE, WHITE], strict=True):
        assert close(got, want), (orientation, quadrant_colors(loaded.image))


def test_modes_are_converted_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red in ink
    gray16 = Image.new("I;16", (8, 8), 40000)
    one = Image.new("1", (8, 8), 1)
    for img, fmt, want in [
        (cmyk, "JPEG", RED),
        (gray16, "PNG", (156, 156, 156)),
        (one, "PNG", WHITE),
        (Image.new("L", (8, 8), 77), "PNG", (77,) * 3),
    ]:
        loaded = decode_image(encode(img, fmt), 10**8).image
        assert loaded.mode == "RGB"
        assert close(loaded.getpixel((4, 4)), want, tol=3), (img.mode, loaded.getpixel((4, 4)))


def test_transparency_is_shown_over_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 255, 255))
    la = Image.new("LA", (8, 8), (0, 0))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0])
    palette.putpixel((1, 1), 1)
    for img, opaque in [(rgba, BLUE), (la, None), (palette, GREEN)]:
        params = {"transparency": 0} if img.mode == "P" else {}
        loaded = decode_image(encode(img, "PNG", **params), 10**8).image
        assert loaded.mode == "RGB"
        assert loaded.getpixel((5, 5)) == WHITE, img.mode
        if opaque:
            assert loaded.getpixel((1, 1)) == opaque, img.mode


def test_palette_without_transparency():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 20, 30])
    assert decode_image(encode(img, "PNG"), 10**8).image.getpixel((0, 0)) == (10, 20, 30)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (10, 10), c) for c in (RED, BLUE, GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    loaded = decode_image(data, 10**8)
    assert loaded.image.mode == "RGB" and loaded.image.getpixel((5, 5)) == RED


def test_webp():
    loaded = decode_image(encode(quadrants(), "WEBP", lossless=True), 10**8)
    assert quadrant_colors(loaded.image) == [RED, GREEN, BLUE, WHITE]


def test_pixel_cap():
    message = str(pytest.raises(ImageLoadError, decode_image, PNG, 2000).value)
    assert "60x40" in message and "MOLMO_MAX_IMAGE_PIXELS=2000" in message
    assert decode_image(PNG, 2400).width == 60


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: Pillow's own bomb guard must stop it at open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_header():
    message = str(
        pytest.raises(ImageLoadError, decode_image, png_header_claiming(60000, 60000), 10**12).value
    )
    assert "decompression bomb" in message


def test_loader_applies_pixel_cap(server):
    server.route("/a.png", Reply(200, PNG))
    assert "MOLMO_MAX_IMAGE_PIXELS" in error_of(
        loader_for(server, max_image_pixels=1000), f"{server.url}/a.png"
    )


def test_formats_outside_the_list_are_refused():
    # EPS would hand the data to Ghostscript; browsers cannot show it either
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    assert "not an image in a supported format" in str(
        pytest.raises(ImageLoadError, decode_image, eps, 10**8).value
    )


def test_image_errors_are_molmo_errors_named_for_metrics():
    kinds = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, ImageLoadError)]
    assert len(kinds) == 10 and all(issubclass(c, MolmoError) for c in kinds)
    assert {c.reason for c in kinds} <= set(FETCH_FAILURES)
