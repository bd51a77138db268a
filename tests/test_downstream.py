"""
Tests for txbalancer.downstream: the strict HTTP/1.1 server protocol.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.downstream import HTTPServerFactory, HTTPServerProtocol
from txbalancer.testing import RecordingExchange, RecordingHandler, serverProtocol

GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


class ServerMixin:
    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def setUpServer(self, handler=None, **kw):
        self.handler = handler if handler is not None else RecordingHandler()
        self.reactor = MemoryReactorClock()
        self.factory = HTTPServerFactory(self.handler, self.reactor, **kw)
        self.proto, self.transport = serverProtocol(self.factory)
        return self.proto, self.transport

    def status(self) -> bytes:
        return self.transport.value().split(b"\r\n", 1)[0]

    def assertRefused(self, data, status: int, started: bool = False, **kw):
        """
        Feed C{data} (bytes, or a list of reads) and check the refusal.
        """
        self.setUpServer(**kw)
        for piece in [data] if isinstance(data, bytes) else data:
            self.proto.dataReceived(piece)
        data = b"".join([data] if isinstance(data, bytes) else data)
        line = self.status()
        self.assertTrue(
            line.startswith(b"HTTP/1.1 %d " % (status,)), (data, line, status)
        )
        self.assertIn(b"Connection: close\r\n", self.transport.value())
        self.assertIn(b"Content-Type: text/plain", self.transport.value())
        self.assertTrue(self.transport.disconnecting)
        for exchange in self.handler.exchanges:
            self.assertEqual(exchange.started, started, data)
        return self.transport.value()


class MalformedRequestTests(ServerMixin, SynchronousTestCase):
    """
    Each malformed request is answered with an error and the connection is
    closed; no exchange is ever started, so nothing reaches a backend.
    """

    def test_bad_request_line(self) -> None:
        """A bad request line is 400 and the handler is never called."""
        self.assertRefused(b"GET /\r\nHost: h\r\n\r\n", 400)
        self.assertEqual(self.handler.exchanges, [])

    def test_cl_and_te(self) -> None:
        """Content-Length with Transfer-Encoding is 400, never handled."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        )
        self.assertEqual(self.handler.exchanges, [])

    def test_conflicting_cl(self) -> None:
        """Conflicting Content-Length values are 400, never handled."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            400,
        )
        self.assertEqual(self.handler.exchanges, [])

    def test_huge_cl(self) -> None:
        """A Content-Length of 2**64 is 400, never handled."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (2**64,), 400
        )
        self.assertEqual(self.handler.exchanges, [])

    def test_non_numeric_cl(self) -> None:
        """A non-numeric Content-Length is 400, never handled."""
        self.assertRefused(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1e3\r\n\r\n", 400)
        self.assertEqual(self.handler.exchanges, [])

    def test_obs_fold(self) -> None:
        """Obs-fold is 400, never handled."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n", 400)
        self.assertEqual(self.handler.exchanges, [])

    def test_nul_in_value(self) -> None:
        """NUL in a header value is 400, never handled."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", 400)
        self.assertEqual(self.handler.exchanges, [])

    def test_bare_cr_in_value(self) -> None:
        """A bare CR inside a header value is 400, never handled."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", 400)
        self.assertEqual(self.handler.exchanges, [])

    def test_bare_lf_in_value(self) -> None:
        """A bare LF inside a header section is 400, never handled."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: h\r\nX: a\nY: b\r\n\r\n", 400)
        self.assertEqual(self.handler.exchanges, [])

    def test_bare_lf_line_endings(self) -> None:
        """A head ended by bare LFs is 400, never handled."""
        self.assertRefused(b"GET / HTTP/1.1\nHost: h\n\n", 400)
        self.assertEqual(self.handler.exchanges, [])

    def test_http2_version(self) -> None:
        """HTTP/2.0 is 505, never handled."""
        self.assertRefused(b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505)
        self.assertEqual(self.handler.exchanges, [])

    def test_malformed_version_400(self) -> None:
        """HTTP/1.x is answered 400 (malformed), not 505, and never handled."""
        out = self.assertRefused(b"GET / HTTP/1.x\r\nHost: h\r\n\r\n", 400)
        self.assertIn(b"malformed HTTP version", out)
        self.assertEqual(self.handler.exchanges, [])

    def test_missing_host(self) -> None:
        """An HTTP/1.1 request without Host is 400, never handled."""
        self.assertRefused(b"GET / HTTP/1.1\r\nX: y\r\n\r\n", 400)
        self.assertEqual(self.handler.exchanges, [])

    def test_oversized_head_incomplete(self) -> None:
        """A head growing past maxHeadSize without ending is 431, never handled."""
        self.assertRefused(
            b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 2000, 431, maxHeadSize=1024
        )
        self.assertEqual(self.handler.exchanges, [])

    def test_oversized_head_complete(self) -> None:
        """A complete head larger than maxHeadSize is 431, never handled."""
        self.assertRefused(
            b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 2000 + b"\r\n\r\n",
            431,
            maxHeadSize=1024,
        )
        self.assertEqual(self.handler.exchanges, [])

    def test_oversized_head_default(self) -> None:
        """The default head limit (32 KiB) answers 431 to a 40 KiB header."""
        self.assertRefused(
            b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 40000 + b"\r\n\r\n", 431
        )

    def test_bad_chunk_sizes(self) -> None:
        """A malformed first chunk size is 400 and the exchange is never started."""
        for size in (b"zz", b"-1", b"", b"0x5", b"1 2", b"1" * 16, b"5;\x00"):
            data = (
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                + size
                + b"\r\nhello\r\n0\r\n\r\n"
            )
            self.assertRefused(data, 400)
            (exchange,) = self.handler.exchanges
            self.assertFalse(exchange.started, size)
            self.assertIn(("gone",), exchange.events)

    def test_chunk_size_line_too_long(self) -> None:
        """A chunk-size line longer than 4 KiB is 400."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;" + b"x" * 5000,
            400,
        )

    def test_chunk_data_not_followed_by_crlf(self) -> None:
        """Chunk data not followed by CRLF is 400 and the exchange is told the client is gone."""
        self.assertRefused(
            [
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n",
                b"abcXY\r\n0\r\n\r\n",
            ],
            400,
            started=True,
        )
        (exchange,) = self.handler.exchanges
        self.assertEqual(exchange.events[-1], ("gone",))
        self.assertNotIn(("finished",), exchange.events)

    def test_bad_later_chunk(self) -> None:
        """A bad chunk size after a good chunk tells the started exchange the client is gone."""
        self.assertRefused(
            [
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n",
                b"abc\r\nxyz\r\n",
            ],
            400,
            started=True,
        )
        (exchange,) = self.handler.exchanges
        self.assertEqual(exchange.events[-1], ("gone",))

    def test_malformed_trailer(self) -> None:
        """A malformed trailer line is 400 and the body never counts as finished."""
        self.assertRefused(
            [
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
                b"bad trailer\r\n\r\n",
            ],
            400,
            started=True,
        )
        (exchange,) = self.handler.exchanges
        self.assertNotIn(("finished",), exchange.events)

    def test_unsupported_expectation(self) -> None:
        """An unknown expectation is 417, never handled."""
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: h\r\nExpect: tea\r\n\r\n", 417)
        self.assertEqual(self.handler.exchanges, [])

    def test_garbage_after_bad_request_ignored(self) -> None:
        """After a refusal nothing more is parsed from the connection."""
        self.setUpServer()
        self.proto.dataReceived(b"GET /\r\n\r\n" + GET)
        self.proto.dataReceived(GET)
        self.assertEqual(self.handler.exchanges, [])
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.factory.counters["refused"], 1)


class MaxBodySizeTests(ServerMixin, SynchronousTestCase):
    def test_content_length_too_large(self) -> None:
        """A Content-Length above maxBodySize is 413 before the handler is called."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n", 413, maxBodySize=10
        )
        self.assertEqual(self.handler.exchanges, [])

    def test_content_length_at_limit(self) -> None:
        """A body exactly maxBodySize long is accepted."""
        self.setUpServer(maxBodySize=10)
        self.proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789")
        (exchange,) = self.handler.exchanges
        self.assertTrue(exchange.complete)
        self.assertEqual(exchange.body, b"0123456789")

    def test_chunked_too_large_first_chunk(self) -> None:
        """A first chunk larger than maxBodySize is 413 and the exchange never starts."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n",
            413,
            maxBodySize=10,
        )

    def test_chunked_too_large_in_total(self) -> None:
        """Chunks adding up past maxBodySize are 413."""
        self.assertRefused(
            [
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"6\r\nabcdef\r\n",
                b"6\r\nghijkl\r\n0\r\n\r\n",
            ],
            413,
            started=True,
            maxBodySize=10,
        )
        (exchange,) = self.handler.exchanges
        self.assertNotIn(("finished",), exchange.events)
        self.assertEqual(exchange.events[-1], ("gone",))


class ValidRequestTests(ServerMixin, SynchronousTestCase):
    def test_get_handled_once_with_no_body(self) -> None:
        """A GET is handed to the handler, started and finished, with no body."""
        self.setUpServer()
        self.proto.dataReceived(GET)
        (exchange,) = self.handler.exchanges
        self.assertEqual(sorted(exchange.events), [("finished",), ("start",)])
        self.assertEqual(exchange.request.peer, "203.0.113.7")
        self.assertEqual(self.transport.value(), b"")

    def test_byte_by_byte(self) -> None:
        """A request fed one byte at a time parses the same."""
        self.setUpServer()
        data = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
        for i in range(len(data)):
            self.proto.dataReceived(data[i : i + 1])
        (exchange,) = self.handler.exchanges
        self.assertEqual(exchange.body, b"abc")
        self.assertTrue(exchange.complete)

    def test_leading_empty_lines_ignored(self) -> None:
        """Empty lines before a request line are ignored."""
        self.setUpServer()
        self.proto.dataReceived(b"\r\n\r\n" + GET)
        self.assertEqual(len(self.handler.exchanges), 1)

    def test_body_streams_before_complete(self) -> None:
        """The exchange starts and gets body bytes before the whole body has arrived."""
        self.setUpServer()
        self.proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
        (exchange,) = self.handler.exchanges
        self.assertTrue(exchange.started)
        self.assertEqual(exchange.body, b"hello")
        self.assertFalse(exchange.complete)
        self.proto.dataReceived(b"world")
        self.assertEqual(exchange.body, b"helloworld")
        self.assertTrue(exchange.complete)

    def test_chunked_decoded_in_pieces(self) -> None:
        """A chunked body is delivered decoded, in pieces, trailers dropped, then finished."""
        self.setUpServer()
        self.proto.dataReceived(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        (exchange,) = self.handler.exchanges
        self.assertFalse(exchange.started)
        body = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n"
        self.proto.dataReceived(body[:3])
        self.proto.dataReceived(body[3:12])
        self.assertTrue(exchange.started)
        self.assertEqual(exchange.body, b"hel")
        for i in range(12, len(body)):
            self.proto.dataReceived(body[i : i + 1])
        self.assertEqual(exchange.body, b"hello 0123456789")
        self.assertEqual(exchange.events[-1], ("finished",))
        self.assertGreater(sum(1 for e in exchange.events if e[0] == "body"), 3)

    def test_content_length_zero(self) -> None:
        """Content-Length: 0 means no body, finished at once."""
        self.setUpServer()
        self.proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
        (exchange,) = self.handler.exchanges
        self.assertTrue(exchange.complete)
        self.assertEqual(exchange.body, b"")

    def test_pipelining_in_order(self) -> None:
        """Pipelined requests are handled one at a time, in order, each after the previous response."""
        self.setUpServer()
        self.proto.dataReceived(
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nab"
            b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.assertEqual([e.request.target for e in self.handler.exchanges], [b"/1"])
        self.handler.exchanges[0].server.respond(200, b"OK", [], b"one")
        self.assertEqual([e.request.target for e in self.handler.exchanges], [b"/1", b"/2"])
        self.assertEqual(self.handler.exchanges[1].body, b"ab")
        self.handler.exchanges[1].server.respond(200, b"OK", [], b"two")
        self.handler.exchanges[2].server.respond(200, b"OK", [], b"three")
        out = self.transport.value()
        self.assertLess(out.index(b"one"), out.index(b"two"))
        self.assertLess(out.index(b"two"), out.index(b"three"))
        self.assertEqual(out.count(b"HTTP/1.1 200 OK"), 3)
        self.assertFalse(self.transport.disconnecting)

    def test_many_pipelined_synchronous_answers(self) -> None:
        """Hundreds of pipelined requests answered synchronously are all answered, without recursion."""

        class Immediate(RecordingExchange):
            def start(self) -> None:
                RecordingExchange.start(self)
                self.server.respond(200, b"OK", [], b"x")

        handler = RecordingHandler()
        self.setUpServer(handler=lambda r, s: handler.exchanges.append(Immediate(r, s)) or handler.exchanges[-1])
        try:
            self.proto.dataReceived(GET * 500)
        except RecursionError:
            self.fail("RecursionError: finishResponse re-enters _process once per request")
        self.assertEqual(len(handler.exchanges), 500)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 500)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_pipeline_buffer_pauses(self) -> None:
        """A client pipelining more than maxHeadSize while a response is pending is paused, then resumed."""
        self.setUpServer(maxHeadSize=1024)
        self.proto.dataReceived(GET)
        self.proto.dataReceived(GET * 28)  # 1036 bytes; 999 after one
        self.assertEqual(self.transport.producerState, "paused")
        self.handler.exchanges[0].server.respond(200, b"OK", [], b"")
        self.assertEqual(self.transport.producerState, "producing")

    def test_keep_alive_11(self) -> None:
        """An HTTP/1.1 response keeps the connection open, with no Connection header."""
        self.setUpServer()
        self.proto.dataReceived(GET)
        self.proto.respond(200, b"OK", [], b"hi")
        self.assertEqual(
            self.transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        )
        self.assertFalse(self.transport.disconnecting)

    def test_connection_close(self) -> None:
        """Connection: close gets Connection: close back and the connection closes after the response."""
        self.setUpServer()
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n" + GET)
        self.proto.respond(200, b"OK", [], b"hi")
        self.assertIn(b"Connection: close\r\n", self.transport.value())
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.handler.exchanges), 1)

    def test_http10_closes(self) -> None:
        """An HTTP/1.0 request without keep-alive is answered in 1.1 and closed."""
        self.setUpServer()
        self.proto.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.proto.respond(200, b"OK", [], b"hi")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"Connection: close\r\n", self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_http10_keep_alive(self) -> None:
        """An HTTP/1.0 keep-alive request gets Connection: keep-alive and stays open."""
        self.setUpServer()
        self.proto.dataReceived(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.proto.respond(200, b"OK", [], b"hi")
        self.assertIn(b"Connection: keep-alive\r\n", self.transport.value())
        self.assertFalse(self.transport.disconnecting)

    def test_expect_continue(self) -> None:
        """With Expect: 100-continue the exchange starts before the body and may send 100 Continue."""
        self.setUpServer()
        self.proto.dataReceived(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        (exchange,) = self.handler.exchanges
        self.assertTrue(exchange.started)
        self.proto.sendContinue()
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.proto.dataReceived(b"2\r\nhi\r\n0\r\n\r\n")
        self.assertEqual(exchange.body, b"hi")
        self.assertTrue(exchange.complete)

    def test_no_continue_after_response_started(self) -> None:
        """sendContinue after the response has started writes nothing."""
        self.setUpServer()
        self.proto.dataReceived(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        self.proto.startResponse(200, b"OK", [], 0)
        self.transport.clear()
        self.proto.sendContinue()
        self.assertEqual(self.transport.value(), b"")

    def test_absolute_form_target(self) -> None:
        """An absolute-form target reaches the handler as origin-form with the authority as Host."""
        self.setUpServer()
        self.proto.dataReceived(b"GET http://ex.com:8080/a%20b?c HTTP/1.1\r\nHost: other\r\n\r\n")
        (exchange,) = self.handler.exchanges
        self.assertEqual(exchange.request.target, b"/a%20b?c")
        self.assertEqual(exchange.request.host, b"ex.com:8080")

    def test_client_leaving_tells_exchange(self) -> None:
        """A client that disconnects mid-request makes the exchange hear clientGone."""
        self.setUpServer()
        self.proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
        self.transport.peerCloses()
        (exchange,) = self.handler.exchanges
        self.assertEqual(exchange.events[-1], ("gone",))
        self.assertNotIn(self.proto, self.factory.connections)


class ResponseFramingTests(ServerMixin, SynchronousTestCase):
    def request(self, data: bytes = GET):
        self.setUpServer()
        self.proto.dataReceived(data)
        self.transport.clear()

    def test_content_length(self) -> None:
        """A known length is sent as Content-Length and the body as is."""
        self.request()
        self.proto.startResponse(200, b"OK", [(b"X-A", b"1")], 5)
        self.proto.writeBody(b"hel")
        self.proto.writeBody(b"lo")
        self.proto.finishResponse()
        self.assertEqual(
            self.transport.value(),
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello",
        )

    def test_small_response_head_waits_for_its_body(self) -> None:
        """The head of a small response with a body leaves with the body's
        first bytes, in one write."""
        self.request()
        self.proto.startResponse(200, b"OK", [], 5)
        self.assertEqual(self.transport.value(), b"")
        self.proto.writeBody(b"hello")
        self.assertEqual(
            self.transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
        )

    def test_large_or_unknown_length_head_leaves_at_once(self) -> None:
        """A head for an unknown-length or larger-than-64-KiB body is written at once."""
        for length in (None, 1024 * 1024):
            self.request()
            self.proto.startResponse(200, b"OK", [], length)
            self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_held_head_is_not_lost_without_body(self) -> None:
        """A held head still goes out if the response finishes without body bytes."""
        self.request()
        self.proto.startResponse(200, b"OK", [], 5)
        self.proto.finishResponse()
        self.assertEqual(
            self.transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        )

    def test_chunked_for_unknown_length(self) -> None:
        """An unknown length to an HTTP/1.1 client is chunked, and the connection stays open."""
        self.request()
        self.proto.startResponse(200, b"OK", [], None)
        self.proto.writeBody(b"hello")
        self.proto.writeBody(b"")
        self.proto.writeBody(b"world!")
        self.proto.finishResponse()
        self.assertEqual(
            self.transport.value(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\nworld!\r\n0\r\n\r\n",
        )
        self.assertFalse(self.transport.disconnecting)

    def test_close_delimited_for_10(self) -> None:
        """An unknown length to an HTTP/1.0 client is close-delimited."""
        self.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.proto.startResponse(200, b"OK", [], None)
        self.proto.writeBody(b"hello")
        self.proto.finishResponse()
        self.assertEqual(
            self.transport.value(), b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello"
        )
        self.assertTrue(self.transport.disconnecting)

    def test_head_no_body(self) -> None:
        """A response to HEAD keeps Content-Length but carries no body."""
        self.request(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.proto.startResponse(200, b"OK", [], 10)
        self.proto.writeBody(b"0123456789")
        self.proto.finishResponse()
        self.assertEqual(self.transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_head_unknown_length(self) -> None:
        """A HEAD response of unknown length is neither chunked nor closed."""
        self.request(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.proto.startResponse(200, b"OK", [], None)
        self.proto.finishResponse()
        self.assertEqual(self.transport.value(), b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_204_and_304_no_body(self) -> None:
        """204 and 304 carry no body, no Content-Length and no chunked framing."""
        for status, reason in ((204, b"No Content"), (304, b"Not Modified")):
            for length in (None, 4):
                self.request()
                self.proto.startResponse(status, reason, [], length)
                self.proto.writeBody(b"body")
                self.proto.finishResponse()
                self.assertEqual(
                    self.transport.value(), b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason)
                )
                self.assertFalse(self.transport.disconnecting)

    def test_response_before_body_complete_closes(self) -> None:
        """A response sent before the request body is complete ends the connection."""
        self.request(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
        self.proto.respond(413, b"", [], b"no")
        self.assertIn(b"Connection: close\r\n", self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_send_error_is_plain_text(self) -> None:
        """sendError writes a short text/plain answer with the message."""
        self.request()
        self.proto.sendError(502, "no backend could be reached: x")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertIn(b"Content-Type: text/plain; charset=utf-8\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\nno backend could be reached: x\n"))

    def test_send_error_after_start_aborts(self) -> None:
        """An error after the response head was sent aborts the connection instead."""
        self.request()
        self.proto.startResponse(200, b"OK", [], 10)
        self.proto.sendError(502, "broke")
        self.assertTrue(self.transport.aborted)
        self.assertNotIn(b"502", self.transport.value())


class TimeoutTests(ServerMixin, SynchronousTestCase):
    def test_idle_connection_closed(self) -> None:
        """A client that sends nothing for clientTimeout is closed without an answer."""
        self.setUpServer(clientTimeout=5)
        self.reactor.advance(4.9)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_idle_after_response_closed(self) -> None:
        """A kept-alive connection idle for clientTimeout after a response is closed."""
        self.setUpServer(clientTimeout=5)
        self.reactor.advance(3)
        self.proto.dataReceived(GET)
        self.reactor.advance(10)
        self.assertFalse(self.transport.disconnecting)
        self.proto.respond(200, b"OK", [], b"")
        self.reactor.advance(4.9)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(0.2)
        self.assertTrue(self.transport.disconnecting)

    def test_incomplete_head_408(self) -> None:
        """A client whose head is incomplete after clientTimeout gets 408."""
        self.setUpServer(clientTimeout=5)
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHo")
        self.reactor.advance(5)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.handler.exchanges, [])

    def test_slow_body_408(self) -> None:
        """A body that stops arriving for clientTimeout gets 408 and the exchange hears clientGone."""
        self.setUpServer(clientTimeout=5)
        self.proto.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabc")
        self.reactor.advance(4)
        self.proto.dataReceived(b"d")
        self.reactor.advance(4)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertEqual(self.handler.exchanges[0].events[-1], ("gone",))

    def test_no_timeout_while_waiting_for_backend(self) -> None:
        """A complete request waiting for its response is not timed out by the client timeout."""
        self.setUpServer(clientTimeout=5)
        self.proto.dataReceived(GET)
        self.reactor.advance(100)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"")

    def test_no_timeout(self) -> None:
        """clientTimeout=None and headerTimeout=None never schedule a timeout."""
        self.setUpServer(clientTimeout=None, headerTimeout=None)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class DrainTests(ServerMixin, SynchronousTestCase):
    def test_drain_no_connections(self) -> None:
        """Draining with no connections fires at once."""
        reactor = MemoryReactorClock()
        factory = HTTPServerFactory(RecordingHandler(), reactor)
        self.successResultOf(factory.drain(30))

    def test_drain_closes_idle_waits_for_busy(self) -> None:
        """Drain closes idle connections now, busy ones when their response is done."""
        self.setUpServer()
        idle, idleTransport = serverProtocol(self.factory, "192.0.2.2")
        self.proto.dataReceived(GET)
        d = self.factory.drain(30)
        self.assertTrue(idleTransport.disconnecting)
        self.assertFalse(self.transport.disconnecting)
        idleTransport.deliverLoss()
        self.assertNoResult(d)
        self.proto.respond(200, b"OK", [], b"done")
        self.assertIn(b"Connection: close\r\n", self.transport.value())
        self.assertTrue(self.transport.value().endswith(b"done"))
        self.assertTrue(self.transport.disconnecting)
        self.assertNoResult(d)
        self.transport.deliverLoss()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_drain_timeout_aborts(self) -> None:
        """Connections still open after the drain timeout are aborted."""
        self.setUpServer()
        self.proto.dataReceived(GET)
        d = self.factory.drain(30)
        self.reactor.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(self.transport.aborted)
        self.transport.deliverLoss()
        self.successResultOf(d)

    def test_response_started_before_drain_closes(self) -> None:
        """A response already being written when drain starts ends with the connection closed."""
        self.setUpServer()
        self.proto.dataReceived(GET)
        self.proto.startResponse(200, b"OK", [], 2)
        d = self.factory.drain(30)
        self.proto.writeBody(b"ok")
        self.proto.finishResponse()
        self.assertTrue(self.transport.disconnecting)
        self.transport.deliverLoss()
        self.successResultOf(d)

    def test_new_request_after_drain_gets_close(self) -> None:
        """A request that arrives during drain is answered with Connection: close."""
        self.setUpServer()
        self.factory.draining = True
        self.proto.dataReceived(GET)
        self.proto.respond(200, b"OK", [], b"")
        self.assertIn(b"Connection: close\r\n", self.transport.value())
        self.assertTrue(self.transport.disconnecting)


class FakeVerificationTests(SynchronousTestCase):
    def test_recording_exchange_matches_handler_contract(self) -> None:
        """RecordingExchange has every method the server protocol calls on a ProxyExchange."""
        from txbalancer.proxy import ProxyExchange

        for name in ("start", "bodyReceived", "bodyFinished", "clientGone"):
            self.assertTrue(callable(getattr(ProxyExchange, name)))
            self.assertTrue(callable(getattr(RecordingExchange, name)))

    def test_server_protocol_helper(self) -> None:
        """serverProtocol connects a real HTTPServerProtocol registered with its factory."""
        factory = HTTPServerFactory(RecordingHandler(), MemoryReactorClock())
        proto, transport = serverProtocol(factory, "2001:db8::1")
        self.assertIsInstance(proto, HTTPServerProtocol)
        self.assertIn(proto, factory.connections)
        self.assertEqual(proto.peer, "2001:db8::1")
        transport.peerCloses()
        self.assertNotIn(proto, factory.connections)


class EarlyBodyTests(ServerMixin, SynchronousTestCase):
    def test_bad_chunk_in_same_read_never_starts(self) -> None:
        """A bad chunk arriving in the same read as a good one means the exchange never starts."""
        self.assertRefused(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabcXY\r\n0\r\n\r\n",
            400,
        )
        (exchange,) = self.handler.exchanges
        self.assertFalse(exchange.started)
        self.assertEqual(exchange.events[-1], ("gone",))
