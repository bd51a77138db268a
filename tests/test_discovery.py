"""
Unit tests for txbalancer.discovery: SRV records into backends, looked up
again when their TTL runs out; and srv: pools of a Balancer following them.
No sockets, no real time.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.names import dns, error
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.balancer import Balancer
from txbalancer.config import ConfigError
from txbalancer.discovery import SRVDiscovery, specsFromAnswer
from txbalancer.settings import BalancerConfig, PoolConfig, dnsServer
from txbalancer.testing import FakeHealthClient

NAME = "_http._tcp.app.test"


def srv(target: str, port: int, weight: int = 1, priority: int = 0, ttl: int = 30,
        name: str = NAME):
    return dns.RRHeader(
        name=name, type=dns.SRV, ttl=ttl,
        payload=dns.Record_SRV(priority, weight, port, target, ttl=ttl),
    )


def a(name: str, address: str):
    return dns.RRHeader(name=name, type=dns.A, payload=dns.Record_A(address))


def aaaa(name: str, address: str):
    return dns.RRHeader(name=name, type=dns.AAAA, payload=dns.Record_AAAA(address))


def described(specs) -> list[tuple[str, int, int]]:
    return [(s.address, s.weight, s.priority) for s in specs]


# (answers, additional, backends as (address, weight, priority))
ANSWER_CASES = [
    ([srv("web-1.test", 3001)], [], [("web-1.test:3001", 1, 0)]),
    ([srv("web-1.test", 3001, weight=0)], [], [("web-1.test:3001", 1, 0)]),
    ([srv("web-1.test", 3001, weight=5000)], [], [("web-1.test:3001", 1000, 0)]),
    ([srv("web-1.test", 3001, weight=7)], [a("web-1.test", "127.0.0.5")],
     [("127.0.0.5:3001", 7, 0)]),
    ([srv("web-1.test", 3001)], [aaaa("web-1.test", "::1")], [("[::1]:3001", 1, 0)]),
    (
        [srv("b.test", 2, priority=20), srv("a.test", 1, priority=10),
         srv("c.test", 3, priority=30), srv("d.test", 4, priority=10)],
        [],
        [("a.test:1", 1, 0), ("d.test:4", 1, 0), ("b.test:2", 1, 1), ("c.test:3", 1, 2)],
    ),
    ([srv("", 3001), srv("web-1.test", 3002)], [], [("web-1.test:3002", 1, 0)]),
    ([srv("x.test", 1, name="_other._tcp.test"), srv("web.test", 2)], [],
     [("web.test:2", 1, 0)]),
    ([srv("web.test", 2, priority=1), srv("WEB.test", 2, priority=5)], [],
     [("web.test:2", 1, 0)]),
    ([], [], []),
    ([srv("b.test", 2), srv("a.test", 1)], [], [("a.test:1", 1, 0), ("b.test:2", 1, 0)]),
]


@pytest.mark.parametrize("answers, additional, expected", ANSWER_CASES)
def test_specsFromAnswer(answers, additional, expected) -> None:
    """Each SRV record of the name is a backend: its weight the SRV weight (0 is 1), its level the rank of its SRV priority, its host the target's address when the answer gives one."""
    assert described(specsFromAnswer(NAME, answers, additional)) == expected


@pytest.mark.parametrize(
    "value, expected",
    [("127.0.0.1:8600", "127.0.0.1:8600"), ("10.0.0.2", "10.0.0.2:53"),
     ("[::1]:5353", "[::1]:5353")],
)
def test_dnsServer(value, expected) -> None:
    """--dns-server takes HOST:PORT (port 53 when left out)."""
    assert dnsServer(value, "--dns-server") == expected


@pytest.mark.parametrize("value", ["consul:8600", "127.0.0.1:x", "127.0.0.1:70000", ""])
def test_dnsServerErrors(value) -> None:
    """A --dns-server that is not an IP address and port is an error saying so."""
    with pytest.raises(ConfigError, match="--dns-server"):
        dnsServer(value, "--dns-server")


class FakeResolver:
    """
    Answers lookupService with Deferreds the test fires.
    """

    def __init__(self) -> None:
        self.lookups: list[tuple[str, Deferred]] = []

    def lookupService(self, name, timeout=None):
        d: Deferred = Deferred()
        self.lookups.append((name, d))
        return d

    def answer(self, *records, additional=()):
        name, d = self.lookups[-1]
        d.callback((list(records), [], list(additional)))

    def fail(self, reason=None):
        name, d = self.lookups[-1]
        d.errback(reason or error.DNSNameError(name))


class SRVDiscoveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.resolver = FakeResolver()
        self.changes: list = []
        self.discovery = SRVDiscovery(
            NAME, self.resolver, self.clock, self.changes.append,
            minTTL=1.0, maxTTL=60.0, retry=5.0,
        )
        self.discovery.start()

    def test_looked_up_again_when_ttl_runs_out(self) -> None:
        """The name is looked up again after the smallest TTL of the answer."""
        self.resolver.answer(srv("a.test", 1, ttl=30), srv("b.test", 2, ttl=10))
        self.assertEqual(described(self.changes[-1]),
                         [("a.test:1", 1, 0), ("b.test:2", 1, 0)])
        self.clock.advance(9.9)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.resolver.lookups), 2)

    def test_ttl_floor_and_ceiling(self) -> None:
        """A TTL of 0 waits the floor, a TTL of a day the ceiling."""
        self.resolver.answer(srv("a.test", 1, ttl=0))
        self.assertEqual(self.discovery.nextLookup, 1.0)
        self.clock.advance(1.0)
        self.resolver.answer(srv("a.test", 1, ttl=86400))
        self.assertEqual(self.discovery.nextLookup, 60.0)

    def test_same_answer_is_no_change(self) -> None:
        """An answer with the same backends, in whatever order, calls no one."""
        self.resolver.answer(srv("a.test", 1, ttl=5), srv("b.test", 2, ttl=5))
        self.clock.advance(5)
        self.resolver.answer(srv("b.test", 2, ttl=5), srv("a.test", 1, ttl=5))
        self.assertEqual(len(self.changes), 1)

    def test_failed_lookup_keeps_last_good_set(self) -> None:
        """A failed or empty lookup changes nothing, is logged, and is tried again after the retry delay."""
        self.resolver.answer(srv("a.test", 1, ttl=5))
        self.clock.advance(5)
        self.resolver.fail()
        self.assertEqual(len(self.changes), 1)
        self.assertEqual(self.discovery.nextLookup, 5.0)
        self.clock.advance(5)
        self.resolver.answer()  # no records
        self.assertEqual(len(self.changes), 1)
        self.assertEqual(described(self.discovery.specs), [("a.test:1", 1, 0)])
        self.clock.advance(5)
        self.resolver.answer(srv("b.test", 2, ttl=5))
        self.assertEqual(described(self.changes[-1]), [("b.test:2", 1, 0)])
        self.flushLoggedErrors()

    def test_stop(self) -> None:
        """After stop, a lookup in flight is dropped and no more are made."""
        self.discovery.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(600)
        self.assertEqual(len(self.resolver.lookups), 1)
        self.assertEqual(self.changes, [])


class SRVPoolTests(SynchronousTestCase):
    """
    A Balancer whose pool is srv:NAME follows the records through the
    reload diff.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver()
        config = BalancerConfig(
            pools=(PoolConfig(backends=(), source="srv:" + NAME),)
        )
        self.balancer = Balancer(
            config=config, reactor=self.reactor, resolver=self.resolver,
            healthClient=FakeHealthClient(), jitter=lambda: 0.0,
        )
        self.balancer.startService()
        self.addCleanup(self.balancer.stopService)

    @property
    def backends(self):
        return self.balancer.defaultPool.pool.backends

    def test_records_become_backends(self) -> None:
        """The first answer gives the pool its backends, weights and levels; their checks start."""
        self.assertEqual(self.backends, [])
        self.resolver.answer(
            srv("a.test", 3001, weight=3, priority=10), srv("b.test", 3002, priority=20),
            additional=[a("a.test", "127.0.0.1"), a("b.test", "127.0.0.2")],
        )
        self.assertEqual(
            [(b.address, b.weight, b.priority) for b in self.backends],
            [("127.0.0.1:3001", 3, 0), ("127.0.0.2:3002", 1, 1)],
        )
        checker = self.balancer.defaultPool.checker
        self.assertTrue(all(b in checker for b in self.backends))
        self.assertEqual(self.balancer.config.pool("default").backends[0].weight, 3)

    def test_changes_go_through_the_diff(self) -> None:
        """A later answer adds, removes and reweights in place; unchanged backends are the same objects with their counters."""
        self.resolver.answer(srv("a.test", 1, ttl=5), srv("b.test", 2, ttl=5))
        first = self.backends[0]
        first.requests = 9
        self.reactor.advance(5)
        self.resolver.answer(srv("a.test", 1, weight=4, ttl=5), srv("c.test", 3, ttl=5))
        self.assertEqual([(b.address, b.weight) for b in self.backends],
                         [("a.test:1", 4), ("c.test:3", 1)])
        self.assertIs(self.backends[0], first)
        self.assertEqual(first.requests, 9)

    def test_failed_lookup_keeps_backends(self) -> None:
        """A failed lookup leaves the pool's backends as they were."""
        self.resolver.answer(srv("a.test", 1, ttl=5))
        before = list(self.backends)
        self.reactor.advance(5)
        self.resolver.fail(error.DNSServerError("SERVFAIL"))
        self.assertEqual(self.backends, before)

    def test_reload_keeps_discovered_backends(self) -> None:
        """A reload of a configuration with the same srv: pool keeps the backends DNS gave it."""
        self.resolver.answer(srv("a.test", 1, ttl=5))
        before = list(self.backends)
        config = BalancerConfig(
            pools=(PoolConfig(backends=(), source="srv:" + NAME, backendTimeout=9),)
        )
        self.balancer.reloader = lambda: config
        self.balancer.reload()
        self.assertEqual(self.backends, before)
        self.assertEqual(self.balancer.defaultPool.forwarder.backendTimeout, 9)
        self.assertEqual(len(self.balancer.discoveries), 1)

    def test_stop_stops_lookups(self) -> None:
        """Stopping the balancer stops its lookups."""
        self.resolver.answer(srv("a.test", 1, ttl=5))
        self.successResultOf(self.balancer.stopService())
        self.assertEqual(self.balancer.discoveries, {})
        self.reactor.advance(60)
        self.assertEqual(len(self.resolver.lookups), 1)
