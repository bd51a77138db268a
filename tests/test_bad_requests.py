"""
Regression tests for issue 14's request defects, from their raw
reproductions on the in-memory balancer: a header line without a colon,
CONNECT in any form, Connection naming end-to-end headers; and a client's
failure never counting against a backend.
"""

from __future__ import annotations

from typing import Callable

from twisted.trial.unittest import SynchronousTestCase

from txbalancer.health import OutlierDetector
from txbalancer.testing import BackendConnection, InMemoryBalancer

OK_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
BACKENDS = ("127.0.0.1:3001", "127.0.0.1:3002")


def headOf(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def headerValues(raw: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in headOf(raw)[1:]:
        n, _, v = line.partition(b":")
        if n.lower() == name.lower():
            out.append(v.strip())
    return out


class BalancerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.lb = InMemoryBalancer(BACKENDS)
        self.ejected: list[str] = []

    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def withOutliers(self, ejectAfter: int = 5) -> None:
        """
        Passive ejection as twistd wires it: an ejected backend is down.
        """
        pool = self.lb.pool

        def onEject(backend, seconds, reason):
            self.ejected.append(backend.address)
            pool.setHealth(backend, "down", reason)

        pool.outliers = OutlierDetector(
            onEject, lambda b: pool.setHealth(b, "up"), self.lb.reactor,
            ejectAfter=ejectAfter,
        )

    def assertRefusedUnsent(self, raw: bytes, status: int) -> bytes:
        """
        C{raw} from a fresh client gets C{status}, the client connection is
        closed and no backend connection was even attempted.
        """
        before = len(self.lb.reactor.tcpClients)
        client = self.lb.client()
        client.send(raw)
        out = client.received()
        self.assertTrue(out.startswith(b"HTTP/1.1 %d " % (status,)), (raw, out))
        self.assertTrue(client.closed)
        self.assertEqual(len(self.lb.reactor.tcpClients), before, raw)
        return out

    def forward(self, raw: bytes) -> tuple[bytes, bytes]:
        """
        Send C{raw}; the backend answers 200.  Returns what the backend
        received and what the client received.
        """
        client = self.lb.client()
        client.send(raw)
        backend = self.lb.acceptConnect()
        received = backend.received()
        backend.respond(OK_CLOSE)
        return received, client.received()

    def serve(self, raw: bytes, behave: Callable[[str, BackendConnection], None]) -> bytes:
        """
        Send C{raw} from a fresh client; each backend connection the
        balancer opens is accepted and handed to C{behave(address, conn)}.
        """
        client = self.lb.client()
        client.send(raw)
        for _ in range(10):
            pending = self.lb.pendingConnects()
            if not pending:
                break
            address = pending[0].address
            behave(address, self.lb.acceptConnect())
        self.lb.flush()
        return client.received()


class ColonlessLineTests(BalancerTestCase):
    def test_header_without_colon(self) -> None:
        """A header line without a colon (X-No-Colon) is 400 and never reaches a backend."""
        out = self.assertRefusedUnsent(
            b"GET / HTTP/1.1\r\nHost: example.com\r\nX-No-Colon\r\n\r\n", 400
        )
        self.assertIn(b"header line without a colon", out)

    def test_bare_host_line(self) -> None:
        """A bare Host line is 400, not an empty Host, in HTTP/1.1 and 1.0 alike."""
        self.assertRefusedUnsent(b"GET / HTTP/1.1\r\nHost\r\n\r\n", 400)
        self.assertRefusedUnsent(b"GET / HTTP/1.0\r\nHost\r\n\r\n", 400)
        self.assertRefusedUnsent(b"GET / HTTP/1.1\r\nHost: h\r\nHost\r\n\r\n", 400)


class ConnectTests(BalancerTestCase):
    def test_connect_in_every_form(self) -> None:
        """CONNECT is 501 in origin, authority, absolute and asterisk form, and never forwarded."""
        for target in (b"/x", b"example.com:443", b"http://example.com/", b"*"):
            out = self.assertRefusedUnsent(
                b"CONNECT " + target + b" HTTP/1.1\r\nHost: example.com\r\n\r\n", 501
            )
            self.assertIn(b"CONNECT is not supported", out)

    def test_fifteen_connects_eject_nothing(self) -> None:
        """15 CONNECT requests with --eject-after 5 eject no backend: none even sees them."""
        self.withOutliers(5)
        for i in range(15):
            target = b"/x" if i % 2 else b"example.com:443"
            self.assertRefusedUnsent(
                b"CONNECT " + target + b" HTTP/1.1\r\nHost: example.com\r\n\r\n", 501
            )
        self.assertEqual(self.ejected, [])
        self.assertEqual([b.state for b in self.lb.pool.backends], ["up", "up"])
        self.assertEqual([b.failures for b in self.lb.pool.backends], [0, 0])


class ConnectionNamesEndToEndTests(BalancerTestCase):
    def test_connection_host_keeps_host(self) -> None:
        """Connection: Host does not remove Host: the backend gets exactly the client's one."""
        received, out = self.forward(
            b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: Host\r\n\r\n"
        )
        self.assertEqual(headerValues(received, b"Host"), [b"example.com"])
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "))

    def test_connection_content_length_keeps_framing(self) -> None:
        """Connection: Content-Length does not unframe a body: the backend gets it framed."""
        received, _ = self.forward(
            b"POST / HTTP/1.1\r\nHost: h\r\nConnection: Content-Length, keep-alive\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        self.assertEqual(headerValues(received, b"Content-Length"), [b"5"])
        self.assertTrue(received.endswith(b"\r\n\r\nhello"))

    def test_connection_transfer_encoding_keeps_framing(self) -> None:
        """Connection: Transfer-Encoding does not unframe a chunked body."""
        received, _ = self.forward(
            b"POST / HTTP/1.1\r\nHost: h\r\nConnection: Transfer-Encoding\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        self.assertEqual(headerValues(received, b"Transfer-Encoding"), [b"chunked"])
        self.assertTrue(received.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"))

    def test_connection_cannot_strip_end_to_end_or_ours(self) -> None:
        """Content-Type, Authorization, Cookie named by Connection stay; X-Forwarded-For is ours anyway."""
        received, _ = self.forward(
            b"POST / HTTP/1.1\r\nHost: h\r\n"
            b"Connection: Content-Type, Authorization, Cookie, X-Forwarded-For, Via, Forwarded\r\n"
            b"Content-Type: text/plain\r\nAuthorization: Bearer t\r\nCookie: a=1\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertEqual(headerValues(received, b"Content-Type"), [b"text/plain"])
        self.assertEqual(headerValues(received, b"Authorization"), [b"Bearer t"])
        self.assertEqual(headerValues(received, b"Cookie"), [b"a=1"])
        self.assertEqual(headerValues(received, b"X-Forwarded-For"), [b"203.0.113.7"])
        self.assertEqual(len(headerValues(received, b"Forwarded")), 1)
        self.assertEqual(headerValues(received, b"Via"), [b"1.1 txbalancer"])
        self.assertEqual(headerValues(received, b"Connection"), [])

    def test_connection_still_removes_extension_fields(self) -> None:
        """An extension header named by Connection is hop-by-hop and removed (RFC 9110 7.6.1)."""
        received, _ = self.forward(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: X-Hop\r\nX-Hop: 1\r\nX-Kept: 2\r\n\r\n"
        )
        self.assertEqual(headerValues(received, b"X-Hop"), [])
        self.assertEqual(headerValues(received, b"X-Kept"), [b"2"])


class ClientFaultsAreNotBackendFaultsTests(BalancerTestCase):
    def setUp(self) -> None:
        BalancerTestCase.setUp(self)
        self.withOutliers(5)

    def assertHealthy(self) -> None:
        self.assertEqual(self.ejected, [])
        self.assertEqual([b.state for b in self.lb.pool.backends], ["up", "up"])
        self.assertEqual([b.failures for b in self.lb.pool.backends], [0, 0])
        self.assertEqual(self.lb.forwarder.inFlight, 0)
        self.assertEqual([b.active for b in self.lb.pool.backends], [0, 0])

    def test_close_while_client_sends_body(self) -> None:
        """15 uploads a backend closes on before their body is in are 502s, not backend failures."""
        for _ in range(15):
            out = self.serve(
                b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc",
                lambda address, conn: conn.close(),
            )
            self.assertTrue(out.startswith(b"HTTP/1.1 502 "), out)
        self.assertHealthy()

    def test_request_every_backend_closes_on(self) -> None:
        """15 requests every backend closes on without answering (CONNECT-like) eject nothing."""
        for _ in range(15):
            out = self.serve(
                b"GET /poison HTTP/1.1\r\nHost: h\r\n\r\n",
                lambda address, conn: conn.close(),
            )
            self.assertTrue(out.startswith(b"HTTP/1.1 502 "), out)
        self.assertEqual(len(self.lb.reactor.tcpClients), 30)  # each tried once each time
        self.assertHealthy()

    def test_post_closed_on_is_not_a_strike(self) -> None:
        """15 complete POSTs a backend closes on (not retried) eject nothing."""
        for _ in range(15):
            out = self.serve(
                b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
                lambda address, conn: conn.close(),
            )
            self.assertTrue(out.startswith(b"HTTP/1.1 502 "), out)
        self.assertHealthy()

    def test_client_error_statuses_are_not_strikes(self) -> None:
        """15 answers of 400, 413, 431 or 501 (bad requests, unknown methods) eject nothing."""
        statuses = [400, 413, 431, 501, 505]
        for i in range(15):
            status = statuses[i % len(statuses)]

            def behave(address, conn, status=status):
                conn.respond(
                    b"HTTP/1.1 %d No\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    % (status,)
                )
                conn.close()

            out = self.serve(b"BREW / HTTP/1.1\r\nHost: h\r\n\r\n", behave)
            self.assertTrue(out.startswith(b"HTTP/1.1 %d " % (status,)), out)
        self.assertHealthy()

    def test_backend_that_closes_on_good_requests_is_ejected(self) -> None:
        """A backend that closes on requests another backend answers is struck, and ejected after 5."""
        def behave(address, conn):
            if address == "127.0.0.1:3001":
                conn.close()
            else:
                conn.respond(OK_CLOSE)

        for _ in range(10):
            out = self.serve(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", behave)
            self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertEqual(self.ejected, ["127.0.0.1:3001"])
        self.assertEqual(self.lb.backend("127.0.0.1:3001").state, "down")
        self.assertEqual(self.lb.backend("127.0.0.1:3001").failures, 5)

    def test_server_errors_still_eject(self) -> None:
        """5 consecutive 500 answers still eject a backend: the rule is not 'never eject'."""
        for _ in range(10):
            self.serve(
                b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
                lambda address, conn: conn.respond(
                    b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ),
            )
        self.assertEqual(len(self.ejected), 1)
