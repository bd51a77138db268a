"""
Tests for WebSocket upgrades through the balancer (on a fake reactor):
the handshake forwarded, the 101 handover, the splice, its lifetime and
its counting, and the upgrades that are refused.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.testing import FakeTransport, InMemoryBalancer


class _HalfCloseableTransport(FakeTransport):
    halfClosed = False

    def loseWriteConnection(self) -> None:
        self.halfClosed = True

HANDSHAKE = (
    b"GET /chat?room=1 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"Connection: Upgrade\r\n"
    b"Upgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: chat\r\n"
    b"\r\n"
)

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"Sec-WebSocket-Protocol: chat\r\n"
    b"\r\n"
)


class TunnelMixin:
    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def openTunnel(self, lb=None, first=b"", backendFirst=b""):
        """
        A client's handshake, accepted by the backend: the tunnel is up.
        """
        self.lb = lb or InMemoryBalancer(["127.0.0.1:3001"])
        client = self.lb.client()
        client.send(HANDSHAKE + first)
        backend = self.lb.acceptConnect()
        self.handshake = backend.received()
        backend.clear()
        backend.respond(SWITCH + backendFirst)
        return client, backend


class HandshakeTests(TunnelMixin, SynchronousTestCase):
    def test_forwarded_with_upgrade_headers(self) -> None:
        """The handshake reaches the backend with Upgrade, Connection: Upgrade and every Sec-WebSocket-* header."""
        self.openTunnel()
        head = self.handshake
        self.assertTrue(head.startswith(b"GET /chat?room=1 HTTP/1.1\r\n"), head)
        self.assertIn(b"Connection: Upgrade\r\n", head)
        self.assertIn(b"Upgrade: websocket\r\n", head)
        self.assertIn(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", head)
        self.assertIn(b"Sec-WebSocket-Version: 13\r\n", head)
        self.assertIn(b"Sec-WebSocket-Protocol: chat\r\n", head)

    def test_client_gets_101(self) -> None:
        """The client gets the 101 with Upgrade, Connection and Sec-WebSocket-Accept, and no framing headers."""
        client, backend = self.openTunnel()
        got = client.received()
        head, _, rest = got.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), got)
        self.assertIn(b"\r\nUpgrade: websocket", head)
        self.assertIn(b"\r\nConnection: Upgrade", head)
        self.assertIn(b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertNotIn(b"Content-Length", head)
        self.assertEqual(rest, b"")

    def test_splice_both_ways(self) -> None:
        """After the 101, bytes go through unchanged both ways, HTTP-looking or not."""
        client, backend = self.openTunnel()
        client.clear()
        client.send(b"\x81\x85\x00\x00\x00\x00hello")
        self.assertEqual(backend.received(), b"\x81\x85\x00\x00\x00\x00hello")
        backend.respond(b"GET / HTTP/1.1\r\n\r\n\x00\xff")
        self.assertEqual(client.received(), b"GET / HTTP/1.1\r\n\r\n\x00\xff")

    def test_bytes_buffered_past_the_heads(self) -> None:
        """A frame that came in the same read as the handshake, or as the 101, is relayed."""
        client, backend = self.openTunnel(first=b"\x81\x01a", backendFirst=b"\x81\x01b")
        self.assertEqual(backend.received(), b"\x81\x01a")
        self.assertTrue(client.received().endswith(b"\r\n\r\n\x81\x01b"))

    def test_refused_handshake_is_a_normal_response(self) -> None:
        """A backend that answers the handshake with 403 gives the client that 403; neither connection is reused (what follows a handshake may be frames)."""
        lb = InMemoryBalancer(["127.0.0.1:3001"])
        client = lb.client()
        client.send(HANDSHAKE)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        self.assertTrue(client.received().startswith(b"HTTP/1.1 403 Forbidden\r\n"))
        self.assertTrue(client.received().endswith(b"\r\n\r\nno"))
        self.assertIn(b"\r\nConnection: close\r\n", client.received())
        self.assertTrue(client.closed)
        self.assertTrue(backend.closed)
        self.assertEqual(lb.upstreams.idleCount(lb.backend("127.0.0.1:3001")), 0)

    def test_unrequested_101_is_502(self) -> None:
        """A 101 to a request that did not ask to upgrade is a bad response: 502."""
        lb = InMemoryBalancer(["127.0.0.1:3001"])
        client = lb.client()
        client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        backend.respond(SWITCH)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 502 "), client.received())

    def test_backend_never_answers_is_504(self) -> None:
        """A backend that never answers the handshake gets the client a 504 after the backend timeout."""
        lb = InMemoryBalancer(["127.0.0.1:3001"], backendTimeout=5)
        client = lb.client()
        client.send(HANDSHAKE)
        lb.acceptConnect()
        lb.reactor.advance(5.1)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 504 "), client.received())

    def test_strip_prefix_route(self) -> None:
        """Through a route that strips its prefix, the backend sees the path below it, and the tunnel works."""
        from test_balancer import ROUTED, _configFrom

        lb = InMemoryBalancer(config=_configFrom(ROUTED))
        client = lb.client()
        client.send(HANDSHAKE.replace(b"GET /chat", b"GET /api/chat"))
        (attempt,) = lb.pendingConnects()
        self.assertEqual(attempt.address, "127.0.0.1:3001")
        backend = lb.acceptConnect()
        self.assertTrue(backend.received().startswith(b"GET /chat?room=1 HTTP/1.1\r\n"))
        backend.clear()
        backend.respond(SWITCH)
        client.send(b"frame")
        self.assertEqual(backend.received(), b"frame")


class LifetimeTests(TunnelMixin, SynchronousTestCase):
    def test_client_close_closes_backend(self) -> None:
        """The client closing closes the backend connection and frees the backend."""
        client, backend = self.openTunnel()
        b = self.lb.backend("127.0.0.1:3001")
        self.assertEqual(b.active, 1)
        client.transport.peerCloses()
        self.assertTrue(backend.closed)
        self.assertFalse(backend.transport.aborted)
        backend.transport.deliverLoss()
        self.assertEqual(b.active, 0)
        self.assertEqual(self.lb.forwarder.inFlight, 0)

    def test_backend_reset_aborts_client(self) -> None:
        """A backend resetting the tunnel aborts the client connection."""
        client, backend = self.openTunnel()
        backend.close(error.ConnectionLost())
        self.assertTrue(client.transport.aborted)
        client.transport.deliverLoss()
        self.assertEqual(self.lb.backend("127.0.0.1:3001").active, 0)

    def test_half_close_passed_on(self) -> None:
        """The client's FIN shuts the backend's write half; the backend's then closes both."""
        from twisted.internet.interfaces import IHalfCloseableProtocol

        client, backend = self.openTunnel()
        # Told of FINs only now: an HTTP connection's FIN still closes it.
        self.assertTrue(IHalfCloseableProtocol.providedBy(client.protocol))
        self.assertTrue(IHalfCloseableProtocol.providedBy(backend.protocol))
        self.assertFalse(IHalfCloseableProtocol.providedBy(self.lb.client().protocol))
        backend.transport.__class__ = _HalfCloseableTransport
        client.protocol.readConnectionLost()
        self.assertTrue(backend.transport.halfClosed)
        self.assertFalse(backend.closed)
        self.assertFalse(client.closed)
        backend.protocol.readConnectionLost()
        self.assertTrue(client.closed)
        self.assertTrue(backend.closed)

    def test_idle_timeout(self) -> None:
        """A tunnel idle for --tunnel-idle-timeout is closed on both sides; one that moves is not."""
        lb = InMemoryBalancer(["127.0.0.1:3001"], tunnelIdleTimeout=100)
        client, backend = self.openTunnel(lb)
        lb.reactor.advance(60)
        client.send(b"x")
        lb.reactor.advance(60)
        self.assertFalse(client.closed)
        lb.reactor.advance(41)
        self.assertTrue(client.closed)
        self.assertTrue(backend.closed)

    def test_no_client_timeout(self) -> None:
        """Neither the client timeout nor the write deadline applies to a tunnel: a client that reads nothing pauses the backend, and is not cut off."""
        lb = InMemoryBalancer(["127.0.0.1:3001"], clientTimeout=10)
        client, backend = self.openTunnel(lb)
        self.assertIsNot(client.transport.producer, client.protocol)
        lb.reactor.advance(50)
        self.assertFalse(client.closed)
        client.transport.producer.pauseProducing()
        self.assertEqual(backend.transport.producerState, "paused")
        lb.reactor.advance(50)
        self.assertFalse(client.closed)
        self.assertFalse(client.transport.aborted)

    def test_backpressure(self) -> None:
        """A backend that reads slowly pauses the client, and the other way round."""
        client, backend = self.openTunnel()
        backend.transport.producer.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        backend.transport.producer.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        client.transport.producer.pauseProducing()
        self.assertEqual(backend.transport.producerState, "paused")


