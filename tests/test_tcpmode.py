"""
Unit tests for TCP mode: the tunnel (backpressure, half-close, close and
reset, idle timeout), the TCP relay (failover on a refused connect, ip-hash
by peer, bytes kept while connecting, PROXY headers sent), the listener
that reads PROXY headers, and the TCP-connect health check.  No sockets,
no real time.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.acceptproxy import AcceptProxyFactory
from txbalancer.balancer import Balancer
from txbalancer.choosers import IPHash, LeastConn, RoundRobin
from txbalancer.config import parse_cidrs
from txbalancer.pool import BackendPool
from txbalancer.proxyprotocol import encodeV1, encodeV2
from txbalancer.settings import ListenerConfig
from txbalancer.tcpcheck import TCPConnectChecker
from txbalancer.tcpproxy import TCPProxyFactory
from txbalancer.testing import FakeTransport, backendSpecs
from txbalancer.tunnel import A, B, Tunnel, TunnelProtocol


class Transport(FakeTransport):
    """
    A fake TCP transport that can also shut its write half.
    """

    writeClosed = False

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


def tunnelOf(idleTimeout=3600.0):
    reactor = MemoryReactorClock()
    a, b = Transport(), Transport()
    closed = []
    tunnel = Tunnel(
        a,
        b,
        reactor,
        idleTimeout=idleTimeout,
        onClose=lambda t, side, reason: closed.append(side),
    )
    return reactor, a, b, tunnel, closed


class TunnelTests(SynchronousTestCase):
    def test_bytes_pass_both_ways(self) -> None:
        """What one side receives is written, unchanged, to the other."""
        reactor, a, b, tunnel, closed = tunnelOf()
        tunnel.dataReceived(A, b"\x00hello")
        tunnel.dataReceived(B, b"world\xff")
        self.assertEqual(b.value(), b"\x00hello")
        self.assertEqual(a.value(), b"world\xff")
        self.assertEqual((tunnel.bytesAtoB, tunnel.bytesBtoA), (6, 6))

    def test_slow_reader_pauses_the_other_side(self) -> None:
        """When one side's transport is full, the other side stops being read."""
        reactor, a, b, tunnel, closed = tunnelOf()
        # Side B's transport is slow: Twisted pauses its producer, side A.
        b.producer.pauseProducing()
        self.assertEqual(a.producerState, "paused")
        self.assertEqual(b.producerState, "producing")
        b.producer.resumeProducing()
        self.assertEqual(a.producerState, "producing")
        a.producer.pauseProducing()
        self.assertEqual(b.producerState, "paused")

    def test_half_close_is_passed_on(self) -> None:
        """A side that stops sending has the other side's write half shut; the rest still flows."""
        reactor, a, b, tunnel, closed = tunnelOf()
        tunnel.readConnectionLost(A)
        self.assertTrue(b.writeClosed)
        self.assertFalse(b.disconnecting)
        tunnel.dataReceived(B, b"answer")
        self.assertEqual(a.value(), b"answer")
        tunnel.readConnectionLost(B)
        self.assertTrue(a.disconnecting and b.disconnecting)
        self.assertFalse(a.aborted or b.aborted)

    def test_clean_close_closes_the_other_cleanly(self) -> None:
        """One side closing closes the other after its buffered bytes."""
        reactor, a, b, tunnel, closed = tunnelOf()
        tunnel.connectionLost(A, Failure(error.ConnectionDone()))
        self.assertTrue(b.disconnecting)
        self.assertFalse(b.aborted)
        self.assertEqual(closed, [A])

    def test_reset_aborts_the_other(self) -> None:
        """One side reset aborts the other."""
        reactor, a, b, tunnel, closed = tunnelOf()
        tunnel.connectionLost(B, Failure(error.ConnectionLost()))
        self.assertTrue(a.aborted)
        self.assertEqual(closed, [B])
        tunnel.connectionLost(A, Failure(error.ConnectionAborted()))
        self.assertEqual(closed, [B])
        self.assertEqual(tunnel.state, "closed")

    def test_idle_timeout_closes_both(self) -> None:
        """No byte either way for the idle timeout closes both sides."""
        reactor, a, b, tunnel, closed = tunnelOf(idleTimeout=10)
        reactor.advance(9)
        self.assertFalse(a.disconnecting)
        reactor.advance(1)
        self.assertTrue(a.disconnecting and b.disconnecting)
        self.assertFalse(a.aborted or b.aborted)
        self.assertEqual(closed, [None])

    def test_closed_side_that_never_goes_is_aborted(self) -> None:
        """A side closed cleanly that cannot flush (its peer stopped reading) is aborted after a grace period."""
        from txbalancer.tunnel import CLOSE_GRACE

        reactor, a, b, tunnel, closed = tunnelOf()
        tunnel.connectionLost(A, Failure(error.ConnectionDone()))
        self.assertTrue(b.disconnecting)
        reactor.advance(CLOSE_GRACE)
        self.assertTrue(b.aborted)

    def test_grace_timer_cancelled_when_both_gone(self) -> None:
        """Once both sides are gone no timer is left behind."""
        reactor, a, b, tunnel, closed = tunnelOf()
        tunnel.connectionLost(A, Failure(error.ConnectionDone()))
        tunnel.connectionLost(B, Failure(error.ConnectionDone()))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_traffic_keeps_the_tunnel_open(self) -> None:
        """A byte within each idle period keeps the tunnel open, with one timer."""
        reactor, a, b, tunnel, closed = tunnelOf(idleTimeout=10)
        for _ in range(5):
            reactor.advance(6)
            tunnel.dataReceived(B, b"x")
        self.assertFalse(a.disconnecting)
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        reactor.advance(10)
        self.assertTrue(a.disconnecting)
        tunnel.connectionLost(A, Failure(error.ConnectionDone()))
        tunnel.connectionLost(B, Failure(error.ConnectionDone()))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_tunnel_protocol_keeps_early_bytes(self) -> None:
        """Bytes and a half-close that arrive before the tunnel is set reach it in order."""
        reactor = MemoryReactorClock()
        proto = TunnelProtocol()
        tb = Transport()
        proto.makeConnection(tb)
        proto.dataReceived(b"banner")
        proto.readConnectionLost()
        ta = Transport()
        tunnel = Tunnel(ta, tb, reactor)
        proto.attach(tunnel, B)
        self.assertEqual(ta.value(), b"banner")
        self.assertTrue(ta.writeClosed)


