"""
Tests for the slow-client defences, on a fake reactor: the request-head
deadline (--header-timeout), the body and write deadlines (--client-timeout)
and the connection limits (--max-connections, --max-conns-per-ip).
"""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from txbalancer import limits as limitsModule
from txbalancer.downstream import HTTPServerFactory, HTTPServerProtocol
from txbalancer.limits import ConnectionLimits, RefusedConnection, TrackedEndpoint
from txbalancer.testing import (
    FakeTransport,
    InMemoryBalancer,
    RecordingHandler,
    serverProtocol,
)

GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
BIG = b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n"


class ServerTestCase(SynchronousTestCase):
    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def server(self, **kw):
        self.handler = RecordingHandler()
        self.reactor = MemoryReactorClock()
        self.factory = HTTPServerFactory(self.handler, self.reactor, **kw)
        self.proto, self.transport = serverProtocol(self.factory)
        return self.proto, self.transport

    def status(self) -> bytes:
        return self.transport.value().split(b"\r\n", 1)[0]


class HeaderTimeoutTests(ServerTestCase):
    def test_trickled_head_408_at_header_timeout(self) -> None:
        """A head sent a byte a second gets 408 at headerTimeout after the connect, long before clientTimeout."""
        self.server(clientTimeout=60, headerTimeout=10)
        head = b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"a" * 100
        for i in range(9):
            self.proto.dataReceived(head[i : i + 1])
            self.reactor.advance(1)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(1)
        self.assertEqual(self.status(), b"HTTP/1.1 408 Request Timeout")
        self.assertIn(b"request head", self.transport.value())
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.handler.exchanges, [])

    def test_connect_without_bytes_closed_at_header_timeout(self) -> None:
        """A connection that sends nothing is closed, without an answer, at headerTimeout."""
        self.server(clientTimeout=60, headerTimeout=10)
        self.reactor.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_keep_alive_head_due_from_its_first_byte(self) -> None:
        """On a kept-alive connection the next head is due headerTimeout after its first byte, whenever it comes."""
        self.server(clientTimeout=60, headerTimeout=10)
        self.proto.dataReceived(GET)
        self.proto.respond(200, b"OK", [], b"ok")
        self.transport.clear()
        self.reactor.advance(50)  # idle, within clientTimeout
        self.proto.dataReceived(b"GET / HT")
        self.reactor.advance(9.9)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertEqual(self.status(), b"HTTP/1.1 408 Request Timeout")

    def test_head_in_time_then_slow_backend_is_fine(self) -> None:
        """A head completed in time is not timed out while its response takes longer than headerTimeout."""
        self.server(clientTimeout=60, headerTimeout=10)
        self.proto.dataReceived(GET)
        self.reactor.advance(100)
        self.assertFalse(self.transport.disconnecting)
        self.proto.respond(200, b"OK", [], b"ok")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK"))

    def test_pipelined_head_due_from_previous_response(self) -> None:
        """A pipelined head left incomplete after the response before it gets 408 headerTimeout later."""
        self.server(clientTimeout=60, headerTimeout=10)
        self.proto.dataReceived(GET + b"GET /next HT")
        self.reactor.advance(30)
        self.proto.respond(200, b"OK", [], b"ok")
        self.transport.clear()
        self.reactor.advance(9.9)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertEqual(self.status(), b"HTTP/1.1 408 Request Timeout")

    def test_one_timer_per_connection(self) -> None:
        """Requests on a kept-alive connection never leave more than one timer scheduled."""
        self.server(clientTimeout=60, headerTimeout=10)
        for _ in range(5):
            self.proto.dataReceived(GET)
            self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
            self.proto.respond(200, b"OK", [], b"ok")
            self.assertEqual(len(self.reactor.getDelayedCalls()), 1)


    def test_timer_never_moved_sooner_per_request(self) -> None:
        """On the path of kept-alive requests, with and without a body, the one timer is pushed later or replaced, never reset sooner (a linear search in Twisted's reactor)."""
        self.server(clientTimeout=60, headerTimeout=10)
        last = None
        post = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n"
        for i in range(5):
            for step in (lambda: self.proto.dataReceived(GET),
                         lambda: self.proto.respond(200, b"OK", [], b"ok"),
                         lambda: self.proto.dataReceived(post),
                         lambda: self.proto.dataReceived(b"x"),
                         lambda: self.proto.dataReceived(b"y"),
                         lambda: self.proto.respond(200, b"OK", [], b"ok")):
                (call,) = self.reactor.getDelayedCalls()
                before = call.getTime()
                step()
                (after,) = self.reactor.getDelayedCalls()
                if after is call:
                    self.assertGreaterEqual(call.getTime(), before)
                last = after
            self.reactor.advance(1)
        self.assertIsNotNone(last)

    def test_header_timeout_without_client_timeout(self) -> None:
        """With clientTimeout off, an idle kept-alive connection stays open, but a started head still gets 408 at headerTimeout."""
        self.server(clientTimeout=None, headerTimeout=10)
        self.proto.dataReceived(GET)
        self.proto.respond(200, b"OK", [], b"ok")
        self.transport.clear()
        self.reactor.advance(1000)
        self.assertFalse(self.transport.disconnecting)
        self.proto.dataReceived(b"GET / HT")
        self.reactor.advance(10)
        self.assertEqual(self.status(), b"HTTP/1.1 408 Request Timeout")


