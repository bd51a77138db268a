"""
Tests for txbalancer.resource: the balancer mounted in a twisted.web Site,
driven with raw bytes on a fake reactor, its backends accepted and answered
in memory.
"""

from __future__ import annotations

import random

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data
from zope.interface.verify import verifyObject

from txbalancer import Balancer
from txbalancer.interfaces import IDownstream, IExchange, IRequestHead
from txbalancer.proxy import PENDING_LIMIT
from txbalancer.resource import (
    BODY_CHUNK,
    BalancerResource,
    ResourceDownstream,
    StreamingSite,
)
from txbalancer.testing import (
    ClientConnection,
    FakeHealthClient,
    FakeTransport,
    PendingConnect,
    RecordingHandler,
    serverProtocol,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def headOf(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def headerValues(raw: bytes, name: bytes) -> list[bytes]:
    return [
        line.partition(b": ")[2]
        for line in headOf(raw)[1:]
        if line.partition(b": ")[0].lower() == name.lower()
    ]


def bodyOf(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


class WebBalancer:
    """
    A started L{Balancer} on a fake reactor, mounted at C{/api} of a Site
    that also serves C{/static}; clients talk to the Site's channel, and
    the backend connections the balancer makes are accepted by the test.
    """

    def __init__(self, backends=("127.0.0.1:3001", "127.0.0.1:3002"), site=Site, **settings):
        self.reactor = MemoryReactorClock()
        self.balancer = Balancer(
            list(backends),
            reactor=self.reactor,
            random=random.Random(0),
            jitter=lambda: 0.0,
            healthClient=FakeHealthClient(),
            **settings,
        )
        self.balancer.startService()
        self.root = Resource()
        self.root.putChild(b"static", Data(b"hello\n", "text/plain"))
        self.root.putChild(b"api", self.balancer.resource())
        self.site = site(self.root, reactor=self.reactor)
        self._transports: list[FakeTransport] = []
        self._resolved: set[int] = set()

    @property
    def pool(self):
        return self.balancer.defaultPool.pool

    @property
    def forwarder(self):
        return self.balancer.defaultPool.forwarder

    def client(self, peer: str = "203.0.113.7") -> ClientConnection:
        transport = FakeTransport(peer)
        channel = self.site.buildProtocol(transport.getPeer())
        transport.protocol = channel
        self._transports.append(transport)
        channel.makeConnection(transport)
        return ClientConnection(channel, transport)

    def pendingConnects(self) -> list[PendingConnect]:
        return [
            PendingConnect(self, i)
            for i in range(len(self.reactor.tcpClients))
            if i not in self._resolved and not self.reactor.connectors[i].stoppedConnecting
        ]

    def _next(self) -> PendingConnect:
        attempt = self.pendingConnects()[0]
        self._resolved.add(attempt.index)
        return attempt

    def acceptConnect(self):
        return self._next().accept()

    def failConnect(self, reason=None) -> str:
        attempt = self._next()
        attempt.fail(reason)
        return attempt.address

    def flush(self) -> None:
        changed = True
        while changed:
            changed = False
            for transport in list(self._transports):
                if transport.deliverLoss():
                    changed = True


class ResourceTestCase(SynchronousTestCase):
    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def web(self, **kw) -> WebBalancer:
        self.lb = WebBalancer(**kw)
        return self.lb

    def assertIdle(self) -> None:
        self.assertEqual(self.lb.forwarder.inFlight, 0)
        self.assertEqual([b.active for b in self.lb.pool.backends], [0] * len(self.lb.pool.backends))


class InterfaceTests(ResourceTestCase):
    def test_downstream_and_head_provide_interfaces(self) -> None:
        """The resource hands the handler an IRequestHead and an IDownstream; the real exchange is an IExchange."""
        handler = RecordingHandler()
        root = Resource()
        root.putChild(b"api", BalancerResource(handler, MemoryReactorClock()))
        site = Site(root)
        channel = site.buildProtocol(None)
        transport = FakeTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/x?q=%2F HTTP/1.1\r\nHost: h\r\n\r\n")
        (exchange,) = handler.exchanges
        verifyObject(IRequestHead, exchange.request)
        verifyObject(IDownstream, exchange.server)
        self.assertIsInstance(exchange.server, ResourceDownstream)
        self.assertEqual(exchange.request.target, b"/x?q=%2F")
        self.assertEqual(exchange.events, [("finished",), ("start",)])

    def test_real_exchange_and_render(self) -> None:
        """The balancer's resource is a leaf IResource whose render answers NOT_DONE_YET and starts an IExchange."""
        from twisted.web.resource import IResource
        from twisted.web.server import NOT_DONE_YET

        lb = self.web()
        self.assertTrue(IResource.providedBy(lb.balancer.resource()))
        self.assertTrue(lb.balancer.resource().isLeaf)
        seen = []

        class Watching(BalancerResource):
            def render(self, request):
                result = BalancerResource.render(self, request)
                seen.append(result)
                return result

        def handler(head, downstream):
            exchange = lb.balancer.handler(head, downstream)
            seen.append(exchange)
            return exchange

        lb.root.putChild(b"watched", Watching(handler, lb.reactor))
        client = lb.client()
        client.send(b"GET /watched/x HTTP/1.1\r\nHost: h\r\n\r\n")
        exchange, result = seen
        verifyObject(IExchange, exchange)
        self.assertIs(result, NOT_DONE_YET)
        self.assertEqual(client.received(), b"")
        self.assertEqual(len(lb.pendingConnects()), 1)


class ForwardingTests(ResourceTestCase):
    def test_round_trip(self) -> None:
        """A GET below the mount point reaches a backend with the path below it, and its answer reaches the client."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/x?q=%2F HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        sent = backend.received()
        self.assertEqual(headOf(sent)[0], b"GET /x?q=%2F HTTP/1.1")
        self.assertEqual(headerValues(sent, b"host"), [b"h"])
        self.assertEqual(headerValues(sent, b"x-forwarded-for"), [b"203.0.113.7"])
        self.assertEqual(headerValues(sent, b"x-forwarded-proto"), [b"http"])
        self.assertEqual(headerValues(sent, b"content-length"), [])
        backend.respond(OK)
        out = client.received()
        self.assertEqual(headOf(out)[0], b"HTTP/1.1 200 OK")
        self.assertEqual(headerValues(out, b"content-length"), [b"2"])
        self.assertEqual(bodyOf(out), b"ok")
        self.assertFalse(client.closed)
        self.assertIdle()

    def test_target_byte_exact(self) -> None:
        """Encoded slashes, spaces and the query pass byte-exact; the mount point itself is /."""
        lb = self.web(backends=("127.0.0.1:3001",))
        cases = [
            (b"/api/a%2Fb/c%20d;p?x=%2f&y", b"/a%2Fb/c%20d;p?x=%2f&y"),
            (b"/api", b"/"),
            (b"/api/", b"/"),
            (b"/api?", b"/?"),
            (b"/api//x/", b"//x/"),
        ]
        client = lb.client()
        backend = None
        for target, expected in cases:
            client.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
            if backend is None:
                backend = lb.acceptConnect()
            self.assertEqual(headOf(backend.received())[0], b"GET " + expected + b" HTTP/1.1", target)
            backend.clear()
            backend.respond(OK)

    def test_nested_mount(self) -> None:
        """Mounted two levels deep, the backend sees the path below both."""
        lb = self.web()
        v1 = Resource()
        lb.root.putChild(b"v1", v1)
        v1.putChild(b"svc", lb.balancer.resource())
        client = lb.client()
        client.send(b"GET /v1/svc/items/7?a=b HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        self.assertEqual(headOf(backend.received())[0], b"GET /items/7?a=b HTTP/1.1")

    def test_static_sibling_untouched(self) -> None:
        """Other resources of the Site are served by twisted.web as usual."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /static HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(client.received().endswith(b"hello\n"))
        self.assertEqual(lb.reactor.tcpClients, [])

    def test_headers_grouped_by_name(self) -> None:
        """With a plain Site, repeated headers reach the backend grouped by name, in first-arrival order, canonically cased."""
        lb = self.web()
        client = lb.client()
        client.send(
            b"GET /api/ HTTP/1.1\r\nHost: h\r\nx-a: 1\r\nX-B: 2\r\nX-A: 3\r\n\r\n"
        )
        lines = headOf(lb.acceptConnect().received())[1:]
        self.assertEqual(
            [line for line in lines if line.lower().startswith(b"x-a") or line.lower().startswith(b"x-b")],
            [b"X-A: 1", b"X-A: 3", b"X-B: 2"],
        )

    def test_hop_by_hop_and_twisted_headers(self) -> None:
        """Hop-by-hop headers are dropped both ways; twisted.web's Server, Date and text/html default are not added."""
        lb = self.web()
        client = lb.client()
        client.send(
            b"GET /api/ HTTP/1.1\r\nHost: h\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\r\n"
        )
        backend = lb.acceptConnect()
        sent = backend.received()
        for name in (b"x-hop", b"keep-alive", b"connection"):
            self.assertEqual(headerValues(sent, name), [], name)
        backend.respond(
            b"HTTP/1.1 200 OK\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\nServer: node\r\n"
            b"Keep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n"
        )
        out = client.received()
        self.assertEqual(headerValues(out, b"date"), [b"Mon, 01 Jan 2024 00:00:00 GMT"])
        self.assertEqual(headerValues(out, b"server"), [b"node"])
        self.assertEqual(headerValues(out, b"keep-alive"), [])
        self.assertEqual(headerValues(out, b"content-type"), [])

    def test_unknown_length_is_chunked(self) -> None:
        """A close-delimited backend body reaches an HTTP/1.1 client chunked."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/ HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc")
        backend.close()
        lb.flush()
        out = client.received()
        self.assertEqual(headerValues(out, b"transfer-encoding"), [b"chunked"])
        self.assertEqual(bodyOf(out), b"3\r\nabc\r\n0\r\n\r\n")
        self.assertIdle()

    def test_http10_unknown_length_close_delimited(self) -> None:
        """An HTTP/1.0 client gets a body of unknown length close-delimited, not chunked."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/ HTTP/1.0\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        self.assertEqual(headOf(backend.received())[0], b"GET / HTTP/1.1")
        backend.respond(b"HTTP/1.1 200 OK\r\n\r\nabc")
        backend.close()
        lb.flush()
        out = client.received()
        self.assertEqual(headOf(out)[0], b"HTTP/1.0 200 OK")
        self.assertEqual(headerValues(out, b"transfer-encoding"), [])
        self.assertEqual(bodyOf(out), b"abc")
        self.assertTrue(client.closed)

    def test_head_keeps_length(self) -> None:
        """A HEAD answer keeps the backend's Content-Length and has no body."""
        lb = self.web()
        client = lb.client()
        client.send(b"HEAD /api/ HTTP/1.1\r\nHost: h\r\n\r\n")
        lb.acceptConnect().respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        out = client.received()
        self.assertEqual(headerValues(out, b"content-length"), [b"1234"])
        self.assertEqual(bodyOf(out), b"")

    def test_response_streams_with_backpressure(self) -> None:
        """A large response is relayed as it arrives, and a client that reads slowly pauses the backend."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/big HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
        self.assertTrue(client.received().endswith(b"x" * 1000))
        client.transport.producer.pauseProducing()
        self.assertEqual(backend.transport.producerState, "paused")
        client.transport.producer.resumeProducing()
        self.assertEqual(backend.transport.producerState, "producing")
        backend.respond(b"y" * 999000)
        self.assertTrue(client.received().endswith(b"y" * 999000))
        self.assertIdle()

    def test_missing_host_refused(self) -> None:
        """An HTTP/1.1 request without Host is a 400 that never reaches a backend."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/ HTTP/1.1\r\n\r\n")
        self.assertEqual(headOf(client.received())[0], b"HTTP/1.1 400 Bad Request")
        self.assertEqual(lb.reactor.tcpClients, [])

    def test_two_hosts_refused(self) -> None:
        """Two Host headers are a 400 that never reaches a backend."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        self.assertEqual(headOf(client.received())[0], b"HTTP/1.1 400 Bad Request")
        self.assertIn(b"more than one Host", client.received())
        self.assertEqual(lb.reactor.tcpClients, [])

    def test_body_too_large(self) -> None:
        """A body over maxBodySize is a 413 that never reaches a backend."""
        lb = self.web()
        lb.root.putChild(b"small", BalancerResource(lb.balancer.handler, lb.reactor, maxBodySize=4))
        client = lb.client()
        client.send(b"POST /small/ HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nabcde")
        self.assertEqual(headOf(client.received())[0], b"HTTP/1.1 413 Content Too Large")
        self.assertEqual(lb.reactor.tcpClients, [])


class DrainTests(ResourceTestCase):
    def test_drain_waits_for_requests_in_flight(self) -> None:
        """drain() fires once the requests in flight through the resource are answered."""
        lb = self.web()
        resource = BalancerResource(lb.balancer.handler, lb.reactor)
        lb.root.putChild(b"d", resource)
        self.successResultOf(resource.drain(10))
        client = lb.client()
        client.send(b"GET /d/ HTTP/1.1\r\nHost: h\r\n\r\n")
        drained = resource.drain(10)
        self.assertNoResult(drained)
        lb.acceptConnect().respond(OK)
        self.successResultOf(drained)
        self.assertEqual(resource.inFlight, set())

    def test_balancer_stop_can_wait_for_it(self) -> None:
        """Listed among the balancer's factories, the resource holds the balancer's graceful stop until its requests are answered."""
        lb = self.web()
        resource = lb.balancer.resource()
        lb.balancer.factories.append(resource)
        lb.root.putChild(b"d", resource)
        client = lb.client()
        client.send(b"GET /d/ HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        stopped = lb.balancer.stopService()
        self.assertNoResult(stopped)
        backend.respond(OK)
        lb.flush()
        self.successResultOf(stopped)
        self.assertEqual(bodyOf(client.received()), b"ok")

    def test_drain_timeout_aborts(self) -> None:
        """Requests still in flight when the drain times out are aborted, and their backend requests cancelled."""
        lb = self.web()
        resource = BalancerResource(lb.balancer.handler, lb.reactor)
        lb.root.putChild(b"d", resource)
        client = lb.client()
        client.send(b"GET /d/ HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        drained = resource.drain(5)
        lb.reactor.advance(5)
        self.successResultOf(drained)
        self.assertTrue(client.transport.aborted)
        lb.flush()
        self.assertTrue(backend.transport.aborted)
        self.assertIdle()


class RequestBodyTests(ResourceTestCase):
    def test_small_body(self) -> None:
        """A small body reaches the backend with its Content-Length."""
        lb = self.web()
        client = lb.client()
        client.send(b"POST /api/form HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\n\r\na=1&b=2")
        backend = lb.acceptConnect()
        sent = backend.received()
        self.assertEqual(headerValues(sent, b"content-length"), [b"7"])
        self.assertEqual(bodyOf(sent), b"a=1&b=2")

    def test_chunked_body_gets_length(self) -> None:
        """A chunked request body, read whole by twisted.web, reaches the backend with a Content-Length."""
        lb = self.web()
        client = lb.client()
        client.send(
            b"POST /api/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        sent = lb.acceptConnect().received()
        self.assertEqual(headerValues(sent, b"transfer-encoding"), [])
        self.assertEqual(headerValues(sent, b"content-length"), [b"5"])
        self.assertEqual(bodyOf(sent), b"abcde")

    def test_spooled_body_read_as_backend_takes_it(self) -> None:
        """A spooled body is read back in pieces: little waits for the connect, and none while the backend is paused."""
        lb = self.web()
        size = 1024 * 1024
        body = bytes(range(256)) * (size // 256)
        client = lb.client()
        client.send(b"PUT /api/blob HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % size + body)
        (pending,) = lb.pendingConnects()
        # The exchange holds at most its pending limit (plus one piece).
        request = client.protocol._channel.requests[0]  # the twisted.web request
        self.assertTrue(request.content.tell() <= PENDING_LIMIT + 2 * BODY_CHUNK)
        backend = lb.acceptConnect()
        backend.transport.producer.pauseProducing()
        before = len(backend.received())
        lb.reactor.advance(0)
        self.assertEqual(len(backend.received()), before)
        backend.transport.producer.resumeProducing()
        lb.reactor.advance(0)
        self.assertEqual(bodyOf(backend.received()), body)
        backend.respond(OK)
        self.assertEqual(bodyOf(client.received()), b"ok")
        self.assertIdle()

    def test_expect_continue_answered_by_twisted(self) -> None:
        """twisted.web answers Expect: 100-continue itself; the body then reaches the backend."""
        lb = self.web()
        client = lb.client()
        client.send(b"POST /api/ HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(client.received(), b"HTTP/1.1 100 Continue\r\n\r\n")
        client.send(b"hi")
        backend = lb.acceptConnect()
        self.assertEqual(bodyOf(backend.received()), b"hi")
        backend.respond(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        self.assertEqual(client.received().count(b"100 Continue"), 1)
        self.assertTrue(client.received().endswith(b"ok"))


class NativeComparison:
    """
    The same scenario through the balancer's own listener, for comparison.
    """

    def __init__(self, lb: WebBalancer) -> None:
        self.lb = lb
        factory = lb.balancer.serverFactory()
        self.protocol, self.transport = serverProtocol(factory)
        lb._transports.append(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def received(self) -> bytes:
        return self.transport.value()


def statusAndBody(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    return headOf(raw)[0], headerValues(raw, b"content-type"), bodyOf(raw)


class FailureTests(ResourceTestCase):
    def both(self, scenario, **kw) -> tuple[bytes, bytes]:
        """
        Run C{scenario(lb, send)} through the resource and through the
        native listener; return what each client got.
        """
        lb = self.web(**kw)
        client = lb.client()
        scenario(lb, lambda: client.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n"))
        viaResource = client.received()
        lb = self.web(**kw)
        native = NativeComparison(lb)
        scenario(lb, lambda: native.send(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"))
        return viaResource, native.received()

    def test_502_all_refused(self) -> None:
        """Every backend refusing is the native listener's 502 with the same short body."""

        def scenario(lb, send):
            send()
            lb.failConnect()
            lb.failConnect()

        viaResource, native = self.both(scenario)
        self.assertEqual(headOf(viaResource)[0], b"HTTP/1.1 502 Bad Gateway")
        self.assertIn(b"connection refused", viaResource)
        self.assertEqual(statusAndBody(viaResource), statusAndBody(native))
        self.assertIdle()

    def test_503_none_healthy(self) -> None:
        """No healthy backend is the native listener's 503 with the same short body, and nothing is connected."""

        def scenario(lb, send):
            for b in lb.pool.backends:
                lb.pool.setHealth(b, "down")
            send()
            self.assertEqual(lb.reactor.tcpClients, [])

        viaResource, native = self.both(scenario)
        self.assertEqual(headOf(viaResource)[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(statusAndBody(viaResource), statusAndBody(native))

    def test_504_backend_timeout(self) -> None:
        """Backends silent past backendTimeout give the native listener's 504 with the same short body, and their connections are aborted."""
        backends = []

        def scenario(lb, send):
            send()
            backends.append(lb.acceptConnect())
            lb.reactor.advance(10)
            # A GET that timed out is retried once on another backend.
            backends.append(lb.acceptConnect())
            lb.reactor.advance(10)

        viaResource, native = self.both(scenario, backendTimeout=10)
        self.assertEqual(headOf(viaResource)[0], b"HTTP/1.1 504 Gateway Timeout")
        self.assertEqual(statusAndBody(viaResource), statusAndBody(native))
        self.assertTrue(all(b.transport.aborted for b in backends))

    def test_queue_full_503_retry_after(self) -> None:
        """Every backend at max_conns is a 503 with Retry-After, as on the native listener."""

        def scenario(lb, send):
            send()
            lb.acceptConnect()
            send()

        lb = self.web(backends=("127.0.0.1:3001 max_conns=1",))
        first, second = lb.client(), lb.client()
        first.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
        lb.acceptConnect()
        second.send(b"GET /api/x HTTP/1.1\r\nHost: h\r\n\r\n")
        out = second.received()
        self.assertEqual(headOf(out)[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertEqual(headerValues(out, b"retry-after"), [b"1"])

    def test_broken_response_aborts_client(self) -> None:
        """A backend breaking off mid-body aborts the client's connection: no chunk terminator, no clean close."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/ HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        backend.close(error.ConnectionLost())
        self.assertTrue(client.transport.aborted)
        lb.flush()
        self.assertIdle()

    def test_client_leaving_cancels_connect(self) -> None:
        """A client leaving while the connect is pending cancels it and frees the backend."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/ HTTP/1.1\r\nHost: h\r\n\r\n")
        (pending,) = lb.pendingConnects()
        client.leave()
        self.assertTrue(pending.connector.stoppedConnecting)
        self.assertIdle()

    def test_client_leaving_aborts_upstream(self) -> None:
        """A client leaving mid-response aborts the upstream request."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/ HTTP/1.1\r\nHost: h\r\n\r\n")
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nabc")
        client.leave()
        self.assertTrue(backend.transport.aborted)
        lb.flush()
        self.assertIdle()


class StreamingTests(ResourceTestCase):
    def web(self, **kw) -> WebBalancer:
        kw.setdefault("site", StreamingSite)
        return ResourceTestCase.web(self, **kw)

    def test_exchange_driven_from_the_head(self) -> None:
        """Through StreamingSite the exchange starts at the head, gets the body as it arrives, then its end; the head is an IRequestHead."""
        handler = RecordingHandler()
        root = Resource()
        root.putChild(b"api", BalancerResource(handler, MemoryReactorClock()))
        channel = StreamingSite(root).buildProtocol(None)
        channel.makeConnection(FakeTransport())
        channel.dataReceived(b"PUT /api/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n")
        (exchange,) = handler.exchanges
        verifyObject(IRequestHead, exchange.request)
        verifyObject(IDownstream, exchange.server)
        self.assertEqual((exchange.request.contentLength, exchange.request.chunked), (3, False))
        self.assertEqual(exchange.events, [("start",)])
        channel.dataReceived(b"ab")
        channel.dataReceived(b"c")
        self.assertEqual(exchange.events, [("start",), ("body", b"ab"), ("body", b"c"), ("finished",)])

    def test_body_streams_before_it_is_complete(self) -> None:
        """With StreamingSite the backend gets the head and the first body bytes before the client has sent the rest."""
        lb = self.web(backends=("127.0.0.1:3001",))
        client = lb.client()
        client.send(b"POST /api/up HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nabc")
        backend = lb.acceptConnect()
        sent = backend.received()
        self.assertEqual(headOf(sent)[0], b"POST /up HTTP/1.1")
        self.assertEqual(headerValues(sent, b"content-length"), [b"6"])
        self.assertEqual(bodyOf(sent), b"abc")
        client.send(b"def")
        self.assertEqual(bodyOf(backend.received()), b"abcdef")
        backend.respond(OK)
        self.assertEqual(bodyOf(client.received()), b"ok")
        self.assertFalse(client.closed)
        self.assertIdle()
        # The connection serves the next request.
        client.clear()
        backend.clear()
        client.send(b"GET /api/again HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(headOf(backend.received())[0], b"GET /again HTTP/1.1")

    def test_chunked_body_streams_chunked(self) -> None:
        """A chunked upload streams to the backend chunked, as it arrives."""
        lb = self.web()
        client = lb.client()
        client.send(b"POST /api/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        backend = lb.acceptConnect()
        sent = backend.received()
        self.assertEqual(headerValues(sent, b"transfer-encoding"), [b"chunked"])
        self.assertEqual(bodyOf(sent), b"3\r\nabc\r\n")
        client.send(b"0\r\n\r\n")
        self.assertTrue(backend.received().endswith(b"0\r\n\r\n"))

    def test_slow_backend_pauses_client(self) -> None:
        """A backend reading slowly pauses the client's transport, and resumes it."""
        lb = self.web()
        client = lb.client()
        client.send(b"POST /api/ HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nab")
        backend = lb.acceptConnect()
        backend.transport.producer.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        backend.transport.producer.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")

    def test_pending_connect_pauses_client(self) -> None:
        """More body than the pending limit before the backend connects pauses the client."""
        lb = self.web()
        client = lb.client()
        client.send(b"POST /api/ HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
        client.send(b"x" * (PENDING_LIMIT + 1))
        self.assertEqual(client.transport.producerState, "paused")
        lb.acceptConnect()
        self.assertEqual(client.transport.producerState, "producing")

    def test_headers_in_arrival_order(self) -> None:
        """With StreamingSite, repeated headers reach the backend in arrival order."""
        lb = self.web()
        client = lb.client()
        client.send(b"GET /api/ HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nX-B: 2\r\nX-A: 3\r\n\r\n")
        lines = headOf(lb.acceptConnect().received())[1:]
        self.assertEqual(
            [line for line in lines if line[:3] in (b"X-A", b"X-B")],
            [b"X-A: 1", b"X-B: 2", b"X-A: 3"],
        )

    def test_early_answer_waits_for_body(self) -> None:
        """An answer given before the upload ends is sent at once; the rest of the body is dropped, and the connection serves the next request."""
        lb = self.web(backends=("127.0.0.1:3001",))
        for b in lb.pool.backends:
            lb.pool.setHealth(b, "down")
        client = lb.client()
        client.send(b"POST /api/ HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nabc")
        self.assertEqual(headOf(client.received())[0], b"HTTP/1.1 503 Service Unavailable")
        client.send(b"def")
        client.clear()
        client.send(b"GET /static HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(client.received().endswith(b"hello\n"))

    def test_immediate_answer_without_continue(self) -> None:
        """A client waiting on 100-continue that is answered at once (no backend up) gets that answer and no 100 Continue after it."""
        lb = self.web()
        for b in lb.pool.backends:
            lb.pool.setHealth(b, "down")
        client = lb.client()
        client.send(b"POST /api/ HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        out = client.received()
        self.assertEqual(headOf(out)[0], b"HTTP/1.1 503 Service Unavailable")
        self.assertNotIn(b"100 Continue", out)

    def test_expect_continue_streams(self) -> None:
        """twisted.web answers 100-continue itself, and the body then streams to the backend."""
        lb = self.web()
        client = lb.client()
        client.send(b"POST /api/ HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        self.assertEqual(client.received(), b"HTTP/1.1 100 Continue\r\n\r\n")
        backend = lb.acceptConnect()
        client.send(b"abc")
        self.assertEqual(bodyOf(backend.received()), b"abc")

    def test_declared_body_too_large_closes(self) -> None:
        """A declared length over maxBodySize is a 413 from the head, and the connection closes without reading the body."""
        lb = self.web()
        lb.root.putChild(b"small", BalancerResource(lb.balancer.handler, lb.reactor, maxBodySize=4))
        client = lb.client()
        client.send(b"POST /small/ HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n")
        self.assertEqual(headOf(client.received())[0], b"HTTP/1.1 413 Content Too Large")
        self.assertTrue(client.closed)
        self.assertEqual(lb.reactor.tcpClients, [])

    def test_chunked_body_too_large_stops_upstream(self) -> None:
        """A chunked upload growing past maxBodySize is a 413, its backend request is cancelled, and the connection closes."""
        lb = self.web()
        lb.root.putChild(b"small", BalancerResource(lb.balancer.handler, lb.reactor, maxBodySize=4))
        client = lb.client()
        client.send(b"POST /small/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        backend = lb.acceptConnect()
        client.send(b"3\r\ndef\r\n")
        self.assertEqual(headOf(client.received())[0], b"HTTP/1.1 413 Content Too Large")
        self.assertTrue(client.closed)
        self.assertTrue(backend.transport.aborted)
        lb.flush()
        self.assertIdle()

    def test_failing_lookup_answered_by_twisted(self) -> None:
        """A resource whose lookup raises is answered 500 by twisted.web, as with a plain Site, and logged once."""
        lb = self.web()

        class Broken(Resource):
            def getChild(self, name, request):
                raise RuntimeError("broken getChild")

        lb.root.putChild(b"broken", Broken())
        client = lb.client()
        client.send(b"GET /broken/x HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(headOf(client.received())[0], b"HTTP/1.1 500 Internal Server Error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_other_resources_looked_up_once(self) -> None:
        """Requests for other resources are ordinary ones (the whole body read before render), and their resource is looked up once."""
        lb = self.web()
        calls = []

        class Echo(Resource):
            isLeaf = True

            def render_POST(self, request):
                return b"counted " + request.content.read()

        class Counting(Resource):
            def getChild(self, name, request):
                calls.append(name)
                return Echo()

        lb.root.putChild(b"count", Counting())
        client = lb.client()
        client.send(b"POST /count/x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nbody")
        self.assertEqual(calls, [b"x"])
        self.assertTrue(client.received().endswith(b"counted body"))
        self.assertEqual(lb.reactor.tcpClients, [])
