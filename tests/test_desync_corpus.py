"""
A request-desync corpus (issue 14 item 4), written for this project from
the published case classes: CL.TE, TE.CL, TE.TE with obfuscated
Transfer-Encoding, duplicate and listed Content-Length, obs-fold, bare LF,
whitespace before the colon, "_" for "-" in header names, NUL and control
characters, chunk sizes, chunk extensions, trailers, h2c upgrades,
absolute-form targets, HTTP/1.0 with chunked and 8-bit bytes.

For every case the balancer either rejects the request (a 4xx, or 501 for
a transfer coding it does not implement) and sends nothing to any
backend, or sends the backend exactly one well-formed request: what the
backend received is read back with L{strictParse}, an HTTP/1.1 request
parser written here independently of the balancer's and stricter than any
server, and must hold one request, whole, with consistent framing.

The same corpus runs over real sockets against the real ``twistd
balancer`` in tests/integration/test_desync_live.py.

The "_" decision: ``Transfer_Encoding``, ``Content_Length`` and the
underscore spellings of the X-Forwarded-* headers the balancer sets are
refused with 400.  Passed on as ordinary headers they would be dangerous
behind servers that read "_" as "-" (CGI, WSGI and PHP map both spellings
to the same variable).  Other names with "_" are ordinary tokens and pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import pytest

from txbalancer.testing import InMemoryBalancer

H = b"Host: example.com\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

REJECT = "reject"
FORWARD = "forward"


@dataclass
class Case:
    """
    One corpus entry.

    @ivar expect: L{REJECT} or L{FORWARD}.
    @ivar statuses: for a rejection, the statuses that are right.
    @ivar check: for a forward, field -> value the one request must have
        (C{method}, C{target}, C{host}, C{body}), and C{absent}: header
        names it must not carry.
    """

    name: str
    raw: bytes
    expect: str
    statuses: tuple[int, ...] = (400,)
    check: dict = field(default_factory=dict)


def post(headers: bytes, body: bytes = b"", target: bytes = b"/") -> bytes:
    return b"POST " + target + b" HTTP/1.1\r\n" + H + headers + b"\r\n" + body


def get(headers: bytes = b"", target: bytes = b"/", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET " + target + b" " + version + b"\r\n" + H + headers + b"\r\n"


def chunkedWithSize(line: bytes) -> bytes:
    return post(CHUNKED, line + b"\r\nhello\r\n0\r\n\r\n")


CORPUS = [
    # -- CL.TE and TE.CL: both framings in one message.
    Case("cl-te", post(b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\nG"), REJECT),
    Case("te-cl", post(CHUNKED + b"Content-Length: 4\r\n", b"5c\r\nGPOST / HTTP/1.1\r\n\r\n0\r\n\r\n"), REJECT),
    Case("cl-te-smuggled-get", post(b"Content-Length: 45\r\n" + CHUNKED, b"0\r\n\r\n" + SMUGGLED), REJECT),
    Case("te-cl-zero-length", post(CHUNKED + b"Content-Length: 0\r\n", HELLO_CHUNKED), REJECT),
    # -- TE.TE: Transfer-Encoding obfuscated so that one side ignores it.
    Case("te-trailing-space", post(b"Transfer-Encoding: chunked \r\n", HELLO_CHUNKED), FORWARD, check={"body": b"hello"}),
    Case("te-trailing-space-with-cl", post(b"Transfer-Encoding: chunked \r\nContent-Length: 3\r\n", HELLO_CHUNKED), REJECT),
    Case("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-xchunked-with-cl", post(b"Content-Length: 4\r\nTransfer-Encoding: xchunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity\r\n", HELLO_CHUNKED), REJECT),
    Case("te-identity-chunked", post(b"Transfer-Encoding: identity, chunked\r\n", HELLO_CHUNKED), REJECT, (400, 501)),
    Case("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", HELLO_CHUNKED), REJECT, (501,)),
    Case("te-tab-before-value", post(b"Transfer-Encoding:\tchunked\r\n", HELLO_CHUNKED), FORWARD, check={"body": b"hello"}),
    Case("te-no-space-after-colon", post(b"Transfer-Encoding:chunked\r\n", HELLO_CHUNKED), FORWARD, check={"body": b"hello"}),
    Case("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-tab-before-colon", post(b"Transfer-Encoding\t: chunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-duplicate-chunked", post(CHUNKED + CHUNKED, HELLO_CHUNKED), REJECT),
    Case("te-chunked-chunked-list", post(b"Transfer-Encoding: chunked, chunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-duplicate-one-obfuscated", post(CHUNKED + b"Transfer-Encoding: x\r\n", HELLO_CHUNKED), REJECT),
    Case("te-duplicate-obfuscated-first", post(b"Transfer-Encoding: x\r\n" + CHUNKED, HELLO_CHUNKED), REJECT, (400, 501)),
    Case("te-vertical-tab", post(b"Transfer-Encoding: \x0bchunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-form-feed", post(b"Transfer-Encoding: \x0cchunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-nul-after", post(b"Transfer-Encoding: chunked\x00\r\n", HELLO_CHUNKED), REJECT),
    Case("te-leading-comma", post(b"Transfer-Encoding: ,chunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-quoted", post(b'Transfer-Encoding: "chunked"\r\n', HELLO_CHUNKED), REJECT),
    Case("te-uppercase-value", post(b"Transfer-Encoding: CHUNKED\r\n", HELLO_CHUNKED), FORWARD, check={"body": b"hello"}),
    Case("te-uppercase-name", post(b"TRANSFER-ENCODING: chunked\r\n", HELLO_CHUNKED), FORWARD, check={"body": b"hello"}),
    Case("te-obs-fold-value", post(b"Transfer-Encoding:\r\n chunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-empty", post(b"Transfer-Encoding: \r\n", HELLO_CHUNKED), REJECT),
    Case("te-8bit", post(b"Transfer-Encoding: chunk\xe9d\r\n", HELLO_CHUNKED), REJECT),
    Case("te-underscore", post(b"Transfer_Encoding: chunked\r\n", HELLO_CHUNKED), REJECT),
    Case("te-underscore-with-cl", post(b"Content-Length: 4\r\nTransfer_Encoding: chunked\r\n", b"0\r\n\r\n"), REJECT),
    # -- Content-Length: repeated, listed, malformed.
    Case("cl-duplicate-same", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), FORWARD, check={"body": b"hello"}),
    Case("cl-list-same", post(b"Content-Length: 5, 5\r\n", b"hello"), FORWARD, check={"body": b"hello"}),
    Case("cl-duplicate-different", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), REJECT),
    Case("cl-list-different", post(b"Content-Length: 5, 6\r\n", b"hello!"), REJECT),
    Case("cl-list-empty-item", post(b"Content-Length: 5,\r\n", b"hello"), REJECT),
    Case("cl-plus", post(b"Content-Length: +5\r\n", b"hello"), REJECT),
    Case("cl-negative", post(b"Content-Length: -5\r\n", b"hello"), REJECT),
    Case("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello"), REJECT),
    Case("cl-space-inside", post(b"Content-Length: 5 5\r\n", b"hello"), REJECT),
    Case("cl-trailing-garbage", post(b"Content-Length: 5a\r\n", b"hello"), REJECT),
    Case("cl-empty", post(b"Content-Length: \r\n", b"hello"), REJECT),
    Case("cl-2-to-the-64", post(b"Content-Length: 18446744073709551616\r\n", b"hello"), REJECT),
    Case("cl-leading-zeros", post(b"Content-Length: 0005\r\n", b"hello"), FORWARD, check={"body": b"hello"}),
    Case("cl-space-before-colon", post(b"Content-Length : 5\r\n", b"hello"), REJECT),
    Case("cl-underscore", post(b"Content_Length: 5\r\n", b"hello"), REJECT),
    Case("cl-underscore-lowercase", post(b"content_length: 5\r\n", b"hello"), REJECT),
    Case("cl-obs-fold", post(b"Content-Length:\r\n 5\r\n", b"hello"), REJECT),
    Case("cl-body-holds-a-request", post(b"Content-Length: %d\r\n" % len(SMUGGLED), SMUGGLED), FORWARD, check={"body": SMUGGLED}),
    Case("cl-zero-get", get(b"Content-Length: 0\r\n"), FORWARD, check={"method": b"GET", "body": b""}),
    # -- obs-fold, bare line endings, whitespace.
    Case("obs-fold-space", get(b"X-A: a\r\n b\r\n"), REJECT),
    Case("obs-fold-tab", get(b"X-A: a\r\n\tb\r\n"), REJECT),
    Case("first-header-indented", b"GET / HTTP/1.1\r\n Host: example.com\r\n\r\n", REJECT),
    Case("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: example.com\n\n", REJECT),
    Case("bare-lf-one-line", b"GET / HTTP/1.1\r\nHost: example.com\nX: y\r\n\r\n", REJECT),
    Case("bare-lf-end-of-head", b"GET / HTTP/1.1\r\nHost: example.com\r\n\n", REJECT),
    Case("bare-cr", b"GET / HTTP/1.1\r\nHost: example.com\rX: y\r\n\r\n", REJECT),
    Case("bare-lf-in-chunk-size", post(CHUNKED, b"5\nhello\r\n0\r\n\r\n"), REJECT),
    Case("bare-lf-after-chunk-data", post(CHUNKED, b"5\r\nhello\n0\r\n\r\n"), REJECT),
    Case("space-before-colon", get(b"X-A : b\r\n"), REJECT),
    Case("tab-in-request-line", b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", REJECT),
    Case("double-space-request-line", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", REJECT),
    Case("trailing-space-request-line", b"GET / HTTP/1.1 \r\n" + H + b"\r\n", REJECT),
    Case("header-without-colon", get(b"X-No-Colon\r\n"), REJECT),
    Case("bare-host-line", b"GET / HTTP/1.1\r\nHost\r\n\r\n", REJECT),
    # -- "_" for "-".
    Case("xff-underscore", get(b"X_Forwarded_For: 10.0.0.1\r\n"), REJECT),
    Case("xfp-underscore", get(b"x_forwarded_proto: https\r\n"), REJECT),
    Case("other-underscore-passes", get(b"X_Custom: 1\r\n"), FORWARD, check={"headers": {b"x_custom": b"1"}}),
    # -- NUL and control characters.
    Case("nul-in-target", get(target=b"/a\x00b"), REJECT),
    Case("nul-in-method", b"G\x00ET / HTTP/1.1\r\n" + H + b"\r\n", REJECT),
    Case("nul-in-header-name", get(b"X-\x00A: b\r\n"), REJECT),
    Case("nul-in-header-value", get(b"X-A: a\x00b\r\n"), REJECT),
    Case("soh-in-header-value", get(b"X-A: a\x01b\r\n"), REJECT),
    Case("del-in-header-value", get(b"X-A: a\x7fb\r\n"), REJECT),
    Case("esc-in-target", get(target=b"/a\x1bb"), REJECT),
    Case("del-in-target", get(target=b"/a\x7fb"), REJECT),
    Case("ctl-in-host", b"GET / HTTP/1.1\r\nHost: exa\x01mple.com\r\n\r\n", REJECT),
    Case("slash-in-header-name", get(b"X/Y: 1\r\n"), REJECT),
    # -- chunk sizes.
    Case("chunk-size-16-hex-digits", chunkedWithSize(b"0000000000000005"), REJECT),
    Case("chunk-size-2-to-the-64", chunkedWithSize(b"10000000000000000"), REJECT),
    Case("chunk-size-negative", chunkedWithSize(b"-5"), REJECT),
    Case("chunk-size-0x", chunkedWithSize(b"0x5"), REJECT),
    Case("chunk-size-empty", chunkedWithSize(b""), REJECT),
    Case("chunk-size-trailing-space", chunkedWithSize(b"5 "), REJECT),
    Case("chunk-size-leading-space", chunkedWithSize(b" 5"), REJECT),
    Case("chunk-size-leading-zeros", chunkedWithSize(b"0005"), FORWARD, check={"body": b"hello"}),
    Case("chunk-size-uppercase-hex", post(CHUNKED, b"A\r\n0123456789\r\n0\r\n\r\n"), FORWARD, check={"body": b"0123456789"}),
    Case("chunk-too-short", post(CHUNKED, b"6\r\nhello\r\n0\r\n\r\n"), REJECT),
    Case("chunk-too-long", post(CHUNKED, b"4\r\nhello\r\n0\r\n\r\n"), REJECT),
    # -- chunk extensions: valid ones pass (and are not forwarded), malformed are refused.
    Case("chunk-ext-name", chunkedWithSize(b"5;name"), FORWARD, check={"body": b"hello"}),
    Case("chunk-ext-name-value", chunkedWithSize(b"5;name=value"), FORWARD, check={"body": b"hello"}),
    Case("chunk-ext-quoted", chunkedWithSize(b'5;name="a value; \\"quoted\\""'), FORWARD, check={"body": b"hello"}),
    Case("chunk-ext-bws", chunkedWithSize(b"5 ; a = b ;c"), FORWARD, check={"body": b"hello"}),
    Case("chunk-ext-on-last-chunk", post(CHUNKED, b"5\r\nhello\r\n0;done\r\n\r\n"), FORWARD, check={"body": b"hello"}),
    Case("chunk-ext-empty", chunkedWithSize(b"5;"), REJECT),
    Case("chunk-ext-no-name", chunkedWithSize(b"5;=x"), REJECT),
    Case("chunk-ext-no-value", chunkedWithSize(b"5;a="), REJECT),
    Case("chunk-ext-unterminated-quote", chunkedWithSize(b'5;a="x'), REJECT),
    Case("chunk-ext-space-in-name", chunkedWithSize(b"5;a b"), REJECT),
    Case("chunk-ext-ctl", chunkedWithSize(b"5;a=\x01"), REJECT),
    Case("chunk-ext-nul", chunkedWithSize(b"5;\x00"), REJECT),
    # -- trailers: valid ones are read and dropped, invalid ones refused.
    Case("trailer-valid", post(CHUNKED, b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), FORWARD, check={"body": b"hello", "absent": [b"x-t"]}),
    Case("trailer-content-length", post(CHUNKED, b"5\r\nhello\r\n0\r\nContent-Length: 50\r\n\r\n"), FORWARD, check={"body": b"hello"}),
    Case("trailer-without-colon", post(CHUNKED, b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n"), REJECT),
    Case("trailer-obs-fold", post(CHUNKED, b"5\r\nhello\r\n0\r\nX-T: 1\r\n folded\r\n\r\n"), REJECT),
    Case("trailer-space-before-colon", post(CHUNKED, b"5\r\nhello\r\n0\r\nX-T : 1\r\n\r\n"), REJECT),
    Case("trailer-nul", post(CHUNKED, b"5\r\nhello\r\n0\r\nX-T: \x00\r\n\r\n"), REJECT),
    Case("trailer-bare-lf", post(CHUNKED, b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n"), REJECT),
    # -- Upgrade: h2c is never passed on.
    Case("upgrade-h2c", get(b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: Upgrade, HTTP2-Settings\r\n"),
         FORWARD, check={"absent": [b"upgrade", b"http2-settings", b"connection"]}),
    Case("upgrade-h2c-without-connection", get(b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"),
         FORWARD, check={"absent": [b"upgrade"]}),
    Case("upgrade-h2c-post", post(b"Upgrade: h2c\r\nConnection: Upgrade\r\nContent-Length: 5\r\n", b"hello"),
         FORWARD, check={"absent": [b"upgrade"], "body": b"hello"}),
    Case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", REJECT, (505,)),
    # -- absolute-form: the authority wins and replaces Host; one Host only.
    Case("absolute-host-disagrees", get(target=b"http://backend.internal/admin"), FORWARD,
         check={"host": b"backend.internal", "target": b"/admin"}),
    Case("absolute-https-port", get(target=b"https://Other:8443/p?q=1"), FORWARD,
         check={"host": b"Other:8443", "target": b"/p?q=1"}),
    Case("absolute-no-path", get(target=b"http://backend.internal"), FORWARD,
         check={"host": b"backend.internal", "target": b"/"}),
    Case("absolute-userinfo", get(target=b"http://user@backend.internal/"), REJECT),
    Case("absolute-empty-authority", get(target=b"http:///admin"), REJECT),
    Case("absolute-bad-authority", get(target=b"http://a%zz/"), REJECT),
    Case("absolute-other-scheme", get(target=b"ftp://backend.internal/"), REJECT),
    Case("absolute-without-host-header", b"GET http://backend.internal/ HTTP/1.1\r\n\r\n", REJECT),
    Case("connect-authority", b"CONNECT backend.internal:443 HTTP/1.1\r\n" + H + b"\r\n", REJECT, (501,)),
    Case("connect-origin", b"CONNECT /x HTTP/1.1\r\n" + H + b"\r\n", REJECT, (501,)),
    # -- versions.
    Case("http10-chunked", b"POST / HTTP/1.0\r\n" + CHUNKED + b"\r\n" + HELLO_CHUNKED, REJECT),
    Case("http10-content-length", b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", FORWARD, check={"body": b"hello"}),
    Case("http-1-x", get(version=b"HTTP/1.x"), REJECT),
    Case("http-lowercase", get(version=b"http/1.1"), REJECT),
    Case("http09", b"GET /\r\n\r\n", REJECT),
    Case("http20-in-request-line", get(version=b"HTTP/2.0"), REJECT, (505,)),
    # -- 8-bit bytes.
    Case("8bit-in-target", get(target=b"/caf\xc3\xa9"), REJECT),
    Case("8bit-in-query", get(target=b"/?q=\xff"), REJECT),
    Case("8bit-in-header-name", get(b"X-\xe9: 1\r\n"), REJECT),
    Case("8bit-in-header-value", get(b"X-Name: caf\xc3\xa9\r\n"), FORWARD, check={"headers": {b"x-name": b"caf\xc3\xa9"}}),
    Case("8bit-in-method", b"G\xc9T / HTTP/1.1\r\n" + H + b"\r\n", REJECT),
    # -- Host.
    Case("host-missing", b"GET / HTTP/1.1\r\n\r\n", REJECT),
    Case("host-twice", get(b"Host: other.example\r\n"), REJECT),
    Case("host-with-space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", REJECT),
    Case("host-with-userinfo", b"GET / HTTP/1.1\r\nHost: user@example.com\r\n\r\n", REJECT),
    Case("host-with-path", b"GET / HTTP/1.1\r\nHost: example.com/x\r\n\r\n", REJECT),
    Case("host-ipv6", b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", FORWARD, check={"host": b"[::1]:8080"}),
    Case("connection-host", get(b"Connection: Host\r\n"), FORWARD, check={"host": b"example.com"}),
    Case("connection-content-length", post(b"Connection: Content-Length\r\nContent-Length: 5\r\n", b"hello"),
         FORWARD, check={"body": b"hello"}),
    # -- ordinary requests, for contrast.
    Case("plain-get", get(), FORWARD, check={"method": b"GET", "target": b"/", "host": b"example.com"}),
    Case("lowercase-method", b"get / HTTP/1.1\r\n" + H + b"\r\n", FORWARD, check={"method": b"get"}),
    Case("chunked-plain", post(CHUNKED, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), FORWARD, check={"body": b"hello world"}),
    Case("expect-continue", post(b"Expect: 100-continue\r\nContent-Length: 5\r\n", b"hello"), FORWARD, check={"body": b"hello"}),
    Case("too-many-headers", get(b"X: y\r\n" * 101), REJECT, (431,)),
    Case("head-too-large", get(b"X: " + b"a" * 40000 + b"\r\n"), REJECT, (431,)),
]


# -- an independent, strict reading of what a backend received


class Malformed(Exception):
    """The backend was sent something that is not one clean HTTP/1.1 request."""


@dataclass
class Message:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header C{name} (lower case), in order."""
        return [v for n, v in self.headers if n.lower() == name]


