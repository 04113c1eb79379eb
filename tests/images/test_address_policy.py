"""The address policy alone (molmo_backend/images/address_policy.py): entries, ranges, decisions.

Pure logic: nothing here touches a socket. The same decisions through the real server, with the
addresses connected to recorded, are in tests/images/test_fetch_security.py.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from molmo_backend.errors import BadInput
from molmo_backend.images.address_policy import AddressPolicy, PolicyError, classify, parse_entry, parse_ip
from molmo_backend.settings import Settings, SettingsError

CATEGORIES = {
    "loopback": ["127.0.0.1", "127.255.255.254", "::1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"],
    "private": [
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "fc00::1",
        "fd12:3456::1",
        "fec0::1",
        "::ffff:10.1.2.3",
        "::ffff:192.168.0.1",
        "64:ff9b:1::1",
    ],
    "link-local": [
        "169.254.169.254",
        "169.254.0.1",
        "fe80::1",
        "fe80::1%eth0",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "febf::1",
    ],
    "CGNAT": ["100.64.0.1", "100.127.255.254", "::ffff:100.64.0.1"],
    "multicast": ["224.0.0.1", "239.255.255.250", "ff02::1", "ff05::1:3"],
    "unspecified": ["0.0.0.0", "::", "::ffff:0.0.0.0"],
    "reserved": [
        "0.1.2.3",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",
        "198.51.100.1",
        "203.0.113.5",
        "198.18.0.1",
        "192.0.0.1",
        "192.88.99.1",
        "2001:db8::1",
        "100::1",
        "2002:7f00:1::1",
        "2001::1",
        "::127.0.0.1",
        "3fff::1",
        "5f00::1",
        "1::1",
    ],
    None: [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "100.63.255.255",
        "100.128.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "169.253.255.255",
        "11.0.0.1",
        "2606:4700::1111",
        "2a00:1450::1",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
    ],
}


@pytest.mark.parametrize(
    "category, address",
    [(c, a) for c, addrs in CATEGORIES.items() for a in addrs],
    ids=[f"{c}-{a}" for c, addrs in CATEGORIES.items() for a in addrs],
)
def test_classify(category, address):
    assert classify(address.split("%")[0] if "%" in address else address) == category
    if "%" not in address:
        assert classify(ipaddress.ip_address(address)) == category


@pytest.mark.parametrize(
    "text, want",
    [
        ("10.0.0.1", "10.0.0.1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("[::ffff:7f00:1]", "127.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%25eth0", "fe80::1"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254"),
        # spellings the C library reads as 127.0.0.1 are names here (and then resolved as such)
        ("127.1", None),
        ("2130706433", None),
        ("0x7f000001", None),
        ("0177.0.0.1", None),
        ("0x7f.0.0.1", None),
        ("127.0.0.1.", None),
        ("localhost", None),
        ("1.2.3.4.5", None),
        ("", None),
    ],
)
def test_parse_ip(text, want):
    got = parse_ip(text)
    assert (str(got) if got is not None else None) == want


@pytest.mark.parametrize(
    "text, name, network, port",
    [
        ("images.example.com", "images.example.com", None, None),
        ("Images.Example.COM.", "images.example.com", None, None),
        ("minio:9000", "minio", None, 9000),
        ("label_studio", "label_studio", None, None),
        ("10.0.0.5", None, "10.0.0.5/32", None),
        ("10.0.0.5:8080", None, "10.0.0.5/32", 8080),
        ("[::1]", None, "::1/128", None),
        ("[::1]:8080", None, "::1/128", 8080),
        ("::1", None, "::1/128", None),
        ("::ffff:127.0.0.1", None, "127.0.0.1/32", None),
        ("10.0.0.0/8", None, "10.0.0.0/8", None),
        ("10.1.2.3/8", None, "10.0.0.0/8", None),
        ("fd00::/8", None, "fd00::/8", None),
        ("::ffff:10.0.0.0/104", None, "10.0.0.0/8", None),
    ],
)
def test_entries(text, name, network, port):
    entry = parse_entry(text)
    assert (entry.name, str(entry.network) if entry.network else None, entry.port) == (name, network, port)


@pytest.mark.parametrize(
    "text, why",
    [
        ("10.0.0.0/33", "not a CIDR"),
        ("host:abc", "invalid port"),
        ("host:0", "invalid port"),
        ("host:70000", "invalid port"),
        ("*.example.com", "wildcards"),
        ("127.1", "four decimal"),
        ("2130706433", "four decimal"),
        ("0x7f000001", "four decimal"),
        ("[::1", "without ']'"),
        ("[::1]x", "':port'"),
        ("a b", "not a host name"),
        ("http://x", "without a scheme"),
        ("::1::2", "not an IPv6"),
        ("exa$mple", "not a host name"),
    ],
)
def test_bad_entries_are_refused_with_the_reason(text, why):
    with pytest.raises(PolicyError) as info:
        parse_entry(text)
    assert why in str(info.value) and repr(text) in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, BadInput)


def test_bad_entry_stops_the_start_naming_the_variable():
    with pytest.raises(SettingsError, match="MOLMO_ALLOWED_HOSTS.*10.0.0.0/33"):
        Settings.from_env({"MOLMO_ALLOWED_HOSTS": "images.example.com,10.0.0.0/33"})
    assert Settings.from_env({"MOLMO_ALLOWED_HOSTS": "*, 10.0.0.0/8 ,minio:9000"}).allowed_hosts == (
        "*",
        "10.0.0.0/8",
        "minio:9000",
    )


DECISIONS = [
    # entries, host (the URL's), port, address connected to, allowed
    (["*"], "images.test", 80, "8.8.8.8", True),
    (["*"], "images.test", 80, "10.0.0.5", False),
    (["*"], "images.test", 80, "169.254.169.254", False),
    (["*"], "10.0.0.5", 80, "10.0.0.5", False),
    (["*"], "images.test", 80, "::ffff:10.0.0.5", False),
    (["*"], "images.test", 80, "2606:4700::1111", True),
    (["*", "10.0.0.0/8"], "x.test", 80, "10.0.0.5", True),
    (["*", "10.0.0.0/8"], "x.test", 80, "::ffff:10.0.0.5", True),
    (["*", "10.0.0.0/8"], "x.test", 80, "169.254.169.254", False),
    (["*", "0.0.0.0/0"], "x.test", 80, "169.254.169.254", True),  # the operator said so
    (["minio"], "minio", 9000, "172.18.0.3", True),
    (["minio"], "MINIO.", 9000, "172.18.0.3", True),
    (["minio"], "minio", 9000, "127.0.0.1", True),
    (["minio"], "minio", 9000, "169.254.169.254", False),  # a name never opens link-local
    (["minio"], "minio", 9000, "fe80::1", False),
    (["minio"], "other", 9000, "172.18.0.3", False),
    (["minio", "169.254.169.254"], "minio", 80, "169.254.169.254", True),
    (["minio:9000"], "minio", 9001, "172.18.0.3", False),
    (["minio:9000"], "minio", 9000, "172.18.0.3", True),
    (["127.0.0.1"], "127.0.0.1", 80, "::ffff:127.0.0.1", True),
    (["127.0.0.1"], "127.0.0.2", 80, "127.0.0.2", False),
    (["[::1]"], "::1", 80, "::1", True),
    (["10.0.0.5:8080"], "10.0.0.5", 8080, "10.0.0.5", True),
    (["10.0.0.5:8080"], "10.0.0.5", 80, "10.0.0.5", False),
    ([], "x.test", 80, "8.8.8.8", True),  # public: the name check decides (name_allowed)
    ([], "x.test", 80, "127.0.0.1", False),
    ([], "x.test", 80, "0.0.0.0", False),
    ([], "x.test", 80, "100.64.0.1", False),
    ([], "x.test", 80, "224.0.0.1", False),
    ([], "x.test", 80, "240.0.0.1", False),
]


@pytest.mark.parametrize(
    "entries, host, port, address, allowed",
    DECISIONS,
    ids=[f"{','.join(d[0]) or 'none'}-{d[1]}:{d[2]}-{d[3]}" for d in DECISIONS],
)
def test_check(entries, host, port, address, allowed):
    verdict = AddressPolicy(entries).check(host, port, address)
    assert verdict.allowed is allowed, verdict.reason
    if not allowed:
        assert verdict.reason.startswith(("a ", "the "))


def test_trusted_label_studio_host_counts_as_a_listed_name():
    policy = AddressPolicy([], trusted=["label-studio"])
    assert policy.name_allowed("label-studio", 8080)
    assert policy.check("label-studio", 8080, "172.18.0.2").allowed
    assert not policy.check("label-studio", 8080, "169.254.169.254").allowed
    ip_policy = AddressPolicy([], trusted=["10.1.2.3"])
    assert ip_policy.check("10.1.2.3", 8080, "10.1.2.3").allowed
    assert not ip_policy.check("10.1.2.4", 8080, "10.1.2.4").allowed


@pytest.mark.parametrize(
    "entries, host, port, allowed",
    [
        ([], "images.test", 80, False),
        (["*"], "anything.test", 80, True),
        (["*"], "10.0.0.5", 80, True),  # passes the name check; its address is refused later
        (["images.test"], "IMAGES.test.", 443, True),
        (["images.test:8443"], "images.test", 443, False),
        (["10.0.0.0/8"], "10.0.0.5", 80, True),
        (["10.0.0.0/8"], "minio.test", 80, False),  # a CIDR holds addresses, not names
        (["127.0.0.1"], "2130706433", 80, False),  # a non-canonical spelling is a name
        (["127.0.0.1"], "::ffff:127.0.0.1", 80, True),
        (["::1"], "[::1]", 80, True),
    ],
)
def test_name_allowed(entries, host, port, allowed):
    assert AddressPolicy(entries).name_allowed(host, port) is allowed


def test_the_policy_module_is_pure():
    code = (
        "import sys, molmo_backend.images.address_policy; "
        "bad = {'requests', 'urllib3', 'torch', 'socket'} & set(sys.modules); "
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
