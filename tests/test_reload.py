"""
Unit tests for Balancer.reload() and Balancer.apply(): a new configuration
applied in place while requests flow, on a fake reactor.
"""

from __future__ import annotations

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from txbalancer import settings as _settings
from txbalancer.balancer import rereadBackendsFiles
from txbalancer.choosers import LeastConn
from txbalancer.config import ConfigError, load_backends, parse_backends
from txbalancer.settings import PoolConfig
from txbalancer.testing import InMemoryBalancer

GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def _tempPath() -> str:
    """A fresh path in a new temporary directory (trial's mktemp writes under
    the current directory when run by pytest)."""
    import os
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="txbalancer-test-"), "file")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def configOf(*pools: tuple[str, str], **values):
    """
    A BalancerConfig of pools given as (name, backends lines with ';').
    """
    return _settings.build(
        [
            PoolConfig(name=name, backends=parse_backends(lines.replace(";", "\n")))
            for name, lines in pools
        ],
        values,
    )


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lb = InMemoryBalancer(["127.0.0.1:3001", "127.0.0.1:3002"])
        self.balancer = self.lb.balancer
        self.logged: list[dict] = []
        self.conns: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def reloadTo(self, *pools, **values):
        config = configOf(*pools, **values)
        self.balancer.reloader = lambda: config
        return self.balancer.reload()

    def request(self):
        """
        One GET through the balancer, answered by the backend it picked:
        the address of that backend.
        """
        client = self.lb.client()
        client.send(GET)
        pending = self.lb.pendingConnects()
        if pending:
            address = pending[0].address
            conn = self.lb.acceptConnect()
            self.conns.append((address, conn))
        else:
            # Served over a kept-alive connection: the one that got it.
            address, conn = next((a, c) for a, c in self.conns if c.received())
            address = "pooled " + address
        conn.clear()
        conn.respond(OK)
        assert client.received().endswith(b"ok"), client.received()
        return address

    def test_added_backend_takes_traffic(self) -> None:
        """A backend added to the configuration gets requests after the reload, and its health checks run."""
        diff = self.reloadTo(("default", "127.0.0.1:3001;127.0.0.1:3002;127.0.0.1:3003"))
        self.assertEqual([s.address for s in diff.pool("default").backends.added],
                         ["127.0.0.1:3003"])
        new = self.lb.backend("127.0.0.1:3003")
        self.assertIn(new, self.lb.checker)
        for _ in range(6):
            client = self.lb.client()
            client.send(GET)
            for attempt in self.lb.pendingConnects():
                self.lb.acceptConnect().respond(OK)
        self.assertGreater(new.requests, 0)
        self.lb.reactor.advance(5)
        self.assertIn("http://127.0.0.1:3003/", self.lb.health.checks)

    def test_removed_backend_finishes_its_requests(self) -> None:
        """A backend removed by a reload finishes its request in flight and gets no new one."""
        client = self.lb.client()
        client.send(GET)
        attempt = self.lb.pendingConnects()[0]
        leaving = self.lb.backend(attempt.address)
        conn = self.lb.acceptConnect()
        stay = "127.0.0.1:3002" if leaving.address == "127.0.0.1:3001" else "127.0.0.1:3001"
        self.reloadTo(("default", stay))
        self.assertNotIn(leaving, self.lb.pool.backends)
        for _ in range(3):
            self.assertTrue(self.request().endswith(stay))
        conn.respond(OK)
        self.assertTrue(client.received().endswith(b"ok"))
        # Its request done, the removed backend's connection is closed.
        self.assertTrue(conn.closed)
        self.assertNotIn(leaving, self.lb.checker)

    def test_unchanged_backends_keep_state(self) -> None:
        """A backend the reload leaves alone keeps its health, counters and kept-alive connections."""
        first = self.lb.backend("127.0.0.1:3001")
        second = self.lb.backend("127.0.0.1:3002")
        self.request()
        self.request()
        self.lb.pool.setHealth(second, "down")
        requests = first.requests
        idle = self.lb.upstreams.idleCount(first)
        self.assertEqual(idle, 1)
        self.reloadTo(("default", "127.0.0.1:3001;127.0.0.1:3002;127.0.0.1:3009 backup"))
        self.assertIs(self.lb.backend("127.0.0.1:3001"), first)
        self.assertEqual(second.state, "down")
        self.assertEqual(first.requests, requests)
        # The next request reuses the pooled connection: no new connect.
        self.assertEqual(self.request(), "pooled 127.0.0.1:3001")
        self.assertEqual(first.requests, requests + 1)

    def test_changed_backend_updated_in_place(self) -> None:
        """A backend whose weight or priority changed is the same backend with the new values."""
        first = self.lb.backend("127.0.0.1:3001")
        first.requests = 7
        self.reloadTo(("default", "127.0.0.1:3001 weight=5;127.0.0.1:3002 priority=1"))
        self.assertIs(self.lb.backend("127.0.0.1:3001"), first)
        self.assertEqual((first.weight, first.requests), (5, 7))
        self.assertTrue(self.lb.backend("127.0.0.1:3002").backup)
        self.assertEqual({self.request() for _ in range(4)},
                         {"127.0.0.1:3001", "pooled 127.0.0.1:3001"})

    def test_broken_file_changes_nothing(self) -> None:
        """A broken configuration raises ConfigError with its reason, is logged, and changes nothing."""
        before = self.balancer.config
        backends = list(self.lb.pool.backends)

        def broken():
            raise ConfigError("unknown flag 'wieght'", "backends.txt", 3)

        self.balancer.reloader = broken
        error = self.assertRaises(ConfigError, self.balancer.reload)
        self.assertEqual(str(error), "backends.txt:3: unknown flag 'wieght'")
        self.assertIs(self.balancer.config, before)
        self.assertEqual(self.lb.pool.backends, backends)
        self.assertTrue(
            any("backends.txt:3: unknown flag" in str(e.get("error")) for e in self.logged)
        )
        # SIGHUP goes the same way without raising into the reactor.
        self.balancer._reloadOnSignal()
        self.assertIn(self.request(), {"127.0.0.1:3001", "127.0.0.1:3002"})
        self.assertIs(self.balancer.config, before)

    def test_config_becomes_the_new_one(self) -> None:
        """After a reload, balancer.config is the new configuration."""
        config = configOf(("default", "127.0.0.1:3001"))
        self.balancer.reloader = lambda: config
        self.balancer.reload()
        self.assertIs(self.balancer.config, config)

    def test_settings_in_place(self) -> None:
        """Strategy, timeouts, limits and health settings change in place, keeping the pool's backends."""
        runtime = self.lb.runtime
        first = self.lb.backend("127.0.0.1:3001")
        diff = self.reloadTo(
            ("default", "127.0.0.1:3001;127.0.0.1:3002"),
            strategy="least-conn", backendTimeout=7, connectTimeout=1,
            healthPath="/healthz", healthInterval=2, queueSize=5, panicThreshold=40,
        )
        self.assertEqual(
            set(diff.pool("default").settings),
            {"strategy", "backendTimeout", "connectTimeout", "healthPath",
             "healthInterval", "queueSize", "panicThreshold"},
        )
        self.assertIs(self.lb.runtime, runtime)
        self.assertIs(self.lb.backend("127.0.0.1:3001"), first)
        self.assertIsInstance(self.lb.pool.chooser, LeastConn)
        self.assertEqual(self.lb.forwarder.backendTimeout, 7)
        self.assertEqual(self.lb.upstreams.connectTimeout, 1)
        self.assertEqual(self.lb.pool.queueSize, 5)
        self.assertEqual(self.lb.pool.panicThreshold, 40)
        self.lb.health.checks.clear()
        self.lb.reactor.advance(5)
        self.assertIn("http://127.0.0.1:3001/healthz", self.lb.health.checks)

    def test_balancer_settings(self) -> None:
        """Trusted proxies and HSTS change at once; a setting that needs a restart is logged as such."""
        self.assertFalse(self.lb.forwarder.isTrusted("203.0.113.7"))
        diff = self.reloadTo(
            ("default", "127.0.0.1:3001;127.0.0.1:3002"),
            trustedProxies="203.0.113.0/24", hsts=60, clientTimeout=5,
        )
        self.assertEqual(set(diff.settings), {"trustedProxies", "hsts", "clientTimeout"})
        self.assertTrue(self.lb.forwarder.isTrusted("203.0.113.7"))
        self.assertEqual(self.lb.forwarder.hsts[1], b"max-age=60")
        self.assertTrue(any(
            "clientTimeout" in str(e.get("settings")) and "restarted" in e["log_format"]
            for e in self.logged if "log_format" in e
        ))

    def test_rebuild_setting_new_runtime(self) -> None:
        """A setting a pool cannot take in place gives it a new runtime; the old one finishes its request, then stops."""
        old = self.lb.runtime
        client = self.lb.client()
        client.send(GET)
        conn = self.lb.acceptConnect()
        self.reloadTo(("default", "127.0.0.1:3001;127.0.0.1:3002"), rise=5)
        self.assertIsNot(self.lb.runtime, old)
        self.assertEqual(self.lb.checker.rise, 5)
        self.assertEqual(self.balancer.retiring, [old])
        other = self.lb.client()
        other.send(GET)
        self.lb.acceptConnect().respond(OK)
        self.assertTrue(other.received().endswith(b"ok"))
        self.lb.reactor.advance(3)
        self.assertEqual(self.balancer.retiring, [old])
        conn.respond(OK)
        self.assertTrue(client.received().endswith(b"ok"))
        self.lb.reactor.advance(1)
        self.assertEqual(self.balancer.retiring, [])
        self.lb.flush()  # its kept-alive connection closes
        self.successResultOf(old.retired)

    def test_pools_swap_at_once(self) -> None:
        """A pool replaced by another serves its request in flight; new requests go to the new pool."""
        client = self.lb.client()
        client.send(GET)
        conn = self.lb.acceptConnect()
        handler = self.balancer.handler
        self.reloadTo(("web", "127.0.0.1:4001"))
        self.assertIs(self.balancer.handler, handler)
        self.assertIs(self.lb.factory.handler, handler)
        self.assertEqual(list(self.balancer.pools), ["web"])
        other = self.lb.client()
        other.send(GET)
        self.assertEqual(self.lb.pendingConnects()[0].address, "127.0.0.1:4001")
        self.lb.acceptConnect().respond(OK)
        conn.respond(OK)
        self.assertTrue(client.received().endswith(b"ok"))
        self.lb.reactor.advance(1)
        self.assertEqual(self.balancer.retiring, [])

    def test_stop_with_retiring_pool(self) -> None:
        """A graceful stop also stops a pool still retiring."""
        self.reloadTo(("web", "127.0.0.1:4001"))
        self.successResultOf(self.lb.stop())
        self.assertEqual(self.balancer.retiring, [])

    def test_nothing_changed(self) -> None:
        """A reload of the same configuration changes nothing and says so."""
        runtime = self.lb.runtime
        backends = list(self.lb.pool.backends)
        diff = self.reloadTo(("default", "127.0.0.1:3001;127.0.0.1:3002"))
        self.assertTrue(diff.empty)
        self.assertIs(self.lb.runtime, runtime)
        self.assertEqual(self.lb.pool.backends, backends)


