"""
The request head: what a client asks for, parsed strictly from the bytes of
an HTTP/1.1 (or 1.0) request line and header lines.

Pure: no I/O, no reactor.  The server protocol (downstream.py) finds where
a head ends and calls L{parseHead}; everything this module accepts is
unambiguous, and everything else raises L{BadRequest} with the status that
answers it, so a request the balancer would read one way and a backend
another never leaves the balancer.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from zope.interface import implementer

from txbalancer.framing import (
    AUTHORITY,
    BAD_TARGET,
    BAD_VALUE,
    CRLF,
    TOKEN,
    FramingError,
    parseContentLength,
)
from txbalancer.headers import SET_BY_BALANCER, connectionTokens
from txbalancer.interfaces import IRequestHead

# A request target: visible ASCII only (framing.BAD_TARGET, shared with
# HTTP/2).  The rest goes upstream byte for byte.
_BAD_TARGET = BAD_TARGET
# Field names a server behind the balancer may read with "_" as "-" (CGI,
# WSGI, PHP and others map both X-Forwarded-For and X_Forwarded_For to
# HTTP_X_FORWARDED_FOR): a client sending Content_Length or
# X_Forwarded_For would frame the body, or pick its address, past the
# balancer.  Such names are refused (400), not forwarded.
_UNDERSCORE_SHADOWS = frozenset(
    [b"content_length", b"transfer_encoding"]
    + [name.replace(b"-", b"_") for name in SET_BY_BALANCER if b"-" in name]
)
# HTTP-version (RFC 9112 2.3): case-sensitive, one digit, a dot, one digit.
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")


class BadRequest(FramingError):
    """
    The client sent something we will not forward.
    """


@implementer(IRequestHead)
class Request:
    """
    The parsed head of one request.

    @ivar headers: every header as C{(name, value)} in arrival order, names
        as the client spelled them.
    @ivar contentLength: the body length, or L{None} when chunked or absent.
    @ivar chunked: whether the body is chunked.
    """

    __slots__ = (
        "method",
        "target",
        "version",
        "headers",
        "host",
        "contentLength",
        "chunked",
        "keepAlive",
        "expectContinue",
        "upgrade",
        "websocket",
        "teTrailers",
        "clientCert",
        "peer",
        "secure",
        "received",
        "addresses",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"HTTP/1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.host: Optional[bytes] = None
        self.contentLength: Optional[int] = None
        self.chunked = False
        self.keepAlive = True
        self.expectContinue = False
        self.upgrade = False
        self.websocket = False
        self.teTrailers = False
        self.clientCert: Optional[bytes] = None
        self.peer = ""
        self.secure = False
        self.received = 0.0
        # (peer, host) IAddress of the client connection (for PROXY headers)
        self.addresses: Any = None

    @property
    def hasBody(self) -> bool:
        return self.chunked or bool(self.contentLength)


def parseHead(head: bytes, maxHeaders: int = 100) -> Request:
    """
    Parse a request head (request line and header lines, without the blank
    line that ends it).

    @raise BadRequest: for anything malformed or ambiguous.
    """
    lines = head.split(CRLF)
    requestLine = lines[0]
    parts = requestLine.split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if not TOKEN.match(method):
        raise BadRequest(400, "malformed method")
    if not target or _BAD_TARGET.search(target):
        raise BadRequest(400, "malformed request target")
    if method == b"CONNECT":
        # A tunnel, whatever the form of its target: a backend behind a
        # reverse proxy has no use for one (Node closes the connection).
        raise BadRequest(501, "CONNECT is not supported")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        # A well-formed version we do not speak (HTTP/2.0, HTTP/3.0) is
        # 505; anything else (HTTP/1.x, HTTP/1.10) is not a version at all.
        if _VERSION.match(version):
            raise BadRequest(505, "unsupported HTTP version")
        raise BadRequest(400, "malformed HTTP version")
    request = Request()
    request.method = method
    request.version = version
    if len(lines) > maxHeaders + 1:
        raise BadRequest(431, "too many header fields")

    headers = request.headers
    contentLengths = []
    transferEncodings = []
    connection = []
    hosts = []
    expect = None
    upgrade = False
    protocols: list[bytes] = []
    teTrailers = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.match(name):
            # A line without a colon ("X-No-Colon", a bare "Host") is not
            # a field with an empty value: it is not a field at all.
            if line[:1] in (b" ", b"\t"):
                raise BadRequest(400, "obsolete line folding in headers")
            if not colon:
                raise BadRequest(400, "header line without a colon")
            raise BadRequest(400, "malformed header name")
        value = value.strip(b" \t")
        if BAD_VALUE.search(value):
            raise BadRequest(400, "invalid character in header value")
        lname = name.lower()
        if b"_" in lname and lname in _UNDERSCORE_SHADOWS:
            raise BadRequest(400, "'_' in place of '-' in a header the balancer owns")
        if lname == b"content-length":
            contentLengths.append(value)
        elif lname == b"transfer-encoding":
            transferEncodings.append(value)
        elif lname == b"host":
            hosts.append(value)
        elif lname == b"connection":
            connection.append(value)
        elif lname == b"expect":
            expect = value.lower()
        elif lname == b"upgrade":
            upgrade = True
            protocols.extend(p.strip().lower() for p in value.split(b","))
        elif lname == b"te":
            teTrailers = b"trailers" in [t.strip().lower() for t in value.split(b",")]
        headers.append((name, value))

    if transferEncodings:
        if contentLengths:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if version == b"HTTP/1.0":
            raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [
            c.strip().lower() for te in transferEncodings for c in te.split(b",")
        ]
        if codings != [b"chunked"]:
            if codings.count(b"chunked") > 1:
                raise BadRequest(400, "chunked applied more than once")
            if codings[-1] == b"chunked" and all(TOKEN.match(c) for c in codings):
                raise BadRequest(501, "unsupported transfer coding")
            raise BadRequest(400, "request body framing is not chunked")
        request.chunked = True
    elif contentLengths:
        try:
            request.contentLength = parseContentLength(contentLengths)
        except FramingError as e:
            raise BadRequest(e.status, e.reason)

    if len(hosts) > 1:
        raise BadRequest(400, "more than one Host header")
    if hosts:
        if not AUTHORITY.match(hosts[0]):
            raise BadRequest(400, "malformed Host header")
        request.host = hosts[0]
    elif version == b"HTTP/1.1":
        raise BadRequest(400, "missing Host header")

    if target[:1] != b"/":
        if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
            # absolute-form: the authority in the target wins over Host.
            rest = target.split(b"://", 1)[1]
            authority, slash, path = rest.partition(b"/")
            if not authority or not AUTHORITY.match(authority):
                raise BadRequest(400, "malformed absolute request target")
            target = b"/" + path
            request.host = authority
            headers[:] = [(n, v) for n, v in headers if n.lower() != b"host"]
            headers.insert(0, (b"Host", authority))
        elif target == b"*" and method == b"OPTIONS":
            pass
        else:
            raise BadRequest(400, "malformed request target")
    request.target = target

    tokens = connectionTokens(connection)
    if version == b"HTTP/1.1":
        request.keepAlive = b"close" not in tokens
    else:
        request.keepAlive = b"keep-alive" in tokens and b"close" not in tokens
    if expect is not None:
        if expect != b"100-continue":
            raise BadRequest(417, "unsupported expectation")
        request.expectContinue = version == b"HTTP/1.1"
    request.upgrade = upgrade and b"upgrade" in tokens
    # Only a WebSocket handshake (RFC 6455 4.1: GET, HTTP/1.1, no body) is
    # forwarded as an upgrade.  Any other (h2c above all: a tunnel past
    # the balancer's checks) goes on as a plain request, Upgrade removed
    # with the other hop-by-hop headers.
    request.websocket = (
        request.upgrade
        and protocols == [b"websocket"]
        and method == b"GET"
        and version == b"HTTP/1.1"
        and not request.hasBody
    )
    request.teTrailers = teTrailers and b"te" not in tokens
    return request