_TOKEN = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9a-f]+\Z")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"upgrade",
               b"trailer", b"http2-settings"}


def strictParse(data: bytes) -> tuple[list[Message], bytes]:
    """
    The complete requests in C{data}, and the bytes after them (an
    incomplete request).  Stricter than the balancer on purpose: one Host,
    one framing header, no whitespace games, chunk sizes in lower-case hex
    without extensions, no trailers, no hop-by-hop header.

    @raise Malformed: for anything else.
    """
    messages = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return messages, data
        head, rest = data[:end], data[end + 4 :]
        if head.count(b"\r") != head.count(b"\r\n") or head.count(b"\n") != head.count(b"\r\n"):
            raise Malformed("bare CR or LF in the head")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            raise Malformed(f"request line {lines[0]!r}")
        method, target, _ = parts
        if not _TOKEN.match(method) or not (target.startswith(b"/") or target == b"*"):
            raise Malformed(f"request line {lines[0]!r}")
        if re.search(rb"[\x00-\x20\x7f-\xff]", target):
            raise Malformed(f"target {target!r}")
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b": ")
            if not colon or not _TOKEN.match(name):
                raise Malformed(f"header line {line!r}")
            if value != value.strip(b" \t") or _CTL.search(value):
                raise Malformed(f"header value {line!r}")
            lname = name.lower()
            if lname in _HOP_BY_HOP or (lname == b"te" and value != b"trailers"):
                raise Malformed(f"hop-by-hop header {line!r}")
            if lname.replace(b"_", b"-") in (b"content-length", b"transfer-encoding") and b"_" in lname:
                raise Malformed(f"underscore framing header {line!r}")
            headers.append((name, value))
        message = Message(method, target, headers, b"")
        if len(message.values(b"host")) != 1:
            raise Malformed("not exactly one Host")
        lengths = message.values(b"content-length")
        codings = message.values(b"transfer-encoding")
        if lengths and codings or len(lengths) > 1 or len(codings) > 1:
            raise Malformed("ambiguous framing")
        if codings:
            if codings != [b"chunked"]:
                raise Malformed(f"transfer coding {codings!r}")
            body = b""
            while True:
                lineEnd = rest.find(b"\r\n")
                if lineEnd < 0:
                    return messages, data
                size = rest[:lineEnd]
                if not _HEX.match(size):
                    raise Malformed(f"chunk size line {size!r}")
                n = int(size, 16)
                chunk = rest[lineEnd + 2 : lineEnd + 2 + n + 2]
                if n == 0:
                    if len(rest) < lineEnd + 4:
                        return messages, data
                    if rest[lineEnd + 2 : lineEnd + 4] != b"\r\n":
                        raise Malformed("trailers or garbage after the last chunk")
                    rest = rest[lineEnd + 4 :]
                    break
                if len(chunk) < n + 2:
                    return messages, data
                if chunk[n:] != b"\r\n":
                    raise Malformed("chunk data not followed by CRLF")
                body += chunk[:n]
                rest = rest[lineEnd + 2 + n + 2 :]
        elif lengths:
            if not re.match(rb"(0|[1-9][0-9]*)\Z", lengths[0]):
                raise Malformed(f"Content-Length {lengths[0]!r}")
            n = int(lengths[0])
            if len(rest) < n:
                return messages, data
            body, rest = rest[:n], rest[n:]
        else:
            body = b""
        message.body = body
        messages.append(message)
        data = rest
    return messages, b""


