"""
Tests for txbalancer.routing: host and path matching, order, strip_prefix.
"""

from __future__ import annotations

import pytest

from txbalancer.routing import RouteTable, checkHost, checkPath, normalizeHost
from txbalancer.settings import RouteConfig

# The seed's table, plus a wildcard and an exact host.
TABLE = RouteTable([
    RouteConfig(pool="api", path="/api/", stripPrefix=True),
    RouteConfig(pool="admin", host="admin.example.com", path="/admin/"),
    RouteConfig(pool="tenants", host="*.tenants.example.com"),
    RouteConfig(pool="v6", host="[::1]", path="/v6"),
    RouteConfig(pool="exact", host="Shop.Example.COM"),
    RouteConfig(pool="web"),
])

# (host, target) -> (pool, target the backend sees)
CASES = [
    # path prefixes match at a segment boundary
    (b"x.test", b"/api", "api", b"/"),
    (b"x.test", b"/api/", "api", b"/"),
    (b"x.test", b"/api/x", "api", b"/x"),
    (b"x.test", b"/api/x/y?q=1&r=%2F", "api", b"/x/y?q=1&r=%2F"),
    (b"x.test", b"/api?q=1", "api", b"/?q=1"),
    (b"x.test", b"/api/?q", "api", b"/?q"),
    (b"x.test", b"/apix", "web", b"/apix"),
    (b"x.test", b"/API/x", "web", b"/API/x"),
    (b"x.test", b"/", "web", b"/"),
    (b"x.test", b"*", "web", b"*"),
    # hosts: exact, case-insensitive, port ignored, trailing dot ignored
    (b"admin.example.com", b"/admin/users", "admin", b"/admin/users"),
    (b"ADMIN.Example.com:8443", b"/admin", "admin", b"/admin"),
    (b"admin.example.com.", b"/admin/", "admin", b"/admin/"),
    (b"admin.example.com", b"/other", "web", b"/other"),
    (b"www.example.com", b"/admin/", "web", b"/admin/"),
    (b"shop.example.com", b"/anything", "exact", b"/anything"),
    (b"shop.example.com:80", b"/", "exact", b"/"),
    # the first match wins: /api/ goes to api whatever the host
    (b"admin.example.com", b"/api/x", "api", b"/x"),
    # wildcards: one label or more below the name, not the name itself
    (b"a.tenants.example.com", b"/", "tenants", b"/"),
    (b"a.b.tenants.example.com:81", b"/", "tenants", b"/"),
    (b"tenants.example.com", b"/", "web", b"/"),
    (b"atenants.example.com", b"/", "web", b"/"),
    # IPv6 literals, with and without a port, in any spelling
    (b"[::1]", b"/v6/x", "v6", b"/v6/x"),
    (b"[::1]:8000", b"/v6", "v6", b"/v6"),
    (b"[0:0::1]:8000", b"/v6", "v6", b"/v6"),
    (b"[::2]:8000", b"/v6", "web", b"/v6"),
    # no Host at all (HTTP/1.0): only routes without a host match
    (None, b"/admin/", "web", b"/admin/"),
    (None, b"/api/x", "api", b"/x"),
]


@pytest.mark.parametrize("host,target,pool,sent", CASES)
def test_match(host, target, pool, sent):
    """Each request goes to the first route whose host and path match, with the prefix stripped when asked."""
    assert TABLE.match(host, target) == (pool, sent)


NO_DEFAULT = RouteTable([
    RouteConfig(pool="api", path="/api"),
    RouteConfig(pool="admin", host="admin.example.com"),
])


@pytest.mark.parametrize("host,target", [
    (b"x.test", b"/"),
    (b"x.test", b"/apix"),
    (b"x.test", b"/ap"),
    (b"admin.example.com.evil.test", b"/"),
    (None, b"/"),
])
def test_no_match(host, target):
    """Without a default route, a request that matches nothing gets no route."""
    assert NO_DEFAULT.match(host, target) is None


def test_unchanged_target_is_the_same_object():
    """Without strip_prefix the target is passed on as it is, not copied."""
    target = b"/api/x?y"
    assert NO_DEFAULT.match(b"x", target)[1] is target


def test_root_path_matches_every_path():
    """A route with path "/" matches every path, and stripping it changes nothing."""
    table = RouteTable([RouteConfig(pool="p", path="/", stripPrefix=True)])
    assert table.match(b"x", b"/a/b?c") == ("p", b"/a/b?c")
    assert table.match(b"x", b"/") == ("p", b"/")


def test_values():
    """A match returns the value given for its route (the balancer's forwarder)."""
    table = RouteTable([RouteConfig(pool="a", path="/a"), RouteConfig(pool="b")], ["A", "B"])
    assert table.match(b"x", b"/a/1") == ("A", b"/a/1")
    assert table.match(b"x", b"/b") == ("B", b"/b")


@pytest.mark.parametrize("host,normal", [
    ("Admin.Example.COM", "admin.example.com"),
    ("*.Example.com", "*.example.com"),
    ("example.com.", "example.com"),
    ("[::1]", "::1"),
    ("0::1", "::1"),
    ("127.0.0.1", "127.0.0.1"),
])
def test_check_host(host, normal):
    """Route hosts are normalised once, when the table is compiled."""
    assert checkHost(host) == normal


@pytest.mark.parametrize("host", ["", "a.*.com", "*", "**.a.com", "a.com:80", "a b.com",
                                  "-a.com", "[::1]:80", "*example.com"])
def test_bad_host(host):
    """A host pattern that is not a name, a *.wildcard or an IP address is refused."""
    with pytest.raises(ValueError):
        checkHost(host)


@pytest.mark.parametrize("path,normal", [("/api/", "/api"), ("/api", "/api"), ("/", ""),
                                         ("/a/b//", "/a/b")])
def test_check_path(path, normal):
    """Path prefixes lose their trailing slash: /api/ and /api are the same prefix."""
    assert checkPath(path) == normal


@pytest.mark.parametrize("path", ["", "api", "/a?b", "/a#b", "/a b", "/\u00e9"])
def test_bad_path(path):
    """A path prefix must start with / and hold no query, fragment, space or non-ASCII."""
    with pytest.raises(ValueError):
        checkPath(path)


@pytest.mark.parametrize("host,normal", [
    (b"Example.COM:8080", "example.com"),
    (b"[::1]:80", "::1"),
    (b"[::1", "[::1"),
    (b"::1", "::1"),
    (b"", ""),
    (None, ""),
    (b"a.test.", "a.test"),
])
def test_normalize_request_host(host, normal):
    """A request's host is compared in lower case without port, brackets or trailing dot."""
    assert normalizeHost(host) == normal
