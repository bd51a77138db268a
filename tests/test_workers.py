"""
Unit tests of C{--workers}: the AMP commands between master and workers
(over an in-memory connection), a worker applying the master's state, the
master summing the workers' reports, and restarts with backoff; on a fake
reactor.
"""

from __future__ import annotations

from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from txbalancer import workerstate as ws
from txbalancer.config import ConfigError
from txbalancer.settings import BalancerConfig, PoolConfig, coerce
from txbalancer.testing import InMemoryBalancer, backendSpecs
from txbalancer.workers import MasterBalancer

GET = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"


def ok() -> bytes:
    return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"


class Receiver(amp.AMP):
    got: list = []

    @ws.SetState.responder
    def setState(self, state):
        self.got.append(state)
        return {}


class CommandTests(SynchronousTestCase):
    def test_blob_larger_than_one_amp_value(self) -> None:
        """A state of several hundred KiB crosses the AMP connection intact
        (split over several values)."""
        client, server, pump = connectedServerAndClient(Receiver, amp.AMP)
        Receiver.got = []
        state = {"default": [(f"spec-{i}" * 20, "up", False) for i in range(5000)]}
        d = client.callRemote(ws.SetState, state=state)
        pump.flush()
        self.successResultOf(d)
        self.assertEqual(Receiver.got, [state])

    def test_workers_setting(self) -> None:
        """--workers takes a number from 1, or auto (0: one per core)."""
        self.assertEqual(coerce({"workers": "auto"}), {"workers": 0})
        self.assertEqual(coerce({"workers": 3}), {"workers": 3})
        for bad in ("0", "-1", "many", True):
            with self.assertRaises(ConfigError) as e:
                coerce({"workers": bad})
            self.assertIn("workers", str(e.exception))


class WorkerConfigTests(SynchronousTestCase):
    def test_worker_config(self) -> None:
        """A worker runs without checks, admin server or DNS lookups, as one
        process, with its share of each max_conns and of max-connections
        (rounded up)."""
        pool = PoolConfig(backends=backendSpecs("127.0.0.1:3001 max_conns=5",
                                                "127.0.0.1:3002"), source="srv:_http._tcp.x")
        config = BalancerConfig(pools=(pool,), admin="tcp:9000", workers=2,
                                maxConnections=101)
        mine = ws.workerConfig(config, 2)
        self.assertTrue(mine.pools[0].noHealthChecks)
        self.assertIsNone(mine.admin)
        self.assertEqual(mine.workers, 1)
        self.assertEqual(mine.maxConnections, 51)
        self.assertEqual(mine.pools[0].source, "inline")  # no DNS lookups of its own
        self.assertEqual([s.max_conns for s in mine.pools[0].backends], [3, 0])
        self.assertEqual(config.pools[0].backends[0].max_conns, 5)


def worker(*lines: str, **settings):
    """A balancer as a worker runs it, its health following the master."""
    lb = InMemoryBalancer(lines or ("127.0.0.1:3001", "127.0.0.1:3002"),
                          noHealthChecks=True, **settings)
    told: dict = {}
    ws.gateHealth(lb.pool, told)
    return lb, told


def state(*entries):
    return {"default": [(backendSpecs(line)[0], health, disabled)
                        for line, health, disabled in entries]}