class FakeEndpoint:
    """
    A client endpoint whose connects the test accepts or refuses.
    """

    def __init__(self, backend) -> None:
        self.backend = backend
        self.pending: list = []

    def connect(self, factory):
        d = defer.Deferred()
        self.pending.append((factory, d))
        return d

    def accept(self):
        factory, d = self.pending.pop(0)
        proto = factory.buildProtocol(
            IPv4Address("TCP", self.backend.host, self.backend.port)
        )
        transport = Transport(self.backend.host, self.backend.port)
        transport.protocol = proto
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport

    def refuse(self, reason=None):
        factory, d = self.pending.pop(0)
        d.errback(Failure(reason or error.ConnectionRefusedError()))


def relay(*lines, chooser=None, **kw):
    reactor = MemoryReactorClock()
    pool = BackendPool(backendSpecs(*lines), chooser or RoundRobin())
    endpoints = {}

    def endpointFor(backend):
        return endpoints.setdefault(backend.address, FakeEndpoint(backend))

    factory = TCPProxyFactory(pool, reactor, endpointFor, **kw)
    for b in pool.backends:
        endpointFor(b)
    return reactor, pool, endpoints, factory


def client(factory, peer="203.0.113.7", port=50000):
    proto = factory.buildProtocol(IPv4Address("TCP", peer, port))
    transport = Transport(peer, port)
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


