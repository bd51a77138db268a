"""
Tests for txbalancer.headers: hop-by-hop removal and the X-Forwarded family.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from txbalancer.headers import (
    VIA,
    connectionTokens,
    endToEnd,
    formatForwardedFor,
    forwardedHeaders,
    isTrusted,
)


def as_dict(headers):
    return {n: v for n, v in headers}


def test_connection_tokens_lowercased_and_split() -> None:
    """Connection values are split on commas, trimmed and lower-cased."""
    assert connectionTokens([b"Keep-Alive, X-Foo", b" close ,,"]) == {
        b"keep-alive",
        b"x-foo",
        b"close",
    }


def test_end_to_end_removes_hop_by_hop() -> None:
    """Every hop-by-hop header and Content-Length is removed; the rest stays in order."""
    headers = [
        (b"Accept", b"*/*"),
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Trailer", b"X"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Content-Length", b"3"),
        (b"X-A", b"1"),
    ]
    assert endToEnd(headers) == [(b"Accept", b"*/*"), (b"X-A", b"1")]


def test_end_to_end_removes_connection_named_headers() -> None:
    """Headers named by Connection are removed, whatever their case."""
    headers = [
        (b"Connection", b"X-Secret, close"),
        (b"x-secret", b"1"),
        (b"X-Kept", b"2"),
    ]
    assert endToEnd(headers) == [(b"X-Kept", b"2")]


def test_end_to_end_keeps_repeated_headers_in_order() -> None:
    """Repeated headers stay separate entries in arrival order, names as sent."""
    headers = [(b"Set-Cookie", b"a=1"), (b"X", b"y"), (b"set-cookie", b"b=2")]
    assert endToEnd(headers) == headers


def test_end_to_end_extra_drop() -> None:
    """Names in extraDrop are removed too."""
    assert endToEnd([(b"Via", b"x"), (b"A", b"b")], frozenset([b"via"])) == [
        (b"A", b"b")
    ]


def test_forwarded_for_ipv4_bare_ipv6_quoted() -> None:
    """RFC 7239: IPv4 is bare, IPv6 is quoted in brackets."""
    assert formatForwardedFor("192.0.2.1") == b"for=192.0.2.1"
    assert formatForwardedFor("2001:db8::1") == b'for="[2001:db8::1]"'


def test_untrusted_peer_replaces_chains() -> None:
    """From an untrusted peer, X-Forwarded-For and Forwarded are replaced by the peer alone."""
    incoming = [
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"Forwarded", b"for=6.6.6.6"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"evil"),
    ]
    out = as_dict(forwardedHeaders(incoming, "192.0.2.1", False, b"http", b"ex.com"))
    assert out[b"X-Forwarded-For"] == b"192.0.2.1"
    assert out[b"Forwarded"] == b"for=192.0.2.1;host=ex.com;proto=http"
    assert out[b"X-Forwarded-Proto"] == b"http"
    assert out[b"X-Forwarded-Host"] == b"ex.com"
    assert out[b"Via"] == VIA


def test_trusted_peer_appends() -> None:
    """From a trusted peer, the incoming chains are kept and the peer appended."""
    incoming = [
        (b"X-Forwarded-For", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2"),
        (b"Forwarded", b"for=1.1.1.1"),
        (b"X-Forwarded-Proto", b"https"),
    ]
    out = as_dict(forwardedHeaders(incoming, "10.0.0.5", True, b"http", b"ex.com"))
    assert out[b"X-Forwarded-For"] == b"1.1.1.1, 2.2.2.2, 10.0.0.5"
    assert out[b"Forwarded"] == b"for=1.1.1.1, for=10.0.0.5;host=ex.com;proto=http"
    assert out[b"X-Forwarded-Proto"] == b"https"


def test_forwarded_ipv6_peer_and_quoted_host() -> None:
    """An IPv6 peer is quoted, and a host with a colon is a quoted string."""
    out = as_dict(forwardedHeaders([], "::1", False, b"https", b"ex.com:8443"))
    assert out[b"Forwarded"] == b'for="[::1]";host="ex.com:8443";proto=https'
    assert out[b"X-Forwarded-For"] == b"::1"


def test_via_appended_to_existing() -> None:
    """An existing Via is kept (from anyone) and ours appended."""
    out = as_dict(forwardedHeaders([(b"Via", b"1.0 fred")], "1.2.3.4", False, b"http", None))
    assert out[b"Via"] == b"1.0 fred, " + VIA
    assert b"X-Forwarded-Host" not in out
    assert out[b"Forwarded"] == b"for=1.2.3.4;proto=http"


def test_is_trusted() -> None:
    """Only addresses inside a trusted network are trusted; garbage is not."""
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert isTrusted("10.1.2.3", nets)
    assert isTrusted("::1", nets)
    assert not isTrusted("11.0.0.1", nets)
    assert not isTrusted("not an ip", nets)
    assert not isTrusted("10.1.2.3", [])


_name = st.sampled_from(
    [b"Connection", b"Keep-Alive", b"TE", b"Upgrade", b"X-A", b"X-B", b"Accept", b"Host"]
)
_value = st.sampled_from([b"x-a", b"close", b"1", b"X-B, keep-alive", b""])


@given(st.lists(st.tuples(_name, _value), max_size=12))
def test_end_to_end_property(headers) -> None:
    """endToEnd never returns a hop-by-hop or Connection-named header, and keeps the rest in order."""
    out = endToEnd(headers)
    named = connectionTokens(v for n, v in headers if n.lower() == b"connection")
    for n, _ in out:
        assert n.lower() not in named
        assert n.lower() not in (b"connection", b"keep-alive", b"te", b"upgrade")
    kept = [
        (n, v)
        for n, v in headers
        if n.lower() not in named
        and n.lower() not in (b"connection", b"keep-alive", b"te", b"upgrade")
    ]
    assert out == kept


def test_connection_cannot_remove_end_to_end_fields() -> None:
    """Connection naming Host, framing or other end-to-end fields removes none of them."""
    headers = [
        (b"Host", b"h"),
        (b"Connection", b"Host, content-length, Content-Type, Cookie, X-Hop"),
        (b"Content-Type", b"text/plain"),
        (b"Cookie", b"a=1"),
        (b"X-Hop", b"1"),
    ]
    assert endToEnd(headers) == [
        (b"Host", b"h"),
        (b"Content-Type", b"text/plain"),
        (b"Cookie", b"a=1"),
    ]
