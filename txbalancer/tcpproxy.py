"""
TCP mode: each client connection relayed, byte for byte, to one backend.

The listener's factory is a L{TCPProxyFactory}; each connection is a
L{TCPProxyProtocol}, which:

1. picks a backend with the pool's strategy as soon as the client connects
   (the key of ip-hash is the client's address; least-conn sees the
   connections open on each backend, since each counts as one request in
   flight from connect to close; sticky cookies do not apply);
2. connects to it, at once: a server that speaks first (SMTP, MySQL,
   PostgreSQL's SSL answer) needs nothing from the client.  A refused or
   timed-out connect (C{connectTimeout}) counts as a failure of that
   backend (passive ejection sees it) and the next backend is tried; when
   none is left the client is closed with a log line;
3. keeps what the client sends meanwhile, and pauses the client when that
   passes C{pendingLimit};
4. sends the PROXY header first when the pool says so, then what it kept,
   then splices the two connections with a L{txbalancer.tunnel.Tunnel}
   (backpressure, half-close, idle timeout).

States (C{_state}): C{"connecting"} (no backend connection yet),
C{"relaying"} (the tunnel is up), C{"closed"}.

Counters on each L{txbalancer.backend.Backend}: C{connections} (relayed
connections opened), C{bytesOut} and C{bytesIn} (to and from the backend),
C{failures} (connects that failed, and relays the backend reset), and
C{active} (open now).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from txbalancer.headers import normalizeAddress
from txbalancer.proxyprotocol import V2_SIGNATURE, encode
from txbalancer.tunnel import A, B, Tunnel, TunnelProtocol

__all__ = ["TCPProxyFactory", "TCPProxyProtocol"]

log = Logger()

PENDING_LIMIT = 64 * 1024

# What a PROXY header starts with, for refusing one from an unlisted peer.
_V1_SIGNATURE = b"PROXY "
_SNIFF = max(len(_V1_SIGNATURE), len(V2_SIGNATURE))


def _describe(failure: Any) -> str:
    value = failure.value
    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, (error.TimeoutError, defer.TimeoutError)):
        return "connect timed out"
    return str(value) or type(value).__name__


class _BackendSide(TunnelProtocol):
    """
    The connection to the backend: side B of the tunnel.
    """

    def __init__(self, client: "TCPProxyProtocol") -> None:
        TunnelProtocol.__init__(self)
        self.client = client


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, client: "TCPProxyProtocol") -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> _BackendSide:
        return _BackendSide(self.client)


@implementer(IHalfCloseableProtocol)
class TCPProxyProtocol(Protocol):
    """
    One client connection in TCP mode (side A of its tunnel).

    States (C{_state}): C{"connecting"} (choosing a backend and connecting
    to it; what the client sends is kept), C{"relaying"} (the tunnel has
    both connections), C{"closed"} (given up, or the tunnel closed).
    """

    def __init__(self) -> None:
        self._state = "connecting"
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._pausedForConnect = False
        self._clientEOF = False
        self._connecting: Any = None
        self._tried: set[Any] = set()
        self._errors: list[str] = []
        self._sniffed = b""
        self.backend: Any = None
        self.tunnel: Optional[Tunnel] = None
        self.peer = ""
        self.key: Optional[str] = None

    # -- the client

    def connectionMade(self) -> None:
        factory = self.factory
        factory.connections.add(self)
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", "") or ""
        if factory.needsClientKey and self.peer:
            self.key = normalizeAddress(self.peer)
        self._sniffing = factory.refuseProxyHeaders
        self._connectNext()

    def dataReceived(self, data: bytes) -> None:
        if self._sniffing:
            if self._refusedHeader(data):
                return
        if self._state == "relaying":
            self.tunnel.dataReceived(A, data)
        elif self._state == "connecting":
            self._pending.append(data)
            self._pendingSize += len(data)
            if (
                self._pendingSize > self.factory.pendingLimit
                and not self._pausedForConnect
            ):
                self._pausedForConnect = True
                self.transport.pauseProducing()

    def _refusedHeader(self, data: bytes) -> bool:
        """
        Whether the first bytes from a peer not allowed to send a PROXY
        header are one (the connection is then closed).
        """
        sniffed = self._sniffed = self._sniffed + data[: _SNIFF - len(self._sniffed)]
        for signature in (_V1_SIGNATURE, V2_SIGNATURE):
            n = min(len(sniffed), len(signature))
            if sniffed[:n] == signature[:n] and n == len(signature):
                log.warn(
                    "refused a PROXY header from {peer}, which is not in "
                    "--accept-proxy-protocol",
                    peer=self.peer,
                )
                self._sniffing = False
                self._giveUp(abort=True)
                return True
        if len(sniffed) >= _SNIFF or not any(
            signature.startswith(sniffed) for signature in (_V1_SIGNATURE, V2_SIGNATURE)
        ):
            self._sniffing = False
        return False

    def readConnectionLost(self) -> None:
        if self._state == "relaying":
            self.tunnel.readConnectionLost(A)
        else:
            self._clientEOF = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.connections.discard(self)
        if self.tunnel is not None:
            # Relaying, or closed by the tunnel: it hears of it either way.
            self.tunnel.connectionLost(A, reason)
        elif self._state == "connecting":
            self._state = "closed"
            if self._connecting is not None:
                connecting, self._connecting = self._connecting, None
                connecting.cancel()
            self._release()

    # -- the backend

    def _connectNext(self) -> None:
        factory = self.factory
        pool = factory.pool
        backend = pool.choose(None, self._tried, self.key)
        if backend is None:
            if self._tried:
                why = "no backend could be reached: " + "; ".join(self._errors)
            elif pool.isFull():
                why = "every backend is at its max_conns"
            else:
                why = "no backend available"
            log.warn("TCP client {peer} closed: {why}", peer=self.peer, why=why)
            self._giveUp(abort=False)
            return
        self._tried.add(backend)
        self.backend = backend
        pool.acquire(backend)
        backend.connections += 1
        d = self._connecting = factory.endpointFor(backend).connect(
            _BackendFactory(self)
        )
        d.addCallbacks(self._connected, self._connectFailed, errbackArgs=(backend,))
        d.addErrback(lambda f: log.failure("TCP relay broke", f))

    def _connectFailed(self, failure: Any, backend: Any) -> None:
        self._connecting = None
        if self._state != "connecting" or failure.check(defer.CancelledError):
            return
        self._release()
        backend.failures += 1
        self.factory.pool.attemptFinished(backend, False)
        why = _describe(failure)
        self._errors.append(f"{backend.address} {why}")
        log.info(
            "TCP connect to backend {backend} failed: {why}",
            backend=backend.address,
            why=why,
        )
        self._connectNext()

    def _connected(self, side: _BackendSide) -> None:
        self._connecting = None
        factory = self.factory
        backend = self.backend
        if self._state != "connecting":
            side.transport.abortConnection()
            return
        factory.pool.attemptFinished(backend, True)
        self._state = "relaying"
        if self._pausedForConnect:
            # Before the kept bytes are written: if they fill the backend's
            # buffer, the tunnel's backpressure pauses the client again.
            self._pausedForConnect = False
            self.transport.resumeProducing()
        backendTransport = side.transport
        if factory.proxyProtocol:
            backendTransport.write(
                encode(
                    factory.proxyProtocol,
                    self.transport.getPeer(),
                    self.transport.getHost(),
                )
            )
        tunnel = self.tunnel = Tunnel(
            self.transport,
            backendTransport,
            factory.reactor,
            idleTimeout=factory.idleTimeout,
            onClose=self._tunnelClosed,
            backend=backend,
        )
        pending, self._pending = self._pending, []
        self._pendingSize = 0
        for data in pending:
            tunnel.dataReceived(A, data)
        side.attach(tunnel, B)
        if self._clientEOF:
            tunnel.readConnectionLost(A)

    def _tunnelClosed(self, tunnel: Tunnel, side: Optional[int], reason: Any) -> None:
        if side == B and reason is not None and not reason.check(error.ConnectionDone):
            self.backend.failures += 1
            log.info(
                "TCP backend {backend} reset the relay of {peer}: {why}",
                backend=self.backend.address,
                peer=self.peer,
                why=reason.getErrorMessage(),
            )
        self._state = "closed"
        self._release()

    def _release(self) -> None:
        backend, self.backend = self.backend, None
        if backend is not None:
            self.factory.pool.release(backend)

    def _giveUp(self, abort: bool) -> None:
        state, self._state = self._state, "closed"
        if state == "relaying" and self.tunnel is not None:
            self.tunnel.close(abort=abort)
            return
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        self._release()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()


class TCPProxyFactory(Factory):
    """
    The factory of a TCP-mode listener.

    @param pool: the L{txbalancer.pool.BackendPool} its connections go to.
    @param endpointFor: C{endpointFor(backend)} gives the client endpoint of
        a backend (with C{connectTimeout}); the balancer passes its upstream
        pool's.
    @param idleTimeout: C{--tunnel-idle-timeout}.
    @param proxyProtocol: C{"v1"}, C{"v2"} or L{None}: the PROXY header sent
        first on each backend connection.
    @param needsClientKey: whether the strategy hashes the client's
        address (ip-hash); others are spared working it out.
    @param refuseProxyHeaders: close a client whose first bytes are a PROXY
        header (the listener accepts them from listed peers only, which
        never reach this check).
    """

    noisy = False
    protocol = TCPProxyProtocol

    def __init__(
        self,
        pool: Any,
        reactor: Any,
        endpointFor: Callable[[Any], Any],
        *,
        idleTimeout: float = 3600.0,
        proxyProtocol: Optional[str] = None,
        refuseProxyHeaders: bool = False,
        pendingLimit: int = PENDING_LIMIT,
        needsClientKey: bool = True,
    ) -> None:
        self.pool = pool
        self.reactor = reactor
        self._endpointFor = endpointFor
        self._endpoints: dict[Any, Any] = {}
        self.idleTimeout = idleTimeout
        self.proxyProtocol = proxyProtocol
        self.refuseProxyHeaders = refuseProxyHeaders
        self.pendingLimit = pendingLimit
        self.needsClientKey = needsClientKey
        self.connections: set[TCPProxyProtocol] = set()

    def usePool(
        self,
        pool: Any,
        endpointFor: Callable[[Any], Any],
        *,
        proxyProtocol: Optional[str],
        needsClientKey: bool,
    ) -> None:
        """
        New connections go to C{pool} from now on (a reload gave the
        listener's pool a new runtime); tunnels open now carry on.
        """
        self.pool = pool
        self._endpointFor = endpointFor
        self._endpoints = {}
        self.proxyProtocol = proxyProtocol
        self.needsClientKey = needsClientKey

    def endpointFor(self, backend: Any) -> Any:
        endpoint = self._endpoints.get(backend)
        if endpoint is None:
            endpoint = self._endpoints[backend] = self._endpointFor(backend)
        return endpoint

    def drain(self, timeout: float) -> "defer.Deferred[None]":
        """
        Wait up to C{timeout} seconds for the relayed connections to end,
        then close those left.
        """
        done: defer.Deferred[None] = defer.Deferred()
        if not self.connections:
            done.callback(None)
            return done

        def check() -> None:
            if not self.connections:
                if poll.running:
                    poll.stop()
                if not done.called:
                    done.callback(None)

        def giveUp() -> None:
            for conn in list(self.connections):
                conn._giveUp(abort=False)
            check()
            if not done.called:
                done.callback(None)

        from twisted.internet.task import LoopingCall

        poll = LoopingCall(check)
        poll.clock = self.reactor
        poll.start(0.1, now=False)
        later = self.reactor.callLater(timeout, giveUp)

        def stop(result: object) -> object:
            if poll.running:
                poll.stop()
            if later.active():
                later.cancel()
            return result

        done.addBoth(stop)
        return done
