"""
In-memory fakes for testing code built on txbalancer, and txbalancer itself.

Nothing here opens a socket or waits for real time: a balancer is wired
from its real parts (L{HTTPServerFactory}, L{Forwarder}, L{BackendPool},
L{UpstreamPool}) onto a L{MemoryReactorClock}; clients and backends are
L{StringTransport}s that a test writes raw bytes into and reads raw bytes
from.  Like C{treq.testing.StubTreq}, the fakes are public and are
themselves tested against the real classes (C{tests/test_testing.py}
style checks live in the unit tests of the pieces they stand in for).

    balancer = InMemoryBalancer(["127.0.0.1:3001", "127.0.0.1:3002"])
    client = balancer.client()
    client.send(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    backend = balancer.acceptConnect()
    backend.respond(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nhi")
    assert client.received().endswith(b"hi")

Disconnects are delivered the way a reactor delivers them: later, not from
inside C{loseConnection}.  Call L{InMemoryBalancer.flush} to deliver them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Callable, Optional

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from txbalancer.config import BackendSpec, parse_backends
from txbalancer.downstream import HTTPServerFactory, HTTPServerProtocol, Request
from txbalancer.interfaces import IExchange
from txbalancer.pool import BackendPool
from txbalancer.proxy import Forwarder
from txbalancer.upstream import UpstreamConnection, UpstreamPool

__all__ = [
    "BackendConnection",
    "ClientConnection",
    "FakeHealthClient",
    "FakeTransport",
    "InMemoryBalancer",
    "PendingConnect",
    "RecordingExchange",
    "RecordingHandler",
    "backendSpecs",
    "serverProtocol",
    "upstreamConnection",
]


class FakeTransport(StringTransport):
    """
    A L{StringTransport} that behaves like a TCP transport where the stock
    one is stricter: pausing or resuming after C{loseConnection} is allowed
    (a real transport ignores it), and it remembers whether it was aborted
    and whether its protocol has been told the connection is gone.
    """

    aborted = False
    lostDelivered = False

    def __init__(self, peer: str = "203.0.113.7", port: int = 50000) -> None:
        if ":" in peer:
            peerAddress: Any = IPv6Address("TCP", peer, port)
        else:
            peerAddress = IPv4Address("TCP", peer, port)
        StringTransport.__init__(self, peerAddress=peerAddress, lenient=True)
        self.protocol: Any = None

    def abortConnection(self) -> None:
        self.aborted = True
        StringTransport.abortConnection(self)

    def deliverLoss(self) -> bool:
        """
        If the protocol closed or aborted this transport, tell it the
        connection is gone (once).  This is the reactor's half of a close.

        @return: whether C{connectionLost} was delivered now.
        """
        if self.disconnecting and not self.lostDelivered:
            self.lostDelivered = True
            self.connected = False
            if self.aborted:
                reason = Failure(error.ConnectionAborted())
            else:
                reason = Failure(error.ConnectionDone())
            self.protocol.connectionLost(reason)
            return True
        return False

    def peerCloses(self, reason: Optional[Exception] = None) -> None:
        """
        The other side closed the connection (cleanly by default).
        """
        if not self.lostDelivered:
            self.lostDelivered = True
            self.disconnecting = True
            self.connected = False
            self.protocol.connectionLost(
                Failure(reason if reason is not None else error.ConnectionDone())
            )


@implementer(IExchange)
class RecordingExchange:
    """
    A stand-in for L{txbalancer.proxy.ProxyExchange}: it records every call
    the server protocol makes on it, in order, in C{events}.
    """

    def __init__(self, request: Request, server: HTTPServerProtocol) -> None:
        self.request = request
        self.server = server
        self.events: list[tuple[Any, ...]] = []
        self.body = b""

    def start(self) -> None:
        self.events.append(("start",))

    def bodyReceived(self, data: bytes) -> None:
        self.events.append(("body", data))
        self.body += data

    def bodyFinished(self) -> None:
        self.events.append(("finished",))

    def clientGone(self) -> None:
        self.events.append(("gone",))

    @property
    def started(self) -> bool:
        return ("start",) in self.events

    @property
    def complete(self) -> bool:
        return ("finished",) in self.events


class RecordingHandler:
    """
    A handler for L{HTTPServerFactory} that makes L{RecordingExchange}s and
    keeps them in C{exchanges}, oldest first.
    """

    def __init__(self) -> None:
        self.exchanges: list[RecordingExchange] = []

    def __call__(self, request: Request, server: HTTPServerProtocol) -> RecordingExchange:
        exchange = RecordingExchange(request, server)
        self.exchanges.append(exchange)
        return exchange


def serverProtocol(
    factory: HTTPServerFactory, peer: str = "203.0.113.7", port: int = 50000
) -> tuple[HTTPServerProtocol, FakeTransport]:
    """
    A connected L{HTTPServerProtocol} from C{factory} on a L{FakeTransport}.
    """
    transport = FakeTransport(peer, port)
    protocol = factory.buildProtocol(transport.getPeer())
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def backendSpecs(*lines: str) -> tuple[BackendSpec, ...]:
    """
    Backend specs from backends-file lines, e.g. C{"127.0.0.1:3001 weight=2"}.
    """
    return parse_backends("\n".join(lines) + "\n", "<test>")


def upstreamConnection(
    pool: Optional[UpstreamPool] = None,
    backend: Any = None,
    reactor: Any = None,
) -> tuple[UpstreamConnection, FakeTransport]:
    """
    A connected L{UpstreamConnection} on a L{FakeTransport}, with a fresh
    L{UpstreamPool} on a L{MemoryReactorClock} unless one is given.
    """
    from txbalancer.backend import Backend

    if pool is None:
        pool = UpstreamPool(reactor if reactor is not None else MemoryReactorClock())
    if backend is None:
        backend = Backend(backendSpecs("127.0.0.1:3001")[0])
    transport = FakeTransport(backend.host, backend.port)
    conn = UpstreamConnection(pool, backend)
    transport.protocol = conn
    conn.makeConnection(transport)
    return conn, transport


class ClientConnection:
    """
    A client connected to an L{InMemoryBalancer}.
    """

    def __init__(self, protocol: HTTPServerProtocol, transport: FakeTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()

    def clear(self) -> None:
        self.transport.clear()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def leave(self) -> None:
        """
        The client goes away.
        """
        self.transport.peerCloses(error.ConnectionLost())


class BackendConnection:
    """
    The backend's end of one upstream connection.

    @ivar protocol: the balancer's L{UpstreamConnection}.
    """

    def __init__(self, protocol: UpstreamConnection, transport: FakeTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def received(self) -> bytes:
        return self.transport.value()

    def clear(self) -> None:
        self.transport.clear()

    def respond(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def close(self, reason: Optional[Exception] = None) -> None:
        self.transport.peerCloses(reason)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


class PendingConnect:
    """
    A connection attempt the balancer made through the fake reactor.
    """

    def __init__(self, owner: InMemoryBalancer, index: int) -> None:
        self.owner = owner
        self.index = index
        host, port, factory, timeout, bindAddress = owner.reactor.tcpClients[index]
        self.host = host
        self.port = port
        self.factory = factory
        self.timeout = timeout
        self.connector = owner.reactor.connectors[index]
        self.done = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def accept(self) -> BackendConnection:
        """
        The backend accepts: the balancer gets its connection.
        """
        self.done = True
        transport = FakeTransport(self.host, self.port)
        wrapper = self.factory.buildProtocol(transport.getPeer())
        transport.protocol = wrapper
        self.owner._transports.append(transport)
        wrapper.makeConnection(transport)
        conn = getattr(wrapper, "_wrappedProtocol", wrapper)
        return BackendConnection(conn, transport)

    def fail(self, reason: Optional[Exception] = None) -> None:
        """
        The attempt fails (refused by default).
        """
        self.done = True
        if reason is None:
            reason = error.ConnectionRefusedError()
        self.factory.clientConnectionFailed(self.connector, Failure(reason))


class FakeHealthResponse:
    """
    What a health check reads of a response: its code, headers, length.
    """

    def __init__(self, code: int, headers: Optional[dict] = None) -> None:
        from twisted.web.http_headers import Headers

        self.code = code
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self.length = 0


class FakeHealthClient:
    """
    A stand-in for the treq client of the health checks: each check of a
    backend is answered by C{answers[address]} (default 200):

        - a status code, answered at once;
        - C{(503, {b"Retry-After": b"5"})}: a status with headers;
        - an exception, such as C{ConnectionRefusedError()}: the check fails
          with it;
        - C{"hang"}: no answer at all (the check's own timeout fires).

    @ivar checks: the URLs checked, oldest first.
    """

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.checks: list[str] = []

    def get(self, url: str, headers: Any = None, **kwargs: Any) -> Any:
        from twisted.internet.defer import Deferred, fail, succeed

        self.checks.append(url)
        address = url.split("://", 1)[1].split("/", 1)[0]
        answer = self.answers.get(address, 200)
        if answer == "hang":
            return Deferred()
        if isinstance(answer, BaseException):
            return fail(answer)
        if isinstance(answer, tuple):
            return succeed(FakeHealthResponse(*answer))
        return succeed(FakeHealthResponse(answer))


class InMemoryBalancer:
    """
    A whole L{txbalancer.Balancer} (server protocol, forwarder, pools,
    health checks, ejection) on a L{MemoryReactorClock}, started, with
    clients and backends in memory.

    Health checks are answered by a L{FakeHealthClient} (C{health}): every
    backend passes until a test says otherwise; they run when the clock
    advances (C{reactor.advance}).

    @param backends: backends-file lines.
    @param config: a whole L{txbalancer.settings.BalancerConfig} instead
        (several pools, routes), e.g. from
        L{txbalancer.config.load_config}; then give no backends or
        settings.  Which pool a pending connect is for, its address tells.
    @param settings: any setting of L{txbalancer.settings} by attribute
        name (C{backendTimeout=10}, C{strategy="least-conn"}, ...).
    """

    def __init__(
        self,
        backends: Sequence[str] = ("127.0.0.1:3001", "127.0.0.1:3002"),
        secure: bool = False,
        accessLog: Any = None,
        idleTimeout: Optional[float] = None,
        config: Any = None,
        **settings: Any,
    ) -> None:
        from txbalancer.balancer import Balancer

        self.reactor = MemoryReactorClock()
        self.health = FakeHealthClient()
        if idleTimeout is not None:
            settings["upstreamIdleTimeout"] = idleTimeout
        kwargs: dict[str, Any] = dict(
            reactor=self.reactor,
            random=random.Random(0),
            jitter=lambda: 0.0,
            healthClient=self.health,
        )
        if config is not None:
            self.balancer = Balancer(config=config, **kwargs, **settings)
        else:
            self.balancer = Balancer(list(backends), **kwargs, **settings)
        self.factory = self.balancer.serverFactory(secure=secure)
        if accessLog is not None:
            self.forwarder.accessLog = accessLog
        self.balancer.startService()
        self._transports: list[FakeTransport] = []
        self._resolved: set[int] = set()

    @property
    def runtime(self) -> Any:
        return self.balancer.defaultPool

    @property
    def pool(self) -> BackendPool:
        return self.runtime.pool

    @property
    def forwarder(self) -> Forwarder:
        return self.runtime.forwarder

    @property
    def upstreams(self) -> UpstreamPool:
        return self.runtime.upstreams

    @property
    def checker(self) -> Any:
        return self.runtime.checker

    def stop(self) -> Any:
        """
        Stop the balancer (a graceful stop): a Deferred.
        """
        return self.balancer.stopService()

    def requestTimers(self) -> list[Any]:
        """
        The delayed calls pending on the reactor, less the balancer's own
        periodic ones (health checks, sweeps): what requests left behind.
        """
        from twisted.internet.task import LoopingCall

        from txbalancer.health import HealthChecker

        return [
            call
            for call in self.reactor.getDelayedCalls()
            if not isinstance(call.func, LoopingCall)
            and not isinstance(getattr(call.func, "__self__", None), HealthChecker)
        ]

    def backend(self, address: str) -> Any:
        """
        The live L{txbalancer.backend.Backend} for C{host:port}.
        """
        for b in self.pool.backends:
            if b.address == address:
                return b
        raise KeyError(address)

    def client(self, peer: str = "203.0.113.7", port: int = 50000) -> ClientConnection:
        protocol, transport = serverProtocol(self.factory, peer, port)
        self._transports.append(transport)
        return ClientConnection(protocol, transport)

    def pendingConnects(self) -> list[PendingConnect]:
        """
        Connection attempts not yet accepted or failed, oldest first.
        """
        result = []
        for i in range(len(self.reactor.tcpClients)):
            if i not in self._resolved and not self.reactor.connectors[i].stoppedConnecting:
                result.append(PendingConnect(self, i))
        return result

    def _next(self) -> PendingConnect:
        pending = self.pendingConnects()
        if not pending:
            raise AssertionError("the balancer has no connection attempt pending")
        attempt = pending[0]
        self._resolved.add(attempt.index)
        return attempt

    def acceptConnect(self) -> BackendConnection:
        """
        Accept the oldest pending connection attempt.
        """
        return self._next().accept()

    def failConnect(self, reason: Optional[Exception] = None) -> str:
        """
        Fail the oldest pending connection attempt (refused by default).

        @return: the C{host:port} it was for.
        """
        attempt = self._next()
        attempt.fail(reason)
        return attempt.address

    def flush(self) -> None:
        """
        Deliver C{connectionLost} to every protocol whose transport was
        closed or aborted, until nothing changes.
        """
        changed = True
        while changed:
            changed = False
            for transport in list(self._transports):
                if transport.deliverLoss():
                    changed = True
