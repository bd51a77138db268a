"""
The backend side of the balancer: an HTTP/1.1 client protocol and the pool
of kept-alive connections it runs on.

Twisted's Agent builds an endpoint per request, keeps two idle connections
per host, moves Content-Length out of the response and offers no way to
pause a response but private attributes.  A proxy needs the opposite of all
four, so this module speaks HTTP/1.1 to backends itself.

One request at a time per connection.  The exchange that owns the request
gets::

    exchange.upstreamContinue()                     # a 100 Continue arrived
    exchange.upstreamInterim(status, reason, headers)  # another 1xx (103)
    exchange.responseHead(status, reason, headers, length)
    exchange.responseData(data)                     # zero or more times
    exchange.responseTrailers(trailers)             # chunked, if it had any
    exchange.responseFinished()                     # the connection is free
    exchange.upstreamLost(reason, responseStarted)  # it broke first

and, for a request sent with C{upgrade=True} that the backend answers with
C{101}, instead of C{responseHead} and what follows::

    exchange.upstreamSwitched(reason, headers, buffered)

after which the connection is never reused: it belongs to the exchange,
which makes it side B of a L{txbalancer.tunnel.Tunnel} (L{attachTunnel}).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import alsoProvides

from txbalancer.backend import Backend
from txbalancer.failures import BadResponse
from txbalancer.framing import (
    BAD_VALUE,
    CRLF,
    TOKEN,
    ChunkedDecoder,
    FramingError,
    parseContentLength,
)
from txbalancer.headers import connectionTokens
from txbalancer.tunnel import B
from txbalancer.writethrough import writerFor

log = Logger()

MAX_HEAD = 64 * 1024


# Response parser states; _TUNNEL: switched protocols, part of a tunnel.
_IDLE, _HEAD, _BODY, _UNTIL_CLOSE, _CHUNKED, _TUNNEL = range(6)


class UpstreamConnection(Protocol):
    """
    One connection to one backend.

    @ivar reused: whether the current request is not the connection's
        first, so a close before any response byte may be a keep-alive race
        rather than the backend's answer.
    """

    def __init__(self, pool: "UpstreamPool", backend: Backend) -> None:
        self.pool = pool
        self.backend = backend
        self.exchange: Any = None
        self.reused = False
        self.idleSince = 0.0
        self.proxyHeader = b""  # -- tcp mode: the PROXY header it was opened with
        self.responseStarted = False
        self.connected = False
        self._buffer = b""
        self._state = _IDLE
        self._remaining = 0
        self._isHead = False
        self._reusable = True
        self._requestSent = False
        self._chunkedRequest = False
        self._paused = False
        self._upgrade = False
        self._decoder: Optional[ChunkedDecoder] = None
        self.tunnel: Any = None
        self._write: Any = lambda data: self.transport.write(data)

    def connectionMade(self) -> None:
        self.connected = True
        self._write = writerFor(self.transport)
        self.pool._connections.add(self)

    # -- the request

    def sendRequest(
        self,
        head: bytes,
        exchange: Any,
        isHead: bool,
        chunked: bool,
        upgrade: bool = False,
    ) -> None:
        """
        Write a request head; the body, if any, follows through L{writeBody}
        and L{finishBody}.

        @param upgrade: the request asks to switch protocols (a WebSocket
            handshake): a C{101} is handed to the exchange, and whatever
            else the backend answers, the connection is not reused.
        """
        self._upgrade = upgrade
        self._decoder = None
        self.exchange = exchange
        self._state = _HEAD
        self._buffer = b""
        self._isHead = isHead
        self._reusable = not upgrade
        self._requestSent = False
        self._chunkedRequest = chunked
        self.responseStarted = False
        self._write(head)

    def writeBody(self, data: bytes) -> None:
        if self._chunkedRequest:
            self._write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._write(data)

    def finishBody(self) -> None:
        if self._chunkedRequest:
            self._write(b"0\r\n\r\n")
        self._requestSent = True

    # -- flow control, for the exchange

    def pauseReading(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def resumeReading(self) -> None:
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def abort(self) -> None:
        """
        Give up on this connection: it is closed, never reused.
        """
        self.exchange = None
        self._reusable = False
        self.transport.abortConnection()

    # -- the response

    def attachTunnel(self, tunnel: Any) -> None:
        """
        From now on what the backend sends, its half-close and its leaving
        go to C{tunnel}, as its side C{B}.
        """
        self.tunnel = tunnel
        alsoProvides(self, IHalfCloseableProtocol)

    def readConnectionLost(self) -> None:
        # Only called once a tunnel is attached (IHalfCloseableProtocol).
        if self.tunnel is not None:
            self.tunnel.readConnectionLost(B)

    def writeConnectionLost(self) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.dataReceived(B, data)
            return
        if self.exchange is None:
            # Nobody asked: a backend talking out of turn is not reused.
            self.pool._discard(self)
            self.transport.abortConnection()
            return
        self.responseStarted = True
        if self._buffer:
            self._buffer += data
        else:
            self._buffer = data
        try:
            self._parse()
        except (BadResponse, FramingError) as e:
            exchange = self.exchange
            self.abort()
            if exchange is not None:
                exchange.upstreamLost(
                    e if isinstance(e, BadResponse) else BadResponse(str(e)), True
                )

    def _parse(self) -> None:
        while self._buffer and self.exchange is not None:
            state = self._state
            if state == _HEAD:
                buf = self._buffer
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise BadResponse("response head too large")
                    return
                head = buf[:end]
                self._buffer = buf[end + 4 :]
                self._headReceived(head)
            elif state == _BODY:
                buf = self._buffer
                remaining = self._remaining
                exchange = self.exchange
                if len(buf) < remaining:
                    self._buffer = b""
                    self._remaining = remaining - len(buf)
                    exchange.responseData(buf)
                else:
                    # Anything past Content-Length stays in the buffer, and
                    # a connection with leftovers is never reused.
                    self._buffer = buf[remaining:]
                    self._remaining = 0
                    exchange.responseData(buf[:remaining] if self._buffer else buf)
                    self._responseDone()
            elif state == _UNTIL_CLOSE:
                buf = self._buffer
                self._buffer = b""
                self.exchange.responseData(buf)
            elif state == _CHUNKED:
                rest = self._decoder.feed(self._buffer, self.exchange.responseData)
                if rest is None:
                    self._buffer = b""
                else:
                    self._buffer = rest
                    self._responseDone()
            else:
                raise BadResponse("data after the response")

    def _headReceived(self, head: bytes) -> None:
        lines = head.split(CRLF)
        statusLine = lines[0]
        parts = statusLine.split(b" ", 2)
        if (
            len(parts) < 2
            or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(parts[1]) != 3
            or not parts[1].isdigit()
        ):
            raise BadResponse("malformed status line")
        status = int(parts[1])
        reason = parts[2] if len(parts) == 3 else b""
        if BAD_VALUE.search(reason):
            raise BadResponse("malformed reason phrase")
        headers = []
        contentLengths = []
        chunked = None
        connection = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not TOKEN.match(name):
                raise BadResponse("malformed header line")
            value = value.strip(b" \t")
            if BAD_VALUE.search(value):
                raise BadResponse("invalid character in header value")
            lname = name.lower()
            if lname == b"content-length":
                contentLengths.append(value)
            elif lname == b"transfer-encoding":
                codings = [c.strip().lower() for c in value.split(b",")]
                chunked = codings[-1] == b"chunked"
            elif lname == b"connection":
                connection.append(value)
            headers.append((name, value))

        if status < 200:
            if status == 100:
                self.exchange.upstreamContinue()
            elif status == 101:
                if not self._upgrade:
                    raise BadResponse("unexpected protocol switch")
                self._switched(reason, headers)
            elif status != 102:
                # 103 Early Hints and the like go to the client; 102
                # (Processing) is deprecated and only kept the connection
                # alive, which is the balancer's business.
                self.exchange.upstreamInterim(status, reason, headers)
            return

        tokens = connectionTokens(connection)
        if b"close" in tokens or (
            parts[0] == b"HTTP/1.0" and b"keep-alive" not in tokens
        ):
            self._reusable = False

        length: Optional[int] = None
        if self._isHead or status in (204, 304):
            # No body follows, whatever the headers say; HEAD keeps its
            # Content-Length so the client learns the size.
            if contentLengths:
                try:
                    length = parseContentLength(contentLengths)
                except FramingError:
                    length = None
            self._state = _IDLE
            self.exchange.responseHead(status, reason, headers, length)
            self._responseDone()
            return
        if chunked is not None:
            # Transfer-Encoding wins over Content-Length (RFC 9112 6.3), and
            # a message that had both is never trusted with a next one.
            if contentLengths:
                self._reusable = False
            if chunked:
                self._state = _CHUNKED
                self._decoder = ChunkedDecoder(MAX_HEAD)
            else:
                self._reusable = False
                self._state = _UNTIL_CLOSE
        elif contentLengths:
            length = parseContentLength(contentLengths)
            self._remaining = length
            self._state = _BODY
        else:
            self._reusable = False
            self._state = _UNTIL_CLOSE
        self.exchange.responseHead(status, reason, headers, length)
        if self._state == _BODY and not self._remaining and self.exchange is not None:
            self._responseDone()

    def _switched(self, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """
        The backend switched protocols: stop parsing, leave the pool, and
        hand the exchange what arrived past the 101's head.
        """
        exchange = self.exchange
        self.exchange = None
        self._state = _TUNNEL
        self._reusable = False
        self.pool._discard(self)
        if self._paused:
            self.resumeReading()
        buffered, self._buffer = self._buffer, b""
        exchange.upstreamSwitched(reason, headers, buffered)

    def _responseDone(self) -> None:
        exchange = self.exchange
        self.exchange = None
        self._state = _IDLE
        if self._buffer:
            self._reusable = False
        if self._paused:
            self.resumeReading()
        if self._reusable and self._requestSent:
            self.pool.release(self)
        else:
            self.pool._discard(self)
            self.transport.loseConnection()
        if exchange is not None:
            decoder, self._decoder = self._decoder, None
            if decoder is not None and decoder.trailers:
                exchange.responseTrailers(decoder.trailers)
            exchange.responseFinished()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        self.pool._connectionLost(self)
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.connectionLost(B, reason)
            return
        exchange = self.exchange
        self.exchange = None
        if exchange is None:
            return
        if self._state == _UNTIL_CLOSE:
            self._state = _IDLE
            exchange.responseFinished()
        else:
            exchange.upstreamLost(reason, self.responseStarted)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool: "UpstreamPool", backend: Backend) -> None:
        self.pool = pool
        self.backend = backend

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self.pool, self.backend)


def _isIP(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


def backendTLSOptions(backend: Backend, trustRoot: Any = None) -> Any:
    """
    Client TLS options for an C{https://} backend: SNI sent, and its
    certificate verified for its host name (service-identity) against
    C{trustRoot} (see L{loadTrustRoot}) or the system's trusted CAs; or,
    with C{tls_verify=off}, no verification at all.
    """
    from twisted.internet.ssl import CertificateOptions, optionsForClientTLS

    if not backend.spec.tls_verify:
        return CertificateOptions(verify=False)
    return optionsForClientTLS(backend.host, trustRoot=trustRoot)


def loadTrustRoot(path: str) -> Any:
    """
    A trust root made of every certificate in the PEM file at C{path}.

    @raise txbalancer.config.ConfigError: naming the file, when it cannot be
        read or holds no certificate.
    """
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    from txbalancer.config import ConfigError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read CA file: {e.strerror}", filename=path)
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in data.split(marker) if b"-----BEGIN" in block]
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception as e:
        raise ConfigError(f"not a PEM certificate file: {e}", filename=path)
    if not certificates:
        raise ConfigError("no certificate in CA file", filename=path)
    return trustRootFromCertificates(certificates)


def _sendProxyHeader(conn: UpstreamConnection, header: bytes) -> UpstreamConnection:
    conn.proxyHeader = header
    conn.transport.write(header)
    return conn


class UpstreamPool:
    """
    Kept-alive connections to backends, and new ones on demand.

    Idle connections are reused newest first, so the busy ones stay warm
    and the spare ones age out: a sweep closes any idle longer than
    C{idleTimeout}, which must stay below the backends' own keep-alive
    timeout (Node closes after 5 s) so the balancer is always the side that
    closes an idle connection.

    @param maxIdlePerBackend: idle connections kept per backend; more are
        closed as they come free.
    @param proxyProtocol: C{"v1"} or C{"v2"}: each new connection starts
        with a PROXY header naming the client it is opened for, and is
        reused only for requests that would send the very same header, that
        is from the same client connection (same address and port): the
        idle connections are in effect keyed by client connection.
    """

    def __init__(
        self,
        reactor: Any,
        connectTimeout: float = 3.0,
        maxIdlePerBackend: int = 64,
        idleTimeout: float = 4.0,
        tlsOptionsFor: Any = None,
        proxyProtocol: Optional[str] = None,
    ) -> None:
        self.reactor = reactor
        self.proxyProtocol = proxyProtocol
        self.connectTimeout = connectTimeout
        self.maxIdlePerBackend = maxIdlePerBackend
        self.idleTimeout = idleTimeout
        self.tlsOptionsFor = tlsOptionsFor
        self._idle: dict[Backend, list[UpstreamConnection]] = {}
        self._endpoints: dict[Backend, Any] = {}
        self._factories: dict[Backend, _ConnectionFactory] = {}
        self._connections: set[UpstreamConnection] = set()
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor
        self._closing = False
        self._whenClosed: list[defer.Deferred[None]] = []
        self._closeTimer: Any = None

    def start(self) -> None:
        if not self._sweeper.running:
            self._sweeper.start(min(1.0, self.idleTimeout / 4), now=False).addErrback(
                lambda f: log.failure("idle connection sweep stopped", f)
            )

    def idleCount(self, backend: Backend) -> int:
        return len(self._idle.get(backend, ()))

    def takeIdle(
        self, backend: Backend, proxyHeader: bytes = b""
    ) -> Optional[UpstreamConnection]:
        """
        A kept-alive connection to C{backend} (opened with C{proxyHeader}),
        or L{None} if there is none.
        """
        idle = self._idle.get(backend)
        if idle:
            if proxyHeader:
                # -- tcp mode: only a connection opened for this client.
                for i in range(len(idle) - 1, -1, -1):
                    if idle[i].proxyHeader == proxyHeader:
                        conn = idle.pop(i)
                        conn.reused = True
                        return conn
                return None
            conn = idle.pop()
            conn.reused = True
            return conn
        return None

    def proxyHeaderFor(self, addresses: Any) -> bytes:
        """
        The PROXY header for a client connection's C{(peer, host)}
        addresses, or C{b""} when the pool sends none.
        """
        if not self.proxyProtocol or addresses is None:
            return b""
        from txbalancer.proxyprotocol import encode

        return encode(self.proxyProtocol, addresses[0], addresses[1])

    def connect(
        self, backend: Backend, proxyHeader: bytes = b""
    ) -> "defer.Deferred[UpstreamConnection]":
        """
        A new connection to C{backend} (its first bytes C{proxyHeader});
        fails with the connect error, or
        L{twisted.internet.error.TimeoutError} after C{connectTimeout}.
        """
        endpoint = self._endpoints.get(backend)
        if endpoint is None:
            endpoint = self._endpoints[backend] = self._endpointFor(backend)
            self._factories[backend] = _ConnectionFactory(self, backend)
        d = endpoint.connect(self._factories[backend])
        if proxyHeader:
            d.addCallback(_sendProxyHeader, proxyHeader)
        return d

    def _endpointFor(self, backend: Backend) -> Any:
        host, port, timeout = backend.host, backend.port, self.connectTimeout
        if _isIP(host, 4):
            endpoint = TCP4ClientEndpoint(self.reactor, host, port, timeout=timeout)
        elif _isIP(host, 6):
            endpoint = TCP6ClientEndpoint(self.reactor, host, port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, port, timeout=timeout)
        if backend.scheme == "https":
            tlsOptionsFor = self.tlsOptionsFor or backendTLSOptions
            endpoint = wrapClientTLS(tlsOptionsFor(backend), endpoint)
        return endpoint

    def release(self, conn: UpstreamConnection) -> None:
        """
        A connection finished its exchange cleanly: keep it for the next.
        """
        idle = self._idle.get(conn.backend)
        if idle is None:
            idle = self._idle[conn.backend] = []
        if self._closing or len(idle) >= self.maxIdlePerBackend:
            conn.transport.loseConnection()
            return
        conn.idleSince = self.reactor.seconds()
        idle.append(conn)

    def _discard(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.backend)
        if idle and conn in idle:
            idle.remove(conn)

    def _sweep(self) -> None:
        deadline = self.reactor.seconds() - self.idleTimeout
        for idle in self._idle.values():
            # Oldest first: stop at the first one still fresh enough.
            while idle and idle[0].idleSince <= deadline:
                idle.pop(0).transport.loseConnection()

    def forget(self, backend: Backend) -> None:
        """
        Close the idle connections to a backend that left the pool.
        """
        for conn in self._idle.pop(backend, []):
            conn.transport.loseConnection()
        self._endpoints.pop(backend, None)
        self._factories.pop(backend, None)

    def _connectionLost(self, conn: UpstreamConnection) -> None:
        """
        C{conn} is gone: forget it, and when the pool is closing and it was
        the last one, fire L{close}'s Deferreds.
        """
        self._connections.discard(conn)
        self._discard(conn)
        if self._closing and not self._connections:
            self._closed()

    def close(self, timeout: float = 5.0) -> "defer.Deferred[None]":
        """
        Close every connection: idle and unused ones cleanly, busy ones at
        once (aborted); stop the sweep; close any connection released from
        now on.

        @param timeout: seconds a clean close may take; the connections
            still open then are aborted.
        @return: a Deferred that fires once every connection has gone (its
            C{connectionLost} arrived).
        """
        self._closing = True
        if self._sweeper.running:
            self._sweeper.stop()
        for idle in self._idle.values():
            idle.clear()
        for conn in list(self._connections):
            if conn.exchange is not None:
                conn.transport.abortConnection()
            else:
                conn.transport.loseConnection()
        if not self._connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._whenClosed.append(d)
        if self._closeTimer is None:
            self._closeTimer = self.reactor.callLater(timeout, self._abortRemaining)
        return d

    def _abortRemaining(self) -> None:
        self._closeTimer = None
        log.warn(
            "{n} backend connections did not close in time; aborting them",
            n=len(self._connections),
        )
        for conn in list(self._connections):
            conn.transport.abortConnection()

    def _closed(self) -> None:
        if self._closeTimer is not None:
            if self._closeTimer.active():
                self._closeTimer.cancel()
            self._closeTimer = None
        waiting, self._whenClosed = self._whenClosed, []
        for d in waiting:
            d.callback(None)