class WriteDeadlineTests(ServerTestCase):
    def test_protocol_is_its_transports_producer(self) -> None:
        """The server protocol registers itself with its transport as a streaming producer."""
        self.server()
        self.assertIs(self.transport.producer, self.proto)
        self.assertTrue(self.transport.streaming)

    def test_blocked_client_aborted_after_client_timeout(self) -> None:
        """A client that reads nothing for clientTimeout while a response waits is aborted."""
        self.server(clientTimeout=5)
        self.proto.dataReceived(GET)
        self.proto.startResponse(200, b"OK", [], None)
        self.reactor.advance(3)
        self.proto.pauseProducing()  # the send buffer is full
        self.reactor.advance(4.9)
        self.assertFalse(self.transport.aborted)
        self.reactor.advance(0.2)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.factory.counters["write_timeout"], 1)

    def test_reading_client_is_not_cut(self) -> None:
        """A slow reader that keeps draining the buffer is never cut, however long the response takes."""
        self.server(clientTimeout=5)
        self.proto.dataReceived(GET)
        self.proto.startResponse(200, b"OK", [], None)
        for _ in range(20):
            self.proto.pauseProducing()
            self.reactor.advance(4)
            self.proto.resumeProducing()
            self.proto.writeBody(b"x")
        self.assertFalse(self.transport.disconnecting)

    def test_exchange_paused_and_resumed_with_client(self) -> None:
        """The producer registered by the exchange is paused and resumed with the client, also when registered while paused."""

        class Producer:
            def __init__(self):
                self.calls = []

            def pauseProducing(self):
                self.calls.append("pause")

            def resumeProducing(self):
                self.calls.append("resume")

            def stopProducing(self):
                self.calls.append("stop")

        self.server()
        self.proto.dataReceived(GET)
        self.proto.startResponse(200, b"OK", [], None)
        producer = Producer()
        self.proto.pauseProducing()
        self.proto.registerProducer(producer, True)
        self.assertEqual(producer.calls, ["pause"])
        self.proto.resumeProducing()
        self.proto.pauseProducing()
        self.assertEqual(producer.calls, ["pause", "resume", "pause"])
        self.proto.unregisterProducer()
        self.proto.resumeProducing()
        self.assertEqual(producer.calls, ["pause", "resume", "pause"])

    def test_no_pipelined_request_while_blocked(self) -> None:
        """While the client reads nothing, the next pipelined request is not started; it is once the client reads."""
        self.server(clientTimeout=60)
        self.proto.dataReceived(GET + GET)
        self.assertEqual(len(self.handler.exchanges), 1)
        self.proto.pauseProducing()
        self.proto.respond(200, b"OK", [], b"ok")
        self.assertEqual(len(self.handler.exchanges), 1)
        self.proto.dataReceived(GET)
        self.assertEqual(len(self.handler.exchanges), 1)
        self.proto.resumeProducing()
        self.assertEqual(len(self.handler.exchanges), 2)

    def test_pipelined_buffer_bounded_while_blocked(self) -> None:
        """Pipelined bytes sent to a client that reads nothing stop being read past maxHeadSize."""
        self.server(clientTimeout=60, maxHeadSize=1024)
        self.proto.dataReceived(GET)
        self.proto.pauseProducing()
        self.proto.respond(200, b"OK", [], b"ok")
        self.proto.dataReceived(GET * 40)
        self.assertEqual(self.transport.producerState, "paused")

    def test_closing_connection_aborted_when_not_drained(self) -> None:
        """A connection closed after its response but never drained by its client is aborted clientTimeout later."""
        self.server(clientTimeout=5)
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        self.proto.respond(200, b"OK", [], b"ok")
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)  # else TCP/TLS would never close
        self.assertFalse(self.transport.aborted)
        self.reactor.advance(5)
        self.assertTrue(self.transport.aborted)


