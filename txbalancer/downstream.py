"""
The client side of the balancer: an HTTP/1.1 server protocol.

twisted.web's HTTPChannel buffers a whole request body before C{render}
and is lenient in ways a proxy cannot afford (a proxy that reads a message
differently from the server behind it is the root of request smuggling).
This protocol parses strictly, hands each request to a handler as soon as
its head is complete, streams the body to it as it arrives, and frames the
response itself.

The handler contract, for one request at a time on a connection::

    exchange = handler(request, server)   # head parsed, body not yet read
    exchange.start()                      # go: pick a backend, connect
    exchange.bodyReceived(data)           # zero or more times
    exchange.bodyFinished()               # the whole body has arrived
    exchange.clientGone()                 # the client went away first

and the exchange answers through the server's C{sendContinue},
C{startResponse}, C{writeBody}, C{finishResponse}, C{abortResponse} and
C{sendError}.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from txbalancer.framing import CRLF, ChunkedDecoder, FramingError
from txbalancer.interfaces import IDownstream, IFrontEndConnection
from txbalancer.request import BadRequest, Request, parseHead
from txbalancer.writethrough import writerFor

__all__ = [
    "BadRequest",
    "HTTPServerFactory",
    "HTTPServerProtocol",
    "NO_BODY_STATUSES",
    "REASONS",
    "Request",
    "parseHead",
]

log = Logger()

# Statuses whose responses never carry a body.
NO_BODY_STATUSES = frozenset([204, 304])

REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
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

# Parser states.
_HEAD, _BODY, _CHUNKED, _DONE = range(4)

# The head of a response with a body of at most this many bytes waits for
# the body's first bytes, so head and body leave in one send (a small body
# arrives from the backend in the same read as its head).
HOLD_HEAD_LIMIT = 64 * 1024


@implementer(IDownstream, IFrontEndConnection)
class HTTPServerProtocol(Protocol):
    """
    One client connection, one request at a time (pipelined requests wait
    in the buffer until the response before them is finished).
    """

    _timeoutCall: Any = None

    def __init__(self) -> None:
        self._buffer = b""
        self._state = _HEAD
        self._remaining = 0
        self._request: Optional[Request] = None
        self._exchange: Any = None
        self._pendingStart = False
        self._pauses: set[str] = set()
        self._responding = False
        self._chunkedResponse = False
        self._bodyAllowed = True
        self._keepAlive = True
        self._disconnected = False
        self._decoder: Optional[ChunkedDecoder] = None
        self._processing = False
        self._again = False
        self._clientCert: Any = False
        self._heldHead = b""
        self._write: Callable[[bytes], None] = self._writeLater
        self.peer = ""
        self.secure = False

    # -- connection life

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections.add(self)
        self._write = writerFor(self.transport)
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "") or ""
        self.secure = factory.secure
        self._armTimeout()

    def connectionLost(self, reason: Any = None) -> None:
        self._disconnected = True
        self.factory.connections.discard(self)
        self._cancelTimeout()
        exchange = self._exchange
        if exchange is not None:
            self._exchange = None
            exchange.clientGone()
        self.factory.connectionClosed()

    # -- timeouts

    def _armTimeout(self) -> None:
        timeout = self.factory.clientTimeout
        if timeout:
            call = self._timeoutCall
            if call is not None and call.active():
                call.reset(timeout)
            else:
                self._timeoutCall = self.factory.reactor.callLater(
                    timeout, self._timedOut
                )

    def _cancelTimeout(self) -> None:
        call = self._timeoutCall
        if call is not None:
            if call.active():
                call.cancel()
            self._timeoutCall = None

    def _timedOut(self) -> None:
        self._timeoutCall = None
        if self._exchange is not None and self._state == _DONE:
            # The whole request is in; waiting for the backend is the
            # backend timeout's business, not the client's.
            self._armTimeout()
            return
        if self._state == _HEAD and not self._buffer:
            self.transport.loseConnection()
        elif not self._responding:
            log.info("client {peer} timed out sending its request", peer=self.peer)
            self._refuse(408, "client timed out sending the request")
        else:
            self.transport.abortConnection()

    # -- reading

    def pauseReading(self, reason: str) -> None:
        """
        Stop reading from the client for C{reason} until resumed for it.
        """
        if not self._pauses:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def resumeReading(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self._disconnected:
                self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        self._process()

    def _process(self) -> None:
        if self._processing:
            # An answer given synchronously from inside this loop (say, a
            # 503 for a pipelined request) must not recurse: the loop that
            # is already running goes round once more instead.
            self._again = True
            return
        self._processing = True
        try:
            again = True
            while again:
                self._again = False
                try:
                    self._parse()
                except FramingError as e:
                    self._refuse(e.status, e.reason)
                    return
                exchange = self._exchange
                if self._pendingStart and exchange is not None:
                    request = self._request
                    # A chunked body is not forwarded before its first
                    # chunk-size line has been checked, unless the client
                    # waits for 100 Continue.
                    if (
                        not request.chunked
                        or request.expectContinue
                        or self._decoder.sawSize
                    ):
                        self._pendingStart = False
                        exchange.start()
                again = self._again
        finally:
            self._processing = False

    def _parse(self) -> None:
        factory = self.factory
        while self._buffer and not self._disconnected:
            state = self._state
            if state == _HEAD:
                buf = self._buffer
                if buf[:2] == CRLF:
                    # RFC 9112 2.2: ignore empty lines before a request line.
                    self._buffer = buf.lstrip(CRLF)
                    continue
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > factory.maxHeadSize:
                        raise BadRequest(431, "request header block too large")
                    if b"\n\n" in buf or b"\r\r" in buf:
                        raise BadRequest(400, "bare line ending in request head")
                    return
                if end > factory.maxHeadSize:
                    raise BadRequest(431, "request header block too large")
                head = buf[:end]
                self._buffer = buf[end + 4 :]
                crlfs = head.count(CRLF)
                if head.count(b"\n") != crlfs or head.count(b"\r") != crlfs:
                    raise BadRequest(400, "bare CR or LF in request head")
                self._headReceived(parseHead(head, factory.maxHeaders))
            elif state == _BODY:
                buf = self._buffer
                remaining = self._remaining
                if len(buf) <= remaining:
                    self._buffer = b""
                    self._remaining = remaining - len(buf)
                    self._exchange.bodyReceived(buf)
                else:
                    self._buffer = buf[remaining:]
                    self._remaining = 0
                    self._exchange.bodyReceived(buf[:remaining])
                if not self._remaining:
                    self._bodyDone()
                else:
                    self._armTimeout()
            elif state == _CHUNKED:
                rest = self._decoder.feed(self._buffer, self._exchange.bodyReceived)
                if rest is None:
                    self._buffer = b""
                    self._armTimeout()
                else:
                    self._buffer = rest
                    self._bodyDone()
            else:  # _DONE: a pipelined request waits for this response.
                if len(self._buffer) > factory.maxHeadSize:
                    self.pauseReading("pipeline")
                return

    def _headReceived(self, request: Request) -> None:
        factory = self.factory
        request.peer = self.peer
        request.secure = self.secure
        if self.secure and factory.clientCertificates:
            # The handshake is over by the first request: read the
            # verified client certificate once per connection.
            if self._clientCert is False:
                from txbalancer.tls import peerCertificateSubject

                self._clientCert = peerCertificateSubject(self.transport)
            request.clientCert = self._clientCert
        request.received = factory.reactor.seconds()
        maxBody = factory.maxBodySize
        if (
            maxBody is not None
            and request.contentLength is not None
            and request.contentLength > maxBody
        ):
            raise BadRequest(413, "request body too large")
        self._request = request
        self._keepAlive = request.keepAlive and not factory.draining
        self._responding = False
        self._exchange = factory.handler(request, self)
        self._pendingStart = True
        if request.chunked:
            self._state = _CHUNKED
            self._decoder = ChunkedDecoder(factory.maxHeadSize, maxBody)
            self._armTimeout()
        elif request.contentLength:
            self._state = _BODY
            self._remaining = request.contentLength
            self._armTimeout()
        else:
            self._state = _DONE
            self._exchange.bodyFinished()

    def _bodyDone(self) -> None:
        self._state = _DONE
        exchange = self._exchange
        if exchange is not None:
            if self._pendingStart:
                self._pendingStart = False
                exchange.start()
            exchange.bodyFinished()

    # -- IFrontEndConnection

    def isIdle(self) -> bool:
        """
        Whether no request is in progress: between requests, with nothing
        of the next one received.
        """
        return self._state == _HEAD and not self._buffer and not self._responding

    # -- writing, for the exchange

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()

    def sendContinue(self) -> None:
        """
        Tell a client waiting on C{Expect: 100-continue} to send its body.
        """
        if not self._responding and not self._disconnected:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def startResponse(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        length: Optional[int],
    ) -> None:
        """
        Write the response head.  C{headers} are end-to-end headers only;
        this method adds the framing (C{Content-Length}, chunked, or close)
        and C{Connection} as the client's version and the request need.
        """
        request = self._request
        self._responding = True
        bodyAllowed = request.method != b"HEAD" and status not in NO_BODY_STATUSES
        self._bodyAllowed = bodyAllowed
        self._chunkedResponse = False
        if self._state != _DONE:
            # The body is still arriving: once the response is done we
            # cannot tell where the next request would start without
            # reading the rest, so this connection ends with the response.
            self._keepAlive = False
        if self.factory.draining:
            self._keepAlive = False
        http11 = request.version == b"HTTP/1.1"
        lines = [
            b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, b"Unknown"))
        ]
        for name, value in headers:
            lines.append(name + b": " + value + b"\r\n")
        if length is not None:
            if status not in NO_BODY_STATUSES or request.method == b"HEAD":
                lines.append(b"Content-Length: %d\r\n" % (length,))
        elif bodyAllowed:
            if http11:
                self._chunkedResponse = True
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self._keepAlive = False
        if not self._keepAlive:
            lines.append(b"Connection: close\r\n")
        elif not http11:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(CRLF)
        if bodyAllowed and length and length <= HOLD_HEAD_LIMIT:
            self._heldHead = b"".join(lines)
        else:
            self._write(b"".join(lines))

    def _writeLater(self, data: bytes) -> None:
        # Before connectionMade: the transport's own write.
        self.transport.write(data)

    def writeBody(self, data: bytes) -> None:
        if not self._bodyAllowed or not data:
            return
        held = self._heldHead
        if held:
            self._heldHead = b""
            # A held head has a Content-Length: never chunked.
            self._write(held + data)
        elif self._chunkedResponse:
            self._write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._write(data)

    def respond(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        """
        A whole response with a known body at once: the fast path for small
        responses.
        """
        self.startResponse(status, reason, headers, len(body))
        self.writeBody(body)
        self.finishResponse()

    def finishResponse(self) -> None:
        """
        The response is complete: end its framing, then either wait for the
        next request on this connection or close it.
        """
        held = self._heldHead
        if held:
            # No body came after all (the exchange would have aborted
            # otherwise): the head still goes out.
            self._heldHead = b""
            self._write(held)
        if self._chunkedResponse and self._bodyAllowed:
            self._write(b"0\r\n\r\n")
        self._exchange = None
        self._request = None
        self._responding = False
        if self._disconnected:
            return
        if not self._keepAlive or self._state != _DONE:
            self.transport.loseConnection()
            self._disconnected = True
            return
        self._state = _HEAD
        self.resumeReading("pipeline")
        self._armTimeout()
        if self.factory.draining and not self._buffer:
            self.transport.loseConnection()
            return
        if self._buffer:
            self._process()

    def abortResponse(self) -> None:
        """
        The response broke off half-way: the client must not mistake what
        it got for the whole, so the connection is aborted.
        """
        self._exchange = None
        self._heldHead = b""
        if not self._disconnected:
            self._disconnected = True
            self.transport.abortConnection()

    def sendError(
        self,
        status: int,
        message: str,
        headers: Optional[list[tuple[bytes, bytes]]] = None,
    ) -> None:
        """
        Answer the current request with a short plain-text error.
        """
        if self._disconnected:
            return
        if self._responding:
            self.abortResponse()
            return
        body = message.encode("utf-8", "replace") + b"\n"
        self.respond(
            status,
            REASONS.get(status, b"Error"),
            [(b"Content-Type", b"text/plain; charset=utf-8")] + (headers or []),
            body,
        )

    def _refuse(self, status: int, reason: str) -> None:
        """
        Answer a request we will not forward, then close the connection:
        after a framing error nothing that follows can be trusted.
        """
        log.info(
            "refused request from {peer}: {status} {reason}",
            peer=self.peer,
            status=status,
            reason=reason,
        )
        self._pendingStart = False
        exchange = self._exchange
        self._exchange = None
        if exchange is not None:
            exchange.clientGone()
        self._buffer = b""
        self._keepAlive = False
        self._state = _DONE
        if self._disconnected:
            return
        if self._responding:
            self.abortResponse()
            return
        if self._request is None:
            self._request = Request()
        self.factory.counters["refused"] = self.factory.counters.get("refused", 0) + 1
        self.sendError(status, REASONS.get(status, b"Error").decode() + ": " + reason)


class HTTPServerFactory(Factory):
    """
    Builds L{HTTPServerProtocol}s for one or more listeners and knows every
    open client connection, so a graceful stop can wait for them.

    @ivar handler: C{handler(request, server)} returns the exchange that
        will serve C{request}.
    """

    protocol = HTTPServerProtocol
    noisy = False

    def __init__(
        self,
        handler: Callable[[Request, HTTPServerProtocol], Any],
        reactor: Any,
        clientTimeout: Optional[float] = 60.0,
        maxBodySize: Optional[int] = None,
        maxHeadSize: int = 32 * 1024,
        maxHeaders: int = 100,
        secure: bool = False,
        clientCertificates: bool = False,
    ) -> None:
        self.handler = handler
        self.clientCertificates = clientCertificates
        self.reactor = reactor
        self.clientTimeout = clientTimeout
        self.maxBodySize = maxBodySize
        self.maxHeadSize = maxHeadSize
        self.maxHeaders = maxHeaders
        self.secure = secure
        self.connections: set[HTTPServerProtocol] = set()
        self.draining = False
        self.counters: dict[str, int] = {}
        self._drained: list[Any] = []

    def buildProtocol(self, addr: Any) -> HTTPServerProtocol:
        p = HTTPServerProtocol()
        p.factory = self
        return p

    def connectionClosed(self) -> None:
        if self.draining and not self.connections:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drain(self, timeout: float) -> Any:
        """
        Stop keeping connections alive: close the idle ones now, close the
        busy ones when their response is done, and abort whatever is still
        open after C{timeout} seconds.

        @return: a Deferred that fires when every connection has closed.
        """
        from twisted.internet.defer import Deferred

        self.draining = True
        d: Deferred[None] = Deferred()
        if not self.connections:
            d.callback(None)
            return d
        self._drained.append(d)
        for conn in list(self.connections):
            if conn.isIdle():
                conn.transport.loseConnection()
        if self.connections:
            log.info(
                "waiting up to {timeout}s for {n} connections to finish",
                timeout=timeout,
                n=len(self.connections),
            )

        def giveUp() -> None:
            if self.connections:
                log.warn(
                    "drain timeout: aborting {n} connections", n=len(self.connections)
                )
                for conn in list(self.connections):
                    conn.transport.abortConnection()

        call = self.reactor.callLater(timeout, giveUp)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d
