"""
Property-based fuzzing of the HTTP/1.1 front end (issue 14 item 5, the
HTTP/1.1 half): hypothesis builds request heads and bodies, valid ones and
ones broken in a known way, and feeds them, split at random points into
separate reads, to the server protocol of an in-memory balancer.

The property: a broken request gets a 4xx (or 501) and never reaches a
backend whole; a valid one reaches the backend as exactly one request
whose method, target, headers and body are the ones sent, apart from the
documented rewrites (framing re-written, X-Forwarded-*, Forwarded and Via
set by the balancer); and nothing ever logs an unhandled error.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from test_desync_corpus import Message, strictParse
from txbalancer.testing import InMemoryBalancer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TCHARS = "!#$%&'*+-.^_`|~" + string.digits + string.ascii_letters
# Names the balancer treats specially; the valid generator leaves them out.
SPECIAL = {
    b"host", b"content-length", b"transfer-encoding", b"connection", b"te",
    b"upgrade", b"expect", b"keep-alive", b"proxy-connection", b"trailer",
    b"proxy-authenticate", b"proxy-authorization", b"x-forwarded-for",
    b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via",
    b"x-client-cert-subject", b"http2-settings",
}
# Headers the balancer adds or re-frames on the way up.
REWRITTEN = {
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"forwarded", b"via", b"content-length", b"transfer-encoding",
}


@dataclass
class Generated:
    raw: bytes
    valid: bool
    method: bytes = b""
    target: bytes = b""
    headers: tuple = ()
    body: bytes = b""
    defect: str = ""


tokens = st.text(alphabet=TCHARS, min_size=1, max_size=10).map(str.encode)
methods = st.one_of(
    st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]),
    tokens.filter(lambda t: t.upper() != b"CONNECT"),
)
targetChars = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%?#",
    max_size=30,
)
targets = targetChars.map(lambda t: b"/" + t.encode())
headerNames = tokens.map(lambda t: b"X-" + t).filter(
    lambda n: n.lower() not in SPECIAL and b"_" not in n
)
# Visible ASCII and obs-text, with SP and HTAB inside but not at the ends
# (the balancer, like every HTTP parser, strips them there).
valueChars = st.one_of(
    st.sampled_from([b" ", b"\t"]),
    st.integers(0x21, 0x7E).map(lambda i: bytes([i])),
    st.integers(0x80, 0xFF).map(lambda i: bytes([i])),
)
headerValues = st.lists(valueChars, max_size=20).map(b"".join).map(
    lambda v: v.strip(b" \t")
)
extensions = st.one_of(
    st.just(b""),
    st.sampled_from([b";a", b";a=b", b' ; q="x y"', b";n=1;m"]),
)


@st.composite
def chunkedBodies(draw, body: bytes) -> bytes:
    """C{body} in random chunks, with optional valid extensions and trailers."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body))), max_size=5))))
    pieces, last = [], 0
    for cut in cuts + [len(body)]:
        if cut > last:
            pieces.append(body[last:cut])
            last = cut
    out = b""
    for piece in pieces:
        size = b"%x" % len(piece)
        if draw(st.booleans()):
            size = size.upper()
        out += size + draw(extensions) + b"\r\n" + piece + b"\r\n"
    out += b"0" + draw(extensions) + b"\r\n"
    if draw(st.booleans()):
        out += b"X-Trailer: " + draw(headerValues) + b"\r\n"
    return out + b"\r\n"


@st.composite
def validRequests(draw) -> Generated:
    method = draw(methods)
    target = draw(targets)
    headers = [(b"Host", b"example.com")]
    headers += draw(st.lists(st.tuples(headerNames, headerValues), max_size=6))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b"" if framing == "none" else draw(st.binary(max_size=300))
    head = method + b" " + target + b" HTTP/1.1\r\n"
    lines = [n + b":" + draw(st.sampled_from([b"", b" ", b"\t", b"  "])) + v for n, v in headers]
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
        encoded = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        encoded = draw(chunkedBodies(body))
    else:
        encoded = b""
    position = draw(st.integers(0, len(lines)))
    framingLine = lines.pop() if framing != "none" else None
    if framingLine is not None:
        lines.insert(min(position, len(lines)), framingLine)
    raw = head + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + encoded
    return Generated(raw, True, method, target, tuple(headers), body)


# Ways to break a valid request, each a function of its raw bytes that
# returns the broken bytes (or None when it does not apply).
def _insertHeader(line: bytes):
    def breaker(raw: bytes) -> Optional[bytes]:
        head, sep, rest = raw.partition(b"\r\n")
        return head + sep + line + b"\r\n" + rest
    return breaker


def _requestLine(fn):
    def breaker(raw: bytes) -> Optional[bytes]:
        line, sep, rest = raw.partition(b"\r\n")
        return fn(line) + sep + rest
    return breaker


def _chunkSize(bad: bytes):
    def breaker(raw: bytes) -> Optional[bytes]:
        head, sep, body = raw.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" not in head.lower():
            return None
        return head + sep + bad + b"\r\n" + body
    return breaker