class TCPRelayTests(SynchronousTestCase):
    def test_connects_before_the_client_speaks(self) -> None:
        """The backend is connected at once, so a server that speaks first is heard."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1")
        proto, ct = client(factory)
        bproto, bt = endpoints["127.0.0.1:1"].accept()
        bproto.dataReceived(b"220 smtp ready\r\n")
        self.assertEqual(ct.value(), b"220 smtp ready\r\n")

    def test_early_client_bytes_are_kept_then_sent(self) -> None:
        """Bytes from the client before the backend connection is up arrive first, in order."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1")
        proto, ct = client(factory)
        proto.dataReceived(b"one ")
        proto.dataReceived(b"two")
        bproto, bt = endpoints["127.0.0.1:1"].accept()
        proto.dataReceived(b" three")
        self.assertEqual(bt.value(), b"one two three")

    def test_client_paused_beyond_pending_limit(self) -> None:
        """A client sending more than the pending limit while connecting is paused, then resumed."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1", pendingLimit=10)
        proto, ct = client(factory)
        proto.dataReceived(b"x" * 11)
        self.assertEqual(ct.producerState, "paused")
        endpoints["127.0.0.1:1"].accept()
        self.assertEqual(ct.producerState, "producing")

    def test_refused_connect_moves_to_next_backend(self) -> None:
        """A refused connect counts as a failure (for passive ejection too) and the next backend gets the client."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1", "127.0.0.1:2")
        recorded = []

        class Outliers:
            def record(self, backend, ok, total):
                recorded.append((backend.address, ok))

        pool.outliers = Outliers()
        proto, ct = client(factory)
        first = pool.backends[0]
        endpoints["127.0.0.1:1"].refuse()
        self.assertEqual(first.failures, 1)
        self.assertEqual(first.active, 0)
        bproto, bt = endpoints["127.0.0.1:2"].accept()
        proto.dataReceived(b"hi")
        self.assertEqual(bt.value(), b"hi")
        self.assertEqual(pool.backends[1].active, 1)
        # Passive ejection hears of both: the failure and the success.
        self.assertEqual(recorded, [("127.0.0.1:1", False), ("127.0.0.1:2", True)])

    def test_timed_out_connect_moves_on(self) -> None:
        """A connect that times out (connect-timeout) moves the client to the next backend."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1", "127.0.0.1:2")
        proto, ct = client(factory)
        endpoints["127.0.0.1:1"].refuse(error.TimeoutError())
        bproto, bt = endpoints["127.0.0.1:2"].accept()
        self.assertEqual(pool.backends[0].failures, 1)
        self.assertFalse(ct.disconnecting)

    def test_all_refused_closes_client(self) -> None:
        """When every backend refuses, the client is closed and nothing stays in flight."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1", "127.0.0.1:2")
        proto, ct = client(factory)
        endpoints["127.0.0.1:1"].refuse()
        endpoints["127.0.0.1:2"].refuse()
        self.assertTrue(ct.disconnecting)
        self.assertEqual([b.active for b in pool.backends], [0, 0])

    def test_open_connection_counts_in_flight(self) -> None:
        """A relayed connection is in flight on its backend until either side closes."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1")
        proto, ct = client(factory)
        bproto, bt = endpoints["127.0.0.1:1"].accept()
        backend = pool.backends[0]
        self.assertEqual((backend.active, backend.connections), (1, 1))
        proto.dataReceived(b"abc")
        bproto.dataReceived(b"de")
        self.assertEqual((backend.bytesOut, backend.bytesIn), (3, 2))
        bt.peerCloses()
        self.assertTrue(ct.disconnecting)
        self.assertEqual(backend.active, 0)
        ct.deliverLoss()
        self.assertEqual(proto.tunnel.state, "closed")
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_least_conn_sees_open_connections(self) -> None:
        """least-conn sends a new client to the backend with fewer open relays."""
        reactor, pool, endpoints, factory = relay(
            "127.0.0.1:1", "127.0.0.1:2", chooser=LeastConn()
        )
        client(factory)
        first = [a for a, e in endpoints.items() if e.pending][0]
        endpoints[first].accept()
        client(factory)
        second = [a for a, e in endpoints.items() if e.pending][0]
        self.assertNotEqual(first, second)

    def test_ip_hash_by_peer(self) -> None:
        """ip-hash sends every connection of one client address to one backend."""
        reactor, pool, endpoints, factory = relay(
            "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", chooser=IPHash()
        )
        seen = {}
        for peer in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            for port in (40000, 40001, 40002):
                client(factory, peer, port)
                (address,) = [a for a, e in endpoints.items() if e.pending]
                endpoints[address].accept()
                seen.setdefault(peer, set()).add(address)
        self.assertTrue(all(len(s) == 1 for s in seen.values()))
        self.assertGreater(len(set().union(*seen.values())), 1)

    def test_client_gone_while_connecting(self) -> None:
        """A client that leaves before the backend answers frees its slot; a late connect is closed."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1")
        proto, ct = client(factory)
        ct.peerCloses()
        self.assertEqual(pool.backends[0].active, 0)

    def test_proxy_header_first(self) -> None:
        """With proxy-protocol, the backend's first bytes are the header naming the client."""
        for version, encoder in (("v1", encodeV1), ("v2", encodeV2)):
            reactor, pool, endpoints, factory = relay(
                "127.0.0.1:1", proxyProtocol=version
            )
            proto, ct = client(factory, "198.51.100.9", 51234)
            proto.dataReceived(b"hello")
            bproto, bt = endpoints["127.0.0.1:1"].accept()
            header = encoder(ct.getPeer(), ct.getHost())
            self.assertEqual(bt.value(), header + b"hello")

    def test_unlisted_peer_sending_proxy_header_is_refused(self) -> None:
        """With accept-proxy-protocol set, a header from an unlisted peer closes its connection."""
        reactor, pool, endpoints, factory = relay(
            "127.0.0.1:1", refuseProxyHeaders=True
        )
        proto, ct = client(factory)
        proto.dataReceived(b"PRO")
        proto.dataReceived(b"XY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
        self.assertTrue(ct.aborted)
        self.assertEqual(pool.backends[0].active, 0)
        proto, ct = client(factory)
        proto.dataReceived(b"PRIVMSG")
        endpoints["127.0.0.1:1"].pending.clear()
        self.assertFalse(ct.disconnecting)


class Recorder:
    """
    A protocol that records what its transport says about the peer.
    """

    def __init__(self) -> None:
        self.data = b""
        self.peer = None
        self.lost = False

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.peer = transport.getPeer()
        self.host = transport.getHost()

    def dataReceived(self, data) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost = True


class RecorderFactory:
    def __init__(self) -> None:
        self.built = []

    def buildProtocol(self, addr):
        p = Recorder()
        self.built.append(p)
        return p

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


def accepting(peer="10.0.0.5"):
    reactor = MemoryReactorClock()
    inner = RecorderFactory()
    factory = AcceptProxyFactory(
        inner, parse_cidrs("10.0.0.0/8", "test"), reactor, timeout=5
    )
    proto = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    transport = Transport(peer, 40000)
    proto.makeConnection(transport)
    return reactor, inner, proto, transport


class AcceptProxyTests(SynchronousTestCase):
    def test_v1_header_names_the_client(self) -> None:
        """After a v1 header split over reads, the wrapped protocol sees the client it names."""
        reactor, inner, proto, transport = accepting()
        self.assertFalse(hasattr(inner.built[0], "transport"))
        proto.dataReceived(b"PROXY TCP4 192.0.2.1 ")
        proto.dataReceived(b"198.51.100.1 5555 443\r\nGET /")
        r = inner.built[0]
        self.assertEqual((r.peer.host, r.peer.port), ("192.0.2.1", 5555))
        self.assertEqual((r.host.host, r.host.port), ("198.51.100.1", 443))
        self.assertEqual(r.data, b"GET /")

    def test_v2_header_names_the_client(self) -> None:
        """A v2 header read in small pieces gives the client's address."""
        reactor, inner, proto, transport = accepting()
        header = encodeV2(
            IPv4Address("TCP", "192.0.2.7", 4242), IPv4Address("TCP", "10.1.1.1", 80)
        )
        for i in range(len(header)):
            proto.dataReceived(header[i : i + 1])
        proto.dataReceived(b"rest")
        r = inner.built[0]
        self.assertEqual((r.peer.host, r.peer.port), ("192.0.2.7", 4242))
        self.assertEqual(r.data, b"rest")

    def test_listed_peer_without_header_is_closed(self) -> None:
        """A listed peer that sends something else than a header is closed, never passed on."""
        reactor, inner, proto, transport = accepting()
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(hasattr(inner.built[0], "transport"))

    def test_malformed_header_is_closed(self) -> None:
        """A malformed v1 header closes the connection."""
        reactor, inner, proto, transport = accepting()
        proto.dataReceived(b"PROXY TCP4 not-an-address\r\n")
        self.assertTrue(transport.disconnecting)

    def test_silent_listed_peer_times_out(self) -> None:
        """A listed peer that sends nothing is closed after the timeout."""
        reactor, inner, proto, transport = accepting()
        reactor.advance(5)
        self.assertTrue(transport.disconnecting)

    def test_unlisted_peer_is_not_wrapped(self) -> None:
        """A peer outside the list gets the plain protocol: its header is just data."""
        reactor, inner, proto, transport = accepting(peer="192.0.2.50")
        self.assertIsInstance(proto, Recorder)


class TCPCheckTests(SynchronousTestCase):
    def test_connect_is_healthy_refusal_is_not(self) -> None:
        """A backend that accepts a TCP connect stays up; one refusing fall times goes down."""
        reactor = MemoryReactorClock()
        pool = BackendPool(backendSpecs("127.0.0.1:1", "127.0.0.1:2"), RoundRobin())
        changes = []
        endpoints = {}

        def endpointFor(r, backend, timeout):
            return endpoints.setdefault(backend.address, FakeEndpoint(backend))

        checker = TCPConnectChecker(
            pool.backends,
            lambda b, state, reason: changes.append((b.address, state)),
            reactor,
            endpointFor=endpointFor,
            interval=1,
            fall=2,
            jitter=lambda: 0,
        )
        checker.startService()
        for _ in range(3):
            reactor.advance(1)
            while endpoints["127.0.0.1:1"].pending:
                proto, t = endpoints["127.0.0.1:1"].accept()
                self.assertTrue(t.disconnecting)
            while endpoints["127.0.0.1:2"].pending:
                endpoints["127.0.0.1:2"].refuse()
        checker.stopService()
        self.assertEqual(changes, [("127.0.0.1:2", "down")])


class WiringTests(SynchronousTestCase):
    def test_tcp_listener_and_tcp_checks(self) -> None:
        """--mode tcp listens with the relay and checks its pool by TCP connect."""
        reactor = MemoryReactorClock()
        balancer = Balancer(
            ["127.0.0.1:3001"], reactor=reactor, mode="tcp", healthClient=object()
        )
        balancer.listen()
        self.assertIsInstance(balancer.defaultPool.checker, TCPConnectChecker)
        self.assertIsInstance(balancer.factories[0], TCPProxyFactory)

    def test_health_path_keeps_http_checks(self) -> None:
        """A health path given explicitly keeps HTTP checks in TCP mode."""
        reactor = MemoryReactorClock()
        balancer = Balancer(
            ["127.0.0.1:3001"],
            reactor=reactor,
            mode="tcp",
            healthPath="/ping",
            healthClient=object(),
        )
        self.assertNotIsInstance(balancer.defaultPool.checker, TCPConnectChecker)

    def test_listener_mode_and_accept_proxy(self) -> None:
        """A listener with mode tcp is a relay, wrapped to read PROXY headers when asked."""
        from txbalancer import settings

        config = settings.build(
            [settings.PoolConfig(backends=backendSpecs("127.0.0.1:3001"))],
            {"accept-proxy-protocol": "10.0.0.0/8"},
            listeners=[ListenerConfig("tcp:0", mode="tcp"), ListenerConfig("tcp:0")],
        )
        reactor = MemoryReactorClock()
        balancer = Balancer(config=config, reactor=reactor, healthClient=object())
        balancer.listen()
        factories = [listener.factory for listener in balancer.listeners]
        self.assertIsInstance(factories[0], AcceptProxyFactory)
        self.assertIsInstance(factories[0].wrappedFactory, TCPProxyFactory)
        self.assertTrue(factories[0].wrappedFactory.refuseProxyHeaders)
        self.assertNotIsInstance(factories[1].wrappedFactory, TCPProxyFactory)

    def test_listener_with_undefined_pool_is_an_error(self) -> None:
        """A listener naming a pool that does not exist is refused with its name."""
        from txbalancer import settings
        from txbalancer.config import ConfigError

        with self.assertRaises(ConfigError) as e:
            settings.build(
                [settings.PoolConfig(backends=backendSpecs("127.0.0.1:3001"))],
                {},
                listeners=[ListenerConfig("tcp:0", mode="tcp", pool="db")],
            )
        self.assertIn("'db'", str(e.exception))


class CommandLineTests(SynchronousTestCase):
    def _options(self, *args):
        import tempfile

        from txbalancer.tap import Options

        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/backends.txt"
            with open(path, "w") as f:
                f.write("127.0.0.1:3001\n")
            options = Options()
            options.parseOptions(["--backends", path, *args])
            return options["config"]

    def test_tcp_options(self) -> None:
        """--mode, --proxy-protocol, --accept-proxy-protocol and --tunnel-idle-timeout reach the config."""
        config = self._options(
            "--mode",
            "tcp",
            "--proxy-protocol",
            "v2",
            "--accept-proxy-protocol",
            "10.0.0.0/8,192.0.2.1",
            "--tunnel-idle-timeout",
            "60",
        )
        self.assertEqual(config.mode, "tcp")
        self.assertEqual(config.pools[0].proxyProtocol, "v2")
        self.assertEqual(
            [str(n) for n in config.acceptProxyProtocol], ["10.0.0.0/8", "192.0.2.1/32"]
        )
        self.assertEqual(config.tunnelIdleTimeout, 60.0)
        self.assertEqual(config.tcpPools(), frozenset(["default"]))

    def test_bad_values_are_usage_errors(self) -> None:
        """A bad mode or PROXY version is refused with the option's name."""
        from twisted.python.usage import UsageError

        for args, word in (
            (("--mode", "udp"), "--mode"),
            (("--proxy-protocol", "v3"), "--proxy-protocol"),
        ):
            with self.assertRaises(UsageError) as e:
                self._options(*args)
            self.assertIn(word, str(e.exception))

    def test_defaults(self) -> None:
        """Without the options: HTTP mode, no PROXY headers, an hour of tunnel idle time."""
        config = self._options()
        self.assertEqual(
            (config.mode, config.pools[0].proxyProtocol, config.acceptProxyProtocol),
            ("http", None, ()),
        )
        self.assertEqual(config.tunnelIdleTimeout, 3600.0)
        self.assertEqual(config.tcpPools(), frozenset())


class DrainTests(SynchronousTestCase):
    def test_drain_waits_then_closes(self) -> None:
        """On stop, relayed connections get the drain timeout, then are closed."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1")
        proto, ct = client(factory)
        bproto, bt = endpoints["127.0.0.1:1"].accept()
        d = factory.drain(5)
        reactor.advance(4)
        self.assertNoResult(d)
        self.assertFalse(ct.disconnecting)
        reactor.advance(1)
        self.assertTrue(ct.disconnecting and bt.disconnecting)
        ct.deliverLoss()
        bt.deliverLoss()
        self.successResultOf(d)
        self.assertEqual(reactor.getDelayedCalls(), [])


class ProxyCheckTests(SynchronousTestCase):
    def test_probe_sends_local_header(self) -> None:
        """A pool sending the PROXY protocol is checked by connects that send a LOCAL header."""
        reactor = MemoryReactorClock()
        pool = BackendPool(backendSpecs("127.0.0.1:1"), RoundRobin())
        endpoints = {}
        checker = TCPConnectChecker(
            pool.backends,
            lambda *a: None,
            reactor,
            endpointFor=lambda r, b, t: endpoints.setdefault(
                b.address, FakeEndpoint(b)
            ),
            proxyProtocol="v2",
            interval=1,
            jitter=lambda: 0,
        )
        checker.startService()
        reactor.advance(0)
        proto, transport = endpoints["127.0.0.1:1"].accept()
        from twisted.protocols.haproxy._v2parser import V2Parser

        info, rest = V2Parser().feed(transport.value())
        self.assertIsNone(info.source)
        self.assertEqual(rest, b"")
        checker.stopService()

    def test_http_pool_with_proxy_protocol_checked_by_connect(self) -> None:
        """An HTTP-mode pool with --proxy-protocol and no health path gets TCP checks."""
        balancer = Balancer(
            ["127.0.0.1:3001"],
            reactor=MemoryReactorClock(),
            proxyProtocol="v1",
            healthClient=object(),
        )
        self.assertIsInstance(balancer.defaultPool.checker, TCPConnectChecker)


class PendingBackpressureTests(SynchronousTestCase):
    def test_kept_bytes_filling_backend_keep_client_paused(self) -> None:
        """If the bytes kept while connecting fill the backend's buffer, the client stays paused."""
        reactor, pool, endpoints, factory = relay("127.0.0.1:1", pendingLimit=10)
        proto, ct = client(factory)
        proto.dataReceived(b"x" * 100)
        self.assertEqual(ct.producerState, "paused")
        endpoint = endpoints["127.0.0.1:1"]
        f, d = endpoint.pending.pop(0)
        bproto = f.buildProtocol(None)
        bt = Transport()
        bt.protocol = bproto
        bproto.makeConnection(bt)
        original = bt.write

        def write(data):
            original(data)
            # The backend's buffer is full: Twisted pauses its producer.
            bt.producer.pauseProducing()

        bt.write = write
        d.callback(bproto)
        self.assertEqual(bt.value(), b"x" * 100)
        self.assertEqual(ct.producerState, "paused")


class ListenerPoolTests(SynchronousTestCase):
    def test_tcp_listener_uses_its_pool(self) -> None:
        """A TCP listener naming a pool relays to that pool, and only that pool gets TCP checks."""
        from txbalancer import settings

        config = settings.build(
            [
                settings.PoolConfig(
                    name="web", backends=backendSpecs("127.0.0.1:3001")
                ),
                settings.PoolConfig(name="db", backends=backendSpecs("127.0.0.1:5432")),
            ],
            {},
            listeners=[
                ListenerConfig("tcp:0"),
                ListenerConfig("tcp:0", mode="tcp", pool="db"),
            ],
        )
        balancer = Balancer(
            config=config, reactor=MemoryReactorClock(), healthClient=object()
        )
        balancer.listen()
        relay = balancer.listeners[1].factory
        self.assertIs(relay.pool, balancer.pools["db"].pool)
        self.assertIsInstance(balancer.pools["db"].checker, TCPConnectChecker)
        self.assertNotIsInstance(balancer.pools["web"].checker, TCPConnectChecker)


class UnlistedHTTPPeerTests(SynchronousTestCase):
    def test_headers_from_unlisted_peer_get_400(self) -> None:
        """In HTTP mode a v1 or v2 header from a peer outside the list is answered 400 and reaches no backend."""
        from txbalancer.downstream import HTTPServerFactory
        from txbalancer.testing import RecordingHandler, serverProtocol

        v2 = encodeV2(
            IPv4Address("TCP", "192.0.2.1", 1), IPv4Address("TCP", "10.0.0.1", 80)
        )
        for header in (b"PROXY TCP4 192.0.2.1 10.0.0.1 1 80\r\n", v2):
            reactor = MemoryReactorClock()
            handler = RecordingHandler()
            inner = HTTPServerFactory(handler, reactor)
            factory = AcceptProxyFactory(inner, parse_cidrs("10.0.0.0/8", "t"), reactor)
            protocol, transport = serverProtocol(factory, peer="192.0.2.50")
            protocol.dataReceived(header + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertTrue(
                transport.value().startswith(b"HTTP/1.1 400"), transport.value()
            )
            self.assertEqual(handler.exchanges, [])
