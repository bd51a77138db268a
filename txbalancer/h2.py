"""
HTTP/2 for clients that choose it by ALPN, proxied to HTTP/1.1 backends.

Twisted's L{twisted.web._http2.H2Connection} does the framing, flow control
and priorities; this module puts the balancer's request handling on top of
it, so each HTTP/2 stream is one L{txbalancer.proxy.ProxyExchange}, exactly
as each HTTP/1.1 request is:

    - L{H2ProxyConnection} builds, for every stream, a
      L{txbalancer.downstream.Request} from the HEADERS frame (C{:authority}
      becomes C{Host}, cookie crumbs are joined) and hands it to the
      factory's handler with an L{H2StreamServer}, which implements the
      server side of the exchange (C{startResponse}, C{writeBody}, ...) on
      the stream; the request body streams in with per-stream flow control,
      the response streams out under the client's window.
    - Rapid reset (CVE-2023-44487): resets the client sends are counted per
      connection; past C{maxResets} within C{resetWindow} seconds it gets
      GOAWAY (ENHANCE_YOUR_CALM) and the connection is closed.
    - L{NegotiatingFactory} is the factory for a TLS listener: once the
      handshake is done it hands the connection to an L{H2ProxyConnection}
      when ALPN chose C{h2}, else to the usual
      L{txbalancer.downstream.HTTPServerProtocol}.

HTTP/2 connections join the HTTP/1.1 factory's C{connections}, so a graceful
stop waits for them too (and L{NegotiatingFactory.drain} sends them GOAWAY).

Needs the C{h2} package (C{pip install 'twisted[http2]'}).
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import h2.errors
from hyperframe.frame import GoAwayFrame
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import H2Connection
from zope.interface import implementer

from txbalancer.downstream import (
    NO_BODY_STATUSES,
    REASONS,
    Request,
)
from txbalancer.framing import FramingError, parseContentLength
from txbalancer.interfaces import IDownstream, IFrontEndConnection

log = Logger()

_DIGITS = re.compile(rb"[0-9]+\Z")

# Connection-specific headers HTTP/2 forbids in a response (RFC 9113 8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"content-length",
    ]
)


class _NoHeaders:
    """
    Stands in for C{Request.requestHeaders} inside Twisted's H2Stream: the
    balancer reads the headers from the HEADERS event itself (keeping their
    order), and Twisted must not answer C{Expect: 100-continue} on its own
    (the backend decides).
    """

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        return default

    def setRawHeaders(self, name: bytes, values: Any) -> None:
        pass


class _StreamRequest:
    """
    What Twisted's H2Stream drives for one stream (its "request"): it turns
    the stream's events into calls on the balancer's exchange.
    """

    def __init__(self, stream: Any, connection: H2ProxyConnection) -> None:
        self.stream = stream
        self.connection = connection
        self.requestHeaders = _NoHeaders()
        self.server: H2StreamServer | None = None
        self.exchange: Any = None
        self.bodySeen = 0
        self.refused = False

    # -- called by H2Stream

    def gotLength(self, length: int | None) -> None:
        pass

    def parseCookies(self) -> None:
        pass

    def handleContentChunk(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None or self.refused:
            return
        maxBody = self.connection.factory.maxBodySize
        if maxBody is not None:
            self.bodySeen += len(data)
            if self.bodySeen > maxBody:
                self.refuse(413, "request body too large")
                return
        exchange.bodyReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The whole body has arrived.
        exchange = self.exchange
        if exchange is not None and not self.refused:
            exchange.bodyFinished()

    def connectionLost(self, reason: Any) -> None:
        server = self.server
        if server is not None:
            server.closed = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.clientGone()

    # -- ours

    def refuse(self, status: int, reason: str) -> None:
        """
        Answer without forwarding (or stop forwarding) and drop the rest of
        the request body.
        """
        log.info(
            "refused HTTP/2 request from {peer}: {status} {reason}",
            peer=self.connection.peer,
            status=status,
            reason=reason,
        )
        self.refused = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.clientGone()
        counters = self.connection.factory.counters
        counters["refused"] = counters.get("refused", 0) + 1
        if self.server is not None:
            self.server.sendError(status, REASONS.get(status, b"Error").decode() + ": " + reason)


@implementer(IDownstream)
class H2StreamServer:
    """
    The server side of one exchange, on one HTTP/2 stream: the same methods
    as L{txbalancer.downstream.HTTPServerProtocol} offers an exchange.

    @ivar transport: the stream (an L{IConsumer}): the exchange registers
        itself there as the producer of the response, and is paused while
        the client's flow-control window is full.
    """

    def __init__(self, stream: Any, connection: H2ProxyConnection, request: Request) -> None:
        self.transport = stream
        self.stream = stream
        self.streamID = stream.streamID
        self.connection = connection
        self.request = request
        self.closed = False
        self.responding = False
        self._bodyAllowed = True
        self._pauses: set[str] = set()

    def _active(self) -> bool:
        return not self.closed and self.connection._streamIsActive(self.streamID)

    # -- reading

    def pauseReading(self, reason: str) -> None:
        """
        Stop passing request body data on for C{reason}; the stream's window
        stays closed, so the client stops sending on this stream only.
        """
        if not self._pauses and self._active():
            self.stream.pauseProducing()
        self._pauses.add(reason)

    def resumeReading(self, reason: str) -> None:
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and self._active():
                self.stream.resumeProducing()

    # -- writing

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.stream.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.stream.producer is not None:
            self.stream.unregisterProducer()

    def sendContinue(self) -> None:
        if not self.responding and self._active():
            self.connection._send100Continue(self.streamID)

    def startResponse(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        length: int | None,
    ) -> None:
        self.responding = True
        self._bodyAllowed = (
            self.request.method != b"HEAD" and status not in NO_BODY_STATUSES
        )
        if not self._active():
            return
        out = [
            (name.lower(), value)
            for name, value in headers
            if name.lower() not in _CONNECTION_SPECIFIC
        ]
        if length is not None and (
            status not in NO_BODY_STATUSES or self.request.method == b"HEAD"
        ):
            out.append((b"content-length", b"%d" % (length,)))
        self.connection.writeHeaders(b"HTTP/2", b"%d" % (status,), reason, out, self.streamID)

    def writeBody(self, data: bytes) -> None:
        if data and self._bodyAllowed and self._active():
            self.stream.write(data)

    def finishResponse(self) -> None:
        if self._active():
            self.closed = True
            self.connection.endRequest(self.streamID)

    def abortResponse(self) -> None:
        if self._active():
            self.closed = True
            self.connection.abortRequest(self.streamID)

    def sendError(
        self,
        status: int,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if self.closed:
            return
        if self.responding:
            self.abortResponse()
            return
        body = message.encode("utf-8", "replace") + b"\n"
        self.startResponse(
            status,
            REASONS.get(status, b"Error"),
            [(b"content-type", b"text/plain; charset=utf-8")] + (headers or []),
            len(body),
        )
        self.writeBody(body)
        self.finishResponse()


@implementer(IFrontEndConnection)
class H2ProxyConnection(H2Connection):
    """
    An HTTP/2 connection whose streams are proxied by the balancer.

    @param factory: the L{txbalancer.downstream.HTTPServerFactory} of the
        listener: its C{handler}, C{maxBodySize}, C{draining}, C{connections}.
    @param maxResets: client stream resets allowed within C{resetWindow}
        seconds before the connection is closed with GOAWAY.
    """

    def __init__(
        self,
        factory: Any,
        reactor: Any,
        maxResets: int = 100,
        resetWindow: float = 10.0,
    ) -> None:
        H2Connection.__init__(self, reactor)
        self.factory = factory
        self.timeOut = factory.clientTimeout
        self.callLater = reactor.callLater
        self.requestFactory = self._makeRequest
        self.maxResets = maxResets
        self.resetWindow = resetWindow
        self._resets: deque[float] = deque()
        self.peer = ""
        self.secure = True
        self._goingAway = False
        self._lost = False

    def _makeRequest(self, stream: Any, queued: bool = False) -> _StreamRequest:
        return _StreamRequest(stream, self)

    # -- connection life

    def makeConnection(self, transport: Any) -> None:
        H2Connection.makeConnection(self, _ProducerTransport(transport, self))

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "") or ""
        self.factory.connections.add(self)
        # The connection is its transport's producer: when the client reads
        # slowly, Twisted's sending loop waits.
        self.transport.registerProducer(self, True)
        H2Connection.connectionMade(self)
        # Each stream's window (64 KiB) bounds what a paused stream holds;
        # the connection's window is made room for all of them, so one
        # paused upload never stalls the other streams.
        streams = self.conn.local_settings.max_concurrent_streams
        self.conn.increment_flow_control_window(
            streams * self.conn.local_settings.initial_window_size
        )
        self._tryToWriteControlData()

    def connectionLost(self, reason: Any, _cancelTimeouts: bool = True) -> None:
        H2Connection.connectionLost(self, reason, _cancelTimeouts)
        if not self._lost:
            self._lost = True
            self.factory.connections.discard(self)
            self.factory.connectionClosed()

    # -- IFrontEndConnection, for a graceful stop

    def isIdle(self) -> bool:
        """
        Whether no stream is open on this connection.
        """
        return not self.streams

    def goAway(self) -> None:
        """
        Tell the client no new streams will be served; close once the open
        ones are done.
        """
        if not self._goingAway and not self._lost:
            self._goingAway = True
            # Written by hand: h2's close_connection() would also close its
            # state machine, and the open streams could not finish.
            self._tryToWriteControlData()
            frame = GoAwayFrame(
                0,
                last_stream_id=self.conn.highest_inbound_stream_id,
                error_code=h2.errors.ErrorCodes.NO_ERROR,
            )
            self.transport.write(frame.serialize())
        if not self.streams and not self._lost:
            self.transport.loseConnection()

    def _requestDone(self, streamID: int) -> None:
        # A stream is over (its last frame sent, or reset): when draining,
        # the connection closes once no stream is left.
        H2Connection._requestDone(self, streamID)
        if self.factory.draining and not self.streams and not self._lost:
            self.goAway()

    # -- streams

    def _requestReceived(self, event: Any) -> None:
        for name, value in event.headers:
            if name == b"content-length" and not _DIGITS.match(value):
                # Malformed (RFC 9113 8.1.1): a stream error, and Twisted
                # must not see it (it would int() the value).
                self.conn.reset_stream(
                    event.stream_id, error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR
                )
                self._tryToWriteControlData()
                return
        H2Connection._requestReceived(self, event)
        stream = self.streams[event.stream_id]
        streamRequest = stream._request
        try:
            request = self._buildRequest(event)
        except _Refused as e:
            streamRequest.server = H2StreamServer(stream, self, Request())
            streamRequest.refuse(e.status, e.reason)
            return
        server = H2StreamServer(stream, self, request)
        streamRequest.server = server
        factory = self.factory
        maxBody = factory.maxBodySize
        if (
            maxBody is not None
            and request.contentLength is not None
            and request.contentLength > maxBody
        ):
            streamRequest.refuse(413, "request body too large")
            return
        exchange = factory.handler(request, server)
        streamRequest.exchange = exchange
        exchange.start()

    def _buildRequest(self, event: Any) -> Request:
        request = Request()
        request.version = b"HTTP/2"
        request.peer = self.peer
        request.secure = self.secure
        request.received = self._reactor.seconds()
        authority = None
        method = path = None
        headers = request.headers
        cookies = []
        lengths = []
        expect = te = None
        for name, value in event.headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"cookie":
                cookies.append(value)
                continue
            if name == b"content-length":
                lengths.append(value)
            elif name == b"expect":
                expect = value.lower()
            elif name == b"te":
                te = value.lower()
            elif name == b"host":
                if authority is not None:
                    continue
                authority = value
            headers.append((name, value))
        if method is None or method == b"CONNECT":
            raise _Refused(501 if method else 400, "CONNECT is not supported"
                           if method else "no :method")
        if not path or (path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS")):
            raise _Refused(400, "malformed :path")
        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
        if authority is not None:
            headers[:] = [(n, v) for n, v in headers if n != b"host"]
            headers.insert(0, (b"Host", authority))
        request.method = method
        request.target = path
        request.host = authority
        if lengths:
            try:
                request.contentLength = parseContentLength(lengths)
            except FramingError as e:
                raise _Refused(e.status, e.reason)
        elif event.stream_ended is not None:
            if method not in (b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"):
                request.contentLength = 0
        else:
            # A body of unknown length follows: HTTP/1.1 backends get it
            # chunked.
            request.chunked = True
        if expect is not None:
            if expect != b"100-continue":
                raise _Refused(417, "unsupported expectation")
            request.expectContinue = True
        request.teTrailers = te == b"trailers"
        if hasattr(Request, "clientCert"):
            request.clientCert = self._clientCert()  # type: ignore[attr-defined]
        return request

    def _clientCert(self) -> bytes | None:
        from txbalancer.tls import peerCertificateSubject

        cached = getattr(self, "_clientCertSubject", False)
        if cached is False:
            cached = self._clientCertSubject = peerCertificateSubject(self.transport)
        return cached

    # Twisted looks streams up without checking they still exist; a client
    # may legally send DATA or RST_STREAM after we finished a stream.

    def _requestDataReceived(self, event: Any) -> None:
        if event.stream_id in self.streams:
            H2Connection._requestDataReceived(self, event)
        else:
            # Give the connection window back (h2 skips the closed stream).
            self.conn.acknowledge_received_data(
                event.flow_controlled_length, event.stream_id
            )
            self._tryToWriteControlData()

    def _requestEnded(self, event: Any) -> None:
        if event.stream_id in self.streams:
            H2Connection._requestEnded(self, event)

    def _requestAborted(self, event: Any) -> None:
        if event.stream_id in self.streams:
            H2Connection._requestAborted(self, event)
            if self._lost:
                return
        self._countReset()

    def _countReset(self) -> None:
        now = self._reactor.seconds()
        resets = self._resets
        resets.append(now)
        horizon = now - self.resetWindow
        while resets and resets[0] < horizon:
            resets.popleft()
        if len(resets) > self.maxResets and not self._lost:
            log.warn(  # noqa: G010 - twisted.logger.Logger has warn()
                "HTTP/2 client {peer} reset {n} streams within {window}s: "
                "closing the connection (rapid reset)",
                peer=self.peer,
                n=len(resets),
                window=self.resetWindow,
            )
            counters = self.factory.counters
            counters["h2_rapid_reset"] = counters.get("h2_rapid_reset", 0) + 1
            self._goingAway = True
            self.conn.close_connection(
                error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
            )
            self._terminate(Failure(ConnectionError("too many stream resets")))

    if not hasattr(H2Connection, "_terminate"):
        # Twisted before 26 (25.5 is the newest for PyPy's Python 3.9) has
        # no _terminate: this is the teardown its dataReceived does inline
        # on a protocol error (control data flushed, then the close).
        def _terminate(self, reason: Failure) -> None:
            if self._tryToWriteControlData():
                self.transport.loseConnection()
                self.connectionLost(reason, _cancelTimeouts=False)


class _ProducerTransport:
    """
    The transport as an L{H2ProxyConnection} sees it: closing it first
    unregisters the connection as its producer, since a TLS transport does
    not shut down while a producer is registered (and Twisted's
    H2Connection never unregisters itself).
    """

    def __init__(self, transport: Any, protocol: Any) -> None:
        self._transport = transport
        self._registered = False
        self.write = transport.write
        self.writeSequence = transport.writeSequence

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)
        self._registered = True

    def unregisterProducer(self) -> None:
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()

    def loseConnection(self) -> None:
        self.unregisterProducer()
        self._transport.loseConnection()

    def abortConnection(self) -> None:
        self.unregisterProducer()
        self._transport.abortConnection()


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        Exception.__init__(self, status, reason)
        self.status = status
        self.reason = reason


class _Negotiator(Protocol):
    """
    Waits for the TLS handshake (the first application data) and then hands
    the connection to the protocol ALPN chose, replacing itself as the TLS
    transport's wrapped protocol.
    """

    def __init__(self, factory: NegotiatingFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self.inner: Any = None
        self._timeoutCall: Any = None

    def connectionMade(self) -> None:
        timeout = self.factory.httpFactory.clientTimeout
        if timeout:
            self._timeoutCall = self.factory.reactor.callLater(timeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timeoutCall = None
        if self.inner is None:
            self.transport.abortConnection()

    def _cancelTimeout(self) -> None:
        call, self._timeoutCall = self._timeoutCall, None
        if call is not None and call.active():
            call.cancel()

    def dataReceived(self, data: bytes) -> None:
        if self.inner is None:
            self._cancelTimeout()
            self.inner = self.factory.protocolFor(
                getattr(self.transport, "negotiatedProtocol", None), self.addr
            )
            transport = self.transport
            if getattr(transport, "wrappedProtocol", None) is self:
                transport.wrappedProtocol = self.inner
            self.inner.makeConnection(transport)
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        self._cancelTimeout()
        if self.inner is not None:
            self.inner.connectionLost(reason)


class NegotiatingFactory(Factory):
    """
    The factory of a TLS listener that speaks HTTP/2 to clients choosing
    C{h2} by ALPN and HTTP/1.1 to the others.

    Use with a L{txbalancer.tls.ServerTLS} whose C{alpn} is
    C{(b"h2", b"http/1.1")}.

    @param httpFactory: the listener's
        L{txbalancer.downstream.HTTPServerFactory} (built with
        C{secure=True}); its handler, limits and connection set serve both
        protocols.
    """

    noisy = False

    def __init__(
        self,
        httpFactory: Any,
        reactor: Any,
        maxResets: int = 100,
        resetWindow: float = 10.0,
    ) -> None:
        self.httpFactory = httpFactory
        self.reactor = reactor
        self.maxResets = maxResets
        self.resetWindow = resetWindow

    def buildProtocol(self, addr: Any) -> _Negotiator:
        return _Negotiator(self, addr)

    def protocolFor(self, negotiated: bytes | None, addr: Any) -> Any:
        if negotiated == b"h2":
            return H2ProxyConnection(
                self.httpFactory,
                self.reactor,
                maxResets=self.maxResets,
                resetWindow=self.resetWindow,
            )
        return self.httpFactory.buildProtocol(addr)

    @property
    def connections(self) -> Any:
        return self.httpFactory.connections

    @property
    def counters(self) -> dict[str, int]:
        return self.httpFactory.counters

    def drain(self, timeout: float) -> Any:
        """
        Send GOAWAY to every HTTP/2 connection, then drain as the HTTP/1.1
        factory does (which waits for both kinds).
        """
        self.httpFactory.draining = True
        for conn in list(self.httpFactory.connections):
            if isinstance(conn, H2ProxyConnection):
                conn.goAway()
        return self.httpFactory.drain(timeout)