BREAKERS = {
    "no colon": _insertHeader(b"X-No-Colon"),
    "bare host line": _insertHeader(b"Host"),
    "space before colon": _insertHeader(b"X-A : b"),
    "NUL in value": _insertHeader(b"X-A: a\x00b"),
    "CTL in value": _insertHeader(b"X-A: \x01"),
    "DEL in value": _insertHeader(b"X-A: \x7f"),
    "bare CR in value": _insertHeader(b"X-A: a\rb"),
    "obs-fold": _insertHeader(b"X-A: a\r\n b"),
    "8-bit name": _insertHeader(b"X-\xe9: 1"),
    "underscore framing": _insertHeader(b"Transfer_Encoding: chunked"),
    "underscore xff": _insertHeader(b"X_Forwarded_For: 10.0.0.1"),
    "second host": _insertHeader(b"Host: other.example"),
    "CL and TE": _insertHeader(b"Content-Length: 3\r\nTransfer-Encoding: chunked"),
    "conflicting CL": _insertHeader(b"Content-Length: 1\r\nContent-Length: 2"),
    "malformed CL": _insertHeader(b"Content-Length: 1x"),
    "TE not chunked": _insertHeader(b"Transfer-Encoding: gzip"),
    "TE obfuscated": _insertHeader(b"Transfer-Encoding: \x0bchunked"),
    "space in target": _requestLine(lambda l: l.replace(b" HTTP/1.1", b"x y HTTP/1.1")),
    "8-bit target": _requestLine(lambda l: l.replace(b" HTTP/1.1", b"\xff HTTP/1.1")),
    "CTL in target": _requestLine(lambda l: l.replace(b" HTTP/1.1", b"\x1b HTTP/1.1")),
    "bad version": _requestLine(lambda l: l.replace(b"HTTP/1.1", b"HTTP/1.x")),
    "bad method": _requestLine(lambda l: b"G(T" + l[l.index(b" "):]),
    "CONNECT": _requestLine(lambda l: b"CONNECT" + l[l.index(b" "):]),
    "bare LF": lambda raw: raw.replace(b"\r\n", b"\n", 1),
    "bad chunk size": _chunkSize(b"zz"),
    "chunk size overflow": _chunkSize(b"1" * 16),
    "bad chunk ext": _chunkSize(b"5;"),
}


@st.composite
def brokenRequests(draw) -> Generated:
    valid = draw(validRequests())
    name = draw(st.sampled_from(sorted(BREAKERS)))
    broken = BREAKERS[name](valid.raw)
    if broken is None:
        name, broken = "no colon", BREAKERS["no colon"](valid.raw)
    return Generated(broken, False, defect=name)


@st.composite
def splitReads(draw, raw: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(raw) - 1)), max_size=8))))
    pieces, last = [], 0
    for cut in cuts + [len(raw)]:
        if cut > last:
            pieces.append(raw[last:cut])
            last = cut
    return pieces


def feed(pieces: list[bytes]) -> tuple[bytes, list, list[Message], bytes]:
    """
    Feed C{pieces} as separate reads to an in-memory balancer whose backend
    answers each complete request.

    @return: the client's bytes, the backend connections, the complete
        requests they got, and any incomplete bytes after them.
    """
    lb = InMemoryBalancer(("127.0.0.1:3001",))
    client = lb.client()
    backends: list = []
    answered: dict[int, int] = {}

    def serve() -> None:
        for _ in range(10):
            progress = False
            while lb.pendingConnects():
                backends.append(lb.acceptConnect())
                progress = True
            for i, backend in enumerate(backends):
                complete, _ = strictParse(backend.received())
                while answered.get(i, 0) < len(complete):
                    answered[i] = answered.get(i, 0) + 1
                    backend.respond(OK)
                    progress = True
            if not progress:
                return

    for piece in pieces:
        if client.closed:
            break
        client.send(piece)
        serve()
    lb.flush()
    messages: list[Message] = []
    rest = b""
    for backend in backends:
        complete, leftover = strictParse(backend.received())
        messages.extend(complete)
        rest += leftover
    return client.received(), backends, messages, rest


def status(response: bytes) -> int:
    return int(response[9:12]) if response.startswith(b"HTTP/1.1 ") else 0


class FailureObserver:
    def __init__(self) -> None:
        self.failures: list = []

    def __call__(self, event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.failures.append(event)

    def __enter__(self) -> FailureObserver:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self)


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.data())
def test_valid_requests_forwarded_as_sent(data) -> None:
    """A valid request in any split reaches the backend once, with its method, target, headers and body."""
    request = data.draw(validRequests())
    pieces = data.draw(splitReads(request.raw))
    with FailureObserver() as observer:
        response, backends, messages, rest = feed(pieces)
    assert observer.failures == []
    assert status(response) == 200, (request.raw, response)
    assert len(messages) == 1 and rest == b"", (request.raw, messages, rest)
    (message,) = messages
    assert message.method == request.method
    assert message.target == request.target
    assert message.body == request.body
    kept = [(n, v) for n, v in message.headers if n.lower() not in REWRITTEN]
    assert kept == list(request.headers)
    assert message.values(b"x-forwarded-for") == [b"203.0.113.7"]


@FUZZ
@given(st.data())
def test_broken_requests_refused(data) -> None:
    """A request broken in a known way, in any split, gets 4xx (or 501) and never reaches a backend whole."""
    request = data.draw(brokenRequests())
    pieces = data.draw(splitReads(request.raw))
    with FailureObserver() as observer:
        response, backends, messages, rest = feed(pieces)
    assert observer.failures == []
    code = status(response)
    assert 400 <= code < 500 or code == 501, (request.defect, request.raw, response)
    assert messages == [], (request.defect, request.raw)
    for backend in backends:
        # A body error found after the head went up aborts the upstream
        # request, so the backend never takes the fragment for a request.
        assert backend.transport.aborted or backend.received() == b""


@FUZZ
@given(st.binary(max_size=400), st.data())
def test_random_bytes_never_break_the_balancer(raw, data) -> None:
    """Arbitrary bytes get some answer or wait, reach a backend only as clean requests, and log no error."""
    pieces = data.draw(splitReads(b"GET / HTTP/1.1\r\n" + raw))
    with FailureObserver() as observer:
        response, backends, messages, rest = feed(pieces)
    assert observer.failures == []
    assert len(messages) <= 1
