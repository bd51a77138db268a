"""
Unit tests for L{txbalancer.pool.BackendPool}: which backends may be
picked (health, backups, panic), per-backend limits and the wait queue,
sticky cookie values and slow start.  No sockets, no real time.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.choosers import LeastConn, RoundRobin
from txbalancer.pool import BackendPool
from txbalancer.testing import backendSpecs


def pool(*lines: str, **kw) -> BackendPool:
    return BackendPool(backendSpecs(*lines), kw.pop("chooser", RoundRobin()), **kw)


class Waiter:
    def __init__(self, log: list, name: str, pool: BackendPool) -> None:
        self.log, self.name, self.pool = log, name, pool

    def backendFreed(self) -> None:
        backend = self.pool.choose()
        self.log.append((self.name, backend.address if backend else None))
        if backend is not None:
            self.pool.acquire(backend)


class AvailabilityTests(SynchronousTestCase):
    def test_down_backends_are_not_chosen(self) -> None:
        """A backend whose health is down or draining is never picked."""
        p = pool("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
        a, b, c = p.backends
        p.setHealth(b, "down")
        p.setHealth(c, "draining")
        self.assertEqual({p.choose().address for _ in range(6)}, {"127.0.0.1:1"})

    def test_nothing_up_gives_none(self) -> None:
        """With every backend down, choose answers None (the proxy's 503)."""
        p = pool("127.0.0.1:1", "127.0.0.1:2")
        for b in p.backends:
            p.setHealth(b, "down")
        self.assertIsNone(p.choose())

    def test_backup_only_when_no_primary_is_up(self) -> None:
        """A backup takes traffic only while every primary is down, and loses it when one returns."""
        p = pool("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:9 backup")
        a, b, backup = p.backends
        self.assertNotIn(backup, {p.choose() for _ in range(10)})
        p.setHealth(a, "down")
        p.setHealth(b, "down")
        self.assertEqual({p.choose() for _ in range(4)}, {backup})
        p.setHealth(b, "up")
        self.assertEqual({p.choose() for _ in range(4)}, {b})

    def test_priority_levels_in_turn(self) -> None:
        """Each priority level takes traffic only while every lower level is down, and loses it when a lower one returns."""
        p = pool("127.0.0.1:1", "127.0.0.1:2 priority=1", "127.0.0.1:3 priority=2",
                 "127.0.0.1:4 priority=2")
        a, b, c, d = p.backends
        self.assertEqual({p.choose() for _ in range(4)}, {a})
        p.setHealth(a, "down")
        self.assertEqual({p.choose() for _ in range(4)}, {b})
        p.setHealth(b, "down")
        self.assertEqual({p.choose() for _ in range(4)}, {c, d})
        p.setHealth(a, "up")
        self.assertEqual({p.choose() for _ in range(4)}, {a})

    def test_lowest_level_present_is_primary(self) -> None:
        """When no backend has priority 0, the lowest level present is the primary one."""
        p = pool("127.0.0.1:1 priority=3", "127.0.0.1:2 priority=5")
        a, b = p.backends
        self.assertEqual({p.choose() for _ in range(4)}, {a})
        p.setHealth(a, "down")
        self.assertEqual({p.choose() for _ in range(4)}, {b})

    def test_update_moves_a_backend_between_levels(self) -> None:
        """update() with a new priority moves the backend to that level at once."""
        p = pool("127.0.0.1:1", "127.0.0.1:2")
        a, b = p.backends
        p.update(b, b.spec.__class__("127.0.0.1", 2, priority=1))
        self.assertEqual({p.choose() for _ in range(4)}, {a})
        self.assertTrue(b.backup)

    def test_panic_balances_over_all_primaries(self) -> None:
        """Below the panic threshold every primary is picked, up or not; above it only the healthy."""
        p = pool("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4",
                 panicThreshold=50)
        backends = p.backends
        p.setHealth(backends[0], "down")
        self.assertFalse(p.panic)
        self.assertEqual(len({p.choose() for _ in range(12)}), 3)
        p.setHealth(backends[1], "down")  # 2 of 4 up: 50% is not below 50%
        self.assertFalse(p.panic)
        p.setHealth(backends[2], "down")  # 1 of 4 up: panic
        self.assertTrue(p.panic)
        self.assertEqual(set(p.choose() for _ in range(8)), set(backends))
        p.setHealth(backends[2], "up")
        self.assertFalse(p.panic)

    def test_excluded_backends_are_not_chosen(self) -> None:
        """A backend this request already tried is not picked again."""
        p = pool("127.0.0.1:1", "127.0.0.1:2")
        a, b = p.backends
        self.assertEqual({p.choose(None, {a}) for _ in range(4)}, {b})
        self.assertIsNone(p.choose(None, {a, b}))

    def test_status_is_plain_data(self) -> None:
        """status() lists every backend with its state and counters."""
        p = pool("127.0.0.1:1", "127.0.0.1:2 backup")
        p.setHealth(p.backends[0], "down")
        status = p.status()
        self.assertEqual([s["address"] for s in status], ["127.0.0.1:1", "127.0.0.1:2"])
        self.assertEqual(status[0]["state"], "down")
        self.assertTrue(status[1]["backup"])


class LimitTests(SynchronousTestCase):
    def test_full_backend_is_skipped(self) -> None:
        """A backend at its max_conns is not picked while another has room."""
        p = pool("127.0.0.1:1 max_conns=1", "127.0.0.1:2", chooser=LeastConn())
        a, b = p.backends
        p.acquire(a)
        self.assertEqual({p.choose() for _ in range(4)}, {b})
        self.assertFalse(p.isFull())

    def test_every_backend_full(self) -> None:
        """When every backend is at max_conns there is no choice, and isFull says why."""
        p = pool("127.0.0.1:1 max_conns=1", "127.0.0.1:2 max_conns=2")
        a, b = p.backends
        p.acquire(a)
        p.acquire(b)
        p.acquire(b)
        self.assertIsNone(p.choose())
        self.assertTrue(p.isFull())

    def test_queue_is_bounded_and_fifo(self) -> None:
        """Waiters beyond queueSize are refused; freed slots go to waiters in arrival order."""
        p = pool("127.0.0.1:1 max_conns=1", queueSize=2)
        (a,) = p.backends
        p.acquire(a)
        log: list = []
        first, second, third = (Waiter(log, n, p) for n in ("first", "second", "third"))
        self.assertTrue(p.enqueue(first))
        self.assertTrue(p.enqueue(second))
        self.assertFalse(p.enqueue(third))
        p.release(a)
        self.assertEqual(log, [("first", "127.0.0.1:1")])
        p.release(a)
        self.assertEqual(log[1], ("second", "127.0.0.1:1"))
        self.assertEqual(len(p.waiting), 0)

    def test_dequeued_waiter_is_not_woken(self) -> None:
        """A waiter that left the queue (timeout, client gone) is never called."""
        p = pool("127.0.0.1:1 max_conns=1", queueSize=5)
        (a,) = p.backends
        p.acquire(a)
        log: list = []
        gone, stays = Waiter(log, "gone", p), Waiter(log, "stays", p)
        p.enqueue(gone)
        p.enqueue(stays)
        p.dequeue(gone)
        p.release(a)
        self.assertEqual([name for name, _ in log], ["stays"])

    def test_recovery_wakes_waiters(self) -> None:
        """A backend that comes back up lets waiting requests go."""
        p = pool("127.0.0.1:1 max_conns=1", "127.0.0.1:2 max_conns=1", queueSize=5)
        a, b = p.backends
        p.setHealth(b, "down")
        p.acquire(a)
        log: list = []
        p.enqueue(Waiter(log, "w", p))
        p.setHealth(b, "up")
        self.assertEqual(log, [("w", "127.0.0.1:2")])


class CookieTests(SynchronousTestCase):
    def test_cookie_names_its_backend(self) -> None:
        """A backend's cookie value leads back to it, and does not show its address."""
        p = pool("127.0.0.1:3001", "127.0.0.1:3002")
        for backend in p.backends:
            value = p.cookieFor(backend)
            self.assertNotIn("3001", value)
            self.assertNotIn("127.0.0.1", value)
            self.assertIs(p.backendForCookie(value), backend)

    def test_tampered_or_foreign_cookie(self) -> None:
        """A changed value, or one made with another secret, names no backend."""
        p = pool("127.0.0.1:1", cookieSecret=b"one")
        other = pool("127.0.0.1:1", cookieSecret=b"two")
        value = p.cookieFor(p.backends[0])
        self.assertIsNone(p.backendForCookie(value[:-1] + ("0" if value[-1] != "0" else "1")))
        self.assertIsNone(p.backendForCookie(other.cookieFor(other.backends[0])))

    def test_same_secret_same_cookie(self) -> None:
        """Two balancers given the same secret agree on every cookie."""
        one = pool("127.0.0.1:1", "127.0.0.1:2", cookieSecret=b"s")
        two = pool("127.0.0.1:1", "127.0.0.1:2", cookieSecret=b"s")
        self.assertEqual(
            [one.cookieFor(b) for b in one.backends], [two.cookieFor(b) for b in two.backends]
        )

    def test_cookie_for_down_backend_is_ignored(self) -> None:
        """A cookie for a backend that is down (or full) falls back to the strategy."""
        p = pool("127.0.0.1:1 max_conns=1", "127.0.0.1:2")
        a, b = p.backends
        value = p.cookieFor(a)
        p.acquire(a)
        self.assertIsNone(p.backendForCookie(value))
        p.release(a)
        p.setHealth(a, "down")
        self.assertIsNone(p.backendForCookie(value))


class SlowStartTests(SynchronousTestCase):
    def test_weight_ramps_after_recovery(self) -> None:
        """A backend that comes back up starts at a tenth of its weight and reaches it after slowStart."""
        clock = Clock()
        p = pool("127.0.0.1:1 weight=10", "127.0.0.1:2", clock=clock, slowStart=10.0)
        a, _ = p.backends
        p.setHealth(a, "down")
        p.setHealth(a, "up")
        self.assertAlmostEqual(a.weight, 1.0)
        clock.advance(5.0)
        self.assertAlmostEqual(a.weight, 5.0)
        clock.advance(5.0)
        self.assertEqual(a.weight, 10)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_slow_start_by_default(self) -> None:
        """Without slowStart a recovered backend gets its full weight at once."""
        clock = Clock()
        p = pool("127.0.0.1:1 weight=10", clock=clock)
        (a,) = p.backends
        p.setHealth(a, "down")
        p.setHealth(a, "up")
        self.assertEqual(a.weight, 10)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_stops_the_ramp(self) -> None:
        """Stopping the pool leaves no timer behind."""
        clock = Clock()
        p = pool("127.0.0.1:1", clock=clock, slowStart=10.0)
        p.startService()
        p.setHealth(p.backends[0], "down")
        p.setHealth(p.backends[0], "up")
        p.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