def statusOf(response: bytes) -> Optional[int]:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    return int(match.group(1)) if match else None


def checkForwarded(case: Case, message: Message) -> None:
    """
    The one request a backend got for C{case} is what C{case} expects.
    """
    check = case.check
    for key in ("method", "target", "body"):
        if key in check:
            assert getattr(message, key) == check[key], (case.name, key, getattr(message, key))
    if "host" in check:
        assert message.values(b"host") == [check["host"]], (case.name, message.headers)
    for name, value in check.get("headers", {}).items():
        assert message.values(name) == [value], (case.name, message.headers)
    for name in check.get("absent", ()):
        assert message.values(name) == [], (case.name, name, message.headers)


# -- the corpus on the in-memory balancer


def runInMemory(raw: bytes) -> tuple[bytes, list[bytes]]:
    """
    Feed C{raw} to an in-memory balancer with two backends that answer
    every complete request they get.

    @return: what the client received, and what each backend connection
        received.
    """
    lb = InMemoryBalancer(("127.0.0.1:3001", "127.0.0.1:3002"))
    client = lb.client()
    client.send(raw)
    backends = []
    answered: dict[int, int] = {}
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
            break
    lb.flush()
    return client.received(), [b.received() for b in backends]


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_case_in_memory(case: Case) -> None:
    """The balancer rejects the case with nothing sent upstream, or sends exactly one clean request."""
    response, sent = runInMemory(case.raw)
    assertOutcome(case, response, sent)


