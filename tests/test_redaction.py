"""URLs and errors for messages (molmo_backend/redaction.py): secrets never shown, the reason kept."""

from __future__ import annotations

import socket

import requests
import urllib3.exceptions

from molmo_backend.redaction import describe_url, error_reason


def test_credentials_query_and_fragment_are_dropped():
    assert describe_url("https://user:secret@ls.example:8080/data/upload/1/a.png?X-Amz-Signature=s#f") == (
        "https://ls.example:8080/data/upload/1/a.png"
    )
    assert describe_url("http://key@vllm:8000/v1") == "http://vllm:8000/v1"


def test_a_local_files_path_keeps_its_query():
    assert describe_url("http://ls:8080/data/local-files/?d=images/cat.png") == (
        "http://ls:8080/data/local-files/?d=images/cat.png"
    )
    assert describe_url("http://ls/data/upload/a.png?d=x") == "http://ls/data/upload/a.png"
    # Label Studio also writes the path without the slash before the query
    assert describe_url("http://ls/data/local-files?d=images/cat.png") == (
        "http://ls/data/local-files?d=images/cat.png"
    )
    assert describe_url("http://ls/data/local-filesX?d=secret") == "http://ls/data/local-filesX"


def test_odd_urls_are_described_without_failing():
    assert describe_url("data:image/png;base64,AAAA") == "a data: URI"
    assert describe_url("http://[::1/a.png") == "<unparseable url>"
    assert describe_url("http://host:99999/a.png") == "http://host/a.png"  # the port is out of range
    long = describe_url("http://host/" + "a" * 300)
    assert len(long) == 200 and long.endswith("...")


def raised(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` raised while handling ``inner``, as requests raises its errors."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit chain (__context__) is what requests leaves
    except BaseException as exc:
        return exc


def test_the_reason_is_the_root_cause_without_the_url():
    refused = raised(
        requests.ConnectionError("http://user:secret@host/ failed"),
        ConnectionRefusedError(111, "Connection refused"),
    )
    assert error_reason(refused) == "Connection refused"
    dns = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    retries = raised(urllib3.exceptions.MaxRetryError(None, "/", dns), dns)
    assert error_reason(raised(requests.ConnectionError("secret"), retries)) == "Name or service not known"


def test_a_known_phrase_else_the_type_name():
    assert error_reason(requests.ConnectTimeout("Connection to host timed out. (connect timeout=1)")) == (
        "timed out"
    )
    assert error_reason(requests.ConnectionError("RemoteDisconnected('Remote end closed')")) == (
        "RemoteDisconnected"
    )
    assert error_reason(requests.TooManyRedirects("http://user:secret@host/")) == "TooManyRedirects"