class BackendsFileTests(SynchronousTestCase):
    def test_reread(self) -> None:
        """By default a reload reads every pool's backends file again."""
        path = _tempPath()
        with open(path, "w") as f:
            f.write("127.0.0.1:3001\n")
        config = _settings.build(
            [PoolConfig(backends=load_backends(path), source=path)], {}
        )
        with open(path, "w") as f:
            f.write("127.0.0.1:3001\n127.0.0.1:3002 weight=2\n")
        new = rereadBackendsFiles(config)
        self.assertEqual([(s.address, s.weight) for s in new.pool("default").backends],
                         [("127.0.0.1:3001", 1), ("127.0.0.1:3002", 2)])

    def test_reload_default_rereads_file(self) -> None:
        """A balancer given no reloader rereads its backends file on reload."""
        path = _tempPath()
        with open(path, "w") as f:
            f.write("127.0.0.1:3001\n")
        config = _settings.build(
            [PoolConfig(backends=load_backends(path), source=path)], {}
        )
        lb = InMemoryBalancer(config=config) if _takesConfig() else None
        if lb is None:
            from twisted.internet.testing import MemoryReactorClock

            from txbalancer.balancer import Balancer

            balancer = Balancer(config=config, reactor=MemoryReactorClock())
        else:
            balancer = lb.balancer
        with open(path, "w") as f:
            f.write("127.0.0.1:3002\n")
        balancer.reload()
        self.assertEqual([b.address for b in balancer.defaultPool.pool.backends],
                         ["127.0.0.1:3002"])
        with open(path, "w") as f:
            f.write("127.0.0.1:3002 wieght=2\n")
        error = self.assertRaises(ConfigError, balancer.reload)
        self.assertIn(f"{path}:1: unknown flag 'wieght'", str(error))
        self.assertEqual([b.address for b in balancer.defaultPool.pool.backends],
                         ["127.0.0.1:3002"])