def assertOutcome(case: Case, response: bytes, sent: list[bytes]) -> None:
    """
    Check one case's outcome: what the client got and what backends got.
    """
    status = statusOf(response)
    everything = b"".join(sent)
    if case.expect == REJECT:
        assert status in case.statuses, (case.name, response[:200])
        assert everything == b"", (case.name, everything[:300])
        return
    assert status == 200, (case.name, response[:200])
    assert response.count(b"HTTP/1.1 200 OK") == 1, (case.name, response)
    messages: list[Message] = []
    for data in sent:
        complete, rest = strictParse(data)
        assert rest == b"", (case.name, "incomplete request upstream", rest[:300])
        messages.extend(complete)
    assert len(messages) == 1, (case.name, [m.target for m in messages])
    checkForwarded(case, messages[0])


def test_corpus_names_unique() -> None:
    """Every corpus case has its own name, and both outcomes are represented."""
    names = [c.name for c in CORPUS]
    assert len(names) == len(set(names))
    assert {c.expect for c in CORPUS} == {REJECT, FORWARD}


def test_strict_parse_catches_a_smuggled_request() -> None:
    """The independent parser sees two requests where a desync puts two, so the corpus check can fail."""
    messages, rest = strictParse(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n" + SMUGGLED
    )
    assert [m.target for m in messages] == [b"/", b"/admin"] and rest == b""
    with pytest.raises(Malformed):
        strictParse(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(Malformed):
        strictParse(b"GET / HTTP/1.1\r\nHost: h\r\nTransfer_Encoding: chunked\r\n\r\n")
