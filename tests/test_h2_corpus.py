"""
The HTTP/2 half of the desync corpus (issue 14, item 4): each request-
smuggling case class that can be written in HTTP/2 is sent through the
real balancer in memory.  Every case either is rejected (an error status
from the balancer, a stream reset or GOAWAY) with no complete request at
any backend, or the backend receives exactly one well-formed HTTP/1.1
request, parsed back here with the balancer's own strict parser.  The
table also states which of the two each case gets, so a case that starts
to be forwarded (or refused) shows up.
"""

from __future__ import annotations

import h2.exceptions
import pytest
from test_h2 import AUTHORITY, H2Client, request

from txbalancer.downstream import BadRequest, parseHead
from txbalancer.framing import ChunkedDecoder
from txbalancer.testing import InMemoryBalancer

REJECT, FORWARD = "reject", "forward"


def post(*extra, path=b"/"):
    return request(path, b"POST") + list(extra)


def get(*extra, path=b"/"):
    return request(path) + list(extra)


def with_(name, value):
    return [(n, value if n == name else v) for n, v in request()]


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: app.example\r\n\r\n"
CHUNKED_SMUGGLE = b"0\r\n\r\n" + SMUGGLED

# (id, header block, DATA frames, trailers, expected)
CORPUS = [
    # Content-Length against the DATA frames.
    ("CL matches", post((b"content-length", b"5")), [b"hello"], None, FORWARD),
    ("CL larger than DATA", post((b"content-length", b"10")), [b"hello"], None, REJECT),
    ("CL smaller than DATA", post((b"content-length", b"5")), [b"hello" + SMUGGLED],
     None, REJECT),
    ("CL 0 with a smuggled request", post((b"content-length", b"0")), [SMUGGLED], None,
     REJECT),
    ("CL with no DATA", post((b"content-length", b"5")), [], None, REJECT),
    ("CL, short DATA, trailers", post((b"content-length", b"5")), [b"ab"],
     [(b"x-t", b"1")], REJECT),
    ("duplicate CL, same", post((b"content-length", b"5"), (b"content-length", b"5")),
     [b"hello"], None, FORWARD),
    ("duplicate CL, different", post((b"content-length", b"5"),
                                     (b"content-length", b"6")), [b"hello"], None, REJECT),
    ("comma-listed CL", post((b"content-length", b"5, 5")), [b"hello"], None, REJECT),
    ("CL with a sign", post((b"content-length", b"+5")), [b"hello"], None, REJECT),
    ("CL with leading zeros", post((b"content-length", b"005")), [b"hello"], None,
     FORWARD),
    ("CL out of range", post((b"content-length", b"99999999999999999999")), [b"x"],
     None, REJECT),
    ("CL hex", post((b"content-length", b"0x5")), [b"hello"], None, REJECT),
    ("no CL: body forwarded chunked", post(), [b"hel", b"lo"], None, FORWARD),
    ("no CL, body looks chunked", post(), [CHUNKED_SMUGGLE], None, FORWARD),
    ("GET with a body", get(), [b"body"], None, FORWARD),
    ("HEAD with a body", request(b"/", b"HEAD") + [(b"content-length", b"4")],
     [b"body"], None, FORWARD),
    # Transfer-Encoding in any spelling.
    ("TE chunked", post((b"transfer-encoding", b"chunked")), [CHUNKED_SMUGGLE], None,
     REJECT),
    ("TE and CL", post((b"transfer-encoding", b"chunked"), (b"content-length", b"5")),
     [b"0\r\n\r\n"], None, REJECT),
    ("TE obfuscated", post((b"transfer-encoding", b"xchunked")), [b"x"], None, REJECT),
    ("TE with a tab", post((b"transfer-encoding", b"\tchunked")), [b"x"], None, REJECT),
    ("Transfer_Encoding", post((b"transfer_encoding", b"chunked")), [CHUNKED_SMUGGLE],
     None, REJECT),
    ("Content_Length", post((b"content_length", b"0")), [b"hello"], None, REJECT),
    ("TE with a trailing space in the name", post((b"transfer-encoding ", b"chunked")),
     [b"x"], None, REJECT),
    ("TE name with a semicolon", post((b"transfer-encoding;", b"chunked")), [b"x"],
     None, REJECT),
    ("TE in trailers", post(), [b"hello"], [(b"transfer-encoding", b"chunked")], REJECT),
    ("CL in trailers", post(), [b"hello"], [(b"content-length", b"100")], FORWARD),
    ("TE: gzip", get((b"te", b"gzip")), [], None, REJECT),
    ("TE: trailers", get((b"te", b"trailers")), [], None, FORWARD),
    # Upgrade and h2c.
    ("upgrade h2c", get((b"upgrade", b"h2c")), [], None, REJECT),
    ("connection upgrade", get((b"connection", b"Upgrade, HTTP2-Settings")), [], None,
     REJECT),
    ("http2-settings alone", get((b"http2-settings", b"AAMAAABkAARAAAAAAAIAAAAA")), [],
     None, FORWARD),
    ("upgrade websocket", get((b"upgrade", b"websocket")), [], None, REJECT),
    # Control characters and line breaks in values.
    ("NUL in a value", get((b"x", b"a\x00b")), [], None, REJECT),
    ("CR in a value", get((b"x", b"a\rb")), [], None, REJECT),
    ("LF in a value", get((b"x", b"a\nb")), [], None, REJECT),
    ("header injection", get((b"x", b"a\r\nTransfer-Encoding: chunked")), [], None,
     REJECT),
    ("obs-fold", get((b"x", b"a\r\n b")), [], None, REJECT),
    ("VT in a value", get((b"x", b"a\x0bb")), [], None, REJECT),
    ("8-bit bytes in a value", get((b"x", b"caf\xc3\xa9\xff")), [], None, FORWARD),
    # Names.
    ("uppercase name", get((b"Content-Length", b"0")), [], None, REJECT),
    ("space before a name", get((b" x", b"1")), [], None, REJECT),
    ("space after a name", get((b"x ", b"1")), [], None, REJECT),
    ("colon in a name", get((b"x:y", b"1")), [], None, REJECT),
    ("name with parentheses", get((b"x(y", b"1")), [], None, REJECT),
    # The request target.
    ("8-bit bytes in :path", with_(b":path", b"/caf\xc3\xa9/\x80\xff"), [], None,
     REJECT),
    ("space in :path", with_(b":path", b"/a HTTP/1.1\r\nX: y"), [], None, REJECT),
    ("request line in :path", with_(b":path", b"/ HTTP/1.1"), [], None, REJECT),
    ("absolute-form :path", with_(b":path", b"http://evil.example/"), [], None, REJECT),
    ("absolute-form https :path", with_(b":path", b"https://evil.example/x"), [], None,
     REJECT),
    ("authority-form :path", with_(b":path", b"evil.example:443"), [], None, REJECT),
    ("//host :path", with_(b":path", b"//evil.example/x"), [], None, FORWARD),
    ("* for GET", with_(b":path", b"*"), [], None, REJECT),
    ("fragment in :path", with_(b":path", b"/a#frag"), [], None, FORWARD),
    ("encoded slash in :path", with_(b":path", b"/a/..%2f..%2fadmin"), [], None, FORWARD),
    ("request line in :method", with_(b":method", b"GET / HTTP/1.1\r\n"), [], None,
     REJECT),
    ("method with a space", with_(b":method", b"GET /admin"), [], None, REJECT),
    # Host and :authority.
    ("userinfo in :authority", with_(b":authority", b"evil@app.example"), [], None,
     REJECT),
    ("Host differs from :authority", get((b"host", b"evil.example")), [], None, REJECT),
    ("two Hosts", request()[:2] + [request()[3], (b"host", b"a"), (b"host", b"b")], [],
     None, REJECT),
    # CONNECT.
    ("CONNECT", [(b":method", b"CONNECT"), (b":authority", b"evil.example:22")], [],
     None, REJECT),
    ("extended CONNECT", [(b":method", b"CONNECT"), (b":protocol", b"websocket"),
                          (b":scheme", b"https"), (b":path", b"/"),
                          (b":authority", AUTHORITY)], [], None, REJECT),
]


