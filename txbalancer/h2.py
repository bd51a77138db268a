"""
HTTP/2 for clients that choose it by ALPN, proxied to HTTP/1.1 backends.

Twisted's L{twisted.web._http2.H2Connection} does the framing, flow control
and priorities; this module puts the balancer's request handling on top of
it, so each HTTP/2 stream is one L{txbalancer.proxy.ProxyExchange}, exactly
as each HTTP/1.1 request is:

    - L{H2ProxyConnection} builds, for every stream, a
      L{txbalancer.downstream.Request} from the HEADERS frame, checked as
      strictly as the HTTP/1.1 listener checks a request head and by RFC
      9113's rules for HTTP/2 fields (a malformed one is answered on its
      stream and never forwarded; C{:authority} becomes C{Host}, cookie
      crumbs are joined), and hands it to the
      factory's handler with an L{H2StreamServer}, which implements the
      server side of the exchange (C{startResponse}, C{writeBody}, ...) on
      the stream; the request body streams in with per-stream flow control,
      the response streams out under the client's window.
    - Flow control: a stream whose window is zero or negative (RFC 9113
      6.9.2) waits for it to reopen; L{_WindowedPriority} keeps Twisted's
      sending loop from over-sending or spinning on it.
    - Rapid reset (CVE-2023-44487): resets the client sends are counted per
      connection; past C{maxResets} within C{resetWindow} seconds it gets
      GOAWAY (ENHANCE_YOUR_CALM) and the connection is closed.
    - L{NegotiatingFactory} is the factory for a TLS listener: once the
      handshake is done it hands the connection to an L{H2ProxyConnection}
      when ALPN chose C{h2}, else to the usual
      L{txbalancer.downstream.HTTPServerProtocol}.

HTTP/2 connections join the HTTP/1.1 factory's C{connections}, so a graceful
stop waits for them too (and L{NegotiatingFactory.drain} sends them GOAWAY).

The C{h2} package comes with txbalancer (C{twisted[http2]} is a dependency).
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
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection
from zope.interface import implementer

from txbalancer.request import Request
from txbalancer.framing import (
    AUTHORITY,
    NO_BODY_STATUSES,
    errorResponse,
    refusalMessage,
    BAD_TARGET,
    SCHEME,
    TOKEN,
    FramingError,
    fieldError,
    parseContentLength,
)
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


# The pseudo-header fields of a request (RFC 9113 8.3.1); :protocol only for
# extended CONNECT (RFC 8441), which is refused like any CONNECT.
_REQUEST_PSEUDO = frozenset([b":method", b":scheme", b":authority", b":path", b":protocol"])

# Connection-specific fields: a request with one is malformed (RFC 9113
# 8.2.2); TE is allowed with the value "trailers" only.
_CONNECTION_HEADERS = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"]
)

_WS = frozenset([b" ", b"\t"])


class _StreamEvent:
    """
    What Twisted's handlers read of an h2 event: the stream (0 for the whole
    connection), and for C{_requestReceived} headers, none here (the
    balancer reads those itself).
    """

    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, streamID: int) -> None:
        self.stream_id = streamID


class _WindowedPriority:
    """
    The priority tree as Twisted's sending loop sees it: a stream whose
    flow-control window is not positive is not offered for DATA, but
    blocked until a window update or new settings open it again.

    This covers C{twisted.web._http2.H2Connection._sendPrioritisedData}
    (as of Twisted 26.10): it sizes the next DATA frame as
    C{min(max_outbound_frame_size, local_flow_control_window(stream))}.
    When the client lowers SETTINGS_INITIAL_WINDOW_SIZE after data was sent,
    the window goes negative (legal, RFC 9113 6.9.2), the slice
    C{frameData[:negative]} sends more than the window allows, h2 raises
    FlowControlError out of the loop, which logs a critical traceback and is
    never scheduled again: every stream on the connection stalls. At a
    window of exactly zero the loop reschedules itself with C{callLater(0)}
    until the window opens, a busy loop.
    """

    def __init__(self, tree: Any, connection: H2ProxyConnection) -> None:
        self._tree = tree
        self._connection = connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tree, name)

    def __iter__(self) -> _WindowedPriority:
        return self

    def __next__(self) -> int:
        tree = self._tree
        connection = self._connection
        queues = connection._outboundStreamQueues
        window = connection.conn.local_flow_control_window
        while True:
            # Raises priority.DeadlockError when every stream is blocked:
            # the loop then waits for _wakeSender.
            streamID = next(tree)
            queue = queues.get(streamID)
            if not queue or queue[0] is _END_STREAM_SENTINEL or window(streamID) > 0:
                return streamID
            tree.block(streamID)


class _NoHeaders:
    """
    Stands in for C{Request.requestHeaders} inside Twisted's H2Stream: the
    balancer reads the headers from the HEADERS event itself (keeping their
    order) and hands Twisted none (L{_StreamEvent}); Twisted must not answer
    C{Expect: 100-continue} on its own either (the backend decides).
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
        if exchange is None or self.refused or not data:
            # An empty DATA frame carries nothing; passed on, it would be
            # an empty chunk, which ends a chunked body early.
            return
        self.bodySeen += len(data)
        maxBody = self.connection.factory.maxBodySize
        if maxBody is not None and self.bodySeen > maxBody:
            self.refuse(413, "request body too large")
            return
        length = self.server.request.contentLength
        if length is not None and self.bodySeen > length:
            # h2 checks this before us; repeated, as the backend reads the
            # body by the Content-Length it was sent.
            self.refuse(400, "body longer than content-length")
            return
        exchange.bodyReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The whole body has arrived.
        exchange = self.exchange
        if exchange is None or self.refused:
            return
        length = self.server.request.contentLength
        if length is not None and self.bodySeen != length:
            # Malformed (RFC 9113 8.1.1), and h2 does not notice when the
            # stream ends with HEADERS (no DATA, or trailers). The backend
            # was promised Content-Length bytes: its connection is aborted
            # (clientGone), never reused with a body short of its length.
            self.refuse(400, "body shorter than content-length")
            return
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
            self.server.sendError(status, refusalMessage(status, reason))


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
        self.stream.registerProducer(_WriteDeadline(producer, self), streaming)

    def unregisterProducer(self) -> None:
        producer = self.stream.producer
        if producer is not None:
            if isinstance(producer, _WriteDeadline):
                producer._cancel()
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
        reason, headers, body = errorResponse(status, message, headers, b"content-type")
        self.startResponse(status, reason, headers, len(body))
        self.writeBody(body)
        self.finishResponse()