class ApplyStateTests(SynchronousTestCase):
    def test_health_and_disabled(self) -> None:
        """The master's down, draining and disabled take backends out of the
        worker's pool; up puts them back."""
        lb, told = worker()
        ws.applyState(lb.balancer.pools, state(("127.0.0.1:3001", "down", False),
                                               ("127.0.0.1:3002", "up", True)), 2, told)
        a, b = lb.pool.backends
        self.assertEqual((a.reported, b.reported), ("down", "disabled"))
        self.assertIsNone(lb.pool.choose())
        ws.applyState(lb.balancer.pools, state(("127.0.0.1:3001", "draining", False),
                                               ("127.0.0.1:3002", "up", False)), 2, told)
        self.assertEqual((a.reported, b.reported), ("draining", "up"))
        self.assertIs(lb.pool.choose(), b)

    def test_added_removed_updated(self) -> None:
        """Backends the master added appear (with this worker's share of
        max_conns), the ones it removed go, changed weights are taken."""
        lb, told = worker()
        removals = ws.applyState(
            lb.balancer.pools,
            state(("127.0.0.1:3002 weight=5", "up", False),
                  ("127.0.0.1:3003 max_conns=3", "up", False)), 2, told)
        self.assertEqual([b.address for b in lb.pool.backends],
                         ["127.0.0.1:3002", "127.0.0.1:3003"])
        self.assertEqual(lb.pool.backends[0].weight, 5)
        self.assertEqual(lb.pool.backends[1].maxConns, 2)
        self.assertEqual(len(removals), 1)
        self.successResultOf(removals[0])

    def test_local_ejection_stays_until_it_ends(self) -> None:
        """A backend this worker ejected stays down though the master says
        up; when the ejection ends it is up again, but not if the master
        meanwhile said down."""
        lb, told = worker(ejectAfter=2)
        for _ in range(4):
            lb.client().send(GET)
            while lb.pendingConnects():
                if lb.pendingConnects()[0].address == "127.0.0.1:3002":
                    lb.failConnect()
                else:
                    lb.acceptConnect().respond(ok())
        bad = lb.pool.backends[1]
        self.assertEqual(bad.state, "down")
        ws.applyState(lb.balancer.pools, state(("127.0.0.1:3001", "up", False),
                                               ("127.0.0.1:3002", "up", False)), 2, told)
        self.assertEqual(bad.state, "down")
        lb.reactor.advance(11)  # the ejection (10 s) ends
        self.assertEqual(bad.state, "up")

        lb2, told2 = worker(ejectAfter=2)
        bad2 = lb2.pool.backends[1]
        lb2.pool.setHealth(bad2, "down", "ejected")  # what the detector does
        ws.applyState(lb2.balancer.pools, state(("127.0.0.1:3001", "up", False),
                                                ("127.0.0.1:3002", "down", False)), 2, told2)
        lb2.pool.setHealth(bad2, "up", "ejection over")  # what the detector does
        self.assertEqual(bad2.state, "down")


def report(requests, active, classes2xx, times=(), retries=0, inFlight=None,
           listeners=(), queued=0):
    return {"listeners": list(listeners), "pools": {"default": {
        "in_flight": active if inFlight is None else inFlight,
        "retries": retries,
        "queued": queued,
        "backends": {("http", "127.0.0.1", 3001): {
            "requests": requests, "failures": 0, "connections": 0, "bytesIn": 0,
            "bytesOut": 0, "ejections": 0, "active": active,
            "classes": [0, 0, classes2xx, 0, 0, 0],
            "buckets": [classes2xx] + [0] * 15, "total": 0.001 * classes2xx,
            "recent": list(times)}}}}}


class TotalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.lb = InMemoryBalancer(["127.0.0.1:3001"])
        self.pools = self.lb.balancer.pools
        self.backend = self.lb.pool.backends[0]
        self.totals = ws.Totals()

    def test_sum_of_workers(self) -> None:
        """Counters are the sum of every worker's, in flight the sum of the
        live workers' last reports, latencies from both."""
        self.totals.record("a", self.pools, report(10, 2, 8, [0.001] * 8,
                                                   listeners=[3]), 100.0)
        self.totals.record("b", self.pools, report(5, 1, 4, [0.003] * 4,
                                                   listeners=[2]), 100.0)
        self.assertEqual(self.totals.connections(1), [5])
        self.totals.record("b", self.pools, report(5, 1, 4, queued=2, listeners=[2]), 100.5)
        self.assertEqual(self.lb.runtime.queueLength, 2)
        self.totals.record("a", self.pools, report(12, 0, 12, [0.001] * 4), 101.0)
        b = self.backend
        self.assertEqual((b.requests, b.active), (17, 1))
        self.assertEqual(b.stats.byClass()["2xx"], 16)
        self.assertEqual(b.stats.count, 16)
        self.assertEqual(len(b.stats.recent(101.0)), 16)
        self.assertEqual(self.lb.forwarder.inFlight, 1)

    def test_dead_worker_keeps_its_counts(self) -> None:
        """A worker that dies: what it counted stays, its in-flight requests
        are over, and its replacement adds from zero."""
        self.totals.record("a", self.pools, report(10, 3, 7), 100.0)
        self.totals.forget("a", self.pools)
        self.assertEqual((self.backend.requests, self.backend.active), (10, 0))
        self.totals.record("a", self.pools, report(4, 1, 4), 102.0)
        self.assertEqual((self.backend.requests, self.backend.active), (14, 1))
        self.assertEqual(self.backend.stats.byClass()["2xx"], 11)

    def test_removed_backend_waits_for_the_workers(self) -> None:
        """The master removes a backend with requests in flight in a worker:
        the removal ends when that worker reports none in flight."""
        self.totals.record("a", self.pools, report(3, 2, 1), 100.0)
        d = self.lb.runtime.removeBackend(self.backend)
        self.assertNoResult(d)
        self.totals.record("a", self.pools, report(3, 0, 3), 101.0)
        self.successResultOf(d)


