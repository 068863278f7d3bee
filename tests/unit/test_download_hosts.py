"""The download allow-list as data: ``file_hosts`` entries, allowed hosts, addresses, queries."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagecb_provider.hooks.downloads import (
    VENDOR_FILE_HOSTS,
    FileHost,
    address_kind,
    allowed_file_hosts,
    parse_file_hosts,
)
from imagecb_provider.hooks.protocol import without_query


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("files.example.com", FileHost("files.example.com")),
        ("Files.Example.COM.", FileHost("files.example.com")),
        ("https://files.example.com:8443/", FileHost("files.example.com", 8443)),
        ("http://10.0.0.5:8080", FileHost("10.0.0.5", 8080, plain_http=True)),
        ("http://[fd00::7]", FileHost("fd00::7", plain_http=True)),
        ("*.cdn.example.com", FileHost("*.cdn.example.com", vouched=False)),
        ("bücher.example", FileHost("xn--bcher-kva.example")),
    ],
)
def test_file_hosts_entries_are_read(entry, expected):
    assert FileHost.parse(entry) == expected


@pytest.mark.parametrize(
    "entry",
    [
        "ftp://files.example.com",
        "user@files.example.com",
        "files.example.com/path",
        "*",
        "a.*.example.com",
        "files.example.com:http",
        "https://",
        "files.example.com?x=1",
    ],
)
def test_bad_file_hosts_entries_say_why(entry):
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        FileHost.parse(entry)


def test_file_hosts_is_a_list_or_a_comma_separated_string():
    expected = (FileHost("a.example"), FileHost("b.example", plain_http=True))
    assert parse_file_hosts("a.example, http://b.example,") == expected
    assert parse_file_hosts(["a.example", "http://b.example"]) == expected
    assert parse_file_hosts(None) == parse_file_hosts("") == parse_file_hosts([]) == ()
    with pytest.raises(ValueError, match="list of hosts"):
        parse_file_hosts({"a": 1})
    with pytest.raises(ValueError, match="not a string"):
        parse_file_hosts(["a.example", 7])


@pytest.mark.parametrize(
    ("rule", "host", "port", "matches"),
    [
        (FileHost("a.example"), "a.example", 443, True),
        (FileHost("a.example"), "a.example", 8443, True),
        (FileHost("a.example", 443), "a.example", 8443, False),
        (FileHost("a.example"), "b.a.example", 443, False),
        (FileHost("*.a.example"), "b.a.example", 443, True),
        (FileHost("*.a.example"), "c.b.a.example", 443, True),
        (FileHost("*.a.example"), "a.example", 443, False),
        (FileHost("*.a.example"), "evila.example", 443, False),
        (FileHost("*.a.example"), ".a.example", 443, False),
    ],
)
def test_a_rule_matches_its_host_only(rule, host, port, matches):
    assert rule.matches(host, port) is matches


def test_the_vendors_api_brings_the_vendors_file_hosts_and_the_api_host():
    listed = parse_file_hosts("files.example.com")
    hosts = allowed_file_hosts("https://api.kie.ai", listed)
    assert [str(h) for h in hosts] == [
        "https://api.kie.ai",
        "https://tempfile.aiquickdraw.com",
        "https://*.r2.cloudflarestorage.com",
        "https://files.example.com",
    ]
    assert len(VENDOR_FILE_HOSTS) == 2
    # The vendor's hosts are not vouched for: their addresses are checked; the API host's are not.
    assert [h.vouched for h in hosts] == [True, False, False, True]


def test_another_api_host_brings_only_itself_and_http_only_when_it_uses_http():
    assert allowed_file_hosts("http://127.0.0.1:8089") == (FileHost("127.0.0.1", plain_http=True),)
    assert allowed_file_hosts("https://proxy.example:8443/") == (FileHost("proxy.example"),)
    assert allowed_file_hosts("x") == ()  # not a URL: nothing from it


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
        ("169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("::ffff:10.1.2.3", "private"),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::7f00:1", "loopback"),
        ("2002:c0a8:101::", "private"),  # 6to4 of 192.168.1.1
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("ff02::1", "multicast"),
        ("198.18.0.1", "private"),
        ("100.64.0.1", "non-public"),
    ],
)
def test_address_kinds(address, kind):
    assert address_kind(address) == kind


_TOKEN = st.text(alphabet="ABCDEFabcdef0123456789%-_.~", min_size=8, max_size=40)


@given(secret=_TOKEN, path=st.sampled_from(["/x.jpg", "/v/a%20b.png", "/files/t-1/origin.jpg"]))
def test_no_query_survives_in_a_message(secret, path):
    link = f"https://files.example.com{path}?X-Amz-Date=1&X-Amz-Signature={secret}"
    for text in [
        link,
        f"Could not download {link}: timed out",
        f"HTTPSConnectionPool(host='files.example.com', port=443): Max retries exceeded with url: {path}"
        f"?X-Amz-Signature={secret} (Caused by SSLError('x'))",
        f"imagecb API answered 422 on /api/v1/common/download-url: url '{link}' is not ours",
        f"failed ({link}); retrying",
    ]:
        assert secret not in without_query(text)


def test_prose_keeps_its_question_marks():
    assert without_query("Is it done? Not yet (ok?)") == "Is it done? Not yet (ok?)"
