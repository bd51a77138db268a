"""
Tests for txbalancer.admin: /status, /metrics, the runtime API, the token
and loopback rules, on an in-memory balancer (fake clock, no sockets).
"""

from __future__ import annotations

import json
import os
import tempfile

from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from txbalancer import Balancer
from txbalancer.admin import checkExposure
from txbalancer.config import ConfigError
from txbalancer.settings import BalancerConfig, PoolConfig
from txbalancer.stats import BUCKETS, ResponseStats, percentile
from txbalancer.testing import InMemoryBalancer, backendSpecs

GET = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"


def ok(status: int = 200, body: bytes = b"ok") -> bytes:
    # Connection: close, so that each request makes a new backend connection.
    return (b"HTTP/1.1 %d X\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body))


class AdminCase(SynchronousTestCase):
    """
    An in-memory balancer and a treq client on its admin resource.
    """

    token = None
    backends = ("127.0.0.1:3001", "127.0.0.1:3002")

    def setUp(self) -> None:
        self.lb = InMemoryBalancer(self.backends)
        self.stub = StubTreq(self.lb.balancer.adminResource(token=self.token))

    def call(self, method: str, path: str, body=None, headers=None, host="127.0.0.1:9000"):
        """
        One request to the admin server: (code, headers, body bytes).
        """
        h = Headers({b"Host": [host.encode()]})
        for name, value in (headers or {}).items():
            h.setRawHeaders(name.encode(), [value.encode()])
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        d = self.stub.request(method, f"http://127.0.0.1:9000{path}", headers=h, data=data)
        self.stub.flush()
        response = self.successResultOf(d)
        content = self.stub.content(response)
        self.stub.flush()
        return response.code, response.headers, self.successResultOf(content)

    def json(self, method: str, path: str, body=None, **kwargs):
        code, _, content = self.call(method, path, body, **kwargs)
        return code, json.loads(content)

    def serve(self, n: int, status: int = 200, advance: float = 0.0) -> None:
        """
        C{n} requests, each answered C{status} after C{advance} seconds.
        """
        for _ in range(n):
            client = self.lb.client()
            client.send(GET)
            conn = self.lb.acceptConnect()
            if advance:
                self.lb.reactor.advance(advance)
            conn.respond(ok(status))
            self.lb.flush()


class StatusTests(AdminCase):
    def test_shape(self) -> None:
        """/status has DESIGN.md's shape: pools by name with strategy and backends, and workers."""
        code, status = self.json("GET", "/status")
        self.assertEqual(code, 200)
        self.assertEqual(status["workers"], 1)
        pool = status["pools"]["default"]
        self.assertEqual(pool["strategy"], "round-robin")
        self.assertEqual([b["address"] for b in pool["backends"]], list(self.backends))
        b = pool["backends"][0]
        for key in ("address", "state", "weight", "in_flight", "requests", "responses",
                    "latency_ms"):
            self.assertIn(key, b)
        self.assertEqual(b["responses"], {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0})
        self.assertEqual(b["latency_ms"], {"p50": None, "p99": None})
        self.assertEqual(b["state"], "up")

    def test_counts_and_latency(self) -> None:
        """Requests, responses by class and latency in ms follow the traffic the backends answered."""
        self.serve(3, 200, advance=0.010)
        self.serve(1, 503, advance=0.200)
        self.serve(2, 404, advance=0.010)
        code, status = self.json("GET", "/status")
        self.assertEqual(code, 200)
        backends = status["pools"]["default"]["backends"]
        self.assertEqual(sum(b["requests"] for b in backends), 6)
        total = {k: sum(b["responses"][k] for b in backends) for k in ("2xx", "4xx", "5xx")}
        self.assertEqual(total, {"2xx": 3, "4xx": 2, "5xx": 1})
        latencies = sorted(b["latency_ms"]["p99"] for b in backends)
        self.assertEqual(latencies[-1], 200.0)
        for b in backends:
            self.assertEqual(b["latency_ms"]["p50"], 10.0)

    def test_in_flight(self) -> None:
        """A request waiting for its backend shows as in flight on that backend and its pool."""
        client = self.lb.client()
        client.send(GET)
        self.lb.acceptConnect()
        _, status = self.json("GET", "/status")
        pool = status["pools"]["default"]
        self.assertEqual(pool["in_flight"], 1)
        self.assertEqual(sorted(b["in_flight"] for b in pool["backends"]), [0, 1])

    def test_latency_window_forgets_old_responses(self) -> None:
        """Latency percentiles cover the last minute: a minute later with no traffic they are null."""
        self.serve(2, 200, advance=0.05)
        self.lb.reactor.advance(61)
        _, status = self.json("GET", "/status")
        for b in status["pools"]["default"]["backends"]:
            self.assertEqual(b["latency_ms"], {"p50": None, "p99": None})
            self.assertEqual(b["responses"]["2xx"], 1)

    def test_health_detail(self) -> None:
        """Each backend shows its last check, its result, consecutive counts and when its state changed."""
        self.lb.health.answers["127.0.0.1:3002"] = ConnectionRefusedError()
        for _ in range(4):
            self.lb.reactor.advance(5)
        _, status = self.json("GET", "/status")
        good, bad = status["pools"]["default"]["backends"]
        self.assertEqual(good["health"]["last_result"], "pass")
        self.assertEqual(good["health"]["consecutive_failures"], 0)
        self.assertEqual(good["health"]["consecutive_passes"], 4)
        self.assertEqual(bad["state"], "down")
        self.assertEqual(bad["health"]["last_result"], "fail")
        self.assertEqual(bad["health"]["consecutive_failures"], 4)
        self.assertIn("refused", bad["health"]["last_error"])
        self.assertEqual(bad["health"]["last_check"], self.lb.reactor.seconds())
        self.assertEqual(bad["health"]["results"]["fail"], 4)
        # Checks at 5, 10, 15 and 20 s: down after the third (fall=3).
        self.assertEqual(bad["health"]["state_changed"], 15.0)

    def test_ejections(self) -> None:
        """An ejected backend shows its ejection count and until when it is out."""
        lb = self.lb = InMemoryBalancer(self.backends, ejectAfter=2)
        self.stub = StubTreq(lb.balancer.adminResource())
        for _ in range(4):
            lb.client().send(GET)
            while lb.pendingConnects():
                if lb.pendingConnects()[0].address == "127.0.0.1:3002":
                    lb.failConnect()
                else:
                    lb.acceptConnect().respond(ok())
        _, status = self.json("GET", "/status")
        bad = status["pools"]["default"]["backends"][1]
        self.assertEqual(bad["state"], "down")
        self.assertEqual(bad["ejections"]["count"], 1)
        self.assertTrue(bad["ejections"]["ejected"])
        self.assertEqual(bad["ejections"]["ejected_until"], lb.reactor.seconds() + 10)
        self.assertEqual(status["pools"]["default"]["retries"], 2)

    def test_unknown_path(self) -> None:
        """An unknown admin path is a JSON 404."""
        code, body = self.json("GET", "/nope")
        self.assertEqual(code, 404)
        self.assertIn("error", body)


class TokenTests(AdminCase):
    token = "s3cret-token"

    def test_no_token_401_and_nothing_changes(self) -> None:
        """Without the token every request is 401 and a drain changes nothing."""
        for method, path in [("GET", "/status"), ("GET", "/metrics"),
                             ("POST", "/backends/127.0.0.1:3001/drain"),
                             ("DELETE", "/backends/127.0.0.1:3001"), ("POST", "/reload")]:
            code, headers, _ = self.call(method, path)
            self.assertEqual(code, 401, (method, path))
            self.assertTrue(headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer"))
        self.assertEqual(self.lb.backend("127.0.0.1:3001").state, "up")
        self.assertEqual(len(self.lb.pool.backends), 2)

    def test_wrong_token(self) -> None:
        """A wrong token is 401 too."""
        code, body = self.json("POST", "/backends/127.0.0.1:3001/drain",
                               headers={"Authorization": "Bearer s3cret-tokeX"})
        self.assertEqual(code, 401)
        self.assertEqual(body["error"], "wrong token")
        self.assertEqual(self.lb.backend("127.0.0.1:3001").state, "up")

    def test_right_token(self) -> None:
        """With Authorization: Bearer TOKEN the request is served."""
        code, body = self.json("POST", "/backends/127.0.0.1:3001/drain",
                               headers={"Authorization": "Bearer s3cret-token"})
        self.assertEqual(code, 200)
        self.assertEqual(body["backend"]["state"], "draining")

    def test_dashboard_page_without_token(self) -> None:
        """GET / without the token is 401 with the dashboard page, which holds no data."""
        code, headers, body = self.call("GET", "/")
        self.assertEqual(code, 401)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn(b"<title>txbalancer</title>", body)
        self.assertNotIn(b"127.0.0.1:3001", body)

    def test_any_host_with_token(self) -> None:
        """With a token the Host header may be any name (the server may face a network)."""
        code, _ = self.json("GET", "/status", headers={"Authorization": "Bearer s3cret-token"},
                            host="lb.example.com:9000")
        self.assertEqual(code, 200)


class LoopbackTests(AdminCase):
    def test_foreign_host_refused(self) -> None:
        """Without a token a request whose Host is not loopback (DNS rebinding) is 403."""
        code, body = self.json("GET", "/status", host="evil.example:9000")
        self.assertEqual(code, 403)
        self.assertIn("loopback", body["error"])

    def test_localhost_and_v6(self) -> None:
        """Host localhost and [::1] are loopback."""
        self.assertEqual(self.call("GET", "/status", host="localhost:9000")[0], 200)
        self.assertEqual(self.call("GET", "/status", host="[::1]:9000")[0], 200)

    def test_cross_origin_post_refused(self) -> None:
        """A POST from another site's page (a foreign Origin) is 403 and changes nothing."""
        code, _ = self.json("POST", "/backends/127.0.0.1:3001/disable",
                            headers={"Origin": "http://evil.example"})
        self.assertEqual(code, 403)
        self.assertFalse(self.lb.backend("127.0.0.1:3001").disabled)
        code, _ = self.json("POST", "/backends/127.0.0.1:3001/disable",
                            headers={"Origin": "http://127.0.0.1:9000"})
        self.assertEqual(code, 200)

    def test_check_exposure(self) -> None:
        """Without a token only loopback interfaces and unix sockets are accepted, with a reason otherwise."""
        from twisted.internet.endpoints import serverFromString

        reactor = MemoryReactorClock()
        for good in ("tcp:9000:interface=127.0.0.1", "tcp:9000:interface=127.0.0.2",
                     "tcp6:9000:interface=\\:\\:1", "unix:/tmp/admin.sock"):
            checkExposure(good, serverFromString(reactor, good))
        for bad, why in [("tcp:9000", "every network interface"),
                         ("tcp:9000:interface=0.0.0.0", "every network interface"),
                         ("tcp6:9000", "every network interface"),
                         ("tcp:9000:interface=10.1.2.3", "not a loopback address"),
                         ("tcp:9000:interface=localhost", "not a loopback address")]:
            with self.assertRaises(ConfigError) as e:
                checkExposure(bad, serverFromString(reactor, bad))
            self.assertIn(why, str(e.exception))
            self.assertIn("--admin-token-file", str(e.exception))

    def test_balancer_refuses_to_listen(self) -> None:
        """A Balancer with --admin tcp:9000 and no token does not listen at all."""
        reactor = MemoryReactorClock()
        balancer = Balancer(["127.0.0.1:3001"], reactor=reactor, admin="tcp:9000")
        with self.assertRaises(ConfigError):
            balancer.listenAdmin()
        self.assertEqual(reactor.tcpServers, [])

    def test_balancer_listens_with_token(self) -> None:
        """With a token the admin server listens anywhere, as a child service started with the balancer."""
        reactor = MemoryReactorClock()
        balancer = Balancer(["127.0.0.1:3001"], reactor=reactor, admin="tcp:0",
                            adminToken="t")
        balancer.listenAdmin()
        balancer.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertIn(balancer.admin, list(balancer))


    def test_admin_stops_after_the_drain(self) -> None:
        """On a graceful stop the admin server stays up while requests in flight finish, then stops."""
        lb = InMemoryBalancer(["127.0.0.1:3001"], admin="tcp:0", adminToken="t")
        admin = lb.balancer.listenAdmin()
        admin.startService()
        client = lb.client()
        client.send(GET)
        conn = lb.acceptConnect()
        d = lb.stop()
        self.assertNoResult(d)
        self.assertTrue(admin.running)
        conn.respond(ok())
        lb.flush()
        self.successResultOf(d)
        self.assertFalse(admin.running)


class TokenFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir))

    def balancer(self, **settings):
        return Balancer(["127.0.0.1:3001"], reactor=MemoryReactorClock(),
                        admin="tcp:0:interface=127.0.0.1", **settings)

    def test_token_file(self) -> None:
        """The token file's content, without surrounding whitespace, is the token."""
        from txbalancer.admin import adminToken

        path = os.path.join(self.dir, "token")
        with open(path, "w") as f:
            f.write("  abc123\n")
        self.assertEqual(adminToken(self.balancer(adminTokenFile=path).config), "abc123")

    def test_empty_or_missing_token_file(self) -> None:
        """An empty or missing token file stops start-up with its name."""
        empty = os.path.join(self.dir, "empty")
        open(empty, "w").close()
        for path in (empty, os.path.join(self.dir, "missing")):
            with self.assertRaises(ConfigError) as e:
                self.balancer(adminTokenFile=path).listenAdmin()
            self.assertIn(path, str(e.exception))

    def test_conflicting_settings(self) -> None:
        """Both a token and a token file, or a token without --admin, are errors."""
        with self.assertRaises(ConfigError):
            self.balancer(adminToken="a", adminTokenFile="/x")
        with self.assertRaises(ConfigError):
            Balancer(["127.0.0.1:3001"], reactor=MemoryReactorClock(), adminToken="a")

    def test_command_line(self) -> None:
        """--admin, --admin-token and --admin-token-file are options of twistd balancer."""
        from txbalancer.tap import Options

        path = os.path.join(self.dir, "b.txt")
        with open(path, "w") as f:
            f.write("127.0.0.1:3001\n")
        options = Options()
        options.parseOptions(["--backends", path, "--admin", "tcp:9000:interface=127.0.0.1",
                              "--admin-token", "xyz"])
        self.assertEqual(options["config"].admin, "tcp:9000:interface=127.0.0.1")
        self.assertEqual(options["config"].adminToken, "xyz")


