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
C{sendError}; and, HTTP/1.1 only (L{IHTTP11Downstream}), C{sendInterim}
(a 1xx such as 103 Early Hints), C{setTrailers}, and C{switchProtocols}
with C{attachTunnel} (a WebSocket upgrade the backend accepted: from then
on the connection is one side of a L{txbalancer.tunnel.Tunnel}, with no
HTTP parsing and no client timeout).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import alsoProvides, implementer

from txbalancer.framing import (
    CRLF,
    NO_BODY_STATUSES,
    REASONS,
    ChunkedDecoder,
    FramingError,
    errorResponse,
    refusalMessage,
)
from txbalancer.interfaces import IDownstream, IFrontEndConnection, IHTTP11Downstream
from txbalancer.limits import ConnectionLimits, RefusedConnection
from txbalancer.request import BadRequest, Request, parseHead
from txbalancer.tunnel import A
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

# Parser states; _TUNNEL: the connection was handed to a tunnel.
_HEAD, _BODY, _CHUNKED, _DONE, _TUNNEL = range(5)

# The head of a response with a body of at most this many bytes waits for
# the body's first bytes, so head and body leave in one send (a small body
# arrives from the backend in the same read as its head).
HOLD_HEAD_LIMIT = 64 * 1024


@implementer(IDownstream, IHTTP11Downstream, IFrontEndConnection, IPushProducer)
class HTTPServerProtocol(Protocol):
    """
    One client connection, one request at a time (pipelined requests wait
    in the buffer until the response before them is finished).

    Deadlines, all on one timer per connection (C{_timeoutCall}).  On the
    path of a simple request the timer is only ever pushed later, which is
    cheap (see L{_armTimeout}); the first byte of a request does not touch
    it at all: its head deadline is checked when the timer fires (it sleeps
    at most the shorter of the two timeouts between requests), which then
    re-arms itself for what is left:

        - idle between requests: C{clientTimeout}, then the connection is
          closed;
        - the request head: C{headerTimeout} from its first byte (from the
          connect for the first request), then 408;
        - the request body: no byte for C{clientTimeout}, then 408 (or an
          abort once a response has begun), and the exchange hears
          C{clientGone}, which frees its backend connection;
        - the response: the protocol is its transport's streaming producer
          for the whole connection, so the transport tells it when the
          client stops reading (C{pauseProducing}: the send buffer is
          full).  Paused for C{clientTimeout} without C{resumeProducing},
          the connection is aborted.  The exchange streaming a response
          registers with the protocol (L{registerProducer}) and is paused
          and resumed with it; no further pipelined request is started
          while the client reads nothing;
        - closing: a connection asked to close that has not closed
          C{clientTimeout} later (its client reads nothing of what is left
          to send) is aborted.
    """

    _timeoutCall: Any = None
    # The client address counted by the factory's ConnectionLimits.
    _admitted: Optional[str] = None

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
        self._trailers: Optional[list[tuple[bytes, bytes]]] = None
        self.tunnel: Any = None
        self._heldHead = b""
        self._write: Callable[[bytes], None] = self._writeLater
        self.peer = ""
        self.addresses: Any = None
        self.secure = False
        # The exchange streaming a response (a push producer), if any.
        self._producer: Any = None
        # When the transport paused us (its send buffer is full), or None.
        self._writeBlockedAt: Optional[float] = None
        self._registered = False
        self._closing = False
        # Whether the connection is between requests: the first byte of the
        # next one starts its head deadline (_headStart).
        self._idleTimer = False
        self._headStart = 0.0
        self._idleDeadline = 0.0

    # -- connection life

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections.add(self)
        self._write = writerFor(self.transport)
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "") or ""
        self.addresses = (peer, self.transport.getHost())
        self.secure = factory.secure
        self.transport.registerProducer(self, True)
        self._registered = True
        # The first request's head is due headerTimeout after the connect
        # (or clientTimeout, if that is shorter).
        now = factory.reactor.seconds()
        self._headStart = now
        phase = self._headPhase()
        self._idleDeadline = now + (phase or 0.0)
        self._armTimeout(phase)

    def connectionLost(self, reason: Any = None) -> None:
        self._disconnected = True
        self._registered = False
        self._producer = None
        factory = self.factory
        factory.connections.discard(self)
        if self._admitted is not None:
            factory.limits.release(self._admitted)
            self._admitted = None
        self._cancelTimeout()
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.connectionLost(A, reason)
        exchange = self._exchange
        if exchange is not None:
            self._exchange = None
            exchange.clientGone()
        self.factory.connectionClosed()

    # -- timeouts

    def _armTimeout(self, timeout: Optional[float] = None) -> None:
        """
        (Re)start the connection's one timer: C{timeout} seconds, or
        C{clientTimeout} when L{None}.

        Pushed later, the timer is C{reset} (arithmetic); brought sooner,
        it is replaced (a cancel is lazy, a new call a heap push), since
        C{reset} to an earlier time searches the reactor's heap linearly.
        """
        factory = self.factory
        if timeout is None:
            timeout = factory.clientTimeout
        if timeout:
            call = self._timeoutCall
            if call is not None and call.active():
                reactor = factory.reactor
                if reactor.seconds() + timeout >= call.getTime():
                    call.reset(timeout)
                    return
                call.cancel()
            self._timeoutCall = factory.reactor.callLater(timeout, self._timedOut)

    def _headPhase(self) -> Optional[float]:
        """
        The longest the timer may sleep while a head is due or the
        connection idle: the shorter of the two timeouts.
        """
        header, client = self.factory.headerTimeout, self.factory.clientTimeout
        return header if header and (not client or header < client) else client

    def _cancelTimeout(self) -> None:
        call = self._timeoutCall
        if call is not None:
            if call.active():
                call.cancel()
            self._timeoutCall = None

    def _timedOut(self) -> None:
        self._timeoutCall = None
        factory = self.factory
        if self._closing:
            # Closed a while ago, and still not gone: its client reads
            # nothing of what is left to send.
            self._disconnected = True
            self.transport.abortConnection()
            return
        blockedAt = self._writeBlockedAt
        if blockedAt is not None and factory.clientTimeout:
            left = blockedAt + factory.clientTimeout - factory.reactor.seconds()
            if left > 0:
                self._armTimeout(left)
                return
            log.info(
                "client {peer} read nothing for {timeout}s: aborting the connection",
                peer=self.peer,
                timeout=factory.clientTimeout,
            )
            factory.counters["write_timeout"] = factory.counters.get("write_timeout", 0) + 1
            self._disconnected = True
            self.transport.abortConnection()
            return
        if self._exchange is not None and self._state == _DONE:
            # The whole request is in; waiting for the backend is the
            # backend timeout's business, not the client's.
            self._armTimeout()
            return
        if self._state == _HEAD:
            now = factory.reactor.seconds()
            if not self._buffer:
                left = self._idleDeadline - now
            else:
                left = self._headStart + (self._headPhase() or 0.0) - now
            if left > 0:
                # Not yet: the timer sleeps at most a head phase at a time,
                # so a head that starts meanwhile is not overslept.
                phase = self._headPhase()
                self._armTimeout(left if not phase or left < phase else phase)
                return
        if self._state == _HEAD and not self._buffer:
            self.close()
        elif not self._responding:
            if self._state == _HEAD:
                log.info(
                    "client {peer} did not send a whole request head in time",
                    peer=self.peer,
                )
                reason = "client did not send the request head in time"
            else:
                log.info("client {peer} timed out sending its request", peer=self.peer)
                reason = "client timed out sending the request"
            self._refuse(408, reason)
        else:
            self._disconnected = True
            self.transport.abortConnection()

    def close(self) -> None:
        """
        Close the connection once what was written has been sent; a client
        that reads none of it for C{clientTimeout} is cut off.
        """
        if self._closing:
            return
        self._closing = True
        if self._registered:
            # A transport (TCP or TLS) does not close while a producer is
            # registered.
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._armTimeout()

    # -- IPushProducer, for the transport: the client reading our writes

    def pauseProducing(self) -> None:
        """
        The transport's send buffer is full: the client is not reading.
        """
        if self._writeBlockedAt is None:
            self._writeBlockedAt = self.factory.reactor.seconds()
            if self._timeoutCall is None:
                self._armTimeout()
        producer = self._producer
        if producer is not None:
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        """
        The client has read what was buffered.
        """
        self._writeBlockedAt = None
        producer = self._producer
        if producer is not None:
            producer.resumeProducing()
        elif self._state == _HEAD and self._buffer and not self._disconnected:
            # A pipelined request waited for the client to read.
            self._process()

    def stopProducing(self) -> None:
        producer = self._producer
        if producer is not None:
            producer.stopProducing()

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
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.dataReceived(A, data)
            return
        if self._idleTimer:
            # The first byte of a request: its head is due headerTimeout
            # from now (the timer, due within a head phase, checks).
            self._idleTimer = False
            self._headStart = self.factory.reactor.seconds()
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        if self._writeBlockedAt is not None and self._state == _HEAD:
            # The client reads none of our answers: start no other.
            if len(self._buffer) > self.factory.maxHeadSize:
                self.pauseReading("pipeline")
            return
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
            if state == _TUNNEL:
                return
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
        request.addresses = self.addresses
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
        """
        C{producer} (a push producer: the exchange) streams the response:
        it is paused and resumed as the client reads.
        """
        self._producer = producer
        if self._writeBlockedAt is not None:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def sendContinue(self) -> None:
        """
        Tell a client waiting on C{Expect: 100-continue} to send its body.
        """
        if not self._responding and not self._disconnected:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def sendInterim(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        Pass on an interim (1xx) response such as 103 Early Hints, to an
        HTTP/1.1 client (RFC 9110 15.2: never to an HTTP/1.0 one).
        """
        request = self._request
        if (
            self._responding
            or self._disconnected
            or request is None
            or request.version != b"HTTP/1.1"
        ):
            return
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, b"Unknown"))]
        for name, value in headers:
            lines.append(name + b": " + value + CRLF)
        lines.append(CRLF)
        self.transport.write(b"".join(lines))

    def setTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        Trailer fields to end the chunked response with: written only when
        the client said it accepts them (C{TE: trailers}), dropped otherwise.
        """
        request = self._request
        if request is not None and request.teTrailers:
            self._trailers = trailers

    def switchProtocols(
        self, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[Any, bytes]:
        """
        The backend accepted the upgrade: write the C{101} head (C{headers}
        are end-to-end; C{Connection: Upgrade} and the client's C{Upgrade}
        are added), stop parsing HTTP, stop the client timeout and every
        pause, and hand over the transport.

        @return: the transport, and the bytes already read past the
            request's head (the first frames the client sent at once).
        """
        request = self._request
        self._state = _TUNNEL
        self._pendingStart = False
        self._exchange = None
        self._responding = True
        # No deadline of this protocol's applies to a tunnel (it has its
        # idle timeout), and the tunnel registers its own producers: the
        # write deadline's registration ends here.
        self._cancelTimeout()
        self._producer = None
        self._writeBlockedAt = None
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
        lines = [b"HTTP/1.1 101 " + (reason or REASONS[101]) + CRLF]
        for name, value in headers:
            lines.append(name + b": " + value + CRLF)
        lines.append(b"Connection: Upgrade\r\n")
        for name, value in request.headers:
            if name.lower() == b"upgrade":
                lines.append(b"Upgrade: " + value + CRLF)
        lines.append(CRLF)
        self.transport.write(b"".join(lines))
        if self._pauses:
            self._pauses.clear()
            self.transport.resumeProducing()
        buffered, self._buffer = self._buffer, b""
        return self.transport, buffered

    def attachTunnel(self, tunnel: Any) -> None:
        """
        From now on what the client sends, its half-close and its leaving
        go to C{tunnel} as its side C{A}.
        """
        self.tunnel = tunnel
        alsoProvides(self, IHalfCloseableProtocol)

    # IHalfCloseableProtocol, provided once a tunnel is attached.

    def readConnectionLost(self) -> None:
        if self.tunnel is not None:
            self.tunnel.readConnectionLost(A)

    def writeConnectionLost(self) -> None:
        pass

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
        if self.factory.draining or request.websocket:
            # A refused WebSocket handshake: what the client sent after it
            # may be frames, never to be read as the next request.
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
            trailers, self._trailers = self._trailers, None
            if trailers:
                self._write(
                    b"0\r\n"
                    + b"".join(n + b": " + v + CRLF for n, v in trailers)
                    + CRLF
                )
            else:
                self._write(b"0\r\n\r\n")
        self._trailers = None
        self._exchange = None
        self._request = None
        self._responding = False
        if self._disconnected:
            return
        if not self._keepAlive or self._state != _DONE:
            self.close()
            self._disconnected = True
            return
        self._state = _HEAD
        self.resumeReading("pipeline")
        factory = self.factory
        now = factory.reactor.seconds()
        if self._buffer:
            # A pipelined request has begun: its head is due from now.
            self._headStart = now
        else:
            self._idleTimer = True
            timeout = factory.clientTimeout
            self._idleDeadline = now + timeout if timeout else float("inf")
        # Usually later than where the timer stood (the head deadline of
        # this request, at most a head phase after it began).
        self._armTimeout(self._headPhase())
        if self.factory.draining and not self._buffer:
            self.close()
            return
        if self._buffer and self._writeBlockedAt is None:
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
        self.respond(status, *errorResponse(status, message, headers))

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
        self.sendError(status, refusalMessage(status, reason))


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
        headerTimeout: Optional[float] = 10.0,
        limits: Optional[ConnectionLimits] = None,
    ) -> None:
        self.handler = handler
        self.headerTimeout = headerTimeout
        self.limits = limits
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

    def buildProtocol(self, addr: Any) -> Any:
        limits = self.limits
        if limits is not None and limits.active:
            host = getattr(addr, "host", "") or ""
            if not limits.admit(host):
                return RefusedConnection()
            p = HTTPServerProtocol()
            p._admitted = host
        else:
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
                if isinstance(conn, HTTPServerProtocol):
                    conn.close()
                else:
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
