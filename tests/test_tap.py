"""
Tests for txbalancer.tap: the command line and the wiring of the service tree.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.downstream import HTTPServerFactory
from txbalancer.balancer import Balancer
from txbalancer.tap import Options, makeService


def _tempPath() -> str:
    """A fresh path in a new temporary directory (trial's mktemp writes under
    the current directory when run by pytest)."""
    import tempfile

    return os.path.join(tempfile.mkdtemp(prefix="txbalancer-test-"), "file")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backends = _tempPath()
        with open(self.backends, "w") as f:
            f.write("# test\n127.0.0.1:3001\n127.0.0.1:3002 weight=2\n")

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_defaults(self) -> None:
        """Every option has the documented default."""
        config = self.parse("--backends", self.backends)["config"]
        (pool,) = config.pools
        self.assertEqual([listener.endpoint for listener in config.listeners], ["tcp:8000"])
        self.assertEqual(pool.strategy, "round-robin")
        self.assertEqual(config.trustedProxies, ())
        self.assertEqual(pool.connectTimeout, 3.0)
        self.assertEqual(pool.backendTimeout, 60.0)
        self.assertEqual(config.clientTimeout, 60.0)
        self.assertIsNone(config.accessLog)
        self.assertIsNone(config.maxBodySize)
        self.assertEqual(pool.maxIdlePerBackend, 64)
        self.assertEqual(pool.upstreamIdleTimeout, 4.0)
        self.assertEqual(pool.healthStatus, (200, 399))
        self.assertEqual(config.drainTimeout, 30.0)
        self.assertEqual(pool.name, "default")
        self.assertEqual(pool.source, self.backends)
        self.assertEqual([s.address for s in pool.backends], ["127.0.0.1:3001", "127.0.0.1:3002"])
        self.assertEqual([s.weight for s in pool.backends], [1, 2])

    def test_srv_backends(self) -> None:
        """--backends srv:NAME makes a pool of that source with no backends yet; --dns-server is the balancer's resolver."""
        config = self.parse(
            "--backends", "srv:_http._tcp.web.service.consul", "--dns-server", "127.0.0.1:8600"
        )["config"]
        (pool,) = config.pools
        self.assertEqual((pool.source, pool.backends), ("srv:_http._tcp.web.service.consul", ()))
        self.assertEqual(config.dnsServer, "127.0.0.1:8600")

    def test_bad_dns_server(self) -> None:
        """A --dns-server that is no IP address and port is a usage error saying so."""
        e = self.assertRaises(
            usage.UsageError, self.parse, "--backends", self.backends, "--dns-server", "consul"
        )
        self.assertIn("--dns-server", str(e))

    def test_port_repeatable(self) -> None:
        """--port may be given several times; a bare number means tcp:N, anything else goes to Twisted as it is."""
        options = self.parse(
            "--port", "8080", "--port", "tcp:9000:interface=127.0.0.1", "-p", "0",
            "--port", "unix:/tmp/lb.sock", "--backends", self.backends,
        )
        self.assertEqual(
            [listener.endpoint for listener in options["config"].listeners],
            ["tcp:8080", "tcp:9000:interface=127.0.0.1", "tcp:0", "unix:/tmp/lb.sock"],
        )

    def test_bad_port(self) -> None:
        """A bad --port is a usage error naming the value."""
        e = self.assertRaises(usage.UsageError, self.parse, "--port", "99999", "--backends", self.backends)
        self.assertIn("99999", str(e))

    def test_values(self) -> None:
        """Numeric options are parsed, sizes take suffixes, CIDRs become networks."""
        options = self.parse(
            "--backends", self.backends,
            "--connect-timeout", "1.5", "--backend-timeout", "5", "--client-timeout", "7",
            "--max-body-size", "1k", "--max-idle-per-backend", "3",
            "--upstream-idle-timeout", "2", "--drain-timeout", "1",
            "--trusted-proxies", "10.0.0.0/8,::1/128",
        )
        config = options["config"]
        (pool,) = config.pools
        self.assertEqual(pool.connectTimeout, 1.5)
        self.assertEqual(pool.backendTimeout, 5.0)
        self.assertEqual(config.clientTimeout, 7.0)
        self.assertEqual(config.maxBodySize, 1024)
        self.assertEqual(pool.maxIdlePerBackend, 3)
        self.assertEqual(len(config.trustedProxies), 2)

    def test_bad_number(self) -> None:
        """A non-numeric timeout or count is a usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--backends", self.backends, "--connect-timeout", "soon")
        self.assertRaises(usage.UsageError, self.parse, "--backends", self.backends, "--max-idle-per-backend", "-1")

    def test_bad_cidr(self) -> None:
        """A bad --trusted-proxies value is a usage error."""
        self.assertRaises(usage.UsageError, self.parse, "--backends", self.backends, "--trusted-proxies", "nope")

    def test_unknown_strategy(self) -> None:
        """An unknown --strategy is a usage error that lists the valid ones."""
        e = self.assertRaises(
            usage.UsageError, self.parse, "--backends", self.backends, "--strategy", "fastest"
        )
        self.assertIn("fastest", str(e))
        self.assertIn("round-robin", str(e))

    def test_missing_backends(self) -> None:
        """Without --backends (or --config) it is a usage error."""
        e = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn("--backends", str(e))

    def test_broken_backends_file(self) -> None:
        """A bad line in the backends file stops start-up with FILE:LINE: in one line."""
        with open(self.backends, "w") as f:
            f.write("127.0.0.1:3001\n\n127.0.0.1:3001\n")
        e = self.assertRaises(SystemExit, self.parse, "--backends", self.backends)
        message = str(e.code)
        self.assertIn(f"{self.backends}:3:", message)
        self.assertEqual(len(message.splitlines()), 1)

    def test_missing_backends_file(self) -> None:
        """A missing backends file stops start-up with a message naming it."""
        missing = _tempPath()
        e = self.assertRaises(SystemExit, self.parse, "--backends", missing)
        self.assertIn(missing, str(e.code))

    def test_help_lists_every_option(self) -> None:
        """--help text shows every option of the contract."""
        text = str(Options())
        for name in (
            "--port", "--backends", "--strategy", "--trusted-proxies", "--connect-timeout",
            "--backend-timeout", "--client-timeout", "--access-log", "--max-body-size",
            "--max-idle-per-backend", "--upstream-idle-timeout", "--drain-timeout",
        ):
            self.assertIn(name, text)


CONFIG = """\
[[listen]]
endpoint = "tcp:8100"

