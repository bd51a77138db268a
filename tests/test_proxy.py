"""
Tests for txbalancer.proxy: forwarding through a whole in-memory balancer
(real server protocol, forwarder, pools) to in-memory backends.
"""

from __future__ import annotations

import io
import ipaddress

from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.accesslog import AccessLog
from txbalancer.proxy import PENDING_LIMIT
from txbalancer.testing import InMemoryBalancer

GET = b"GET /path?q=%2F%20x&y HTTP/1.1\r\nHost: example.com\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def headOf(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def headerValues(raw: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in headOf(raw)[1:]:
        n, _, v = line.partition(b": ")
        if n.lower() == name.lower():
            out.append(v)
    return out


class ProxyTestCase(SynchronousTestCase):
    backends = ("127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003")

    def balancer(self, **kw) -> InMemoryBalancer:
        kw.setdefault("backends", self.backends)
        self.lb = InMemoryBalancer(**kw)
        return self.lb

    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def assertIdle(self) -> None:
        """
        Nothing is in flight and no backend counts an active request.
        """
        self.assertEqual(self.lb.forwarder.inFlight, 0)
        self.assertEqual([b.active for b in self.lb.pool.backends], [0] * len(self.lb.pool.backends))


class ForwardingTests(ProxyTestCase):
    def test_simple_round_trip(self) -> None:
        """A GET is forwarded, the response relayed, the connection kept for reuse."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        self.assertTrue(backend.received().startswith(b"GET /path?q=%2F%20x&y HTTP/1.1\r\n"))
        backend.respond(OK)
        self.assertEqual(client.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertFalse(client.closed)
        self.assertEqual(lb.upstreams.idleCount(lb.backend("127.0.0.1:3001")), 1)
        self.assertEqual(lb.backend("127.0.0.1:3001").requests, 1)
        self.assertIdle()

    def test_round_robin_and_reuse(self) -> None:
        """Requests rotate over the backends and reuse kept-alive connections."""
        lb = self.balancer(backends=("127.0.0.1:3001", "127.0.0.1:3002"))
        client = lb.client()
        client.send(GET)
        a = lb.acceptConnect()
        a.respond(OK)
        client.send(GET)
        b = lb.acceptConnect()
        self.assertEqual(b.transport.getPeer().port, 3002)
        b.respond(OK)
        client.send(GET)
        self.assertEqual(lb.pendingConnects(), [])
        self.assertEqual(a.received().count(b"GET /path"), 2)
        a.respond(OK)
        self.assertEqual(client.received().count(b"200 OK"), 3)
        self.assertIdle()

    def test_path_query_byte_exact_host_unchanged(self) -> None:
        """Method, path and query go upstream byte for byte; Host is unchanged."""
        lb = self.balancer()
        client = lb.client()
        client.send(b"PATCH /a%2fb/%7E;p=1?x=%zz&&y=a+b#frag HTTP/1.1\r\nHost: Example.COM:8080\r\n\r\n")
        backend = lb.acceptConnect()
        head = headOf(backend.received())
        self.assertEqual(head[0], b"PATCH /a%2fb/%7E;p=1?x=%zz&&y=a+b#frag HTTP/1.1")
        self.assertEqual(headerValues(backend.received(), b"Host"), [b"Example.COM:8080"])

    def test_repeated_headers_in_order(self) -> None:
        """Repeated request and response headers keep their order and spelling."""
        lb = self.balancer()
        client = lb.client()
        client.send(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nAccept: */*\r\nx-a: 2\r\nX-A: 3\r\n\r\n"
        )
        backend = lb.acceptConnect()
        head = headOf(backend.received())
        self.assertEqual(
            [l for l in head if l.lower().startswith(b"x-a") or l.startswith(b"Accept")],
            [b"X-A: 1", b"Accept: */*", b"x-a: 2", b"X-A: 3"],
        )
        backend.respond(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX: y\r\nset-cookie: b=2\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(
            headOf(client.received())[1:4], [b"Set-Cookie: a=1", b"X: y", b"set-cookie: b=2"]
        )

    def test_hop_by_hop_removed_from_request(self) -> None:
        """Hop-by-hop request headers, and those named by Connection, are not forwarded."""
        lb = self.balancer()
        client = lb.client()
        client.send(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Secret\r\n"
            b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\n"
            b"X-Secret: s\r\nUpgrade: h2c\r\nProxy-Authorization: Basic x\r\nX-Kept: k\r\n\r\n"
        )
        raw = lb.acceptConnect().received().lower()
        for name in (b"connection:", b"keep-alive:", b"proxy-connection:", b"te:", b"x-secret:",
                     b"upgrade:", b"proxy-authorization:"):
            self.assertNotIn(b"\r\n" + name, raw)
        self.assertIn(b"\r\nx-kept: k\r\n", raw)

    def test_te_trailers_forwarded(self) -> None:
        """TE is removed except its trailers token, which is forwarded (DESIGN.md)."""
        lb = self.balancer()
        client = lb.client()
        client.send(b"GET / HTTP/1.1\r\nHost: h\r\nTE: gzip, trailers\r\n\r\n")
        raw = lb.acceptConnect().received().lower()
        self.assertIn(b"\r\nte: trailers\r\n", raw)
        self.assertNotIn(b"gzip", raw)

    def test_hop_by_hop_removed_from_response(self) -> None:
        """Hop-by-hop response headers, and those named by Connection, are not passed back."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        lb.acceptConnect().respond(
            b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\nTrailer: X\r\nX-Kept: k\r\nContent-Length: 0\r\n\r\n"
        )
        raw = client.received().lower()
        for name in (b"connection:", b"x-internal:", b"keep-alive:", b"proxy-authenticate:", b"trailer:"):
            self.assertNotIn(b"\r\n" + name, raw)
        self.assertIn(b"\r\nx-kept: k\r\n", raw)

    def test_backend_connection_close_not_passed_on(self) -> None:
        """A backend's Connection: close closes the upstream connection but not the client's."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        self.assertNotIn(b"connection:", client.received().lower())
        self.assertFalse(client.closed)
        self.assertTrue(backend.closed)
        lb.flush()
        self.assertIdle()

    def test_x_forwarded_for_replaced_for_untrusted(self) -> None:
        """An untrusted peer's X-Forwarded-For and Forwarded are replaced by its own address."""
        lb = self.balancer()
        client = lb.client(peer="198.51.100.9")
        client.send(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
            b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\r\n"
        )
        raw = lb.acceptConnect().received()
        self.assertEqual(headerValues(raw, b"X-Forwarded-For"), [b"198.51.100.9"])
        self.assertEqual(headerValues(raw, b"Forwarded"), [b"for=198.51.100.9;host=h;proto=http"])
        self.assertEqual(headerValues(raw, b"X-Forwarded-Proto"), [b"http"])
        self.assertEqual(headerValues(raw, b"X-Forwarded-Host"), [b"h"])
        self.assertEqual(headerValues(raw, b"Via"), [b"1.1 txbalancer"])

    def test_x_forwarded_for_appended_for_trusted(self) -> None:
        """A trusted peer's X-Forwarded-For and Forwarded are kept and the peer appended."""
        lb = self.balancer(trustedProxies=[ipaddress.ip_network("10.0.0.0/8")])
        client = lb.client(peer="10.1.2.3")
        client.send(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 192.0.2.1\r\n"
            b"Forwarded: for=192.0.2.1\r\nVia: 1.1 edge\r\n\r\n"
        )
        raw = lb.acceptConnect().received()
        self.assertEqual(headerValues(raw, b"X-Forwarded-For"), [b"192.0.2.1, 10.1.2.3"])
        self.assertEqual(
            headerValues(raw, b"Forwarded"), [b"for=192.0.2.1, for=10.1.2.3;host=h;proto=http"]
        )
        self.assertEqual(headerValues(raw, b"Via"), [b"1.1 edge, 1.1 txbalancer"])

    def test_ipv6_peer_quoted(self) -> None:
        """An IPv6 client appears quoted and bracketed in Forwarded, bare in X-Forwarded-For."""
        lb = self.balancer()
        client = lb.client(peer="2001:db8::7")
        client.send(GET)
        raw = lb.acceptConnect().received()
        self.assertEqual(headerValues(raw, b"X-Forwarded-For"), [b"2001:db8::7"])
        self.assertEqual(
            headerValues(raw, b"Forwarded"), [b'for="[2001:db8::7]";host=example.com;proto=http']
        )

    def test_https_listener_proto(self) -> None:
        """Requests on a TLS listener are forwarded with proto https."""
        lb = self.balancer(secure=True)
        client = lb.client()
        client.send(GET)
        raw = lb.acceptConnect().received()
        self.assertEqual(headerValues(raw, b"X-Forwarded-Proto"), [b"https"])

    def test_http10_without_host_gets_backend_host(self) -> None:
        """An HTTP/1.0 request without Host is sent upstream as HTTP/1.1 with the backend as Host."""
        lb = self.balancer()
        client = lb.client()
        client.send(b"GET / HTTP/1.0\r\n\r\n")
        raw = lb.acceptConnect().received()
        self.assertEqual(headOf(raw)[0], b"GET / HTTP/1.1")
        self.assertEqual(headerValues(raw, b"Host"), [b"127.0.0.1:3001"])

    def test_content_length_passthrough(self) -> None:
        """A backend's Content-Length reaches the client; no chunking."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        backend.respond(b"cde")
        self.assertEqual(client.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde")

    def test_chunked_and_close_delimited_become_chunked(self) -> None:
        """A response without a length reaches an HTTP/1.1 client chunked."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\n\r\nhello")
        backend.close()
        self.assertEqual(
            client.received(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        self.assertFalse(client.closed)
        self.assertIdle()

    def test_close_delimited_to_http10(self) -> None:
        """A chunked backend response reaches an HTTP/1.0 client close-delimited."""
        lb = self.balancer()
        client = lb.client()
        client.send(b"GET / HTTP/1.0\r\nHost: h\r\n\r\n")
        lb.acceptConnect().respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        )
        self.assertEqual(client.received(), b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhi")
        self.assertTrue(client.closed)

    def test_head_through_proxy(self) -> None:
        """A HEAD response keeps its Content-Length and has no body; the upstream connection is reused."""
        lb = self.balancer()
        client = lb.client()
        client.send(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
        lb.acceptConnect().respond(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        self.assertEqual(client.received(), b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        self.assertEqual(lb.upstreams.idleCount(lb.backend("127.0.0.1:3001")), 1)

    def test_304_through_proxy(self) -> None:
        """A 304 reaches the client with no body."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        lb.acceptConnect().respond(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
        self.assertEqual(client.received(), b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")

    def test_expect_100_continue(self) -> None:
        """A backend's 100 Continue reaches a client that sent Expect: 100-continue, then the body flows."""
        lb = self.balancer()
        client = lb.client()
        client.send(
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        backend = lb.acceptConnect()
        self.assertIn(b"\r\nExpect: 100-continue\r\n", backend.received())
        backend.respond(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(client.received(), b"HTTP/1.1 100 Continue\r\n\r\n")
        client.send(b"data")
        self.assertTrue(backend.received().endswith(b"\r\n\r\ndata"))
        backend.respond(OK)
        self.assertTrue(client.received().endswith(b"ok"))
        self.assertIdle()

    def test_pipelined_through_proxy(self) -> None:
        """Pipelined requests are forwarded one after another on the same upstream connection, answered in order."""
        lb = self.balancer(backends=("127.0.0.1:3001",))
        client = lb.client()
        client.send(
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        backend = lb.acceptConnect()
        self.assertEqual(backend.received().count(b"GET /"), 1)
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
        self.assertEqual(lb.pendingConnects(), [])
        self.assertEqual(backend.received().count(b"GET /"), 2)
        self.assertIn(b"GET /2 HTTP/1.1", backend.received())
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo")
        out = client.received()
        self.assertLess(out.index(b"one"), out.index(b"two"))
        self.assertIdle()

    def test_access_log(self) -> None:
        """Each finished request writes one access log line naming its backend."""
        stream = io.StringIO()
        lb = InMemoryBalancer(backends=self.backends)
        self.lb = lb
        lb.forwarder.accessLog = AccessLog(stream, lb.reactor.seconds)
        client = lb.client()
        client.send(b"GET /x HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\n\r\n")
        lb.acceptConnect().respond(OK)
        (line,) = stream.getvalue().splitlines()
        self.assertIn('"GET /x HTTP/1.1" 200 2 "-" "t" 127.0.0.1:3001', line)


class BodyStreamingTests(ProxyTestCase):
    def test_request_body_streams_upstream(self) -> None:
        """A request body is forwarded as it arrives, not after it is complete."""
        lb = self.balancer()
        client = lb.client()
        client.send(b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
        backend = lb.acceptConnect()
        raw = backend.received()
        self.assertIn(b"\r\nContent-Length: 10\r\n", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\nhello"))
        client.send(b"world")
        self.assertTrue(backend.received().endswith(b"\r\n\r\nhelloworld"))
        backend.respond(OK)
        self.assertTrue(client.received().endswith(b"ok"))
        self.assertIdle()

    def test_chunked_request_streams_upstream_chunked(self) -> None:
        """A chunked request body is re-framed chunk by chunk upstream."""
        lb = self.balancer()
        client = lb.client()
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        backend = lb.acceptConnect()
        self.assertTrue(backend.received().endswith(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"))
        client.send(b"2\r\nde\r\n0\r\n\r\n")
        self.assertTrue(backend.received().endswith(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"))

    def test_body_producer_backpressure(self) -> None:
        """A backend that reads slowly pauses reading from the client."""
        lb = self.balancer()
        client = lb.client()
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nx")
        backend = lb.acceptConnect()
        producer = backend.transport.producer
        self.assertIsNotNone(producer)
        producer.pauseProducing()
        self.assertEqual(client.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")
        client.send(b"y" * 99)
        self.assertIsNone(backend.transport.producer)

    def test_pending_body_pauses_client(self) -> None:
        """More than 64 KiB of body waiting for a connection pauses the client until connected."""
        lb = self.balancer()
        client = lb.client()
        size = PENDING_LIMIT * 2
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % (size,))
        client.send(b"a" * (PENDING_LIMIT // 2))
        self.assertEqual(client.transport.producerState, "producing")
        client.send(b"b" * (PENDING_LIMIT // 2 + 1))
        self.assertEqual(client.transport.producerState, "paused")
        backend = lb.acceptConnect()
        self.assertEqual(client.transport.producerState, "producing")
        body = backend.received().split(b"\r\n\r\n", 1)[1]
        self.assertEqual(len(body), PENDING_LIMIT + 1)

    def test_response_streams_with_producer(self) -> None:
        """A streamed response registers the exchange as producer: a paused client pauses the backend, until the response is done."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        self.assertTrue(client.received().endswith(b"5\r\nfirst\r\n"))
        producer = client.transport.producer
        self.assertIsNotNone(producer)
        self.assertTrue(client.transport.streaming)
        producer.pauseProducing()
        self.assertEqual(backend.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(backend.transport.producerState, "producing")
        backend.respond(b"0\r\n\r\n")
        # The exchange is done: a client that stops reading now no longer
        # pauses the (pooled, idle) backend connection.
        producer.pauseProducing()
        self.assertEqual(backend.transport.producerState, "producing")
        producer.resumeProducing()
        self.assertIdle()

    def test_large_content_length_response_streams_with_producer(self) -> None:
        """A large Content-Length response registers a producer too."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000)
        self.assertIsNotNone(client.transport.producer)
        client.transport.producer.pauseProducing()
        self.assertEqual(backend.transport.producerState, "paused")


class FailureTests(ProxyTestCase):
    def test_refused_moves_to_next_backend_once_each(self) -> None:
        """Refused connects move to the next backend, each tried once, then 502 naming the reason."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        tried = [lb.failConnect(), lb.failConnect(), lb.failConnect()]
        self.assertEqual(sorted(tried), ["127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003"])
        self.assertEqual(lb.pendingConnects(), [])
        out = client.received()
        self.assertTrue(out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertIn(b"Content-Type: text/plain", out)
        self.assertIn(b"connection refused", out.split(b"\r\n\r\n", 1)[1])
        self.assertFalse(client.closed)
        self.assertEqual([b.failures for b in lb.pool.backends], [1, 1, 1])
        self.assertIdle()

    def test_refused_then_success(self) -> None:
        """A refused connect followed by a good backend serves the request."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        lb.failConnect(error.TimeoutError())
        lb.acceptConnect().respond(OK)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK"))
        self.assertIdle()

    def test_connect_timeout_reason(self) -> None:
        """A connect timeout on every backend is a 502 that says so."""
        lb = self.balancer(backends=("127.0.0.1:3001",))
        client = lb.client()
        client.send(GET)
        self.assertEqual(lb.pendingConnects()[0].timeout, 3.0)
        lb.failConnect(error.TimeoutError())
        self.assertIn(b"connect timed out", client.received())

    def test_no_backend_503(self) -> None:
        """With no available backend the answer is 503 and nothing is connected."""
        lb = self.balancer()
        for b in lb.pool.backends:
            lb.pool.setHealth(b, "down")
        client = lb.client()
        client.send(GET)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertIn(b"no backend available", client.received())
        self.assertEqual(lb.reactor.tcpClients, [])
        self.assertIdle()

    def test_backend_timeout_504(self) -> None:
        """No response head to a POST within backendTimeout is 504, and the upstream connection is aborted."""
        lb = self.balancer(backendTimeout=10)
        client = lb.client()
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
        backend = lb.acceptConnect()
        lb.reactor.advance(9.9)
        self.assertEqual(client.received(), b"")
        lb.reactor.advance(0.1)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"))
        self.assertTrue(backend.transport.aborted)
        lb.flush()
        self.assertIdle()
        self.assertEqual(lb.upstreams.idleCount(lb.backend("127.0.0.1:3001")), 0)

    def test_idempotent_timeout_retried_once_elsewhere(self) -> None:
        """A GET whose backend says nothing within backendTimeout is sent once to another backend, body and all."""
        lb = self.balancer(backendTimeout=10)
        client = lb.client()
        client.send(b"PUT /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
        frozen = lb.acceptConnect()
        lb.reactor.advance(10)
        self.assertTrue(frozen.transport.aborted)
        self.assertEqual(client.received(), b"")
        (retry,) = lb.pendingConnects()
        self.assertNotEqual(retry.address, "127.0.0.1:3001")
        second = lb.acceptConnect()
        self.assertTrue(second.received().startswith(b"PUT /p HTTP/1.1\r\n"))
        self.assertTrue(second.received().endswith(b"\r\n\r\nhello"))
        second.respond(OK)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(lb.backend("127.0.0.1:3001").failures, 1)
        lb.flush()
        self.assertIdle()

    def test_second_timeout_is_504(self) -> None:
        """A GET that times out on two backends gets 504: a timeout is retried only once."""
        lb = self.balancer(backendTimeout=10)
        client = lb.client()
        client.send(GET)
        lb.acceptConnect()
        lb.reactor.advance(10)
        lb.acceptConnect()
        lb.reactor.advance(10)
        self.assertEqual(lb.pendingConnects(), [])
        self.assertTrue(client.received().startswith(b"HTTP/1.1 504 "))
        lb.flush()
        self.assertIdle()

    def test_timeout_with_no_other_backend_is_504(self) -> None:
        """With no other backend to try, a timed-out GET gets 504, not 502."""
        lb = self.balancer(backends=("127.0.0.1:3001",), backendTimeout=10)
        client = lb.client()
        client.send(GET)
        lb.acceptConnect()
        lb.reactor.advance(10)
        out = client.received()
        self.assertTrue(out.startswith(b"HTTP/1.1 504 "), out)
        self.assertIn(b"no backend answered in time", out)
        lb.flush()
        self.assertIdle()

    def test_backend_timeout_not_after_head(self) -> None:
        """Once the response head has arrived, a slow body is never a 504: each piece may take up to the backend timeout."""
        lb = self.balancer(backendTimeout=10)
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        for piece in (b"c", b"d"):
            lb.reactor.advance(9.5)
            backend.respond(piece)
        self.assertTrue(client.received().endswith(b"abcd"))
        self.assertNotIn(b"504", client.received())
        self.assertFalse(client.transport.aborted)
        self.assertIdle()

    def test_backend_timeout_counts_from_end_of_request(self) -> None:
        """A request body that takes longer than backendTimeout to upload is not a 504."""
        lb = self.balancer(backendTimeout=10, clientTimeout=60)
        client = lb.client()
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n")
        backend = lb.acceptConnect()
        for c in b"abcde":
            lb.reactor.advance(5)
            client.send(bytes([c]))
        self.assertEqual(client.received()[:30], b"", "answered while still uploading")
        self.assertTrue(backend.received().endswith(b"abcde"))
        lb.reactor.advance(5)
        backend.respond(OK)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK"), client.received()[:40])

    def test_client_leaving_cancels_connect(self) -> None:
        """A client leaving while a connect is pending cancels it and frees the backend."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        (pending,) = lb.pendingConnects()
        self.assertEqual(lb.backend(pending.address).active, 1)
        client.leave()
        self.assertTrue(pending.connector.stoppedConnecting)
        self.assertEqual(lb.pendingConnects(), [])
        self.assertIdle()

    def test_client_leaving_aborts_upstream(self) -> None:
        """A client leaving while waiting for the response aborts the upstream connection."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        client.leave()
        self.assertTrue(backend.transport.aborted)
        lb.flush()
        self.assertIdle()
        self.assertEqual(lb.upstreams.idleCount(lb.backend("127.0.0.1:3001")), 0)
        self.assertEqual(lb.requestTimers(), [])

    def test_client_leaving_mid_response(self) -> None:
        """A client leaving mid-response aborts the upstream connection."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        client.leave()
        self.assertTrue(backend.transport.aborted)
        lb.flush()
        self.assertIdle()

    def reuse(self, lb: InMemoryBalancer):
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(OK)
        client.clear()
        backend.clear()
        return client, backend

    def test_reused_connection_closed_retried_fresh(self) -> None:
        """A reused connection that closes before any response byte is retried on a fresh one."""
        lb = self.balancer(backends=("127.0.0.1:3001",))
        client, first = self.reuse(lb)
        client.send(GET)
        self.assertEqual(lb.pendingConnects(), [])
        self.assertTrue(first.received().startswith(b"GET /path"))
        first.close()
        (pending,) = lb.pendingConnects()
        self.assertEqual(pending.address, "127.0.0.1:3001")
        fresh = lb.acceptConnect()
        self.assertTrue(fresh.received().startswith(b"GET /path"))
        fresh.respond(OK)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK"))
        self.assertIdle()

    def test_reused_connection_retried_on_same_backend(self) -> None:
        """The fresh retry after a keep-alive race goes to the same backend, not the next in turn."""
        lb = self.balancer(backends=("127.0.0.1:3001", "127.0.0.1:3002"))
        client, first = self.reuse(lb)
        client.send(GET)
        lb.acceptConnect().respond(OK)
        client.clear()
        client.send(GET)
        self.assertEqual(lb.pendingConnects(), [])
        first.close()
        (pending,) = lb.pendingConnects()
        self.assertEqual(pending.address, "127.0.0.1:3001")
        lb.acceptConnect().respond(OK)
        self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK"))
        self.assertIdle()

    def test_reused_connection_post_not_retried(self) -> None:
        """A POST on a reused connection that closes before any byte is a 502, not retried."""
        lb = self.balancer(backends=("127.0.0.1:3001",))
        client, first = self.reuse(lb)
        client.send(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi")
        first.close()
        self.assertEqual(lb.pendingConnects(), [])
        out = client.received()
        self.assertTrue(out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        self.assertIn(b"connection closed before a complete response", out)
        self.assertIdle()

    def test_broken_response_aborts_client(self) -> None:
        """A backend breaking off mid-body aborts the client connection rather than faking an end."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        backend.close(error.ConnectionLost())
        self.assertTrue(client.transport.aborted)
        self.assertNotIn(b"502", client.received())
        lb.flush()
        self.assertIdle()

    def test_malformed_response_is_502(self) -> None:
        """A malformed response head is a 502 and the upstream connection is dropped."""
        lb = self.balancer()
        client = lb.client()
        client.send(GET)
        backend = lb.acceptConnect()
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        self.assertTrue(client.received().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(backend.transport.aborted)
        self.assertIdle()

    def test_malformed_request_never_reaches_backend(self) -> None:
        """A smuggling attempt is refused and no backend connection is made."""
        lb = self.balancer()
        client = lb.client()
        client.send(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        self.assertTrue(client.received().startswith(b"HTTP/1.1 400 "))
        self.assertEqual(lb.reactor.tcpClients, [])
        self.assertIdle()

    def test_pipelined_503_answers(self) -> None:
        """Many pipelined requests answered 503 at once are all answered."""
        lb = self.balancer()
        for b in lb.pool.backends:
            lb.pool.setHealth(b, "down")
        client = lb.client()
        try:
            client.send(GET * 300)
        except RecursionError:
            self.fail("RecursionError: finishResponse re-enters _process once per request")
        self.assertEqual(client.received().count(b"HTTP/1.1 503 "), 300)
