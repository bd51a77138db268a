"""
Tests for txbalancer.upstream: the HTTP/1.1 client protocol and the pool of
kept-alive backend connections.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.backend import Backend
from txbalancer.testing import backendSpecs, upstreamConnection
from txbalancer.upstream import BadResponse, UpstreamPool

HEAD = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


class Recorder:
    """
    Records what an UpstreamConnection tells its exchange.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.data = b""

    def upstreamContinue(self) -> None:
        self.events.append(("continue",))

    def upstreamInterim(self, status, reason, headers) -> None:
        self.events.append(("interim", status, reason, headers))

    def responseTrailers(self, trailers) -> None:
        self.events.append(("trailers", trailers))

    def upstreamSwitched(self, reason, headers, buffered) -> None:
        self.events.append(("switched", reason, headers, buffered))

    def responseHead(self, status, reason, headers, length) -> None:
        self.events.append(("head", status, reason, headers, length))

    def responseData(self, data: bytes) -> None:
        self.events.append(("data", data))
        self.data += data

    def responseFinished(self) -> None:
        self.events.append(("finished",))

    def upstreamLost(self, reason, responseStarted) -> None:
        self.events.append(("lost", reason, responseStarted))

    def names(self) -> list[str]:
        return [e[0] for e in self.events]


def makeBackend(line: str = "127.0.0.1:3001") -> Backend:
    return Backend(backendSpecs(line)[0])


class ConnectionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor)
        self.backend = makeBackend()
        self.conn, self.transport = upstreamConnection(self.pool, self.backend)
        self.exchange = Recorder()

    def send(self, head: bytes = HEAD, isHead: bool = False, chunked: bool = False, finish: bool = True, upgrade: bool = False):
        self.conn.sendRequest(head, self.exchange, isHead, chunked, upgrade)
        if finish:
            self.conn.finishBody()

    def test_request_written(self) -> None:
        """The request head is written as given."""
        self.send()
        self.assertEqual(self.transport.value(), HEAD)

    def test_chunked_request_body(self) -> None:
        """A chunked request body is framed as chunks and ended with a last chunk."""
        self.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", chunked=True, finish=False)
        self.conn.writeBody(b"hello")
        self.conn.writeBody(b"0123456789abcdef!")
        self.conn.finishBody()
        self.assertTrue(
            self.transport.value().endswith(b"\r\n\r\n5\r\nhello\r\n11\r\n0123456789abcdef!\r\n0\r\n\r\n")
        )

    def test_content_length_response(self) -> None:
        """A Content-Length response is passed on in pieces with its length, and the connection is kept."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: 1\r\n\r\nhel")
        self.conn.dataReceived(b"lo")
        self.conn.dataReceived(b"world")
        self.assertEqual(
            self.exchange.events[0],
            ("head", 200, b"OK", [(b"Content-Length", b"10"), (b"X-A", b"1")], 10),
        )
        self.assertEqual(self.exchange.data, b"helloworld")
        self.assertEqual(self.exchange.names(), ["head", "data", "data", "data", "finished"])
        self.assertEqual(self.pool.idleCount(self.backend), 1)
        self.assertFalse(self.transport.disconnecting)

    def test_empty_content_length(self) -> None:
        """Content-Length: 0 finishes with the head."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.exchange.names(), ["head", "finished"])
        self.assertEqual(self.pool.idleCount(self.backend), 1)

    def test_chunked_response(self) -> None:
        """A chunked response is decoded, its trailers handed over before the end, and the connection kept."""
        self.send()
        body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\n"
        for i in range(len(body)):
            self.conn.dataReceived(body[i : i + 1])
        head = self.exchange.events[0]
        self.assertEqual(head[1], 200)
        self.assertIsNone(head[4])
        self.assertEqual(self.exchange.data, b"hello world")
        self.assertEqual(self.exchange.names()[-2:], ["trailers", "finished"])
        self.assertEqual(self.exchange.events[-2], ("trailers", [(b"T", b"1")]))
        self.assertEqual(self.pool.idleCount(self.backend), 1)

    def test_trailers_not_carried_over(self) -> None:
        """A reused connection's next response does not repeat the last one's trailers."""
        self.send()
        self.conn.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: 1\r\n\r\n"
        )
        self.exchange = Recorder()
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(self.exchange.names(), ["head", "data", "finished"])

    def test_101_to_an_upgrade(self) -> None:
        """A 101 to an upgrade request hands the exchange the head and the bytes after it, and the connection leaves the pool."""
        self.send(upgrade=True)
        self.conn.dataReceived(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n\x81\x02hi"
        )
        (event,) = self.exchange.events
        self.assertEqual(event[0], "switched")
        self.assertEqual(event[3], b"\x81\x02hi")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.pool.idleCount(self.backend), 0)

    def test_upgrade_refused_not_reused(self) -> None:
        """A normal answer to an upgrade request is passed on, and the connection is not reused."""
        self.send(upgrade=True)
        self.conn.dataReceived(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.exchange.names(), ["head", "finished"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.pool.idleCount(self.backend), 0)

    def test_close_delimited_response(self) -> None:
        """A response without length runs until close, and its connection is never reused."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        self.conn.dataReceived(b" data")
        self.assertEqual(self.exchange.names(), ["head", "data", "data"])
        self.transport.peerCloses()
        self.assertEqual(self.exchange.names()[-1], "finished")
        self.assertEqual(self.exchange.data, b"some data")
        self.assertEqual(self.pool.idleCount(self.backend), 0)

    def test_100_continue(self) -> None:
        """A 100 Continue is reported, then the final response is read."""
        self.send(finish=False)
        self.conn.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(self.exchange.names(), ["continue"])
        self.conn.finishBody()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.exchange.names(), ["continue", "head", "data", "finished"])

    def test_other_1xx_skipped(self) -> None:
        """103 is handed over as an interim response; 102 is skipped."""
        self.send()
        self.conn.dataReceived(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\n\r\n"
        )
        self.assertEqual(self.exchange.names(), ["interim", "head", "finished"])
        self.assertEqual(self.exchange.events[0], ("interim", 103, b"Early Hints", [(b"Link", b"</a>")]))
        self.assertEqual(self.exchange.events[1][1], 204)

    def test_101_is_bad(self) -> None:
        """An unexpected 101 is a bad response."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        self.assertEqual(self.exchange.names(), ["lost"])
        self.assertTrue(self.transport.aborted)

    def test_head_response(self) -> None:
        """A response to HEAD keeps Content-Length as the length and has no body."""
        self.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n", isHead=True)
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        self.assertEqual(self.exchange.names(), ["head", "finished"])
        self.assertEqual(self.exchange.events[0][4], 1234)
        self.assertEqual(self.pool.idleCount(self.backend), 1)

    def test_204_304_no_body(self) -> None:
        """204 and 304 end with their head whatever their headers say."""
        for status in (b"204 No Content", b"304 Not Modified"):
            conn, transport = upstreamConnection(self.pool, self.backend)
            exchange = Recorder()
            conn.sendRequest(HEAD, exchange, False, False)
            conn.finishBody()
            conn.dataReceived(b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.assertEqual(exchange.names(), ["head", "finished"])

    def test_connection_close_not_reused(self) -> None:
        """A response with Connection: close is not kept for reuse."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(self.exchange.names(), ["head", "data", "finished"])
        self.assertEqual(self.pool.idleCount(self.backend), 0)
        self.assertTrue(self.transport.disconnecting)

    def test_http10_not_reused(self) -> None:
        """An HTTP/1.0 response without keep-alive is not reused; with keep-alive it is."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(self.pool.idleCount(self.backend), 0)
        conn, transport = upstreamConnection(self.pool, self.backend)
        conn.sendRequest(HEAD, Recorder(), False, False)
        conn.finishBody()
        conn.dataReceived(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx")
        self.assertEqual(self.pool.idleCount(self.backend), 1)

    def test_not_reused_when_request_not_fully_sent(self) -> None:
        """A response that ends before the request body was fully sent closes the connection."""
        self.send(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n", finish=False)
        self.conn.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.exchange.names(), ["head", "finished"])
        self.assertEqual(self.pool.idleCount(self.backend), 0)
        self.assertTrue(self.transport.disconnecting)

    def test_leftover_bytes_not_reused(self) -> None:
        """Bytes past Content-Length mean the connection is not reused."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
        self.assertEqual(self.exchange.data, b"ok")
        self.assertEqual(self.exchange.names(), ["head", "data", "finished"])
        self.assertEqual(self.pool.idleCount(self.backend), 0)
        self.assertTrue(self.transport.disconnecting)

    def test_te_and_cl_not_reused(self) -> None:
        """A response with both Transfer-Encoding and Content-Length is read chunked and not reused."""
        self.send()
        self.conn.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )
        self.assertEqual(self.exchange.data, b"ok")
        self.assertEqual(self.exchange.names()[-1], "finished")
        self.assertEqual(self.pool.idleCount(self.backend), 0)

    def test_malformed_responses(self) -> None:
        """Malformed responses are reported as lost with a BadResponse, and the connection aborted."""
        for raw in [
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 O\x00K\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (10**20,),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;\r\nok\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n",
            b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024),
        ]:
            conn, transport = upstreamConnection(self.pool, self.backend)
            exchange = Recorder()
            conn.sendRequest(HEAD, exchange, False, False)
            conn.finishBody()
            conn.dataReceived(raw)
            self.assertEqual(exchange.names()[-1], "lost", raw)
            reason = exchange.events[-1][1]
            self.assertIsInstance(reason, BadResponse, raw)
            self.assertTrue(exchange.events[-1][2])
            self.assertTrue(transport.aborted, raw)
            self.assertEqual(self.pool.idleCount(self.backend), 0)

    def test_lost_before_any_byte(self) -> None:
        """A connection lost before any response byte reports responseStarted False."""
        self.send()
        self.transport.peerCloses()
        (event,) = self.exchange.events
        self.assertEqual(event[0], "lost")
        self.assertFalse(event[2])

    def test_lost_mid_body(self) -> None:
        """A connection lost in the middle of a Content-Length body reports responseStarted True."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.transport.peerCloses(error.ConnectionLost())
        self.assertEqual(self.exchange.names(), ["head", "data", "lost"])
        self.assertTrue(self.exchange.events[-1][2])

    def test_unsolicited_data_aborts(self) -> None:
        """Bytes from a backend when no request is outstanding abort the connection."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.pool.idleCount(self.backend), 1)
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(self.transport.aborted)
        self.assertEqual(self.pool.idleCount(self.backend), 0)

    def test_pause_resume(self) -> None:
        """pauseReading and resumeReading pause and resume the transport, once each."""
        self.conn.pauseReading()
        self.conn.pauseReading()
        self.assertEqual(self.transport.producerState, "paused")
        self.conn.resumeReading()
        self.assertEqual(self.transport.producerState, "producing")

    def test_paused_connection_resumed_on_release(self) -> None:
        """A connection paused when its response ends is resumed before reuse."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.conn.pauseReading()
        self.conn.dataReceived(b"cd")
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.pool.idleCount(self.backend), 1)

    def test_second_request_on_same_connection(self) -> None:
        """A kept-alive connection serves a second request cleanly."""
        self.send()
        self.conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
        conn = self.pool.takeIdle(self.backend)
        self.assertIs(conn, self.conn)
        self.assertTrue(conn.reused)
        second = Recorder()
        conn.sendRequest(HEAD, second, False, False)
        conn.finishBody()
        conn.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nb\r\n0\r\n\r\n")
        self.assertEqual(second.data, b"b")
        self.assertEqual(self.exchange.data, b"a")


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.backend = makeBackend()

    def released(self, pool: UpstreamPool, n: int, backend: Backend | None = None):
        conns = []
        for _ in range(n):
            conn, transport = upstreamConnection(pool, backend or self.backend)
            conn.sendRequest(HEAD, Recorder(), False, False)
            conn.finishBody()
            conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            conns.append((conn, transport))
        return conns

    def test_take_idle_empty(self) -> None:
        """takeIdle with no idle connection is None."""
        self.assertIsNone(UpstreamPool(self.reactor).takeIdle(self.backend))

    def test_take_idle_lifo(self) -> None:
        """Idle connections are reused newest first."""
        pool = UpstreamPool(self.reactor)
        (a, _), (b, _), (c, _) = self.released(pool, 3)
        self.assertEqual(pool.idleCount(self.backend), 3)
        self.assertIs(pool.takeIdle(self.backend), c)
        self.assertIs(pool.takeIdle(self.backend), b)
        self.assertIs(pool.takeIdle(self.backend), a)
        self.assertIsNone(pool.takeIdle(self.backend))

    def test_idle_per_backend(self) -> None:
        """Idle connections are kept per backend."""
        pool = UpstreamPool(self.reactor)
        other = makeBackend("127.0.0.1:3002")
        self.released(pool, 1)
        self.assertIsNone(pool.takeIdle(other))

    def test_max_idle_per_backend(self) -> None:
        """Connections beyond maxIdlePerBackend are closed as they come free."""
        pool = UpstreamPool(self.reactor, maxIdlePerBackend=2)
        conns = self.released(pool, 3)
        self.assertEqual(pool.idleCount(self.backend), 2)
        self.assertEqual([t.disconnecting for _, t in conns], [False, False, True])

    def test_idle_sweep(self) -> None:
        """The sweep closes connections idle longer than idleTimeout, oldest first."""
        pool = UpstreamPool(self.reactor, idleTimeout=4.0)
        pool.start()
        (old, oldT), = self.released(pool, 1)
        self.reactor.advance(2)
        (new, newT), = self.released(pool, 1)
        self.reactor.advance(1.5)
        self.assertFalse(oldT.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(oldT.disconnecting)
        self.assertFalse(newT.disconnecting)
        self.assertEqual(pool.idleCount(self.backend), 1)
        self.reactor.advance(2)
        self.assertTrue(newT.disconnecting)
        self.assertEqual(pool.idleCount(self.backend), 0)
        oldT.deliverLoss()
        newT.deliverLoss()
        self.successResultOf(pool.close())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_idle_connection_closed_by_backend_is_forgotten(self) -> None:
        """An idle connection the backend closes leaves the pool."""
        pool = UpstreamPool(self.reactor)
        (conn, transport), = self.released(pool, 1)
        transport.peerCloses()
        self.assertEqual(pool.idleCount(self.backend), 0)
        self.assertIsNone(pool.takeIdle(self.backend))

    def test_connect_uses_tcp_with_timeout(self) -> None:
        """connect makes a TCP connection to the backend with the connect timeout, one endpoint per backend."""
        pool = UpstreamPool(self.reactor, connectTimeout=2.5)
        pool.connect(self.backend)
        pool.connect(self.backend)
        self.assertEqual(
            [(h, p, t) for h, p, f, t, b in self.reactor.tcpClients],
            [("127.0.0.1", 3001, 2.5), ("127.0.0.1", 3001, 2.5)],
        )
        self.assertEqual(len(pool._endpoints), 1)

    def test_connect_ipv6(self) -> None:
        """An IPv6 backend is connected to over TCP6."""
        pool = UpstreamPool(self.reactor)
        pool.connect(makeBackend("[::1]:3001"))
        self.assertEqual(self.reactor.tcpClients[0][0], "::1")

    def test_connect_result(self) -> None:
        """connect fires with the UpstreamConnection once the connection is made."""
        pool = UpstreamPool(self.reactor)
        d = pool.connect(self.backend)
        self.assertNoResult(d)
        from txbalancer.testing import FakeTransport

        factory = self.reactor.tcpClients[0][2]
        wrapper = factory.buildProtocol(None)
        transport = FakeTransport("127.0.0.1", 3001)
        transport.protocol = wrapper
        wrapper.makeConnection(transport)
        conn = self.successResultOf(d)
        self.assertIs(conn.backend, self.backend)
        self.assertFalse(conn.reused)
        self.assertIn(conn, pool._connections)

    def test_connect_refused(self) -> None:
        """A refused connect fails the Deferred with ConnectionRefusedError."""
        from twisted.python.failure import Failure

        pool = UpstreamPool(self.reactor)
        d = pool.connect(self.backend)
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0], Failure(error.ConnectionRefusedError()))
        self.failureResultOf(d, error.ConnectionRefusedError)

    def test_forget(self) -> None:
        """forget closes a backend's idle connections."""
        pool = UpstreamPool(self.reactor)
        (conn, transport), = self.released(pool, 1)
        pool.connect(self.backend)
        pool.forget(self.backend)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(pool.idleCount(self.backend), 0)
        self.assertNotIn(self.backend, pool._endpoints)

    def test_close(self) -> None:
        """close closes idle connections, aborts busy ones, stops the sweep, and refuses new idle ones."""
        pool = UpstreamPool(self.reactor)
        pool.start()
        (idle, idleT), = self.released(pool, 1)
        busy, busyT = upstreamConnection(pool, self.backend)
        exchange = Recorder()
        busy.sendRequest(HEAD, exchange, False, False)
        d = pool.close()
        self.assertTrue(idleT.disconnecting)
        self.assertFalse(idleT.aborted)
        self.assertTrue(busyT.aborted)
        idleT.deliverLoss()
        busyT.deliverLoss()
        self.successResultOf(d)
        self.assertEqual(exchange.events[-1][0], "lost")
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        (late, lateT), = self.released(pool, 1)
        self.assertTrue(lateT.disconnecting)
        self.assertEqual(pool.idleCount(self.backend), 0)

    def test_close_waits_for_connections(self) -> None:
        """close fires only once the last connection's connectionLost has arrived."""
        pool = UpstreamPool(self.reactor)
        (a, aT), (b, bT) = self.released(pool, 2)
        unused, unusedT = upstreamConnection(pool, self.backend)
        d = pool.close()
        self.assertTrue(unusedT.disconnecting)
        aT.deliverLoss()
        bT.deliverLoss()
        self.assertNoResult(d)
        unusedT.deliverLoss()
        self.successResultOf(d)

    def test_close_without_connections(self) -> None:
        """close with no connection open fires at once, and so does a second close."""
        pool = UpstreamPool(self.reactor)
        self.successResultOf(pool.close())
        (conn, transport), = self.released(pool, 1)
        transport.deliverLoss()
        self.successResultOf(pool.close())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_close_aborts_after_timeout(self) -> None:
        """A connection that does not finish closing within the timeout is aborted."""
        pool = UpstreamPool(self.reactor)
        (conn, transport), = self.released(pool, 1)
        d = pool.close(timeout=2.0)
        self.reactor.advance(1.9)
        self.assertFalse(transport.aborted)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertTrue(transport.aborted)
        self.assertNoResult(d)
        transport.deliverLoss()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
