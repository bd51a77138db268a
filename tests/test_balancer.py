"""
Tests for txbalancer.balancer: one Balancer built from settings, started,
serving, and stopped gracefully.
"""

from __future__ import annotations

import io

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from txbalancer import Balancer
from txbalancer.accesslog import AccessLog
from txbalancer.config import ConfigError
from txbalancer.downstream import HTTPServerFactory
from txbalancer.interfaces import IDownstream, IExchange, IStrategy
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


class BuildTests(SynchronousTestCase):
    def test_keyword_settings(self) -> None:
        """Backends are backends-file lines and settings are keyword arguments named as in settings.py."""
        reactor = MemoryReactorClock()
        balancer = Balancer(
            ["127.0.0.1:3001", "127.0.0.1:3002 weight=2"],
            strategy="least-conn",
            healthPath="/healthz",
            backendTimeout=9,
            reactor=reactor,
        )
        runtime = balancer.defaultPool
        self.assertEqual([b.address for b in runtime.pool.backends], ["127.0.0.1:3001", "127.0.0.1:3002"])
        self.assertEqual([b.weight for b in runtime.pool.backends], [1, 2])
        self.assertEqual(type(runtime.pool.chooser).__name__, "LeastConn")
        self.assertEqual(runtime.checker.path, "/healthz")
        self.assertEqual(runtime.forwarder.backendTimeout, 9.0)
        self.assertEqual(balancer.config.pools[0].name, "default")

    def test_bad_setting(self) -> None:
        """An unknown keyword is a ConfigError naming the closest known setting."""
        e = self.assertRaises(ConfigError, Balancer, ["127.0.0.1:3001"], backendTimout=3,
                              reactor=MemoryReactorClock())
        self.assertIn("did you mean 'backendTimeout'", str(e))

    def test_bad_value(self) -> None:
        """A bad value is a ConfigError naming the option."""
        e = self.assertRaises(ConfigError, Balancer, ["127.0.0.1:3001"], strategy="fastest",
                              reactor=MemoryReactorClock())
        self.assertIn("fastest", str(e))

    def test_bad_backend_line(self) -> None:
        """A bad backend line is a ConfigError that says which line."""
        e = self.assertRaises(ConfigError, Balancer, ["127.0.0.1:3001", "127.0.0.1:99999"],
                              reactor=MemoryReactorClock())
        self.assertIn(":2:", str(e))

    def test_server_factory(self) -> None:
        """serverFactory() is the balancer's own HTTP/1.1 listener factory, drained on stop."""
        balancer = Balancer(["127.0.0.1:3001"], reactor=MemoryReactorClock())
        factory = balancer.serverFactory()
        self.assertIsInstance(factory, HTTPServerFactory)
        self.assertIn(factory, balancer.factories)

    def test_interfaces(self) -> None:
        """The proxy's exchange, the HTTP/1.1 front end and every strategy provide their interfaces."""
        from txbalancer.choosers import STRATEGIES

        lb = InMemoryBalancer(["127.0.0.1:3001"])
        client = lb.client()
        client.send(GET)
        verifyObject(IDownstream, client.protocol)
        verifyObject(IExchange, client.protocol._exchange)
        for cls in STRATEGIES.values():
            verifyObject(IStrategy, cls())

    def test_fakes_provide_the_interfaces(self) -> None:
        """The fakes of txbalancer.testing are checked against the interfaces they stand in for."""
        from txbalancer.testing import RecordingHandler, serverProtocol

        handler = RecordingHandler()
        factory = HTTPServerFactory(handler, MemoryReactorClock())
        protocol, transport = serverProtocol(factory)
        protocol.dataReceived(GET)
        (exchange,) = handler.exchanges
        verifyObject(IExchange, exchange)
        verifyObject(IDownstream, protocol)


class InMemoryTests(SynchronousTestCase):
    def test_health_checks_run_on_the_clock(self) -> None:
        """The in-memory balancer runs real health checks on its fake clock: a failing backend goes down."""
        lb = InMemoryBalancer(["127.0.0.1:3001", "127.0.0.1:3002"])
        from twisted.internet.error import ConnectionRefusedError

        lb.health.answers["127.0.0.1:3002"] = ConnectionRefusedError()
        for _ in range(4):
            lb.reactor.advance(5)
        self.assertEqual(lb.backend("127.0.0.1:3002").state, "down")
        self.assertEqual(lb.backend("127.0.0.1:3001").state, "up")
        client = lb.client()
        client.send(GET)
        self.assertEqual(lb.pendingConnects()[0].address, "127.0.0.1:3001")

    def test_ejection(self) -> None:
        """Failed requests in a row eject a backend (passive outlier detection is wired)."""
        lb = InMemoryBalancer(["127.0.0.1:3001", "127.0.0.1:3002"], ejectAfter=2)
        for _ in range(4):
            client = lb.client()
            client.send(GET)
            while lb.pendingConnects():
                attempt = lb.pendingConnects()[0]
                if attempt.address == "127.0.0.1:3002":
                    lb.failConnect()
                else:
                    lb.acceptConnect().respond(OK)
        self.assertEqual(lb.backend("127.0.0.1:3002").state, "down")


class LifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lb = InMemoryBalancer(backends=("127.0.0.1:3001",))
        self.service = self.lb.balancer
        self.service.listenOn(FakeEndpoint(self.lb.reactor, 8000), self.lb.factory)

    def tearDown(self) -> None:
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_start_listens_and_starts_sweep(self) -> None:
        """Starting listens on each endpoint and starts the idle sweep and the pool."""
        self.assertEqual([p for p, *_ in self.lb.reactor.tcpServers], [8000])
        self.assertTrue(self.lb.upstreams._sweeper.running)
        self.assertTrue(self.lb.pool.running)
        self.assertTrue(self.lb.checker.running)

    def test_stop_when_idle(self) -> None:
        """Stopping with nothing in flight finishes at once and cancels every timer."""
        client = self.lb.client()
        d = self.service.stopService()
        self.assertTrue(client.closed)
        self.lb.flush()
        self.successResultOf(d)
        self.assertFalse(self.lb.pool.running)
        self.assertFalse(self.lb.checker.running)
        self.assertFalse(self.lb.upstreams._sweeper.running)
        self.assertFalse(self.service.running)
        self.assertEqual(self.lb.reactor.getDelayedCalls(), [])

    def test_stop_waits_for_request_in_flight(self) -> None:
        """Stopping waits for a request in flight, which completes with Connection: close."""
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
        balancer = Balancer(["127.0.0.1:3001"], reactor=MemoryReactorClock())
        balancer.accessLog = AccessLog(stream, balancer.reactor.seconds)
        balancer.startService()
        self.successResultOf(balancer.stopService())
        self.assertTrue(stream.closed)


ROUTED = """\
[pool.api]
backends = ["127.0.0.1:3001"]
[pool.admin]
backends = ["127.0.0.1:4001"]
[pool.web]
backends = ["127.0.0.1:3003"]

[[route]]
path = "/api/"
pool = "api"
strip_prefix = true
[[route]]
host = "admin.example.com"
path = "/admin/"
pool = "admin"
[[route]]
pool = "web"
"""


def _configFrom(text: str) -> object:
    import os
    import tempfile

    from txbalancer.config import load_config

    directory = tempfile.mkdtemp(prefix="txbalancer-test-")
    path = os.path.join(directory, "balancer.toml")
    with open(path, "w") as f:
        f.write(text)
    return load_config(path)


class RoutingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lb = InMemoryBalancer(config=_configFrom(ROUTED))

    def route(self, host: bytes, target: bytes) -> tuple[str, bytes]:
        """Send one request; return the address of the backend it reached and what it received."""
        client = self.lb.client()
        client.send(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        (attempt,) = self.lb.pendingConnects()
        address = attempt.address
        backend = self.lb.acceptConnect()
        sent = backend.received()
        # Not kept alive: each request makes a connect, whose address tells the pool.
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        self.lb.flush()
        self.assertTrue(client.received().endswith(b"ok"))
        return address, sent

    def test_prefix_is_stripped(self) -> None:
        """/api/x reaches pool api's backend as /x, the query kept, and /api as /."""
        address, sent = self.route(b"www.example.com", b"/api/x?q=%20")
        self.assertEqual(address, "127.0.0.1:3001")
        self.assertTrue(sent.startswith(b"GET /x?q=%20 HTTP/1.1\r\n"), sent)
        self.assertIn(b"\r\nHost: www.example.com\r\n", sent)
        address, sent = self.route(b"www.example.com", b"/api")
        self.assertTrue(sent.startswith(b"GET / HTTP/1.1\r\n"), sent)

    def test_host_and_path(self) -> None:
        """/admin/ on admin.example.com reaches pool admin unchanged; elsewhere it goes to the default."""
        address, sent = self.route(b"Admin.Example.com:8080", b"/admin/users")
        self.assertEqual(address, "127.0.0.1:4001")
        self.assertTrue(sent.startswith(b"GET /admin/users HTTP/1.1\r\n"), sent)
        self.assertIn(b"\r\nHost: Admin.Example.com:8080\r\n", sent)
        address, _ = self.route(b"www.example.com", b"/admin/")
        self.assertEqual(address, "127.0.0.1:3003")
        address, sent = self.route(b"admin.example.com", b"/apix")
        self.assertEqual(address, "127.0.0.1:3003")
        self.assertTrue(sent.startswith(b"GET /apix HTTP/1.1\r\n"))

    def test_handler_is_the_router(self) -> None:
        """With routes the handler hands requests to the router; without, to the one pool's forwarder itself."""
        from txbalancer.balancer import Router

        self.assertIsInstance(self.lb.balancer.handler.current, Router)
        self.assertIs(self.lb.balancer.router, self.lb.balancer.handler.current)
        plain = InMemoryBalancer(["127.0.0.1:3001"])
        self.assertIs(plain.balancer.handler.current, plain.forwarder)
        self.assertIsNone(plain.balancer.router)


class NotFoundTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = io.StringIO()
        config = _configFrom(ROUTED.replace('[[route]]\npool = "web"\n', ""))
        self.lb = InMemoryBalancer(config=config, accessLog=AccessLog(self.log, lambda: 0.0))
        self.lb.balancer.router.accessLog = self.lb.forwarder.accessLog

    def test_no_route_is_404(self) -> None:
        """A request no route matches gets 404 with a short body, reaches no backend, and is counted."""
        client = self.lb.client()
        client.send(b"POST /other HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        response = client.received()
        self.assertTrue(response.startswith(b"HTTP/1.1 404 "), response)
        self.assertTrue(response.endswith(b"no route for this host and path\n"), response)
        self.assertEqual(self.lb.pendingConnects(), [])
        self.assertEqual(self.lb.balancer.router.notFound, 1)
        self.assertEqual(self.lb.factory.counters.get("refused"), 1)
        self.assertIn('"POST /other HTTP/1.1" 404 0', self.log.getvalue())

    def test_keep_alive_after_404(self) -> None:
        """After a 404 the connection serves the next request, which is routed."""
        client = self.lb.client()
        client.send(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /api/y HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(client.received().startswith(b"HTTP/1.1 404 "))
        self.assertFalse(client.closed)
        (attempt,) = self.lb.pendingConnects()
        self.assertEqual(attempt.address, "127.0.0.1:3001")
        self.assertTrue(self.lb.acceptConnect().received().startswith(b"GET /y HTTP/1.1"))

    def test_interface(self) -> None:
        """The exchange of an unrouted request provides IExchange."""
        from txbalancer.balancer import NotFound

        verifyObject(IExchange, NotFound(self.lb.balancer.router, None, None))


class AgreementTests(SynchronousTestCase):
    """
    Several balancers built from the same configuration agree on where a
    client goes without talking to each other.
    """

    def test_ip_hash_agrees(self) -> None:
        """Two balancers from one config file send each client address to the same backend of each pool."""
        text = (
            '[pool.a]\nstrategy = "ip-hash"\nbackends = ["127.0.0.1:3001", "127.0.0.1:3002",'
            ' "127.0.0.1:3003 weight=2", "127.0.0.1:3004"]\n'
            '[pool.b]\nstrategy = "ip-hash"\nbackends = ["127.0.0.1:4001", "127.0.0.1:4002"]\n'
        )
        one = Balancer(config=_configFrom(text), reactor=MemoryReactorClock())
        two = Balancer(config=_configFrom(text), reactor=MemoryReactorClock())
        for name in ("a", "b"):
            chosen = set()
            for i in range(50):
                key = f"198.51.100.{i}"
                first = one.pools[name].pool.choose(None, set(), key)
                second = two.pools[name].pool.choose(None, set(), key)
                self.assertEqual(first.address, second.address)
                chosen.add(first.address)
            self.assertGreater(len(chosen), 1)

    def test_sticky_secret_file(self) -> None:
        """Balancers sharing --sticky-secret-file give a backend the same cookie and honour each other's."""
        import os
        import tempfile

        secret = os.path.join(tempfile.mkdtemp(prefix="txbalancer-test-"), "secret")
        with open(secret, "w") as f:
            f.write("correct horse battery staple\n")
        lines = ["127.0.0.1:3001", "127.0.0.1:3002"]
        one = Balancer(lines, stickyCookie="lb", stickySecretFile=secret, reactor=MemoryReactorClock())
        two = Balancer(lines, stickyCookie="lb", stickySecretFile=secret, reactor=MemoryReactorClock())
        other = Balancer(lines, stickyCookie="lb", reactor=MemoryReactorClock())
        for backend in one.defaultPool.pool.backends:
            cookie = one.defaultPool.pool.cookieFor(backend)
            self.assertEqual(two.defaultPool.pool.backendForCookie(cookie).address, backend.address)
            self.assertIsNone(other.defaultPool.pool.backendForCookie(cookie))

    def test_short_sticky_secret(self) -> None:
        """A sticky secret file of fewer than 16 bytes stops the balancer with an error naming it."""
        import os
        import tempfile

        secret = os.path.join(tempfile.mkdtemp(prefix="txbalancer-test-"), "secret")
        with open(secret, "w") as f:
            f.write("short\n")
        e = self.assertRaises(ConfigError, Balancer, ["127.0.0.1:3001"],
                              stickySecretFile=secret, reactor=MemoryReactorClock())
        self.assertIn(secret, str(e))
        self.assertIn("at least 16", str(e))


class ChangingBackendsTests(SynchronousTestCase):
    """
    Backends added and removed while requests flow (what reload, the admin
    API and DNS discovery build on).
    """

    def setUp(self) -> None:
        self.lb = InMemoryBalancer(["127.0.0.1:3001"])
        self.runtime = self.lb.runtime

    def test_added_backend_takes_requests_and_is_checked(self) -> None:
        """An added backend takes requests at once and its health checks run."""
        from txbalancer.testing import backendSpecs

        (spec,) = backendSpecs("127.0.0.1:3002 weight=3")
        backend = self.runtime.addBackend(spec)
        self.assertIn(backend, self.lb.checker)
        for _ in range(4):
            client = self.lb.client()
            client.send(GET)
            if self.lb.pendingConnects():
                self.lb.acceptConnect().respond(OK)
        self.assertEqual(backend.requests, 3)
        self.lb.reactor.advance(5)
        self.assertIn("http://127.0.0.1:3002/", self.lb.health.checks)

    def test_removed_backend_finishes_requests_in_flight(self) -> None:
        """A removed backend takes no new request, finishes the one in flight, then is gone."""
        from txbalancer.testing import backendSpecs

        (spec,) = backendSpecs("127.0.0.1:3002")
        second = self.runtime.addBackend(spec)
        first = self.lb.backend("127.0.0.1:3001")
        client = self.lb.client()
        client.send(GET)
        conn = self.lb.acceptConnect()
        self.assertEqual(first.active, 1)
        d = self.runtime.removeBackend(first)
        self.assertNoResult(d)
        other = self.lb.client()
        other.send(GET)
        self.assertEqual(self.lb.pendingConnects()[0].address, "127.0.0.1:3002")
        self.lb.acceptConnect().respond(OK)
        conn.respond(OK)
        self.assertTrue(client.received().endswith(b"ok"))
        self.successResultOf(d)
        self.assertNotIn(first, self.lb.pool.backends)
        self.assertNotIn(first, self.lb.checker)
        self.assertEqual([b.address for b in self.lb.pool.backends], [second.address])

    def test_update_keeps_state(self) -> None:
        """Updating a backend's weight keeps its counters and health."""
        from txbalancer.testing import backendSpecs

        backend = self.lb.backend("127.0.0.1:3001")
        backend.requests = 7
        (spec,) = backendSpecs("127.0.0.1:3001 weight=5")
        self.lb.pool.update(backend, spec)
        self.assertEqual(backend.weight, 5)
        self.assertEqual(backend.requests, 7)
        self.assertIn(backend, self.lb.checker)


class RedirectHttpsTests(SynchronousTestCase):
    def redirected(self, tlsEndpoint: str, host: bytes = b"example.com:8080") -> bytes:
        from txbalancer.settings import BalancerConfig, ListenerConfig, PoolConfig, build
        from txbalancer.testing import backendSpecs
        from txbalancer.tls import CertSpec

        config = build(
            [PoolConfig(backends=backendSpecs("127.0.0.1:3001"))],
            {"redirectHttps": True},
            listeners=[ListenerConfig("tcp:8080"),
                       ListenerConfig(tlsEndpoint, tls=CertSpec("cert.pem", "key.pem"))],
        )
        self.assertIsInstance(config, BalancerConfig)
        lb = InMemoryBalancer(config=config)
        client = lb.client()
        client.send(b"GET /a?b=1 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        self.assertEqual(lb.pendingConnects(), [])
        head = client.received().split(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 301 "), head)
        (location,) = [line for line in head.split(b"\r\n") if line.startswith(b"Location: ")]
        return location[len(b"Location: "):]

    def test_redirect_keeps_the_tls_port(self) -> None:
        """--redirect-https sends plain-HTTP clients to the TLS listener's port when it is not 443."""
        self.assertEqual(self.redirected("tcp:8443"), b"https://example.com:8443/a?b=1")

    def test_redirect_to_443_names_no_port(self) -> None:
        """With the TLS listener on 443 the redirect names no port."""
        self.assertEqual(self.redirected("tcp:443:interface=127.0.0.1"), b"https://example.com/a?b=1")

    def test_redirect_ipv6_host(self) -> None:
        """An IPv6 literal host keeps its brackets, and gets the TLS port."""
        self.assertEqual(self.redirected("tcp:8443", b"[::1]:8080"), b"https://[::1]:8443/a?b=1")
