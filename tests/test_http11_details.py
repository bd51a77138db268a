"""
The HTTP/1.1 details a proxy must get right, on a fake reactor: pipelining,
interim responses, trailers, close-delimited bodies, bodies cut short.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from txbalancer.interfaces import IHTTP11Downstream
from txbalancer.testing import InMemoryBalancer

GET = b"GET /%s HTTP/1.1\r\nHost: h\r\n\r\n"


class DetailTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lb = InMemoryBalancer(["127.0.0.1:3001"])

    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def exchange(self, request: bytes, response: bytes):
        client = self.lb.client()
        client.send(request)
        backend = self.lb.acceptConnect()
        backend.respond(response)
        return client, backend

    def test_front_end_provides_http11_downstream(self) -> None:
        """The HTTP/1.1 front end provides IHTTP11Downstream (1xx, trailers, upgrade)."""
        verifyObject(IHTTP11Downstream, self.lb.client().protocol)

    def test_pipelined_in_order(self) -> None:
        """Three pipelined requests are sent on one at a time and answered in order."""
        client = self.lb.client()
        client.send(GET % b"1" + GET % b"2" + GET % b"3")
        backend = self.lb.acceptConnect()
        for n in (b"1", b"2", b"3"):
            self.assertTrue(backend.received().startswith(b"GET /" + n + b" "), backend.received())
            backend.clear()
            backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + n)
            self.lb.flush()
        bodies = [part[-1:] for part in client.received().split(b"HTTP/1.1 200 OK")[1:]]
        self.assertEqual(bodies, [b"1", b"2", b"3"])

    def test_early_hints_pass_through(self) -> None:
        """A 103 Early Hints reaches an HTTP/1.1 client before the final response."""
        client, backend = self.exchange(
            GET % b"",
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        got = client.received()
        self.assertTrue(
            got.startswith(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                           b"HTTP/1.1 200 OK\r\n"), got)
        self.assertTrue(got.endswith(b"ok"))

    def test_early_hints_not_to_http10(self) -> None:
        """An HTTP/1.0 client never gets a 1xx."""
        client, backend = self.exchange(
            b"GET / HTTP/1.0\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        )
        self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_100_continue_still_once(self) -> None:
        """A 100 Continue reaches a client waiting for it, once."""
        client = self.lb.client()
        client.send(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        backend = self.lb.acceptConnect()
        backend.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(client.received(), b"HTTP/1.1 100 Continue\r\n\r\n")

    CHUNKED_WITH_TRAILERS = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"2\r\nok\r\n0\r\nX-Checksum: abc\r\nContent-Length: 99\r\n\r\n"
    )

    def test_trailers_with_te_trailers(self) -> None:
        """A client that sent TE: trailers gets the backend's trailers (minus framing fields); the backend was told TE: trailers."""
        client, backend = self.exchange(
            b"GET / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\n\r\n", self.CHUNKED_WITH_TRAILERS
        )
        self.assertIn(b"\r\nTE: trailers\r\n", backend.received())
        got = client.received()
        self.assertTrue(got.endswith(b"2\r\nok\r\n0\r\nX-Checksum: abc\r\n\r\n"), got)

    def test_trailers_dropped_otherwise(self) -> None:
        """A client that did not ask for trailers gets the body ended without them."""
        client, backend = self.exchange(GET % b"", self.CHUNKED_WITH_TRAILERS)
        got = client.received()
        self.assertTrue(got.endswith(b"2\r\nok\r\n0\r\n\r\n"), got)
        self.assertNotIn(b"abc", got)

    def test_close_delimited_relayed(self) -> None:
        """A response without Content-Length that ends by close reaches an HTTP/1.1 client chunked and complete, and a 1.0 client by close."""
        client, backend = self.exchange(GET % b"", b"HTTP/1.1 200 OK\r\n\r\nhello ")
        backend.respond(b"world")
        backend.close()
        got = client.received()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", got)
        self.assertTrue(got.endswith(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"), got)
        self.assertFalse(client.transport.aborted)

        client, backend = self.exchange(b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\nhello")
        backend.close()
        self.assertTrue(client.received().endswith(b"\r\n\r\nhello"))
        self.assertTrue(client.closed)
        self.assertFalse(client.transport.aborted)

    def test_backend_closes_mid_body(self) -> None:
        """A backend that closes before Content-Length is reached makes the balancer abort the client."""
        client, backend = self.exchange(GET % b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        backend.close(error.ConnectionDone())
        self.assertTrue(client.transport.aborted)

    def test_backend_closes_mid_chunked_body(self) -> None:
        """A chunked body cut before its last chunk aborts the client: it never gets the last chunk."""
        client, backend = self.exchange(
            GET % b"", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nhalf\r\n"
        )
        backend.close(error.ConnectionDone())
        self.assertTrue(client.transport.aborted)
        self.assertFalse(client.received().endswith(b"0\r\n\r\n"))