class ThroughTheProxyTests(SynchronousTestCase):
    """
    The deadlines with the real exchange: the backend connection is freed.
    """

    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def assertFreed(self, lb: InMemoryBalancer, backend) -> None:
        self.assertTrue(backend.closed)
        self.assertEqual(lb.forwarder.inFlight, 0)
        self.assertEqual([b.active for b in lb.pool.backends], [0, 0])
        self.assertEqual(lb.requestTimers(), [])

    def test_stalled_body_408_frees_backend(self) -> None:
        """A request body that stops for clientTimeout gets 408 and its backend connection is closed."""
        lb = InMemoryBalancer(clientTimeout=5)
        client = lb.client()
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
        backend = lb.acceptConnect()
        self.assertTrue(backend.received().endswith(b"abc"))
        lb.reactor.advance(4)
        client.send(b"d")
        lb.reactor.advance(4.9)
        self.assertEqual(client.received(), b"")
        lb.reactor.advance(0.2)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 408 "))
        lb.flush()
        self.assertFreed(lb, backend)

    def test_stalled_body_after_response_began_aborts(self) -> None:
        """A body that stops for clientTimeout after the backend began answering aborts both connections."""
        lb = InMemoryBalancer(clientTimeout=5)
        client = lb.client()
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        lb.reactor.advance(5)
        self.assertTrue(client.transport.aborted)
        lb.flush()
        self.assertFreed(lb, backend)

    def test_slow_reader_cut_and_backend_freed(self) -> None:
        """A client that stops reading a large response is aborted after clientTimeout and the backend connection closed."""
        lb = InMemoryBalancer(clientTimeout=5)
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(BIG + b"x" * 100000)
        # The client's send buffer fills: the transport pauses its producer,
        # which pauses the backend.
        client.transport.producer.pauseProducing()
        self.assertEqual(backend.transport.producerState, "paused")
        lb.reactor.advance(4.9)
        self.assertFalse(client.transport.aborted)
        lb.reactor.advance(0.2)
        self.assertTrue(client.transport.aborted)
        lb.flush()
        self.assertFreed(lb, backend)

    def test_slow_reader_that_reads_is_served(self) -> None:
        """A client that reads a large response slowly, a little within every clientTimeout, gets all of it."""
        lb = InMemoryBalancer(clientTimeout=5)
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
        for _ in range(30):
            client.transport.producer.pauseProducing()
            lb.reactor.advance(4)
            client.transport.producer.resumeProducing()
            backend.respond(b"x")
        self.assertTrue(client.received().endswith(b"x" * 30))
        self.assertFalse(client.transport.disconnecting)


class _Port:
    def __init__(self):
        self.reading = True
        self.connected = True
        self.disconnecting = False

    def stopReading(self):
        self.reading = False

    def startReading(self):
        self.reading = True


class ConnectionLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        self.patch(limitsModule, "log", Logger(observer=self.events.append))

    def factory(self, **kw) -> HTTPServerFactory:
        self.reactor = MemoryReactorClock()
        self.limits = ConnectionLimits(clock=self.reactor.seconds, **kw)
        return HTTPServerFactory(RecordingHandler(), self.reactor, limits=self.limits)

    def connect(self, factory, host="192.0.2.1", port=40000):
        transport = FakeTransport(host, port)
        protocol = factory.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def test_ports_paused_at_limit_and_resumed_below(self) -> None:
        """At maxConnections open every listening port stops reading; one closing starts them again."""
        factory = self.factory(maxConnections=2)
        ports = [_Port(), _Port()]
        for port in ports:
            self.limits.addPort(port)
        _, first = self.connect(factory)
        self.assertEqual([p.reading for p in ports], [True, True])
        self.connect(factory, port=40001)
        self.assertEqual([p.reading for p in ports], [False, False])
        self.assertEqual(self.limits.open, 2)
        first.peerCloses()
        self.assertEqual([p.reading for p in ports], [True, True])
        self.assertEqual(self.limits.open, 1)

    def test_port_added_while_paused_is_paused(self) -> None:
        """A port that starts listening while at the limit is paused at once."""
        factory = self.factory(maxConnections=1)
        self.connect(factory)
        port = _Port()
        self.limits.addPort(port)
        self.assertFalse(port.reading)

    def test_closed_port_not_resumed(self) -> None:
        """A port that stopped listening (the balancer stopping) is not started again."""
        factory = self.factory(maxConnections=1)
        port = _Port()
        self.limits.addPort(port)
        _, transport = self.connect(factory)
        port.connected = False
        transport.peerCloses()
        self.assertFalse(port.reading)

    def test_over_the_limit_in_one_accept_batch_served(self) -> None:
        """A connection accepted in the same batch as the one that reached maxConnections is served; the ports resume only below the limit."""
        factory = self.factory(maxConnections=1)
        port = _Port()
        self.limits.addPort(port)
        _, first = self.connect(factory)
        protocol, transport = self.connect(factory, port=40001)
        self.assertIsInstance(protocol, HTTPServerProtocol)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.limits.open, 2)
        first.peerCloses()
        self.assertFalse(port.reading)
        transport.peerCloses()
        self.assertTrue(port.reading)

    def test_per_ip_limit(self) -> None:
        """Beyond maxPerPeer connections from one address a new one is closed at once; other addresses are served."""
        factory = self.factory(maxPerPeer=2)
        a1, _ = self.connect(factory, "192.0.2.1", 1)
        a2, _ = self.connect(factory, "192.0.2.1", 2)
        a3, t3 = self.connect(factory, "192.0.2.1", 3)
        b1, tb = self.connect(factory, "192.0.2.2", 1)
        self.assertIsInstance(a1, HTTPServerProtocol)
        self.assertIsInstance(a2, HTTPServerProtocol)
        self.assertIsInstance(a3, RefusedConnection)
        self.assertTrue(t3.aborted)
        self.assertEqual(t3.value(), b"")
        self.assertIsInstance(b1, HTTPServerProtocol)
        self.assertFalse(tb.disconnecting)
        self.assertEqual(self.limits.perPeer, {"192.0.2.1": 2, "192.0.2.2": 1})
        a1.transport.peerCloses()
        again, _ = self.connect(factory, "192.0.2.1", 4)
        self.assertIsInstance(again, HTTPServerProtocol)

    def test_per_ip_counts_forgotten(self) -> None:
        """An address whose connections have all closed leaves nothing behind."""
        factory = self.factory(maxPerPeer=2)
        for i in range(50):
            _, t = self.connect(factory, f"192.0.2.{i}", 1)
            t.peerCloses()
        self.assertEqual(self.limits.perPeer, {})
        self.assertEqual(self.limits.open, 0)

    def test_refusals_logged_at_most_once_per_interval(self) -> None:
        """A flood of refused connections logs one line per interval, saying how many."""
        factory = self.factory(maxPerPeer=1)
        self.connect(factory, "192.0.2.1", 1)
        for i in range(100):
            self.connect(factory, "192.0.2.1", 2 + i)
        self.assertEqual(len(self.events), 1)
        self.reactor.advance(10)
        self.connect(factory, "192.0.2.1", 999)
        self.assertEqual(len(self.events), 2)
        self.assertEqual(self.events[1]["n"], 100)
        self.assertEqual(self.limits.refused, 101)

    def test_no_limits_no_counting(self) -> None:
        """Without limits nothing is counted."""
        factory = self.factory()
        for i in range(3):
            self.connect(factory, "192.0.2.1", i)
        self.assertEqual(self.limits.open, 0)

    def test_tracked_endpoint_hands_over_port(self) -> None:
        """TrackedEndpoint passes the listening port to its callback and on to the caller."""

        class Endpoint:
            def listen(self, factory):
                self.factory = factory
                return succeed("the port")

        seen = []
        d = TrackedEndpoint(Endpoint(), lambda p: seen.append(p) or p).listen(object())
        self.assertEqual(self.successResultOf(d), "the port")
        self.assertEqual(seen, ["the port"])