[pool.api]
backends = ["127.0.0.1:3001"]
backend-timeout = 30
[pool.web]
backends = ["127.0.0.1:3003"]

[[route]]
path = "/api"
pool = "api"
[[route]]
pool = "web"

[balancer]
backend-timeout = 20
client-timeout = 10
"""


class ConfigFileOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = _tempPath() + ".toml"
        with open(self.config, "w") as f:
            f.write(CONFIG)

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_config_alone(self) -> None:
        """--config FILE needs no --backends: its pools, routes and listeners are the configuration."""
        config = self.parse("--config", self.config)["config"]
        self.assertEqual([p.name for p in config.pools], ["api", "web"])
        self.assertEqual([p.backendTimeout for p in config.pools], [30.0, 20.0])
        self.assertEqual([r.pool for r in config.routes], ["api", "web"])
        self.assertEqual([listener.endpoint for listener in config.listeners], ["tcp:8100"])
        self.assertEqual(config.configFile, self.config)

    def test_command_line_overrides_the_file(self) -> None:
        """An option on the command line wins over [balancer] and over a pool's own table; --port replaces [[listen]]."""
        config = self.parse(
            "--config", self.config, "--backend-timeout", "5", "--client-timeout", "3",
            "--port", "9001",
        )["config"]
        self.assertEqual([p.backendTimeout for p in config.pools], [5.0, 5.0])
        self.assertEqual(config.clientTimeout, 3.0)
        self.assertEqual([listener.endpoint for listener in config.listeners], ["tcp:9001"])

    def test_broken_config_file(self) -> None:
        """A mistake in the config file stops start-up with one line: txbalancer: FILE:LINE: message."""
        with open(self.config, "a") as f:
            f.write("client-timout = 3\n")
        e = self.assertRaises(SystemExit, self.parse, "--config", self.config)
        message = str(e.code)
        self.assertTrue(message.startswith(f"txbalancer: {self.config}:19: unknown key"), message)
        self.assertIn("did you mean 'client-timeout'", message)
        self.assertEqual(len(message.splitlines()), 1)

    def test_backends_without_pools(self) -> None:
        """--backends with a config file that has no pools gives it the pool named default."""
        backends = _tempPath()
        with open(backends, "w") as f:
            f.write("127.0.0.1:3009\n")
        with open(self.config, "w") as f:
            f.write("[balancer]\nstrategy = 'least-conn'\n")
        config = self.parse("--config", self.config, "--backends", backends)["config"]
        (pool,) = config.pools
        self.assertEqual((pool.name, pool.strategy), ("default", "least-conn"))
        self.assertEqual([b.address for b in pool.backends], ["127.0.0.1:3009"])

    def test_routed_service(self) -> None:
        """makeService builds a routed balancer from --config and listens on the file's listener."""
        options = self.parse("--config", self.config)
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        service.startService()
        self.assertEqual([port for port, *_ in reactor.tcpServers], [8100])
        self.assertEqual(sorted(service.pools), ["api", "web"])
        self.assertIsNotNone(service.router)
        self.successResultOf(service.stopService())

    def test_help_shows_config(self) -> None:
        """--help lists --config and --sticky-secret-file."""
        text = str(Options())
        self.assertIn("--config", text)
        self.assertIn("--sticky-secret-file", text)


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.backends = _tempPath()
        with open(self.backends, "w") as f:
            f.write("127.0.0.1:3001\n127.0.0.1:3002\n")

    def service(self, *args: str):
        options = Options()
        options.parseOptions(["--backends", self.backends, *args])
        reactor = MemoryReactorClock()
        return makeService(options, reactor), reactor

    def test_reload_rereads_the_backends_file(self) -> None:
        """SIGHUP's reload reads the backends file again, with the command line's settings kept."""
        service, reactor = self.service("--backend-timeout", "7")
        service.startService()
        self.addCleanup(service.stopService)
        with open(self.backends, "w") as f:
            f.write("127.0.0.1:3001\n127.0.0.1:3003 weight=3\n")
        service.reload()
        pool = service.config.pool("default")
        self.assertEqual([(s.address, s.weight) for s in pool.backends],
                         [("127.0.0.1:3001", 1), ("127.0.0.1:3003", 3)])
        self.assertEqual(pool.backendTimeout, 7)
        self.assertEqual(
            [b.address for b in service.defaultPool.pool.backends],
            ["127.0.0.1:3001", "127.0.0.1:3003"],
        )

    def test_reload_rereads_the_config_file(self) -> None:
        """With --config, SIGHUP's reload reads the file again and the command line still overrides it."""
        path = _tempPath()
        with open(path, "w") as f:
            f.write('[pool.web]\nbackends = ["127.0.0.1:3001"]\nbackend-timeout = 20\n')
        options = Options()
        options.parseOptions(["--config", path, "--connect-timeout", "1"])
        service = makeService(options, MemoryReactorClock())
        service.startService()
        self.addCleanup(service.stopService)
        with open(path, "w") as f:
            f.write('[pool.web]\nbackends = ["127.0.0.1:3001", "127.0.0.1:3002"]\n'
                    'backend-timeout = 30\nconnect-timeout = 9\n')
        service.reload()
        pool = service.config.pool("web")
        self.assertEqual([s.address for s in pool.backends], ["127.0.0.1:3001", "127.0.0.1:3002"])
        self.assertEqual((pool.backendTimeout, pool.connectTimeout), (30, 1))
        self.assertEqual(service.pools["web"].forwarder.backendTimeout, 30)

    def test_listens_on_each_port(self) -> None:
        """makeService listens on every --port once started, and stops cleanly."""
        service, reactor = self.service("--port", "8081", "--port", "tcp:8082:interface=127.0.0.1")
        self.assertIsInstance(service, Balancer)
        self.assertEqual(reactor.tcpServers, [])
        service.startService()
        self.assertEqual(
            [(port, interface) for port, factory, backlog, interface in reactor.tcpServers],
            [(8081, ""), (8082, "127.0.0.1")],
        )
        for _, factory, _, _ in reactor.tcpServers:
            self.assertIsInstance(factory, HTTPServerFactory)
        self.assertTrue(service.running)
        self.successResultOf(service.stopService())
        self.assertFalse(service.running)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_any_twisted_endpoint(self) -> None:
        """A --port that is not a number goes to Twisted's endpoint parser: a unix socket listens too."""
        path = _tempPath()
        service, reactor = self.service("--port", f"unix:{path}")
        service.startService()
        self.assertEqual([address for address, *_ in reactor.unixServers], [path])
        self.successResultOf(service.stopService())

    def test_bad_endpoint(self) -> None:
        """An endpoint string Twisted cannot parse is a usage error naming it."""
        options = Options()
        e = self.assertRaises(
            usage.UsageError, options.parseOptions,
            ["--backends", self.backends, "--port", "nosuch:1234"],
        )
        self.assertIn("nosuch:1234", str(e))

    def test_options_reach_the_parts(self) -> None:
        """Timeouts and limits from the command line reach the factory, forwarder and pool."""
        service, reactor = self.service(
            "--client-timeout", "7", "--backend-timeout", "9", "--max-body-size", "100",
            "--connect-timeout", "2", "--max-idle-per-backend", "5", "--upstream-idle-timeout", "3",
            "--drain-timeout", "11",
        )
        (factory,) = service.factories
        self.assertEqual(factory.clientTimeout, 7.0)
        self.assertEqual(factory.maxBodySize, 100)
        self.assertIs(factory.reactor, reactor)
        runtime = service.defaultPool
        self.assertEqual(runtime.forwarder.backendTimeout, 9.0)
        self.assertEqual(runtime.upstreams.connectTimeout, 2.0)
        self.assertEqual(runtime.upstreams.maxIdlePerBackend, 5)
        self.assertEqual(runtime.upstreams.idleTimeout, 3.0)
        self.assertEqual(service.config.drainTimeout, 11.0)
        self.assertEqual(len(runtime.pool.backends), 2)

    def test_access_log_file(self) -> None:
        """--access-log FILE opens the file; stopping closes it."""
        path = _tempPath()
        service, reactor = self.service("--access-log", path)
        service.startService()
        self.successResultOf(service.stopService())
        self.assertTrue(service.accessLog.stream.closed)


class PureImportTests(SynchronousTestCase):
    def test_pure_modules_leave_reactor_alone(self) -> None:
        """Importing the pure modules (config, settings, request, framing, backend, choosers, headers, routing) does not import the reactor."""
        code = (
            "import sys\n"
            "import txbalancer.config, txbalancer.backend, txbalancer.choosers, txbalancer.headers\n"
            "import txbalancer.routing, txbalancer.settings, txbalancer.request, txbalancer.framing\n"
            "bad = [m for m in sys.modules if m == 'twisted.internet.reactor']\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_tap_leaves_reactor_alone(self) -> None:
        """Importing txbalancer.tap (as twistd --help does) does not import the reactor."""
        code = (
            "import sys\nimport txbalancer.tap\n"
            "sys.exit(1 if 'twisted.internet.reactor' in sys.modules else 0)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