class _WriteDeadline:
    """
    The exchange as its stream's producer, with the write deadline of
    C{--client-timeout}: Twisted pauses it while the client's flow-control
    window for the stream is shut; paused that long without a window
    update, the stream is reset and the exchange told the client is gone,
    which frees its backend connection.  (A client that reads nothing at
    all stops sending too, and Twisted's idle timeout of the connection
    closes it; this covers a client that keeps the connection busy while
    leaving one stream's window shut.)
    """

    def __init__(self, producer: Any, server: H2StreamServer) -> None:
        self.producer = producer
        self.server = server
        self._call: Any = None

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()
        connection = self.server.connection
        timeout = connection.factory.clientTimeout
        if timeout and self._call is None:
            self._call = connection._reactor.callLater(timeout, self._stalled)

    def resumeProducing(self) -> None:
        self._cancel()
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self._cancel()
        self.producer.stopProducing()

    def _cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _stalled(self) -> None:
        self._call = None
        server = self.server
        if not server._active():
            return
        log.info(
            "HTTP/2 client {peer} opened no window on stream {stream} for "
            "{timeout}s: resetting it",
            peer=server.connection.peer,
            stream=server.streamID,
            timeout=server.connection.factory.clientTimeout,
        )
        counters = server.connection.factory.counters
        counters["write_timeout"] = counters.get("write_timeout", 0) + 1
        server.abortResponse()
        request = getattr(server.stream, "_request", None)
        if request is not None:
            # Twisted does not tell a stream it reset itself.
            request.connectionLost(None)


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
        self.addresses: Any = None
        self.secure = True
        self._goingAway = False
        self._lost = False
        self.priority = _WindowedPriority(self.priority, self)

    def _makeRequest(self, stream: Any, queued: bool = False) -> _StreamRequest:
        return _StreamRequest(stream, self)

    # -- connection life

    def makeConnection(self, transport: Any) -> None:
        H2Connection.makeConnection(self, _ProducerTransport(transport, self))

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "") or ""
        self.addresses = (peer, self.transport.getHost())
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

    # -- flow control (see _WindowedPriority)

    def dataReceived(self, data: bytes) -> None:
        window = self.conn.remote_settings.initial_window_size
        H2Connection.dataReceived(self, data)
        raised = self.conn.remote_settings.initial_window_size - window
        if raised > 0 and self._stillProducing:
            # A larger SETTINGS_INITIAL_WINDOW_SIZE opens every stream's
            # window (RFC 9113 6.9.2); h2 applies it but reports no
            # WindowUpdated, and Twisted ignores RemoteSettingsChanged.
            self._handleWindowUpdate(_StreamEvent(0))

    def _handleWindowUpdate(self, event: Any) -> None:
        # Twisted unblocks the streams with data queued but does not wake a
        # sending loop that found every stream blocked.
        H2Connection._handleWindowUpdate(self, event)
        self._wakeSender()

    def _wakeSender(self) -> None:
        waiting, self._sendingDeferred = self._sendingDeferred, None
        if waiting is not None:
            waiting.callback(None)

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
        # The request is validated and built here, from the HEADERS event;
        # Twisted's H2Stream gets none of the headers (it would int() a
        # content-length and answer Expect itself), only the stream.
        H2Connection._requestReceived(self, _StreamEvent(event.stream_id))
        stream = self.streams[event.stream_id]
        streamRequest = stream._request
        try:
            request = self._buildRequest(event)
        except _Refused as e:
            # The method decides whether the answer may have a body (HEAD).
            refused = Request()
            refused.method = dict(event.headers).get(b":method", b"")
            streamRequest.server = H2StreamServer(stream, self, refused)
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
        """
        The HTTP/1.1 request for a stream's HEADERS, held to the rules the
        HTTP/1.1 listener applies (L{txbalancer.downstream.parseHead}) and
        to RFC 9113 8.2 and 8.3.

        Malformed requests: h2 itself (C{validate_inbound_headers}, on in
        Twisted's configuration) already rejects uppercase or non-visible
        characters in names, CR, LF and NUL and surrounding whitespace in
        values, connection-specific fields, TE other than "trailers",
        duplicate, unknown, misplaced or missing pseudo-headers, an empty
        C{:path}, Host differing from C{:authority}, and a content-length
        the DATA frames disagree with; it does so with a connection error
        (GOAWAY PROTOCOL_ERROR), which RFC 9113 5.4.1 allows in place of a
        stream error. What it lets through (a method or a name that is not
        a token, other control characters, spaces in C{:path}, control
        characters or userinfo in C{:authority}, the target's form,
        CONNECT) is refused here with an HTTP response on the stream,
        which RFC 9113 8.1.1 allows ("a server MAY send an HTTP response
        prior to closing or resetting the stream"): a 400 with the reason,
        as the HTTP/1.1 listener answers, and the stream ends. The checks h2
        makes are repeated here too, so that nothing malformed reaches a
        backend whatever h2's configuration or version.

        @raise _Refused: the request is not forwarded.
        """
        request = Request()
        request.version = b"HTTP/2"
        request.peer = self.peer
        request.addresses = self.addresses
        request.secure = self.secure
        request.received = self._reactor.seconds()
        pseudo: dict[bytes, bytes] = {}
        regular = False
        headers = request.headers
        cookies = []
        lengths = []
        hosts = []
        expect = None
        teTrailers = False
        for name, value in event.headers:
            if name[:1] == b":":
                if regular:
                    raise _Refused(400, "pseudo-header field after a regular one")
                if name not in _REQUEST_PSEUDO:
                    raise _Refused(400, "unknown pseudo-header field")
                if name in pseudo:
                    raise _Refused(400, "repeated pseudo-header field")
                pseudo[name] = value
                continue
            regular = True
            problem = fieldError(name, value)
            if problem is None and name != name.lower():
                problem = "uppercase header name"
            if problem is not None:
                raise _Refused(400, problem)
            if value[:1] in _WS or value[-1:] in _WS:
                raise _Refused(400, "whitespace around a header value")
            if name in _CONNECTION_HEADERS:
                raise _Refused(400, "connection-specific header field")
            if name == b"cookie":
                cookies.append(value)
                continue
            if name == b"content-length":
                if not _DIGITS.match(value):
                    raise _Refused(400, "malformed Content-Length")
                lengths.append(value)
            elif name == b"host":
                hosts.append(value)
                continue
            elif name == b"expect":
                expect = value.lower()
            elif name == b"te":
                if value.lower() != b"trailers":
                    raise _Refused(400, "TE other than trailers")
                teTrailers = True
            headers.append((name, value))

        method = pseudo.get(b":method")
        if method is None:
            raise _Refused(400, "no :method")
        if not TOKEN.match(method):
            raise _Refused(400, "malformed method")
        if method == b"CONNECT":
            # Plain and extended (:protocol) CONNECT alike, as on HTTP/1.1.
            raise _Refused(501, "CONNECT is not supported")
        if b":protocol" in pseudo:
            raise _Refused(400, ":protocol without CONNECT")
        scheme = pseudo.get(b":scheme")
        if scheme is None or not SCHEME.match(scheme):
            raise _Refused(400, "missing or malformed :scheme")
        path = pseudo.get(b":path")
        if not path or BAD_TARGET.search(path):
            raise _Refused(400, "malformed :path")
        if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
            # RFC 9113 8.3.1: origin-form, or "*" for OPTIONS; never the
            # absolute form.
            raise _Refused(400, "malformed :path")

        if len(hosts) > 1:
            raise _Refused(400, "more than one Host header")
        authority = pseudo.get(b":authority")
        if authority is None:
            if not hosts:
                raise _Refused(400, "no :authority or Host")
            authority = hosts[0]
        elif hosts and hosts[0].lower() != authority.lower():
            # RFC 9113 8.3.1: SHOULD be treated as malformed.
            raise _Refused(400, "Host differs from :authority")
        if not authority or not AUTHORITY.match(authority):
            # RFC 9110 4.2.1: an http(s) URI has a non-empty host.
            raise _Refused(400, "malformed :authority")

        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
        headers.insert(0, (b"Host", authority))
        request.method = method
        request.target = path
        request.host = authority
        if lengths:
            try:
                request.contentLength = parseContentLength(lengths)
            except FramingError as e:
                raise _Refused(e.status, e.reason)
            if request.contentLength and event.stream_ended is not None:
                # The HEADERS end the stream: no body, whatever the length
                # says (h2 lets this through).
                raise _Refused(400, "content-length without a body")
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
        request.teTrailers = teTrailers
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
