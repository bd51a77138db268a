"""
HTTP/2 requests are held to the HTTP/1.1 listener's rules (issue 14, defect
1): every malformed request is refused on its stream, or with the whole
connection when the h2 library catches it first, and never reaches a
backend.  Two layers do the checking: h2's own inbound validation (a
connection error, GOAWAY PROTOCOL_ERROR) and the balancer's
(L{txbalancer.h2.H2ProxyConnection._buildRequest}, a 400 on the stream);
each case runs with both, and with the balancer's alone.
"""

from __future__ import annotations

import h2.errors
import pytest
from test_h2 import AUTHORITY, H2Client, request

from txbalancer.framing import REASONS
from txbalancer.testing import InMemoryBalancer

PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR


@pytest.fixture
def balancer():
    return InMemoryBalancer(["127.0.0.1:3001"], secure=True)


def with_(name, value):
    """
    The usual request with pseudo-header C{name} set to C{value}.
    """
    return [(n, value if n == name else v) for n, v in request()]


def without(name):
    return [(n, v) for n, v in request() if n != name]


# (id, header block, whether h2 itself rejects it, the balancer's status,
#  the HTTP/1.1 request that says the same, which the listener refuses too)
MALFORMED = [
    # The raw reproductions of the issue.
    ("method with spaces", with_(b":method", b"GET /admin HTTP/1.1"), False, 400, b"GET /admin HTTP/1.1 /public HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("space in :path", with_(b":path", b"/a b"), False, 400,
     b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("tab in :path", with_(b":path", b"/a\tb"), False, 400,
     b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("8-bit bytes in :path, as on HTTP/1.1", with_(b":path", b"/caf\xc3\xa9?q=\xff"), False, 400,
     b"GET /caf\xc3\xa9?q=\xff HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("control char in :path", with_(b":path", b"/a\x01b"), False, 400,
     b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("DEL in :path", with_(b":path", b"/a\x7f"), False, 400,
     b"GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("CRLF in :path", with_(b":path", b"/a\r\nX: y"), True, 400, None),
    ("control char in :authority", with_(b":authority", b"a\x01b"), False, 400,
     b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n"),
    ("space in :authority", with_(b":authority", b"a b"), False, 400, None),
    ("userinfo in :authority", with_(b":authority", b"user@a"), False, 400,
     b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("empty :authority", with_(b":authority", b""), False, 400, None),
    ("name transfer-encoding;", request() + [(b"transfer-encoding;", b"chunked")],
     False, 400, b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding;: chunked\r\n\r\n"),
    ("name x(y", request() + [(b"x(y", b"1")], False, 400,
     b"GET / HTTP/1.1\r\nHost: a\r\nx(y: 1\r\n\r\n"),
    ('name with "', request() + [(b'x"y', b"1")], False, 400,
     b'GET / HTTP/1.1\r\nHost: a\r\nx"y: 1\r\n\r\n'),
    ("name with space", request() + [(b"x y", b"1")], True, 400,
     b"GET / HTTP/1.1\r\nHost: a\r\nx y: 1\r\n\r\n"),
    ("space before the colon", request() + [(b"content-length ", b"0")], True, 400,
     b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length : 0\r\n\r\n"),
    ("empty name", request() + [(b"", b"1")], True, 400,
     b"GET / HTTP/1.1\r\nHost: a\r\n: 1\r\n\r\n"),
    ("uppercase name", request() + [(b"X-Up", b"1")], True, 400, None),
    ("control char in a value", request() + [(b"x", b"a\x01b")], False, 400,
     b"GET / HTTP/1.1\r\nHost: a\r\nx: a\x01b\r\n\r\n"),
    ("DEL in a value", request() + [(b"x", b"a\x7f")], False, 400,
     b"GET / HTTP/1.1\r\nHost: a\r\nx: a\x7f\r\n\r\n"),
    ("NUL in a value", request() + [(b"x", b"a\x00b")], True, 400,
     b"GET / HTTP/1.1\r\nHost: a\r\nx: a\x00b\r\n\r\n"),
    ("CR in a value", request() + [(b"x", b"a\rb")], True, 400, None),
    ("LF in a value", request() + [(b"x", b"a\nb")], True, 400, None),
    ("whitespace around a value", request() + [(b"x", b" a ")], True, 400, None),
    # RFC 9113 8.3: pseudo-header fields.
    (":status in a request", request() + [(b":status", b"200")], True, 400, None),
    ("unknown pseudo-header", [(b":foo", b"1")] + request(), True, 400, None),
    ("repeated :path", request() + [(b":path", b"/x")], True, 400, None),
    ("pseudo-header after a field", request()[:2] + [(b"x", b"1")] + request()[2:],
     True, 400, None),
    ("no :method", without(b":method"), True, 400, None),
    ("no :scheme", without(b":scheme"), True, 400, None),
    ("no :path", without(b":path"), True, 400, None),
    ("no :authority nor Host", without(b":authority"), True, 400,
     b"GET / HTTP/1.1\r\n\r\n"),
    ("empty :path", with_(b":path", b""), True, 400, None),
    (":path without a slash", with_(b":path", b"x"), False, 400,
     b"GET x HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("* for GET", with_(b":path", b"*"), False, 400, b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("absolute-form :path", with_(b":path", b"http://evil.example/x"), False, 400, None),
    ("malformed :scheme", with_(b":scheme", b"ht tp"), False, 400, None),
    (":protocol without CONNECT", request() + [(b":protocol", b"websocket")], True, 400,
     None),
    ("two Host fields", request() + [(b"host", AUTHORITY), (b"host", AUTHORITY)], True,
     400, b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
    ("Host differs from :authority", request() + [(b"host", b"other.example")], True,
     400, None),
    # RFC 9113 8.2.2: connection-specific fields.
    ("connection", request() + [(b"connection", b"close")], True, 400, None),
    ("keep-alive", request() + [(b"keep-alive", b"timeout=5")], True, 400, None),
    ("proxy-connection", request() + [(b"proxy-connection", b"close")], True, 400, None),
    ("transfer-encoding", request() + [(b"transfer-encoding", b"chunked")], True, 400,
     None),
    ("upgrade", request() + [(b"upgrade", b"h2c")], True, 400, None),
    ("TE gzip", request() + [(b"te", b"gzip")], True, 400, None),
    ("TE trailers, gzip", request() + [(b"te", b"trailers, gzip")], True, 400, None),
    # CONNECT, refused as on HTTP/1.1.
    ("CONNECT", [(b":method", b"CONNECT"), (b":authority", b"x.example:443")], False, 501,
     b"CONNECT x.example:443 HTTP/1.1\r\nHost: x.example:443\r\n\r\n"),
    ("CONNECT with :path", [(b":method", b"CONNECT"), (b":scheme", b"https"),
                            (b":authority", b"x:443"), (b":path", b"/x")], True, 501, None),
    ("extended CONNECT", [(b":method", b"CONNECT"), (b":protocol", b"websocket"),
                          (b":scheme", b"https"), (b":authority", AUTHORITY),
                          (b":path", b"/chat")], False, 501, None),
]

IDS = [case[0] for case in MALFORMED]


def refusedOnStream(client, sid, status):
    """
    Assert the stream got C{status} with a reason and ended, and the
    connection goes on serving.
    """
    assert client.status(sid) == status
    _, body, ended = client.response(sid)
    assert ended and body.startswith(REASONS[status] + b": ")
    assert client.goaway() is None
    assert not client.transport.disconnecting


def _h2Version() -> tuple[int, ...]:
    import h2

    return tuple(int(part) for part in h2.__version__.split(".")[:2])


# The table's h2Rejects column is what h2 4.4 and newer catch by itself.
_H2_CHECKS_AS_44 = _h2Version() >= (4, 4)


@pytest.mark.parametrize("name, headers, h2Rejects, status, http11", MALFORMED, ids=IDS)
def test_malformedNeverForwarded(balancer, name, headers, h2Rejects, status, http11):
    """A malformed request gets GOAWAY PROTOCOL_ERROR when h2 catches it and
    an error status on its stream otherwise; no backend is ever contacted."""
    client = H2Client(balancer, lenient=True)
    sid = client.send(headers)
    # Which of these the h2 library catches itself depends on its version
    # (PyPy's Python 3.9 has h2 4.3, which checks less, and some things
    # differently): either it does (GOAWAY), or the balancer refuses the
    # stream.  test_balancerAloneRefuses checks the balancer on its own.
    expectGoaway = h2Rejects and _H2_CHECKS_AS_44
    goaway = client.goaway()
    if goaway is not None and (expectGoaway or not _H2_CHECKS_AS_44):
        assert goaway == PROTOCOL_ERROR
        assert client.transport.disconnecting
        assert client.status(sid) is None
    else:
        assert not expectGoaway, "h2 4.4 catches this one itself"
        refusedOnStream(client, sid, status)
    assert balancer.reactor.tcpClients == []
    balancer.flush()
    assert balancer.forwarder.inFlight == 0


@pytest.mark.parametrize("name, headers, h2Rejects, status, http11", MALFORMED, ids=IDS)
def test_balancerAloneRefuses(balancer, name, headers, h2Rejects, status, http11):
    """With h2's own inbound checks off, the balancer refuses every one of
    them on the stream by itself."""
    client = H2Client(balancer, lenient=True, serverValidates=False)
    sid = client.send(headers)
    refusedOnStream(client, sid, status)
    assert balancer.reactor.tcpClients == []


@pytest.mark.parametrize(
    "name, status, http11",
    [(case[0], case[3], case[4]) for case in MALFORMED if case[4] is not None],
)
def test_http11ListenerAgrees(balancer, name, status, http11):
    """The same request over HTTP/1.1 gets the same status from the HTTP/1.1
    listener: both front ends draw the line in the same place."""
    client = balancer.client()
    client.send(http11)
    assert client.received().startswith(b"HTTP/1.1 %d " % (status,))
    assert balancer.reactor.tcpClients == []


def test_methodInjectionRegression(balancer):
    """The issue's reproduction: :method "GET /admin HTTP/1.1" with :path
    "/public" is a 400, and the connection's next request is forwarded with
    its own request line only."""
    client = H2Client(balancer, lenient=True)
    bad = client.send([(b":method", b"GET /admin HTTP/1.1"), (b":scheme", b"https"),
                       (b":authority", AUTHORITY), (b":path", b"/public")])
    assert client.status(bad) == 400
    assert b"malformed method" in client.response(bad)[1]
    assert balancer.reactor.tcpClients == []
    client.send(request(b"/public"))
    sent = balancer.acceptConnect().received()
    assert sent.startswith(b"GET /public HTTP/1.1\r\nHost: app.example\r\n")
    assert b"/admin" not in sent


def test_refusalsAreCounted(balancer):
    """Each refused stream counts in the listener's "refused" counter, like a
    refused HTTP/1.1 request."""
    client = H2Client(balancer, lenient=True)
    client.send(with_(b":path", b"/a b"))
    client.send(request() + [(b"x(y", b"1")])
    assert balancer.factory.counters["refused"] == 2


# -- what is valid passes, and exactly so

VALID = [
    ("OPTIONS *", [(b":method", b"OPTIONS"), (b":scheme", b"https"),
                   (b":authority", AUTHORITY), (b":path", b"*")],
     b"OPTIONS * HTTP/1.1\r\nHost: app.example\r\n"),
    ("Host instead of :authority", without(b":authority") + [(b"host", b"h.example")],
     b"GET / HTTP/1.1\r\nHost: h.example\r\n"),
    ("a lowercase method is a token", with_(b":method", b"get"),
     b"get / HTTP/1.1\r\nHost: app.example\r\n"),
    ("an extension method", with_(b":method", b"PROPFIND"),
     b"PROPFIND / HTTP/1.1\r\nHost: app.example\r\n"),
    ("//host in :path is a path", with_(b":path", b"//evil.example/x"),
     b"GET //evil.example/x HTTP/1.1\r\nHost: app.example\r\n"),
    ("an empty value", request() + [(b"x-empty", b"")],
     b"GET / HTTP/1.1\r\nHost: app.example\r\nx-empty: \r\n"),
    ("a tab inside a value", request() + [(b"x-tab", b"a\tb")],
     b"GET / HTTP/1.1\r\nHost: app.example\r\nx-tab: a\tb\r\n"),
]


@pytest.mark.parametrize("name, headers, head", VALID, ids=[c[0] for c in VALID])
def test_validIsForwarded(balancer, name, headers, head):
    """Requests that are well formed go to the backend with their request
    line and fields byte for byte."""
    client = H2Client(balancer, lenient=True)
    client.send(headers)
    assert balancer.acceptConnect().received().startswith(head)


def test_teTrailersKept(balancer):
    """TE: trailers is the one TE allowed, and is passed on."""
    client = H2Client(balancer)
    client.send(request() + [(b"te", b"trailers")])
    assert b"\r\nTE: trailers\r\n" in balancer.acceptConnect().received()