def _takesConfig() -> bool:
    import inspect

    return "config" in inspect.signature(InMemoryBalancer).parameters


ROUTED = """\
[pool.api]
backends = ["127.0.0.1:3001"]

[pool.web]
backends = ["127.0.0.1:3003"]

[[route]]
path = "/api/"
pool = "api"

[[route]]
pool = "web"
"""

REROUTED = """\
[pool.api]
backends = ["127.0.0.1:3001", "127.0.0.1:3002 weight=2"]
strategy = "least-conn"

[pool.web]
backends = ["127.0.0.1:3003"]

[pool.admin]
backends = ["127.0.0.1:4001"]

[[route]]
path = "/admin/"
pool = "admin"

[[route]]
path = "/api/"
pool = "api"

[[route]]
pool = "web"
"""


class ConfigFileReloadTests(SynchronousTestCase):
    """
    A balancer built from a TOML file reads it again on reload: pools and
    routes change in one step.
    """

    def setUp(self) -> None:
        from txbalancer.config import load_config

        self.path = _tempPath()
        self.write(ROUTED)
        self.lb = InMemoryBalancer(config=load_config(self.path))
        self.balancer = self.lb.balancer

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def route(self, target: bytes) -> str:
        client = self.lb.client()
        client.send(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        (attempt,) = self.lb.pendingConnects()
        address = attempt.address
        self.lb.acceptConnect().respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        )
        self.lb.flush()
        self.assertTrue(client.received().endswith(b"ok"))
        return address

    def test_new_pool_and_route(self) -> None:
        """A pool and a route added to the file serve after the reload; the kept pools keep their runtimes and backends."""
        api = self.balancer.pools["api"]
        kept = api.backend("127.0.0.1:3001")
        self.assertEqual(self.route(b"/admin/x"), "127.0.0.1:3003")
        self.write(REROUTED)
        diff = self.balancer.reload()
        self.assertTrue(diff.routes)
        self.assertEqual([p.name for p in diff.added], ["admin"])
        self.assertEqual(self.route(b"/admin/x"), "127.0.0.1:4001")
        self.assertIs(self.balancer.pools["api"], api)
        self.assertIs(api.backend("127.0.0.1:3001"), kept)
        self.assertIsInstance(api.pool.chooser, LeastConn)
        self.assertIn(self.route(b"/api/x"), {"127.0.0.1:3001", "127.0.0.1:3002"})

    def test_broken_file_changes_nothing(self) -> None:
        """A mistake in the TOML file raises ConfigError naming file and line, and the routes and pools run on."""
        self.write(ROUTED.replace('pool = "web"', 'pool = "wbe"'))
        before = self.balancer.config
        error = self.assertRaises(ConfigError, self.balancer.reload)
        self.assertIn(self.path, str(error))
        self.assertIn("wbe", str(error))
        self.assertIs(self.balancer.config, before)
        self.assertEqual(self.route(b"/other"), "127.0.0.1:3003")

    def test_removed_route_and_pool(self) -> None:
        """A pool and its route taken out of the file: its requests get the remaining routes, and the pool retires."""
        self.write(REROUTED)
        self.balancer.reload()
        self.write(ROUTED)
        diff = self.balancer.reload()
        self.assertEqual([p.name for p in diff.removed], ["admin"])
        self.assertEqual(self.route(b"/admin/x"), "127.0.0.1:3003")
        self.lb.reactor.advance(1)
        self.assertEqual(self.balancer.retiring, [])
        self.assertNotIn("admin", self.balancer.pools)