class CountingTests(TunnelMixin, SynchronousTestCase):
    def test_least_conn_sees_tunnels(self) -> None:
        """An open tunnel counts on its backend, so least-conn sends the next request elsewhere."""
        lb = InMemoryBalancer(["127.0.0.1:3001", "127.0.0.1:3002"], strategy="least-conn")
        client, backend = self.openTunnel(lb)
        first = backend.transport.getPeer().port
        other = lb.client(port=50001)
        other.send(HANDSHAKE)
        second = lb.pendingConnects()[0].port
        self.assertNotEqual(first, second)

    def test_ip_hash_applies(self) -> None:
        """With ip-hash, a client's handshakes always reach the same backend."""
        lb = InMemoryBalancer(
            ["127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003"], strategy="ip-hash"
        )
        ports = set()
        for n in range(4):
            client = lb.client(peer="198.51.100.9", port=40000 + n)
            client.send(HANDSHAKE)
            (attempt,) = lb.pendingConnects()
            ports.add(attempt.port)
            lb.acceptConnect().respond(SWITCH)
        self.assertEqual(len(ports), 1)

    def test_sticky_cookie_applies(self) -> None:
        """A handshake carrying the sticky cookie of a backend reaches that backend; one without gets the cookie with the 101."""
        lb = InMemoryBalancer(
            ["127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003"], stickyCookie="lb"
        )
        chosen = lb.backend("127.0.0.1:3003")
        cookie = lb.pool.cookieFor(chosen).encode("ascii")
        for n in range(3):
            client = lb.client(port=41000 + n)
            client.send(HANDSHAKE.replace(b"\r\n\r\n", b"\r\nCookie: lb=" + cookie + b"\r\n\r\n"))
            (attempt,) = lb.pendingConnects()
            self.assertEqual(attempt.address, "127.0.0.1:3003")
            lb.acceptConnect().respond(SWITCH)
            self.assertNotIn(b"Set-Cookie", client.received())
        client = lb.client(port=42000)
        client.send(HANDSHAKE)
        lb.acceptConnect().respond(SWITCH)
        head = client.received().split(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "))
        self.assertIn(b"\r\nSet-Cookie: lb=", head)

    def test_graceful_stop_closes_tunnels_at_drain_timeout(self) -> None:
        """A graceful stop of the whole balancer keeps a tunnel relaying until the drain timeout, then closes it and finishes."""
        lb = InMemoryBalancer(["127.0.0.1:3001"], drainTimeout=20)
        client, backend = self.openTunnel(lb)
        d = lb.balancer.stopService()
        lb.reactor.advance(19)
        client.send(b"late")
        self.assertEqual(backend.received(), b"late")
        self.assertNoResult(d)
        lb.reactor.advance(2)
        self.assertTrue(client.closed)
        client.transport.deliverLoss()
        self.assertTrue(backend.closed)
        backend.transport.deliverLoss()
        lb.reactor.advance(10)
        self.successResultOf(d)

    def test_access_log_line_when_tunnel_closes(self) -> None:
        """A tunnel writes its access log line when it closes: status 101 and the bytes relayed to the client."""
        import io

        from txbalancer.accesslog import AccessLog

        lb = InMemoryBalancer(["127.0.0.1:3001"])
        stream = io.StringIO()
        lb.forwarder.accessLog = AccessLog(stream, lb.reactor.seconds, "combined")
        client, backend = self.openTunnel(lb)
        backend.respond(b"12345")
        self.assertEqual(stream.getvalue(), "")
        client.transport.peerCloses()
        (line,) = stream.getvalue().splitlines()
        self.assertIn('"GET /chat?room=1 HTTP/1.1" 101 5 ', line)

    def test_status_in_flight(self) -> None:
        """The admin status shows an open tunnel as in flight on its backend."""
        from txbalancer.admin.status import balancerStatus

        client, backend = self.openTunnel()
        (pool,) = balancerStatus(self.lb.balancer)["pools"].values()
        self.assertEqual(pool["in_flight"], 1)
        (backendStatus,) = pool["backends"]
        self.assertEqual(backendStatus["in_flight"], 1)

    def test_removed_backend_waits_for_tunnel(self) -> None:
        """A removed backend keeps its tunnel open; its removal ends when the tunnel does."""
        client, backend = self.openTunnel()
        runtime = self.lb.runtime
        d = runtime.removeBackend(self.lb.backend("127.0.0.1:3001"))
        self.assertNoResult(d)
        client.send(b"still")
        self.assertEqual(backend.received(), b"still")
        client.transport.peerCloses()
        backend.transport.deliverLoss()
        self.successResultOf(d)

    def test_drain_closes_tunnels_last(self) -> None:
        """A graceful stop leaves tunnels open until the drain timeout, then closes them."""
        lb = InMemoryBalancer(["127.0.0.1:3001"], drainTimeout=30)
        client, backend = self.openTunnel(lb)
        d = lb.factory.drain(30)
        lb.reactor.advance(29)
        self.assertFalse(client.closed)
        self.assertNoResult(d)
        lb.reactor.advance(2)
        self.assertTrue(client.closed)
        client.transport.deliverLoss()
        self.assertTrue(backend.closed)
        self.successResultOf(d)


class RefusedUpgradeTests(SynchronousTestCase):
    def forwarded(self, request: bytes) -> tuple:
        lb = InMemoryBalancer(["127.0.0.1:3001"])
        client = lb.client()
        client.send(request)
        return lb, client, lb.acceptConnect()

    def test_h2c_smuggling_forwarded_as_plain_request(self) -> None:
        """The h2c upgrade reaches the backend as a plain request, without Upgrade or HTTP2-Settings, and a 101 to it is 502."""
        lb, client, backend = self.forwarded(
            b"GET /admin HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\n\r\n"
        )
        head = backend.received().lower()
        self.assertNotIn(b"upgrade", head)
        self.assertNotIn(b"http2-settings", head)
        backend.respond(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n")
        self.assertTrue(client.received().startswith(b"HTTP/1.1 502 "), client.received())
        self.assertTrue(backend.closed)

    def test_other_upgrade_not_forwarded(self) -> None:
        """An upgrade to anything but websocket alone goes on as a plain request."""
        for value in (b"foo/2", b"websocket, h2c", b"TLS/1.0"):
            lb, client, backend = self.forwarded(
                b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: " + value
                + b"\r\nConnection: upgrade\r\n\r\n"
            )
            self.assertNotIn(b"upgrade", backend.received().lower(), value)

    def test_upgrade_without_connection_token(self) -> None:
        """Upgrade: websocket without Connection: Upgrade is not an upgrade."""
        lb, client, backend = self.forwarded(
            b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n"
        )
        self.assertNotIn(b"upgrade", backend.received().lower())

    def test_post_upgrade_not_forwarded(self) -> None:
        """A WebSocket upgrade on POST with a body is forwarded as a plain request."""
        lb, client, backend = self.forwarded(
            b"POST / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nContent-Length: 2\r\n\r\nhi"
        )
        self.assertNotIn(b"upgrade", backend.received().lower())

    def test_absolute_form_replaces_host(self) -> None:
        """An absolute-form target's authority replaces a disagreeing Host: the backend sees one Host."""
        lb, client, backend = self.forwarded(
            b"GET http://good.example/p HTTP/1.1\r\nHost: evil.example\r\n\r\n"
        )
        head = backend.received()
        self.assertTrue(head.startswith(b"GET /p HTTP/1.1\r\n"), head)
        self.assertEqual(head.lower().count(b"\r\nhost:"), 1)
        self.assertIn(b"Host: good.example\r\n", head)
        self.assertNotIn(b"evil", head)


class ResourceTests(SynchronousTestCase):
    def test_resource_forwards_handshake_as_plain_request(self) -> None:
        """Through balancer.resource() a handshake reaches the backend without Upgrade (twisted.web cannot hand the connection over), and a 101 is 502."""
        from test_resource import WebBalancer

        lb = WebBalancer(["127.0.0.1:3001"])
        client = lb.client()
        client.send(HANDSHAKE.replace(b"GET /chat", b"GET /api/chat"))
        backend = lb.acceptConnect()
        sent = backend.received()
        self.assertTrue(sent.startswith(b"GET /chat?room=1 HTTP/1.1\r\n"), sent)
        self.assertNotIn(b"upgrade", sent.lower())
        self.assertIn(b"sec-websocket-key: dghlihnhbxbszsbub25jzq==\r\n", sent.lower())
        backend.respond(SWITCH)
        self.assertIn(b" 502 ", client.received().split(b"\r\n", 1)[0])