@pytest.fixture
def balancer():
    return InMemoryBalancer(["127.0.0.1:3001"], secure=True)


def parseRequests(data):
    """
    The HTTP/1.1 requests in C{data} as (request, body), parsed strictly
    with the balancer's own parser, and the bytes after the last complete
    one.

    @raise BadRequest: a request that is not well formed.
    """
    requests = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        head = data[:end]
        if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\n"):
            raise BadRequest(400, "bare CR or LF")
        parsed = parseHead(head)
        rest = data[end + 4 :]
        if parsed.chunked:
            pieces = []
            after = ChunkedDecoder().feed(rest, pieces.append)
            if after is None:
                break
            body, data = b"".join(pieces), after
        else:
            length = parsed.contentLength or 0
            if len(rest) < length:
                break
            body, data = rest[:length], rest[length:]
        requests.append((parsed, body))
    return requests, data


def run(balancer, headers, frames, trailers):
    """
    Send one request as given; return the client and the backends that
    were connected.
    """
    client = H2Client(balancer, lenient=True)
    sid = client.conn.get_next_available_stream_id()
    last = not frames and trailers is None
    client.conn.send_headers(sid, headers, end_stream=last)
    client.flush()
    backends = []

    def connect():
        while balancer.pendingConnects():
            backends.append(balancer.acceptConnect())
        client.flush()

    connect()
    try:
        for i, data in enumerate(frames):
            end = i == len(frames) - 1 and trailers is None
            client.conn.send_data(sid, data, end_stream=end)
            client.flush()
            connect()
        if trailers is not None:
            client.conn.send_headers(sid, trailers, end_stream=True)
            client.flush()
            connect()
    except h2.exceptions.ProtocolError:
        # The server already ended the stream or the connection.
        pass
    balancer.flush()
    return client, sid, backends


