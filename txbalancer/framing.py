"""
HTTP/1.1 message framing, shared by the client side (downstream.py) and
the backend side (upstream.py): which bytes belong to a message body.

Both sides must read framing exactly alike and strictly, or a client and a
backend could disagree about where a message ends.  Pure: no I/O.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

CRLF = b"\r\n"

# RFC 9110 token characters, for methods and field names.
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
TOKEN = re.compile(_TCHAR + rb"+\Z")
# Field values: visible characters, SP, HTAB and obs-text; no other CTL.
BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]+\Z")
# RFC 9110 5.6.4 quoted-string.
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 9112 7.1.1: chunk-size [ chunk-ext ], where chunk-ext is
# *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ] ).  Nothing
# else: no whitespace after the size unless an extension follows, no empty
# or malformed extension, at most 15 hex digits (2^60 - 1, far beyond any
# body, and never an overflow anywhere).
_CHUNK_SIZE = re.compile(
    rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[ \t]*" + _TCHAR + rb"+(?:[ \t]*=[ \t]*(?:"
    + _TCHAR + rb"+|" + _QUOTED + rb"))?)*\Z"
)

MAX_CONTENT_LENGTH = 2**63 - 1
MAX_CHUNK_LINE = 4096


class FramingError(Exception):
    """
    A message whose framing is malformed or ambiguous.

    @ivar status: the HTTP status that answers it when it is a request.
    @ivar reason: what is wrong, for the answer and the log.
    """

    def __init__(self, status: int, reason: str) -> None:
        Exception.__init__(self, status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def parseContentLength(values: Iterable[bytes]) -> int:
    """
    The length given by one or more Content-Length field values.  Repeated
    values (or a list) are accepted only when they all agree.

    @raise FramingError: non-numeric, conflicting or out of range.
    """
    lengths = set()
    for value in values:
        for item in value.split(b","):
            item = item.strip()
            if not _DIGITS.match(item):
                raise FramingError(400, "malformed Content-Length")
            item = item.lstrip(b"0") or b"0"
            if len(item) > 19 or int(item) > MAX_CONTENT_LENGTH:
                raise FramingError(400, "Content-Length out of range")
            lengths.add(int(item))
    if len(lengths) != 1:
        raise FramingError(400, "conflicting Content-Length values")
    return lengths.pop()


# Decoder states.
_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)


class ChunkedDecoder:
    """
    Decodes a chunked body (RFC 9112 7.1) as its bytes arrive.  Trailer
    fields are read, checked, and kept in C{trailers} for whoever wants
    to pass them on.

    @ivar sawSize: whether a chunk-size line has been read and checked.
    @ivar declared: the sum of the chunk sizes read so far.
    @ivar trailers: the trailer fields, C{(name, value)} pairs in arrival
        order, once the body has ended (empty if it had none).
    """

    __slots__ = ("_state", "_remaining", "_pending", "_trailerBytes",
                 "maxTrailerSize", "maxBodySize", "sawSize", "declared",
                 "trailers")

    def __init__(
        self, maxTrailerSize: int = 32 * 1024, maxBodySize: Optional[int] = None
    ) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._pending = b""
        self._trailerBytes = 0
        self.maxTrailerSize = maxTrailerSize
        self.maxBodySize = maxBodySize
        self.sawSize = False
        self.declared = 0
        self.trailers: list[tuple[bytes, bytes]] = []

    def feed(self, data: bytes, deliver: Callable[[bytes], object]) -> Optional[bytes]:
        """
        Decode C{data}, passing each piece of body to C{deliver}.

        @return: L{None} while the body goes on; once it has ended, the
            bytes that followed it (C{b""} if none).
        @raise FramingError: for malformed chunks (400), an oversized
            trailer section (431) or a body over C{maxBodySize} (413).
        """
        buf = self._pending + data if self._pending else data
        self._pending = b""
        while buf:
            state = self._state
            if state == _DATA:
                remaining = self._remaining
                if len(buf) <= remaining:
                    self._remaining = remaining - len(buf)
                    deliver(buf)
                    buf = b""
                else:
                    self._remaining = 0
                    deliver(buf[:remaining])
                    buf = buf[remaining:]
                if not self._remaining:
                    self._state = _DATA_END
            elif state == _SIZE:
                end = buf.find(CRLF)
                if end < 0:
                    if len(buf) > MAX_CHUNK_LINE:
                        raise FramingError(400, "chunk size line too long")
                    break
                match = _CHUNK_SIZE.match(buf, 0, end)
                if match is None:
                    raise FramingError(400, "malformed chunk size")
                size = int(match.group(1), 16)
                buf = buf[end + 2 :]
                self.sawSize = True
                if size:
                    self.declared += size
                    if self.maxBodySize is not None and self.declared > self.maxBodySize:
                        raise FramingError(413, "request body too large")
                    self._remaining = size
                    self._state = _DATA
                else:
                    self._state = _TRAILERS
            elif state == _DATA_END:
                if len(buf) < 2:
                    if buf != b"\r":
                        raise FramingError(400, "chunk data not followed by CRLF")
                    break
                if buf[:2] != CRLF:
                    raise FramingError(400, "chunk data not followed by CRLF")
                buf = buf[2:]
                self._state = _SIZE
            elif state == _TRAILERS:
                end = buf.find(CRLF)
                if end < 0:
                    if self._trailerBytes + len(buf) > self.maxTrailerSize:
                        raise FramingError(431, "trailer section too large")
                    break
                line = buf[:end]
                buf = buf[end + 2 :]
                if not line:
                    self._state = _DONE
                    return buf
                self._trailerBytes += end + 2
                if self._trailerBytes > self.maxTrailerSize:
                    raise FramingError(431, "trailer section too large")
                name, colon, value = line.partition(b":")
                value = value.strip(b" \t")
                if not colon or not TOKEN.match(name) or BAD_VALUE.search(value):
                    raise FramingError(400, "malformed trailer field")
                self.trailers.append((name, value))
            else:
                return buf
        self._pending = buf
        return None


# -- responses the balancer writes itself (every front end frames them)

# Statuses whose responses never carry a body.
NO_BODY_STATUSES = frozenset([204, 304])

REASONS = {
    100: b"Continue",
    101: b"Switching Protocols",
    103: b"Early Hints",
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


def errorResponse(
    status: int,
    message: str,
    headers: Optional[list[tuple[bytes, bytes]]] = None,
    contentType: bytes = b"Content-Type",
) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """
    C{(reason, headers, body)} of the short plain-text answer the balancer
    gives itself (a 502, a refusal): the same on every front end.

    @param contentType: how the front end spells the header (HTTP/2 wants
        lowercase names).
    """
    return (
        REASONS.get(status, b"Error"),
        [(contentType, b"text/plain; charset=utf-8")] + (headers or []),
        message.encode("utf-8", "replace") + b"\n",
    )


def refusalMessage(status: int, reason: str) -> str:
    """
    The text of a refusal: C{"Bad Request: header line without a colon"}.
    """
    return REASONS.get(status, b"Error").decode() + ": " + reason

# -- request fields for a front end without a request line (HTTP/2): the
# characters the HTTP/1.1 parser allows in the same places.

# A request target: visible ASCII only; no CTL, no space, no 8-bit byte (a
# URI is ASCII, and backends decode raw 8-bit bytes differently).  The
# HTTP/1.1 request line's rule too (request.py).
BAD_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")
# RFC 9110 7.2 / RFC 3986 3.2: uri-host [ ":" port ], without userinfo.
# Used for Host and for the authority of an absolute-form target.
AUTHORITY = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?\Z"
)
# (So no CTL, no space, no userinfo: RFC 9113 8.3.1 forbids userinfo in
# :authority for http and https.)
# A URI scheme (RFC 3986 3.1).
SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*\Z")


# Framing field names spelled with "_" for "-": servers that map names to
# CGI-style variables (HTTP_TRANSFER_ENCODING) read them as the real thing,
# so they are refused rather than passed on.
FRAMING_LOOKALIKES = frozenset([b"content_length", b"transfer_encoding"])


def fieldError(name: bytes, value: bytes) -> Optional[str]:
    """
    What is wrong with one header field as a client sent it, by the rules
    every front end applies alike: the name a token and not a framing
    field's look-alike, the value free of control characters other than
    HTAB (so no CR, LF or NUL).

    @return: the reason, or L{None} when the field is acceptable.
    """
    if not TOKEN.match(name):
        return "malformed header name"
    if name.lower() in FRAMING_LOOKALIKES:
        return "framing header name with '_' for '-'"
    if BAD_VALUE.search(value):
        return "invalid character in header value"
    return None
