"""
Tests for txbalancer.service: start-up and the graceful stop.
"""

from __future__ import annotations

import io

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.accesslog import AccessLog
from txbalancer.service import BalancerService
from txbalancer.testing import InMemoryBalancer

GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeEndpoint:
    """
    A server endpoint that listens on a MemoryReactorClock.
    """

    def __init__(self, reactor: MemoryReactorClock, port: int) -> None:
        self.reactor = reactor
        self.port = port

    def listen(self, factory):
        from twisted.internet.defer import succeed

        return succeed(self.reactor.listenTCP(self.port, factory))


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lb = InMemoryBalancer(backends=("127.0.0.1:3001",))
        self.service = BalancerService(
            [(FakeEndpoint(self.lb.reactor, 8000), self.lb.factory)],
            self.lb.pool,
            self.lb.upstreams,
            self.lb.forwarder,
            drainTimeout=30,
        )

    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_start_listens_and_starts_sweep(self) -> None:
        """Starting listens on each endpoint and starts the idle sweep."""
        self.service.startService()
        self.assertEqual([p for p, *_ in self.lb.reactor.tcpServers], [8000])
        self.assertTrue(self.lb.upstreams._sweeper.running)
        self.assertTrue(self.lb.pool.running)

    def test_stop_when_idle(self) -> None:
        """Stopping with nothing in flight finishes at once and cancels every timer."""
        self.service.startService()
        client = self.lb.client()
        d = self.service.stopService()
        self.assertTrue(client.closed)
        self.lb.flush()
        self.successResultOf(d)
        self.assertFalse(self.lb.pool.running)
        self.assertFalse(self.lb.upstreams._sweeper.running)
        self.assertFalse(self.service.running)

    def test_stop_waits_for_request_in_flight(self) -> None:
        """Stopping waits for a request in flight, which completes with Connection: close."""
        self.service.startService()
        client = self.lb.client()
        client.send(GET)
        backend = self.lb.acceptConnect()
        d = self.service.stopService()
        self.assertNoResult(d)
        backend.respond(OK)
        self.assertTrue(client.received().endswith(b"ok"))
        self.assertIn(b"Connection: close\r\n", client.received())
        self.assertTrue(client.closed)
        self.lb.flush()
        self.successResultOf(d)
        self.assertTrue(backend.closed)
        self.assertEqual(self.lb.reactor.getDelayedCalls(), [])

    def test_stop_gives_up_after_drain_timeout(self) -> None:
        """Requests still in flight after the drain timeout are aborted and the stop completes."""
        self.service.startService()
        client = self.lb.client()
        client.send(GET)
        backend = self.lb.acceptConnect()
        d = self.service.stopService()
        self.lb.reactor.advance(29)
        self.assertNoResult(d)
        self.lb.reactor.advance(1)
        self.assertTrue(client.transport.aborted)
        self.lb.flush()
        self.successResultOf(d)
        self.assertTrue(backend.closed)
        self.assertEqual(self.lb.forwarder.inFlight, 0)

    def test_access_log_closed(self) -> None:
        """Stopping closes the access log."""
        stream = io.StringIO()
        service = BalancerService(
            [], self.lb.pool, self.lb.upstreams, self.lb.forwarder,
            accessLog=AccessLog(stream, self.lb.reactor.seconds),
        )
        service.startService()
        self.successResultOf(service.stopService())
        self.assertTrue(stream.closed)