@pytest.mark.parametrize("name, headers, frames, trailers, expected", CORPUS,
                         ids=[case[0] for case in CORPUS])
def test_corpus(balancer, name, headers, frames, trailers, expected):
    """Rejected with nothing answerable upstream, or exactly one well-formed
    HTTP/1.1 request upstream carrying the body the client sent; never a
    second, smuggled request."""
    client, sid, backends = run(balancer, headers, frames, trailers)
    complete = []
    for backend in backends:
        requests, rest = parseRequests(backend.received())
        complete += requests
        if rest:
            # A partial request is only acceptable on a connection the
            # balancer aborted (it will never be reused).
            assert backend.transport.aborted, rest
    status = client.status(sid)
    rejected = (
        client.goaway() is not None
        or client.reset(sid) is not None
        or (status is not None and status >= 400)
    )
    # Never a second request hidden in a body.
    assert [p.target for p, _ in complete if p.target == b"/smuggled"] == []
    if rejected:
        assert expected == REJECT
        # At most what came before the malformation (the head of "CL 0"
        # followed by DATA), on a backend connection that is aborted: its
        # answer reaches no one and the connection is never reused.
        assert len(complete) <= 1
        for backend in backends:
            assert backend.transport.aborted
        return
    assert expected == FORWARD
    assert len(complete) == 1
    (parsed, body), = complete
    assert parsed.host == dict(headers).get(b":authority", AUTHORITY)
    assert parsed.target == dict(headers)[b":path"]
    assert parsed.method == dict(headers)[b":method"]
    assert body == b"".join(frames)
    # The backend's answer reaches the client: the exchange was whole.
    (backend,) = backends
    backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    client.flush()
    assert client.status(sid) == 200 and client.response(sid)[2]


def test_corpusCoversBothOutcomes():
    """The corpus holds both rejected and forwarded cases, so the check
    above exercises both branches."""
    outcomes = {case[4] for case in CORPUS}
    assert outcomes == {REJECT, FORWARD}