class APITests(AdminCase):
    def test_drain_and_enable(self) -> None:
        """Drain takes a backend out of new requests (it shows draining); enable puts it back."""
        code, body = self.json("POST", "/backends/127.0.0.1:3001/drain")
        self.assertEqual((code, body["backend"]["state"], body["pool"]), (200, "draining", "default"))
        for _ in range(3):
            self.lb.client().send(GET)
            self.assertEqual(self.lb.pendingConnects()[0].address, "127.0.0.1:3002")
            self.lb.acceptConnect().respond(ok())
        code, body = self.json("POST", "/backends/127.0.0.1:3001/enable")
        self.assertEqual(body["backend"]["state"], "up")
        self.assertEqual(self.lb.pool.choose().address in ("127.0.0.1:3001", "127.0.0.1:3002"), True)
        self.assertTrue(self.lb.backend("127.0.0.1:3001").available)

    def test_drain_lets_request_in_flight_finish(self) -> None:
        """A request in flight to a backend that is drained finishes normally."""
        client = self.lb.client()
        client.send(GET)
        conn = self.lb.acceptConnect()
        address = conn.protocol.backend.address
        self.json("POST", f"/backends/{address}/drain")
        conn.respond(ok(body=b"done"))
        self.assertTrue(client.received().endswith(b"done"))

    def test_disable_ignores_health(self) -> None:
        """A disabled backend takes nothing even while its checks pass; enabled, it takes the state they found."""
        code, body = self.json("POST", "/backends/127.0.0.1:3001/disable")
        self.assertEqual(body["backend"]["state"], "disabled")
        self.lb.reactor.advance(5)
        self.assertIn("http://127.0.0.1:3001/", self.lb.health.checks)
        for _ in range(3):
            self.lb.client().send(GET)
            self.assertEqual(self.lb.pendingConnects()[0].address, "127.0.0.1:3002")
            self.lb.acceptConnect().respond(ok())
        # Its checks fail while it is out: enabled, it is down, not up.
        self.lb.health.answers["127.0.0.1:3001"] = ConnectionRefusedError()
        for _ in range(3):
            self.lb.reactor.advance(5)
        _, status = self.json("GET", "/status")
        self.assertEqual(status["pools"]["default"]["backends"][0]["state"], "disabled")
        code, body = self.json("POST", "/backends/127.0.0.1:3001/enable")
        self.assertEqual((code, body["backend"]["state"]), (200, "down"))

    def test_enable_undoes_drain_and_disable(self) -> None:
        """Enable undoes a drain and a disable given together."""
        self.json("POST", "/backends/127.0.0.1:3001/drain")
        self.json("POST", "/backends/127.0.0.1:3001/disable")
        code, body = self.json("POST", "/backends/127.0.0.1:3001/enable")
        self.assertEqual((code, body["backend"]["state"]), (200, "up"))

    def test_unknown_backend(self) -> None:
        """An unknown address, or an unknown pool, is 404."""
        self.assertEqual(self.json("POST", "/backends/127.0.0.1:4000/drain")[0], 404)
        self.assertEqual(self.json("POST", "/backends/127.0.0.1:3001/drain?pool=x")[0], 404)
        self.assertEqual(self.json("POST", "/backends/127.0.0.1:3001/reboot")[0], 404)
        self.assertEqual(self.json("GET", "/backends/127.0.0.1:3001/drain")[0], 405)

    def test_ambiguous_address(self) -> None:
        """An address in two pools needs ?pool=NAME: 409 without it."""
        specs = backendSpecs("127.0.0.1:3001")
        config = BalancerConfig(pools=(PoolConfig("a", specs), PoolConfig("b", specs)))
        balancer = Balancer(config=config, reactor=MemoryReactorClock())
        self.stub = StubTreq(balancer.adminResource())
        code, body = self.json("POST", "/backends/127.0.0.1:3001/drain")
        self.assertEqual(code, 409)
        self.assertIn("?pool=NAME", body["error"])
        code, body = self.json("POST", "/backends/127.0.0.1:3001/drain?pool=b")
        self.assertEqual((code, body["pool"]), (200, "b"))
        self.assertEqual(balancer.pools["a"].pool.backends[0].state, "up")
        self.assertEqual(balancer.pools["b"].pool.backends[0].state, "draining")

    def test_add(self) -> None:
        """POST /backends adds a backend that takes requests and is checked."""
        code, body = self.json("POST", "/backends",
                               {"pool": "default", "address": "127.0.0.1:3003", "weight": 3})
        self.assertEqual(code, 201)
        self.assertEqual(body["added"]["address"], "127.0.0.1:3003")
        self.assertEqual(body["added"]["weight"], 3)
        backend = self.lb.backend("127.0.0.1:3003")
        self.assertIn(backend, self.lb.checker)
        # Without "pool", the only pool.
        code, body = self.json("POST", "/backends", {"address": "127.0.0.1:3004"})
        self.assertEqual(code, 201)

    def test_add_bad_bodies(self) -> None:
        """A bad body is 400 with the reason, and adds nothing."""
        cases = [
            (b"not json", "not JSON"),
            ([1], "JSON object"),
            ({"address": "127.0.0.1:99999"}, "port"),
            ({"address": "127.0.0.1:3005", "weight": 0}, "weight"),
            ({"address": "127.0.0.1:3005", "weight": "2"}, "whole number"),
            ({"address": "127.0.0.1:3005 backup"}, "one word"),
            ({"address": "127.0.0.1:3005", "color": "red"}, "unknown key 'color'"),
            ({}, "address"),
        ]
        for body, reason in cases:
            code, answer = self.json("POST", "/backends", body)
            self.assertEqual(code, 400, body)
            self.assertIn(reason, answer["error"])
        self.assertEqual(self.json("POST", "/backends",
                                   {"pool": "nope", "address": "127.0.0.1:3005"})[0], 404)
        code, answer = self.json("POST", "/backends", {"address": "127.0.0.1:3001"})
        self.assertEqual(code, 409)
        self.assertEqual(len(self.lb.pool.backends), 2)

    def test_remove_after_requests_finish(self) -> None:
        """DELETE answers 202 at once; the backend takes no new request and goes once its request finishes."""
        client = self.lb.client()
        client.send(GET)
        conn = self.lb.acceptConnect()
        address = conn.protocol.backend.address
        code, body = self.json("DELETE", f"/backends/{address}")
        self.assertEqual(code, 202)
        self.assertEqual(body, {"pool": "default", "removing": address, "in_flight": 1})
        self.assertNotIn(address, [b.address for b in self.lb.pool.backends])
        _, status = self.json("GET", "/status")
        self.assertEqual(status["pools"]["default"]["removing"],
                         [{"address": address, "in_flight": 1}])
        other = [b.address for b in self.lb.pool.backends]
        self.lb.client().send(GET)
        self.assertEqual(self.lb.pendingConnects()[0].address, other[0])
        conn.respond(ok(body=b"last"))
        self.assertTrue(client.received().endswith(b"last"))
        _, status = self.json("GET", "/status")
        self.assertEqual(status["pools"]["default"]["removing"], [])
        self.assertEqual(self.json("DELETE", f"/backends/{address}")[0], 404)

    def test_reload(self) -> None:
        """POST /reload answers 200, or 400 with the reason when a file is broken."""
        calls = []
        self.lb.balancer.reload = lambda: calls.append(1)
        code, body = self.json("POST", "/reload")
        self.assertEqual((code, body["reloaded"], calls), (200, True, [1]))

        def broken():
            raise ConfigError("unknown flag 'wieght'", "backends.txt", 3)

        self.lb.balancer.reload = broken
        code, body = self.json("POST", "/reload")
        self.assertEqual(code, 400)
        self.assertEqual(body["error"], "backends.txt:3: unknown flag 'wieght'")
        self.assertEqual(self.json("GET", "/reload")[0], 405)


    def test_reload_says_what_changed(self) -> None:
        """POST /reload answers what the reload changed: backends added, removed and reweighted per pool."""
        from txbalancer.config import parse_backends
        from txbalancer.settings import PoolConfig, build

        config = build([PoolConfig(backends=parse_backends(
            "127.0.0.1:3001 weight=3\n127.0.0.1:3009\n"))], {})
        self.lb.balancer.reloader = lambda: config
        code, body = self.json("POST", "/reload")
        self.assertEqual(code, 200)
        self.assertEqual(body["pools_changed"], {"default": {
            "added": ["127.0.0.1:3009"], "removed": ["127.0.0.1:3002"],
            "changed": ["127.0.0.1:3001"], "settings": []}})
        self.assertEqual((body["pools_added"], body["routes_changed"]), ([], False))

    def test_reload_undoes_drain_and_disable(self) -> None:
        """Run-time drains and disables last until the next reload."""
        self.json("POST", "/backends/127.0.0.1:3001/drain")
        self.json("POST", "/backends/127.0.0.1:3002/disable")
        code, _ = self.json("POST", "/reload")
        self.assertEqual(code, 200)
        _, status = self.json("GET", "/status")
        states = [b["state"] for b in status["pools"]["default"]["backends"]]
        self.assertEqual(states, ["up", "up"])


