"""
The reverse proxy: for each request, pick a backend, forward the request,
stream the response back, and turn every failure into a short, truthful
answer (502, 503 or 504) with one log line.

A L{Forwarder} is the handler an L{txbalancer.downstream.HTTPServerFactory}
calls for each request; it makes a L{ProxyExchange}, which lives for that
one request and talks to the client side (the server protocol) and the
backend side (an L{txbalancer.upstream.UpstreamConnection}).

A WebSocket handshake (C{request.websocket}, HTTP/1.1 only) is forwarded
with its C{Upgrade} and C{Connection: Upgrade}; when the backend answers
C{101}, the client's connection and the backend's are handed over to a
L{txbalancer.tunnel.Tunnel}, which relays them byte for byte until either
side ends.  The tunnel stays in flight on its backend (least-conn counts
it, a removed backend waits for it) until it closes.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from txbalancer.backend import Backend
from txbalancer.failures import describe
from txbalancer.framing import CRLF
from txbalancer.headers import (
    SET_BY_BALANCER,
    clientAddress,
    endToEnd,
    forwardedHeaders,
    isTrusted,
)
from txbalancer.interfaces import IExchange, IHTTP11Downstream
from txbalancer.tunnel import A, B, Tunnel
from txbalancer.upstream import UpstreamConnection

log = Logger()

# Methods that may be sent twice with the effect of once (RFC 9110 9.2.2).
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])

# Request headers the balancer rewrites itself (see headers.forwardedHeaders).
REQUEST_DROP = SET_BY_BALANCER | frozenset([b"via"])

# How much of a request body is kept to resend it after a failed attempt,
# and how much may wait for a connection before the client is paused.
REPLAY_LIMIT = 64 * 1024
PENDING_LIMIT = 64 * 1024

# Responses smaller than this arrive in one or two reads; they are written
# without registering the backend as the client's producer.
SMALL_RESPONSE = 64 * 1024

# The phases of a ProxyExchange (see its docstring).
WAITING = "WAITING"
CHOOSING = "CHOOSING"
QUEUED = "QUEUED"
CONNECTING = "CONNECTING"
SENT = "SENT"
RESPONDING = "RESPONDING"
TUNNEL = "TUNNEL"
DONE = "DONE"

# Trailer fields never passed on (RFC 9110 6.5.1: framing, routing and
# authentication are not a trailer's to set); hop-by-hop ones go anyway.
TRAILER_DROP = frozenset(
    [b"host", b"content-type", b"content-encoding", b"content-range",
     b"authorization", b"set-cookie", b"cache-control", b"expect"]
)


class Forwarder:
    """
    Forwards requests to the backends of a pool.

    @param pool: the L{txbalancer.pool.BackendPool} that picks backends.
    @param upstreams: the L{txbalancer.upstream.UpstreamPool} of connections.
    @param trustedProxies: networks whose X-Forwarded-For is believed.
    @param backendTimeout: seconds to wait for a response head.
    @param accessLog: an L{txbalancer.accesslog.AccessLog}, or L{None}.
    @param tunnelIdleTimeout: seconds a WebSocket tunnel may carry no byte
        either way before both sides are closed (C{--tunnel-idle-timeout}).

    @ivar inFlight: requests started and not yet finished.
    @ivar retries: attempts after a request's first (another backend, or a
        fresh connection to the same one).
    """

    def __init__(
        self,
        pool: Any,
        upstreams: Any,
        reactor: Any,
        trustedProxies: Sequence[Any] = (),
        backendTimeout: float = 60.0,
        accessLog: Any = None,
        needsClientKey: bool = False,
        stickyCookie: Optional[str] = None,
        queueTimeout: float = 0.0,
        hsts: Optional[int] = None,
        redirectHttps: bool = False,
        httpsPort: Optional[int] = None,
        tunnelIdleTimeout: Optional[float] = 3600.0,
    ) -> None:
        self.pool = pool
        self.tunnelIdleTimeout = tunnelIdleTimeout
        self.httpsPort = httpsPort
        self.hsts = (
            (b"Strict-Transport-Security", b"max-age=%d" % (hsts,))
            if hsts is not None
            else None
        )
        self.redirectHttps = redirectHttps
        self.needsClientKey = needsClientKey
        self.stickyCookie = stickyCookie.encode("ascii") if stickyCookie else None
        self.queueTimeout = queueTimeout
        self.upstreams = upstreams
        self.reactor = reactor
        self.trustedProxies = tuple(trustedProxies)
        self.backendTimeout = backendTimeout
        self.accessLog = accessLog
        self.inFlight = 0
        self.retries = 0
        self._trustCache: dict[str, bool] = {}

    def __call__(self, request: Any, server: Any) -> "ProxyExchange":
        return ProxyExchange(self, request, server)

    def setTrustedProxies(self, networks: Sequence[Any]) -> None:
        """
        Believe X-Forwarded-For from C{networks} from now on (a reload).
        """
        self.trustedProxies = tuple(networks)
        self._trustCache.clear()

    def isTrusted(self, peer: str) -> bool:
        trusted = self._trustCache.get(peer)
        if trusted is None:
            if len(self._trustCache) > 4096:
                self._trustCache.clear()
            trusted = self._trustCache[peer] = isTrusted(peer, self.trustedProxies)
        return trusted


@implementer(IPushProducer)
class _RequestBodyProducer:
    """
    Registered with a backend connection while a request body streams to
    it: when the backend reads slowly, the client is paused.
    """

    def __init__(self, server: Any) -> None:
        self.server = server

    def pauseProducing(self) -> None:
        self.server.pauseReading("upstream")

    def resumeProducing(self) -> None:
        self.server.resumeReading("upstream")

    def stopProducing(self) -> None:
        self.server.resumeReading("upstream")


@implementer(IPushProducer, IExchange)
class ProxyExchange:
    """
    One request on its way through the balancer.

    It is also the push producer registered with the client's transport
    while a response streams: a slow client pauses the backend.

    @ivar _phase: where the exchange is in its life, one of:

        - C{WAITING}: made by the front end, which has not called
          C{start()} yet (the head is parsed; the body may be arriving,
          kept in C{pending}).
        - C{CHOOSING}: started; asking the pool for a backend (again, on
          a retry).  Passed through synchronously.
        - C{QUEUED}: every backend is at its C{max_conns}; waiting in the
          pool's queue for C{backendFreed()} (or the queue timeout).
        - C{CONNECTING}: a backend is chosen; waiting for a new
          connection to it.
        - C{SENT}: the head is with the backend (the body may still be
          streaming to it); waiting for the response head.  A lost
          connection or a timeout here may go back to C{CHOOSING}.
        - C{RESPONDING}: the response head was passed to the client; the
          body is streaming.
        - C{TUNNEL}: the backend accepted a WebSocket upgrade (C{101});
          both connections are spliced by C{tunnel} until one side ends.
        - C{DONE}: answered, failed, or the client left.  Final.

    Facts that hold across phases are kept apart: C{bodyDone} (the client
    sent its whole body), C{_producing} (registered as the client's
    producer), C{_clientPaused}, C{_timedOutOnce} and C{_retriedFresh}
    (retries already spent).
    """

    def __init__(self, forwarder: Forwarder, request: Any, server: Any) -> None:
        self.forwarder = forwarder
        self.request = request
        # What the backend is asked for: the request's target, or less of
        # it when a route strips its prefix (the access log keeps the
        # client's).
        self.target = request.target
        self.server = server
        self.backend: Optional[Backend] = None
        self.conn: Optional[UpstreamConnection] = None
        self.tried: set[Backend] = set()
        self.pending: list[bytes] = []
        self.pendingSize = 0
        self.replay: Optional[list[bytes]] = []
        self.replaySize = 0
        self._phase = WAITING
        self.bodyDone = False
        self.status = 0
        self.sentBytes = 0
        self.errors: list[str] = []
        self._connecting: Any = None
        self._timeoutCall: Any = None
        self._head: Optional[bytes] = None
        self._bodyProducer: Optional[_RequestBodyProducer] = None
        self._producing = False
        self._clientPaused = False
        self._timedOutOnce = False
        self._retriedFresh = False
        self._activeBackend: Optional[Backend] = None
        self._sentAt = 0.0
        self._connectStart = 0.0
        self.connectTime: Optional[float] = None
        self.firstByteTime: Optional[float] = None
        # Backends that closed a fresh connection on this request, complete,
        # without a byte of answer: the request's fault or theirs, decided
        # by whether another backend answers it (see _judgeLoss).
        self._suspects: list[Backend] = []
        self.clientKey: Optional[str] = None
        self.cookieValue: Optional[str] = None
        self.proxyHeader = b""  # -- tcp mode: the PROXY header, if sent
        self.tunnel: Optional[Tunnel] = None

    @property
    def started(self) -> bool:
        """
        Whether the exchange has left C{WAITING}.
        """
        return self._phase is not WAITING

    @property
    def finished(self) -> bool:
        """
        Whether the exchange is C{DONE}.
        """
        return self._phase is DONE

    @property
    def responded(self) -> bool:
        """
        Whether a response head has been passed to the client (and the
        exchange is not yet C{DONE}).
        """
        return self._phase is RESPONDING

    # -- from the client side

    def start(self) -> None:
        """
        The head is parsed (and the first body bytes checked): go.
        """
        if self._phase is not WAITING:
            return
        self._phase = CHOOSING
        forwarder = self.forwarder
        forwarder.inFlight += 1
        request = self.request
        if forwarder.redirectHttps and not request.secure:
            self._redirectToHttps()
            return
        if forwarder.upstreams.proxyProtocol:
            self.proxyHeader = forwarder.upstreams.proxyHeaderFor(
                getattr(request, "addresses", None)
            )
        if forwarder.needsClientKey:
            self.clientKey = clientAddress(
                request.headers, request.peer, forwarder.trustedProxies
            )
        if forwarder.stickyCookie is not None:
            self.cookieValue = _cookieValue(request.headers, forwarder.stickyCookie)
            if self.cookieValue is not None:
                backend = forwarder.pool.backendForCookie(self.cookieValue)
                if backend is not None:
                    self.tried.add(backend)
                    self._attempt(
                        backend, forwarder.upstreams.takeIdle(backend, self.proxyHeader)
                    )
                    return
        self._attempt(None)

    def bodyReceived(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.writeBody(data)
            self._keepForReplay(data)
        else:
            self.pending.append(data)
            self.pendingSize += len(data)
            if self.pendingSize > PENDING_LIMIT:
                self.server.pauseReading("connect")

    def bodyFinished(self) -> None:
        self.bodyDone = True
        conn = self.conn
        if conn is not None:
            conn.finishBody()
            self._stopBodyProducer()
            self._startTimeout()

    def clientGone(self) -> None:
        """
        The client left (or sent something unforwardable): stop the work
        done on its behalf and free what it held.
        """
        phase = self._phase
        if phase is DONE:
            return
        if phase is not RESPONDING:
            self.status = 499  # nginx's "client closed request"
        if phase is QUEUED:
            self.forwarder.pool.dequeue(self)
        self._finish()
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()

    # -- choosing and connecting

    def _attempt(
        self, chosen: Optional[Backend], conn: Optional[UpstreamConnection] = None
    ) -> None:
        """
        Send the request to C{chosen} (over C{conn}, or a new connection),
        or to the backend the pool picks.
        """
        forwarder = self.forwarder
        self._phase = CHOOSING
        if self.backend is not None:
            forwarder.retries += 1
        if chosen is None:
            pool = forwarder.pool
            backend = pool.choose(self.request, self.tried, self.clientKey)
            if backend is None:
                if pool.isFull(self.tried):
                    self._wait()
                elif not self.tried:
                    self._fail(503, "no backend available")
                elif self._timedOutOnce:
                    self._fail(
                        504, "no backend answered in time: " + "; ".join(self.errors)
                    )
                else:
                    self._fail(
                        502, "no backend could be reached: " + "; ".join(self.errors)
                    )
                return
            self.tried.add(backend)
            conn = forwarder.upstreams.takeIdle(backend, self.proxyHeader)
        else:
            backend = chosen
        self.backend = backend
        self._activeBackend = backend
        forwarder.pool.acquire(backend)
        if conn is not None:
            self._connected(conn)
            return
        self._phase = CONNECTING
        self._connectStart = forwarder.reactor.seconds()
        d = forwarder.upstreams.connect(backend, self.proxyHeader)
        self._connecting = d
        d.addCallbacks(self._connected, self._connectFailed, errbackArgs=(backend,))
        d.addErrback(self._bug)

    def _connected(self, conn: UpstreamConnection) -> None:
        self._connecting = None
        if self._phase is DONE:
            # The client left while we were connecting: keep the
            # connection for someone else.
            self.forwarder.upstreams.release(conn)
            return
        self.conn = conn
        self._phase = SENT
        now = self.forwarder.reactor.seconds()
        self.connectTime = now - self._connectStart if not conn.reused else 0.0
        head = self._head
        if head is None or self.request.host is None:
            head = self._head = self._buildHead(conn.backend)
        request = self.request
        self._sentAt = now
        conn.sendRequest(
            head, self, request.method == b"HEAD", request.chunked, request.websocket
        )
        if self.pending:
            pending, self.pending = self.pending, []
            self.pendingSize = 0
            for data in pending:
                conn.writeBody(data)
                self._keepForReplay(data)
            self.server.resumeReading("connect")
        if self.bodyDone:
            conn.finishBody()
            self._startTimeout()
        else:
            self._bodyProducer = _RequestBodyProducer(self.server)
            conn.transport.registerProducer(self._bodyProducer, True)

    def _startTimeout(self) -> None:
        """
        The whole request is with the backend: from now on it has
        C{backendTimeout} seconds to start its answer.
        """
        timeout = self.forwarder.backendTimeout
        if timeout and self._phase is SENT:
            self._timeoutCall = self.forwarder.reactor.callLater(
                timeout, self._timedOut
            )

    def _connectFailed(self, failure: Any, backend: Backend) -> None:
        self._connecting = None
        self._releaseBackend()
        if self._phase is DONE or failure.check(CancelledError):
            return
        self._strike(backend)
        self.errors.append(f"{backend.address} {describe(failure.value)}")
        log.info(
            "connect to backend {backend} failed: {reason}",
            backend=backend.address,
            reason=describe(failure.value),
        )
        self._attempt(None)

    def _buildHead(self, backend: Backend) -> bytes:
        request = self.request
        forwarder = self.forwarder
        lines = [request.method + b" " + self.target + b" HTTP/1.1\r\n"]
        if request.host is None:
            lines.append(b"Host: " + backend.address.encode("ascii") + CRLF)
        for name, value in endToEnd(request.headers, REQUEST_DROP):
            lines.append(name + b": " + value + CRLF)
        for name, value in forwardedHeaders(
            request.headers,
            request.peer,
            forwarder.isTrusted(request.peer),
            b"https" if request.secure else b"http",
            request.host,
        ):
            lines.append(name + b": " + value + CRLF)
        if request.clientCert is not None:
            lines.append(b"X-Client-Cert-Subject: " + request.clientCert + CRLF)
        if request.teTrailers:
            # TE is hop-by-hop, but "trailers" in it is kept (DESIGN.md).
            lines.append(b"TE: trailers\r\n")
        if request.websocket:
            # Hop-by-hop, but the point of a WebSocket handshake.
            lines.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        if request.chunked:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif request.contentLength is not None:
            lines.append(b"Content-Length: %d\r\n" % (request.contentLength,))
        lines.append(CRLF)
        return b"".join(lines)

    def _keepForReplay(self, data: bytes) -> None:
        replay = self.replay
        if replay is not None:
            self.replaySize += len(data)
            if self.replaySize > REPLAY_LIMIT:
                self.replay = None
            else:
                replay.append(data)

    def _redirectToHttps(self) -> None:
        """
        Answer a plain-HTTP request with a permanent redirect to the same
        host and path over https.
        """
        request = self.request
        host = request.host or b""
        if not host.endswith(b"]") and b":" in host:
            host = host.rsplit(b":", 1)[0]
        port = self.forwarder.httpsPort
        if port is not None and port != 443:
            host += b":%d" % (port,)
        location = b"https://" + host + request.target
        self.status = 301
        self._finish()
        self.server.respond(
            301,
            b"Moved Permanently",
            [(b"Location", location), (b"Content-Type", b"text/plain; charset=utf-8")],
            b"Moved to " + location + b"\n",
        )

    # -- waiting for a backend under its max_conns

    def _wait(self) -> None:
        forwarder = self.forwarder
        if forwarder.queueTimeout and forwarder.pool.enqueue(self):
            self._phase = QUEUED
            self._timeoutCall = forwarder.reactor.callLater(
                forwarder.queueTimeout, self._queueTimedOut
            )
            return
        self._fail(503, "every backend is at its max_conns and the queue is full",
                   retryAfter=True)

    def backendFreed(self) -> None:
        """
        The pool has room again: try to pick a backend (this exchange left
        the queue).
        """
        self._cancelTimeout()
        if self._phase is QUEUED:
            self._attempt(None)

    def _queueTimedOut(self) -> None:
        self._timeoutCall = None
        self.forwarder.pool.dequeue(self)
        self._fail(
            503,
            f"no backend had room within {self.forwarder.queueTimeout:g}s",
            retryAfter=True,
        )

    # -- from the backend side

    def upstreamContinue(self) -> None:
        if self.request.expectContinue and not self.bodyDone:
            self.server.sendContinue()

    def upstreamInterim(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """
        An interim response other than 100 (103 Early Hints): passed on
        to an HTTP/1.1 client; other front ends drop it.
        """
        server = self.server
        if IHTTP11Downstream.providedBy(server):
            server.sendInterim(status, reason, endToEnd(headers))

    def responseTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """
        The chunked response ended with trailer fields: passed on to a
        client that accepts them (the front end decides), minus the ones a
        trailer may not carry.
        """
        server = self.server
        if IHTTP11Downstream.providedBy(server):
            kept = endToEnd(trailers, TRAILER_DROP)
            if kept:
                server.setTrailers(kept)

    def upstreamSwitched(
        self, reason: bytes, headers: list[tuple[bytes, bytes]], buffered: bytes
    ) -> None:
        """
        The backend answered the WebSocket handshake with C{101}: splice
        the two connections.  C{buffered} is what the backend sent past the
        101's head (its first frames).
        """
        conn, self.conn = self.conn, None
        self._cancelTimeout()
        self._stopBodyProducer()
        self._stopProducing()
        self._phase = TUNNEL
        self.replay = None
        self.status = 101
        forwarder = self.forwarder
        backend = self.backend
        pool = forwarder.pool
        pool.attemptFinished(backend, True)
        now = forwarder.reactor.seconds()
        self.firstByteTime = now - self._sentAt
        pool.observe(backend, self.firstByteTime)
        backend.stats.record(101, self.firstByteTime, now)
        headers = endToEnd(headers)
        if forwarder.stickyCookie is not None:
            value = pool.cookieFor(backend)
            if value != self.cookieValue:
                headers.append((b"Set-Cookie", _setCookie(
                    forwarder.stickyCookie, value, self.request.secure)))
        clientTransport, clientBuffered = self.server.switchProtocols(reason, headers)
        tunnel = self.tunnel = Tunnel(
            clientTransport,
            conn.transport,
            forwarder.reactor,
            idleTimeout=forwarder.tunnelIdleTimeout,
            onClose=self._tunnelClosed,
            backend=backend,
        )
        self.server.attachTunnel(tunnel)
        conn.attachTunnel(tunnel)
        log.debug(
            "{peer} {target}: WebSocket tunnel to {backend} open",
            peer=self.request.peer,
            target=self.target.decode("latin-1"),
            backend=backend.address,
        )
        if buffered:
            tunnel.dataReceived(B, buffered)
        if clientBuffered:
            tunnel.dataReceived(A, clientBuffered)

    def _tunnelClosed(self, tunnel: Tunnel, side: Optional[int], reason: Any) -> None:
        """
        The first side of the tunnel went (or it idled out): the other is
        closing, and the tunnel no longer counts against its backend.
        """
        self.sentBytes = tunnel.bytesBtoA
        backend = self.backend
        if (
            side == B
            and backend is not None
            and reason is not None
            and not reason.check(ConnectionDone)
        ):
            backend.failures += 1
            log.info(
                "backend {backend} reset the WebSocket tunnel of {peer}: {why}",
                backend=backend.address,
                peer=self.request.peer,
                why=reason.getErrorMessage(),
            )
        self._finish()

    def responseHead(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        length: Optional[int],
    ) -> None:
        self._armIdleTimeout()
        self._phase = RESPONDING
        self.replay = None
        self.status = status
        forwarder = self.forwarder
        backend = self.backend
        pool = forwarder.pool
        fault = backendFault(status)
        pool.attemptFinished(backend, not fault)
        if fault:
            backend.failures += 1
        elif self._suspects:
            # Another backend answered the request the suspects closed on:
            # it was a good request, so closing on it was their fault.
            suspects, self._suspects = self._suspects, []
            for suspect in suspects:
                self._strike(suspect)
        now = forwarder.reactor.seconds()
        self.firstByteTime = now - self._sentAt
        pool.observe(backend, self.firstByteTime)
        backend.stats.record(status, self.firstByteTime, now)
        headers = endToEnd(headers)
        if forwarder.hsts is not None and self.request.secure:
            headers = [h for h in headers if h[0].lower() != b"strict-transport-security"]
            headers.append(forwarder.hsts)
        if forwarder.stickyCookie is not None:
            value = pool.cookieFor(backend)
            if value != self.cookieValue:
                headers.append((b"Set-Cookie", _setCookie(
                    forwarder.stickyCookie, value, self.request.secure)))
        self.server.startResponse(status, reason, headers, length)
        if length is None or length > SMALL_RESPONSE:
            self._producing = True
            self.server.registerProducer(self, True)

    def responseData(self, data: bytes) -> None:
        self.sentBytes += len(data)
        call = self._timeoutCall
        if call is not None:
            call.reset(self.forwarder.backendTimeout)
        self.server.writeBody(data)

    def responseFinished(self) -> None:
        self._stopBodyProducer()
        self.conn = None
        self._stopProducing()
        self._finish()
        self.server.finishResponse()

    def upstreamLost(self, reason: Any, responseStarted: bool) -> None:
        conn, self.conn = self.conn, None
        self._cancelTimeout()
        self._stopBodyProducer()
        self._stopProducing()
        backend = self.backend
        self._releaseBackend()
        phase = self._phase
        if phase is DONE:
            return
        why = describe(getattr(reason, "value", reason))
        if phase is RESPONDING:
            # The head was counted a success; the body breaking off is
            # the backend's doing all the same.
            if backend is not None:
                backend.failures += 1
            log.warn(
                "backend {backend} broke off the response: {reason}",
                backend=backend.address if backend else "?",
                reason=why,
            )
            self._finish()
            self.server.abortResponse()
            return
        if backend is not None:
            self._judgeLoss(backend, conn, responseStarted)
        retryable = (
            not responseStarted
            and self.request.method in IDEMPOTENT
            and self.replay is not None
        )
        if retryable:
            self.pending = self.replay + self.pending
            self.pendingSize = sum(len(d) for d in self.pending)
            self.replay = []
            self.replaySize = 0
            if conn is not None and conn.reused and not self._retriedFresh:
                # Most likely the backend closed a kept-alive connection
                # just as we reused it: try again on a fresh one.
                self._retriedFresh = True
                self._attempt(backend)
            else:
                self.errors.append(f"{backend.address if backend else '?'} {why}")
                self._attempt(None)
            return
        self._fail(502, f"backend {backend.address if backend else '?'} failed: {why}")

    def _judgeLoss(
        self,
        backend: Backend,
        conn: Optional[UpstreamConnection],
        responseStarted: bool,
    ) -> None:
        """
        C{backend} lost the connection before a response head: count it
        against the backend only when the backend is to blame.  A client's
        failure never counts against a backend, or a client could eject
        healthy backends at will by sending requests they close on.

        - Part of a response arrived (a malformed or cut-off head): the
          backend's fault.
        - The client had not finished sending its body: the backend most
          likely refused the request (too large, malformed body): not the
          backend's fault.
        - A kept-alive connection: most likely a keep-alive race; the
          retry on a fresh connection decides.
        - A complete request on a fresh connection: ambiguous.  The
          backend is a suspect, struck only if another backend then
          answers the same request; if every backend closes on it, the
          request is what they refused.
        """
        if responseStarted:
            self._strike(backend)
        elif not self.bodyDone:
            log.info(
                "backend {backend} closed the connection while the client was "
                "still sending its request body: not counted as a backend failure",
                backend=backend.address,
            )
        elif conn is not None and conn.reused:
            pass
        else:
            self._suspects.append(backend)

    def _strike(self, backend: Backend) -> None:
        """
        One failed attempt on C{backend}, the backend's fault: counted, and
        fed to passive outlier detection.
        """
        backend.failures += 1
        self.forwarder.pool.attemptFinished(backend, False)

    # -- IPushProducer, for the client's transport

    def pauseProducing(self) -> None:
        self._clientPaused = True
        if self.conn is not None:
            self.conn.pauseReading()

    def resumeProducing(self) -> None:
        self._clientPaused = False
        if self.conn is not None:
            call = self._timeoutCall
            if call is not None:
                call.reset(self.forwarder.backendTimeout)
            self.conn.resumeReading()

    def stopProducing(self) -> None:
        pass

    # -- endings

    def _armIdleTimeout(self) -> None:
        """
        The response head is in: from now on the backend may go no longer
        than C{backendTimeout} without sending the next piece of the body
        (like nginx's C{proxy_read_timeout}).  The timer of the wait for
        the head, if any, is reused.
        """
        timeout = self.forwarder.backendTimeout
        call = self._timeoutCall
        if not timeout:
            self._cancelTimeout()
        elif call is not None and call.active():
            call.reset(timeout)
        else:
            self._timeoutCall = self.forwarder.reactor.callLater(
                timeout, self._timedOut
            )

    def _timedOut(self) -> None:
        self._timeoutCall = None
        if self._phase is RESPONDING:
            self._bodyTimedOut()
            return
        backend = self.backend
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        self._stopBodyProducer()
        self._releaseBackend()
        if backend is not None:
            self._strike(backend)
            self.forwarder.pool.observe(backend, self.forwarder.backendTimeout)
        timeout = self.forwarder.backendTimeout
        address = backend.address if backend else "?"
        if (
            not self._timedOutOnce
            and self.request.method in IDEMPOTENT
            and self.replay is not None
        ):
            # Like HAProxy's "retry-on response-timeout": the backend may be
            # frozen.  The request may have reached it and been acted on,
            # so this is done only for idempotent methods, whose body (if
            # any) is still held for replay, and only once per request.
            self._timedOutOnce = True
            log.info(
                "backend {backend} sent no response to {method} {target} within "
                "{timeout}s: idempotent, so trying another backend",
                backend=address,
                method=self.request.method.decode("latin-1"),
                target=self.request.target.decode("latin-1"),
                timeout=timeout,
            )
            self.errors.append(f"{address} sent no response within {timeout:g}s")
            self.pending = self.replay + self.pending
            self.pendingSize = sum(len(d) for d in self.pending)
            self.replay = []
            self.replaySize = 0
            self._attempt(None)
            return
        self._fail(
            504,
            f"backend {address} sent no response within {timeout:g}s",
        )

    def _bodyTimedOut(self) -> None:
        """
        The backend sent nothing for C{backendTimeout} in the middle of a
        response: free the client and the backend connection.  A client
        too slow to take the body is not the backend's fault: while the
        client holds the backend paused, the wait starts over.
        """
        timeout = self.forwarder.backendTimeout
        if self._clientPaused:
            self._timeoutCall = self.forwarder.reactor.callLater(
                timeout, self._timedOut
            )
            return
        backend = self.backend
        conn, self.conn = self.conn, None
        self._stopProducing()
        if conn is not None:
            conn.abort()
        self._releaseBackend()
        if backend is not None:
            self._strike(backend)
        log.warn(
            "backend {backend} sent no response data for {timeout}s in the middle "
            "of a response to {method} {target}: both connections aborted",
            backend=backend.address if backend else "?",
            timeout=timeout,
            method=self.request.method.decode("latin-1"),
            target=self.request.target.decode("latin-1"),
        )
        self._finish()
        self.server.abortResponse()

    def _fail(self, status: int, message: str, retryAfter: bool = False) -> None:
        if self._phase is DONE:
            return
        log.warn(
            "{status} for {method} {target} from {peer}: {message}",
            status=status,
            method=self.request.method.decode("latin-1"),
            target=self.request.target.decode("latin-1"),
            peer=self.request.peer,
            message=message,
        )
        self.status = status
        self._finish()
        if retryAfter:
            self.server.sendError(status, message, [(b"Retry-After", b"1")])
        else:
            self.server.sendError(status, message)

    def _finish(self) -> None:
        phase = self._phase
        if phase is DONE:
            return
        self._phase = DONE
        self._cancelTimeout()
        self._releaseBackend()
        if self._suspects:
            log.info(
                "{method} {target} from {peer}: {backends} closed the connection "
                "on it without an answer, and no other backend answered it well: "
                "taken as a request they refuse, not counted against them",
                method=self.request.method.decode("latin-1"),
                target=self.request.target.decode("latin-1"),
                peer=self.request.peer,
                backends=", ".join(b.address for b in self._suspects),
            )
            self._suspects = []
        if phase is not WAITING:
            self.forwarder.inFlight -= 1
        forwarder = self.forwarder
        accessLog = forwarder.accessLog
        if accessLog is not None:
            request = self.request
            client = self.clientKey
            if client is None:
                client = clientAddress(request.headers, request.peer, forwarder.trustedProxies)
            accessLog.log(
                request,
                self.status,
                self.sentBytes,
                self.backend,
                client=client,
                connect=self.connectTime,
                firstByte=self.firstByteTime,
            )

    def _releaseBackend(self) -> None:
        """
        The current attempt is over: it no longer counts as in flight.
        """
        backend = self._activeBackend
        if backend is not None:
            self._activeBackend = None
            self.forwarder.pool.release(backend)

    def _cancelTimeout(self) -> None:
        call = self._timeoutCall
        if call is not None:
            self._timeoutCall = None
            if call.active():
                call.cancel()

    def _stopBodyProducer(self) -> None:
        producer = self._bodyProducer
        if producer is not None:
            self._bodyProducer = None
            conn = self.conn
            if conn is not None and conn.transport is not None:
                conn.transport.unregisterProducer()
            self.server.resumeReading("upstream")

    def _stopProducing(self) -> None:
        if self._producing:
            self._producing = False
            self.server.unregisterProducer()

    def _bug(self, failure: Any) -> None:
        log.failure("unexpected error while forwarding", failure)
        if self._phase is not DONE:
            self._fail(502, "internal error while forwarding")


def backendFault(status: int) -> bool:
    """
    Whether a response with C{status} counts against the backend that sent
    it.  4xx answers a bad request, and 501 (an unknown method) and 505 (a
    version) say the same of the request: a client can provoke those at
    will, so they never count.  Every other 5xx does.
    """
    return status >= 500 and status not in (501, 505)


def _cookieValue(headers: Any, name: bytes) -> Optional[str]:
    """
    The value of cookie C{name} in a request's Cookie headers, if any.
    """
    for header, value in headers:
        if header.lower() == b"cookie":
            for pair in value.split(b";"):
                key, eq, cookie = pair.strip().partition(b"=")
                if eq and key == name:
                    return cookie.strip(b'"').decode("latin-1")
    return None


def _setCookie(name: bytes, value: str, secure: bool) -> bytes:
    cookie = name + b"=" + value.encode("ascii") + b"; Path=/; HttpOnly; SameSite=Lax"
    if secure:
        cookie += b"; Secure"
    return cookie