class BalancerWiringTests(SynchronousTestCase):
    def test_settings_reach_the_factory_and_ports(self) -> None:
        """Balancer passes headerTimeout and its limits to its factories and its listening ports to the limits."""
        from txbalancer.balancer import Balancer

        reactor = MemoryReactorClock()
        balancer = Balancer(
            ["127.0.0.1:3001"],
            reactor=reactor,
            headerTimeout=3,
            maxConnections=10,
            maxConnsPerIp=2,
        )
        balancer.listen()
        balancer.startService()
        factory = balancer.factories[0]
        self.assertEqual(factory.headerTimeout, 3)
        self.assertIs(factory.limits, balancer.limits)
        self.assertEqual((balancer.limits.maxConnections, balancer.limits.maxPerPeer), (10, 2))
        self.assertEqual(len(balancer.limits._ports), 1)
        self.flushLoggedErrors()

    def test_options(self) -> None:
        """--header-timeout, --max-connections and --max-conns-per-ip are options, checked like the others."""
        from twisted.python import usage

        from txbalancer.tap import Options

        import os
        import shutil
        import tempfile

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "backends.txt")
        with open(path, "w") as f:
            f.write("127.0.0.1:3001\n")
        options = Options()
        options.parseOptions(
            ["--backends", path, "--header-timeout", "2.5", "--max-connections", "100",
             "--max-conns-per-ip", "5"]
        )
        config = options["config"]
        self.assertEqual(
            (config.headerTimeout, config.maxConnections, config.maxConnsPerIp), (2.5, 100, 5)
        )
        for bad in (["--header-timeout", "0"], ["--max-connections", "-1"],
                    ["--max-conns-per-ip", "x"]):
            self.assertRaises(usage.UsageError, Options().parseOptions, ["--backends", path] + bad)


class TLSRefusalTests(SynchronousTestCase):
    def test_refused_under_tls(self) -> None:
        """A connection over --max-conns-per-ip on a TLS listener is aborted at once, before any handshake, without an error."""
        import shutil
        import tempfile

        from twisted.protocols.tls import TLSMemoryBIOFactory

        from test_tls import PKI
        from txbalancer.tls import ServerTLS

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        serverTLS = ServerTLS([PKI(directory).server("a", "a.example")])
        reactor = MemoryReactorClock()
        limits = ConnectionLimits(maxPerPeer=1, clock=reactor.seconds)
        factory = TLSMemoryBIOFactory(
            serverTLS, False, HTTPServerFactory(RecordingHandler(), reactor, limits=limits)
        )
        transports = []
        for port in (1, 2):
            transport = FakeTransport("192.0.2.1", port)
            protocol = factory.buildProtocol(transport.getPeer())
            transport.protocol = protocol
            protocol.makeConnection(transport)
            transports.append(transport)
        self.assertFalse(transports[0].disconnecting)
        self.assertTrue(transports[1].aborted)
        self.assertEqual(self.flushLoggedErrors(), [])
        transports[1].deliverLoss()
        self.assertEqual(limits.open, 1)
        self.assertEqual(self.flushLoggedErrors(), [])