class MetricsTests(AdminCase):
    def metrics(self):
        code, headers, body = self.call("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def test_counters_equal_requests_received(self) -> None:
        """Requests by code, attempts and the histogram count equal what the backends received."""
        received: dict[str, int] = {}
        for i in range(7):
            self.lb.client().send(GET)
            conn = self.lb.acceptConnect()
            address = conn.protocol.backend.address
            received[address] = received.get(address, 0) + 1
            conn.respond(ok(500 if i == 6 else 200))
        m = self.metrics()
        for address, n in received.items():
            labels = (("backend", address), ("pool", "default"))
            by_code = sum(
                v for (name, ls), v in m.items()
                if name == "txbalancer_backend_requests_total"
                and dict(ls)["backend"] == address
            )
            self.assertEqual(by_code, n)
            self.assertEqual(m[("txbalancer_backend_attempts_total", labels)], n)
            self.assertEqual(m[("txbalancer_backend_response_seconds_count", labels)], n)
            self.assertEqual(m[("txbalancer_backend_up", labels)], 1)
        self.assertEqual(
            sum(v for (name, ls), v in m.items()
                if name == "txbalancer_backend_requests_total" and dict(ls)["code"] == "5xx"),
            1,
        )

    def test_histogram_buckets(self) -> None:
        """A response taking 30 ms is counted in the 0.05 s bucket and above, not below."""
        self.serve(1, 200, advance=0.03)
        m = self.metrics()
        samples = {dict(ls)["le"]: v for (name, ls), v in m.items()
                   if name == "txbalancer_backend_response_seconds_bucket" and v}
        self.assertNotIn("0.025", samples)
        self.assertEqual(samples["0.05"], 1)
        self.assertEqual(samples["+Inf"], 1)

    def test_gauges(self) -> None:
        """In flight, state, queue length and health check results are exported."""
        self.lb.client().send(GET)
        conn = self.lb.acceptConnect()
        address = conn.protocol.backend.address
        self.json("POST", "/backends/127.0.0.1:3002/drain")
        self.lb.reactor.advance(5)
        m = self.metrics()
        labels = (("backend", address), ("pool", "default"))
        self.assertEqual(m[("txbalancer_backend_in_flight", labels)], 1)
        self.assertEqual(m[("txbalancer_backend_state", (("backend", "127.0.0.1:3002"),
                                                          ("pool", "default"),
                                                          ("state", "draining")))], 1)
        self.assertEqual(m[("txbalancer_backend_up", (("backend", "127.0.0.1:3002"),
                                                       ("pool", "default")))], 0)
        self.assertEqual(m[("txbalancer_pool_queue_length", (("pool", "default"),))], 0)
        self.assertEqual(m[("txbalancer_pool_in_flight", (("pool", "default"),))], 1)
        self.assertEqual(m[("txbalancer_backend_health_checks_total",
                            (("backend", address), ("pool", "default"), ("result", "pass")))], 1)

    def test_registries_are_separate(self) -> None:
        """Two balancers in one process each export only their own backends."""
        other = InMemoryBalancer(["127.0.0.1:4001"])
        StubTreq(other.balancer.adminResource())
        m = self.metrics()
        backends = {dict(ls).get("backend") for (name, ls) in m}
        self.assertNotIn("127.0.0.1:4001", backends)

    def test_listener_connections(self) -> None:
        """Listener connections count the open client connections of each listener."""
        lb = self.lb
        lb.balancer.listening.append(("tcp:8000", lb.factory))
        lb.client().send(GET)
        lb.client()
        m = self.metrics()
        self.assertEqual(m[("txbalancer_listener_connections", (("listener", "tcp:8000"),))], 2)


class StatsTests(SynchronousTestCase):
    def test_percentile(self) -> None:
        """Nearest-rank percentiles of a sorted list; None when empty."""
        self.assertIsNone(percentile([], 50))
        values = [float(i) for i in range(1, 101)]
        self.assertEqual(percentile(values, 50), 50.0)
        self.assertEqual(percentile(values, 99), 99.0)
        self.assertEqual(percentile([3.0], 99), 3.0)

    def test_window_is_bounded(self) -> None:
        """Only the last 1024 responses count for percentiles; counters count them all."""
        stats = ResponseStats()
        for i in range(2000):
            stats.record(200, 1.0 if i < 2000 - 1024 else 0.001, now=0.0)
        self.assertEqual(stats.latency(0.0), {"p50": 1.0, "p99": 1.0})
        self.assertEqual(stats.count, 2000)
        self.assertEqual(stats.byClass()["2xx"], 2000)

    def test_buckets(self) -> None:
        """A time equal to a bound falls in that bound's bucket (le is inclusive)."""
        stats = ResponseStats()
        stats.record(204, BUCKETS[3], now=0.0)
        stats.record(101, 1000.0, now=0.0)
        self.assertEqual(stats.buckets[3], 1)
        self.assertEqual(stats.buckets[-1], 1)
        self.assertEqual(stats.byClass()["1xx"], 1)
