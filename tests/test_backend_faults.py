"""
Misbehaving backends never hurt clients or the balancer (issue 14 item 3),
on the in-memory balancer: a reset mid-body, garbage for a status line, an
oversized header block, a wrong Content-Length, a hang after the headers
and a flood towards a slow client.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.testing import InMemoryBalancer

GET = b"GET /f HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class BackendFaultTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lb = InMemoryBalancer(("127.0.0.1:3001",), backendTimeout=10)

    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def assertIdle(self) -> None:
        """Nothing in flight, no backend counts an active request."""
        self.lb.flush()
        self.assertEqual(self.lb.forwarder.inFlight, 0)
        self.assertEqual([b.active for b in self.lb.pool.backends], [0])

    def assertStillServes(self) -> None:
        """The balancer serves the next client normally."""
        client = self.lb.client()
        client.send(GET)
        pending = self.lb.pendingConnects()
        backend = self.lb.acceptConnect() if pending else None
        self.assertIsNotNone(backend, "expected a fresh connection to the backend")
        backend.respond(OK)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK"))

    def start(self):
        client = self.lb.client()
        client.send(GET)
        return client, self.lb.acceptConnect()

    def test_reset_mid_body_aborts_client(self) -> None:
        """A backend reset half-way through a Content-Length body aborts the client, never a short 'complete' body."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)
        backend.close(error.ConnectionLost("reset"))
        self.assertTrue(client.transport.aborted)
        self.assertEqual(self.lb.backend("127.0.0.1:3001").failures, 1)
        self.assertIdle()
        self.assertStillServes()

    def test_reset_mid_chunked_body_aborts_client(self) -> None:
        """A reset inside a chunked body aborts the client: it never sees the final chunk."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        backend.close(error.ConnectionLost("reset"))
        self.assertTrue(client.transport.aborted)
        self.assertNotIn(b"0\r\n\r\n", client.received())
        self.assertIdle()

    def test_garbage_status_line_502(self) -> None:
        """Garbage instead of a status line is a 502, and the backend connection is dropped."""
        client, backend = self.start()
        backend.respond(b"\x00\x01garbage that is not HTTP\r\n\r\n")
        self.assertTrue(client.received().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(backend.transport.aborted)
        self.assertIdle()
        self.assertStillServes()

    def test_oversized_response_head_502(self) -> None:
        """A response header block over 64 KiB is a 502 before it is complete."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\n")
        for i in range(70):
            backend.respond(b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000))
        self.assertTrue(client.received().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"response head too large", client.received())
        self.assertTrue(backend.transport.aborted)
        self.assertIdle()

    def test_more_bytes_than_content_length(self) -> None:
        """Bytes past Content-Length never reach the client, and that connection is never reused."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\nEVIL")
        out = client.received()
        self.assertTrue(out.endswith(b"\r\n\r\nok"), out)
        self.assertNotIn(b"EVIL", out)
        self.assertTrue(backend.closed)
        self.assertEqual(self.lb.upstreams.idleCount(self.lb.pool.backends[0]), 0)
        self.assertIdle()
        client.send(GET)
        self.assertEqual(len(self.lb.pendingConnects()), 1)  # a new connection, not the tainted one

    def test_fewer_bytes_than_content_length_then_close(self) -> None:
        """Fewer bytes than Content-Length and then a clean close: the client is aborted, not handed a short body."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        backend.close()
        self.assertTrue(client.transport.aborted)
        self.assertIdle()

    def test_hang_after_headers_frees_both(self) -> None:
        """A backend that stops sending after the head is cut after --backend-timeout of silence: client aborted, backend freed."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.lb.reactor.advance(9.9)
        self.assertFalse(client.transport.aborted)
        self.lb.reactor.advance(0.2)
        self.assertTrue(client.transport.aborted)
        self.assertTrue(backend.transport.aborted)
        self.assertEqual(self.lb.backend("127.0.0.1:3001").failures, 1)
        self.assertIdle()
        self.assertStillServes()

    def test_hang_after_headers_of_chunked_response(self) -> None:
        """The idle timeout restarts with each piece of body and fires only after a silence."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            self.lb.reactor.advance(8)
            backend.respond(b"1\r\nx\r\n")
        self.assertFalse(client.transport.aborted)
        self.lb.reactor.advance(10)
        self.assertTrue(client.transport.aborted)
        self.assertIdle()

    def test_flood_to_slow_client_pauses_backend(self) -> None:
        """A backend flooding a slow client is paused while the client's transport is full, and resumed after."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (10 * 2**20,))
        producer = client.transport.producer
        self.assertIsNotNone(producer, "the exchange is the client transport's producer")
        backend.respond(b"x" * 65536)
        producer.pauseProducing()  # the client's socket buffer is full
        self.assertEqual(backend.transport.producerState, "paused")
        # The backend is not blamed for the silence it was told to keep,
        # however much longer than --backend-timeout the client takes (up
        # to --client-timeout, when the client itself is cut off).
        self.lb.reactor.advance(50)
        self.assertFalse(client.transport.aborted)
        self.assertEqual(self.lb.backend("127.0.0.1:3001").failures, 0)
        producer.resumeProducing()
        self.assertEqual(backend.transport.producerState, "producing")
        backend.respond(b"y" * (10 * 2**20 - 65536))
        self.assertTrue(client.received().endswith(b"y" * 100))
        self.assertFalse(client.transport.aborted)
        self.assertIdle()

    def test_idle_timeout_counts_again_after_resume(self) -> None:
        """After a slow client resumes, a backend that then goes silent is still cut after the timeout."""
        client, backend = self.start()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2**20,))
        producer = client.transport.producer
        producer.pauseProducing()
        self.lb.reactor.advance(25)
        producer.resumeProducing()
        self.lb.reactor.advance(9)
        self.assertFalse(client.transport.aborted)
        self.lb.reactor.advance(2)
        self.assertTrue(client.transport.aborted)
        self.assertIdle()


class FrozenBackendTests(SynchronousTestCase):
    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_timeouts_eject_and_requests_go_elsewhere(self) -> None:
        """Five timeouts on a frozen backend eject it (--eject-after 5); each GET is answered by the other backend."""
        from txbalancer.health import OutlierDetector

        lb = InMemoryBalancer(("127.0.0.1:3001", "127.0.0.1:3002"), backendTimeout=10)
        ejected = []

        def onEject(backend, seconds, reason):
            ejected.append((backend.address, reason))
            lb.pool.setHealth(backend, "down", reason)

        lb.pool.outliers = OutlierDetector(
            onEject, lambda b: lb.pool.setHealth(b, "up"), lb.reactor, ejectAfter=5
        )
        frozen = []
        clients = []
        for i in range(10):
            client = lb.client(port=40000 + i)
            client.send(GET)
            clients.append(client)
            while lb.pendingConnects():
                address = lb.pendingConnects()[0].address
                conn = lb.acceptConnect()
                if address == "127.0.0.1:3001":
                    frozen.append(conn)  # accepts, never answers
                else:
                    conn.respond(OK_CLOSE)
        lb.reactor.advance(10)
        while lb.pendingConnects():
            lb.acceptConnect().respond(OK_CLOSE)
        self.assertEqual(len(frozen), 5)
        self.assertEqual(ejected, [("127.0.0.1:3001", "5 consecutive failed requests")])
        for client in clients:
            self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK"), client.received())
        lb.flush()
        self.assertEqual(lb.forwarder.inFlight, 0)