class RestartTests(SynchronousTestCase):
    def test_backoff(self) -> None:
        """A worker that keeps dying is started again after 1, 2, 4 s ...
        at most 30 s; once it ran 10 s, after 1 s again."""
        reactor = MemoryReactorClock()
        master = MasterBalancer(["127.0.0.1:3001"], reactor=reactor, workers=1)
        slot = master.slots[0]
        starts = []
        slot.start = lambda: (starts.append(reactor.seconds()),
                              setattr(slot, "startedAt", reactor.seconds()))
        died = Failure(ProcessTerminated(signal=9))
        delays = []
        for _ in range(7):
            slot.ended(died)
            delays.append(slot.pending.getTime() - reactor.seconds())
            reactor.advance(delays[-1])
        self.assertEqual(delays, [1, 2, 4, 8, 16, 30, 30])
        reactor.advance(10)
        slot.ended(died)
        self.assertEqual(slot.pending.getTime() - reactor.seconds(), 1)
        self.assertEqual(slot.restarts, 8)

    def test_no_restart_when_stopping(self) -> None:
        """A worker that exits during a graceful stop is not started again."""
        reactor = MemoryReactorClock()
        master = MasterBalancer(["127.0.0.1:3001"], reactor=reactor, workers=1)
        slot = master.slots[0]
        self.successResultOf(slot.stop(5))
        slot.ended(Failure(ProcessTerminated(exitCode=0)))
        self.assertIsNone(slot.pending)
        self.assertEqual(reactor.getDelayedCalls(), [])


class ReportTests(SynchronousTestCase):
    def test_report_sends_new_times_once(self) -> None:
        """A worker's report carries its counters since start, and each
        response time once (only those since the previous report)."""
        lb = InMemoryBalancer(["127.0.0.1:3001"])
        sent: dict = {}
        for _ in range(2):
            lb.client().send(GET)
            lb.acceptConnect().respond(ok())
        first = ws.report(lb.balancer.pools, sent, [("tcp:8000", lb.factory)])
        b = first["pools"]["default"]["backends"][("http", "127.0.0.1", 3001)]
        self.assertEqual((b["requests"], len(b["recent"]), b["classes"][2]), (2, 2, 2))
        self.assertEqual(first["listeners"], [len(lb.factory.connections)])
        second = ws.report(lb.balancer.pools, sent)
        b = second["pools"]["default"]["backends"][("http", "127.0.0.1", 3001)]
        self.assertEqual((b["requests"], b["recent"]), (2, []))


class MasterPushTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.master = MasterBalancer(["127.0.0.1:3001", "127.0.0.1:3002"],
                                     reactor=self.reactor, workers=2)
        self.sent: list = []
        for slot in self.master.slots:
            slot.send = (lambda slot: lambda command, **kw:
                         self.sent.append((slot.index, command, kw)))(slot)

    def test_state_pushed_on_change_only(self) -> None:
        """A change of a backend's state (here a disable) is sent to every
        worker once; no change, nothing sent."""
        master = self.master
        master.lastState = ws.snapshot(master.pools)
        master.pushState()
        self.assertEqual(self.sent, [])
        master.defaultPool.pool.disable(master.defaultPool.pool.backends[0])
        master.pushState()
        master.pushState()
        self.assertEqual([(i, c) for i, c, _ in self.sent], [(0, ws.SetState), (1, ws.SetState)])
        self.assertEqual(self.sent[0][2]["state"]["default"][0][1:], ("up", True))

    def test_reload_sends_the_configuration(self) -> None:
        """A reload in the master sends every worker its configuration, the
        state and the shared secret."""
        self.master.reload()
        self.assertEqual([(i, c) for i, c, _ in self.sent],
                         [(0, ws.Configure), (1, ws.Configure)])
        kw = self.sent[1][2]
        self.assertIs(kw["config"], self.master.config)
        self.assertEqual((kw["index"], kw["workers"]), (1, 2))
        self.assertEqual(len(kw["secret"]), 32)
        self.assertEqual(kw["secret"], self.sent[0][2]["secret"])


class WatchTests(SynchronousTestCase):
    def test_silent_worker_is_killed(self) -> None:
        """A ready worker that sends no report for 15 s is killed with
        SIGKILL (then started again like a crash); one that reports is not."""
        reactor = MemoryReactorClock()
        master = MasterBalancer(["127.0.0.1:3001"], reactor=reactor, workers=2)
        signals: list = []

        class Process:
            pid = 1234

            def __init__(self, index):
                self.index = index

            def signalProcess(self, sig):
                signals.append((self.index, sig))

        for slot in master.slots:
            slot.process, slot.ready, slot.lastReport = Process(slot.index), True, 0.0
        reactor.advance(10)
        master.slots[1].reported(report(0, 0, 0))
        reactor.advance(6)
        master.pushState()
        self.assertEqual(signals, [(0, "KILL")])
        master.pushState()
        self.assertEqual(signals, [(0, "KILL")])