class RunTimeChangesTests(SynchronousTestCase):
    def test_reload_undoes_run_time_changes(self) -> None:
        """Backends added or removed at run time (the admin API) last until the next reload: it makes the pool what the file says."""
        lb = InMemoryBalancer(["127.0.0.1:3001", "127.0.0.1:3002"])
        runtime = lb.runtime
        (extra,) = parse_backends("127.0.0.1:3009\n")
        runtime.addBackend(extra)
        runtime.removeBackend(lb.backend("127.0.0.1:3002"))
        kept = lb.backend("127.0.0.1:3001")
        config = configOf(("default", "127.0.0.1:3001;127.0.0.1:3002"))
        lb.balancer.reloader = lambda: config
        diff = lb.balancer.reload()
        self.assertEqual(diff.pool("default").backends.describe(), "+1 -1 ~0 =1")
        self.assertEqual([b.address for b in lb.pool.backends],
                         ["127.0.0.1:3001", "127.0.0.1:3002"])
        self.assertIs(lb.backend("127.0.0.1:3001"), kept)


class TCPModeReloadTests(SynchronousTestCase):
    def test_tcp_listener_follows_its_pool(self) -> None:
        """A TCP-mode listener sends new connections to its pool's new runtime after a reload that rebuilt it, and sees backends added in place."""
        from twisted.internet.testing import MemoryReactorClock

        from txbalancer.balancer import Balancer
        from txbalancer.testing import FakeHealthClient

        balancer = Balancer(
            config=configOf(("default", "127.0.0.1:3001"), mode="tcp"),
            reactor=MemoryReactorClock(), healthClient=FakeHealthClient(),
        )
        factory = balancer.tcpFactory()
        balancer.startService()
        self.addCleanup(balancer.stopService)
        balancer.reloader = lambda: configOf(
            ("default", "127.0.0.1:3001;127.0.0.1:3002"), mode="tcp"
        )
        balancer.reload()
        self.assertEqual([b.address for b in factory.pool.backends],
                         ["127.0.0.1:3001", "127.0.0.1:3002"])
        old = balancer.defaultPool
        balancer.reloader = lambda: configOf(
            ("default", "127.0.0.1:3001;127.0.0.1:3002"), mode="tcp", rise=4,
            strategy="ip-hash",
        )
        balancer.reload()
        self.assertIsNot(balancer.defaultPool, old)
        self.assertIs(factory.pool, balancer.defaultPool.pool)
        self.assertTrue(factory.needsClientKey)
