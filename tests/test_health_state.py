"""
Tests for txbalancer.health.state: the per-backend state machine alone.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.backend import Backend
from txbalancer.config import BackendSpec
from txbalancer.health import DOWN, DRAINING, UP, BackendHealth


def backend(port: int = 3001, scheme: str = "http") -> Backend:
    return Backend(BackendSpec(host="127.0.0.1", port=port, scheme=scheme))


class Changes:
    """
    Records onChange calls.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, str, str]] = []

    def __call__(self, backend: Any, state: str, reason: str) -> None:
        self.calls.append((backend, state, reason))

    @property
    def states(self) -> list[str]:
        return [state for _, state, _ in self.calls]


class BackendHealthTests(SynchronousTestCase):
    def machine(self, **kw: Any) -> tuple[BackendHealth, Changes]:
        changes = Changes()
        return BackendHealth("127.0.0.1:3002", changes, **kw), changes

    def test_startsUpSilently(self) -> None:
        """A new machine is up and reports nothing until something changes."""
        h, changes = self.machine()
        self.assertEqual(h.state, "up")
        self.assertEqual(changes.calls, [])

    def test_fallAfterConsecutiveFailures(self) -> None:
        """Only the fall-th consecutive failure takes it down, reported once."""
        h, changes = self.machine(rise=2, fall=3)
        h.probeFailed("connection refused")
        h.probeFailed("connection refused")
        self.assertEqual(changes.calls, [])
        h.probeFailed("connection refused")
        self.assertEqual(
            changes.calls,
            [("127.0.0.1:3002", "down", "3 failed checks, last: connection refused")],
        )
        for _ in range(5):
            h.probeFailed("connection refused")
        self.assertEqual(len(changes.calls), 1)
        self.assertEqual(h.state, "down")

    def test_passResetsFailureCount(self) -> None:
        """A pass between failures starts the fall count again."""
        h, changes = self.machine(fall=3)
        for _ in range(4):
            h.probeFailed("status 500")
            h.probeFailed("status 500")
            h.probeSucceeded()
        self.assertEqual(changes.calls, [])

    def test_riseAfterConsecutivePasses(self) -> None:
        """A down backend comes up after rise consecutive passes, reported once."""
        h, changes = self.machine(rise=2, fall=1)
        h.probeFailed("status 500")
        h.probeSucceeded()
        h.probeFailed("status 500")
        h.probeSucceeded()
        self.assertEqual(changes.states, ["down"])
        h.probeSucceeded()
        self.assertEqual(changes.calls[-1], ("127.0.0.1:3002", "up", "2 passed checks"))
        h.probeSucceeded()
        self.assertEqual(changes.states, ["down", "up"])

    def test_initialDown(self) -> None:
        """Started down, a backend needs rise passes before it is up."""
        h, changes = self.machine(rise=3, initial="down")
        self.assertEqual(h.state, "down")
        h.probeSucceeded()
        h.probeSucceeded()
        self.assertEqual(changes.calls, [])
        h.probeSucceeded()
        self.assertEqual(changes.states, ["up"])

    def test_badInitialState(self) -> None:
        """Only up or down can be the initial state."""
        self.assertRaises(ValueError, BackendHealth, "b", Changes(), initial="draining")

    def test_drainingAnswer(self) -> None:
        """A 503 with Retry-After drains at once, then rise passes bring it up."""
        h, changes = self.machine(rise=2)
        h.probeDraining("check answered 503, Retry-After: 30")
        h.probeDraining("check answered 503, Retry-After: 30")
        self.assertEqual(
            changes.calls,
            [("127.0.0.1:3002", "draining", "check answered 503, Retry-After: 30")],
        )
        h.probeSucceeded()
        self.assertEqual(changes.states, ["draining"])
        h.probeSucceeded()
        self.assertEqual(changes.states, ["draining", "up"])

    def test_drainingThenDead(self) -> None:
        """A draining backend that stops answering goes down after fall failures."""
        h, changes = self.machine(fall=2)
        h.probeDraining("check answered 503, Retry-After: 5")
        h.probeFailed("connection refused")
        h.probeFailed("connection refused")
        self.assertEqual(changes.states, ["draining", "down"])

    def test_operatorDrain(self) -> None:
        """An operator drain holds whatever the checks say, until undrain."""
        h, changes = self.machine(rise=1, fall=1)
        h.drain()
        h.probeSucceeded()
        h.probeDraining("x")
        h.drain()
        self.assertEqual(
            changes.calls, [("127.0.0.1:3002", "draining", "drained by operator")]
        )
        h.undrain()
        self.assertEqual(
            changes.calls[-1], ("127.0.0.1:3002", "up", "undrained by operator")
        )
        h.undrain()
        self.assertEqual(changes.states, ["draining", "up"])

    def test_undrainWhileFailing(self) -> None:
        """Undraining a backend whose checks fail puts it down, not up."""
        h, changes = self.machine(fall=2)
        h.drain()
        h.probeFailed("connection refused")
        h.probeFailed("connection refused")
        h.undrain()
        self.assertEqual(changes.states, ["draining", "down"])
        self.assertIn("connection refused", changes.calls[-1][2])

    def test_ejection(self) -> None:
        """An ejection takes an up backend down; its end brings it up."""
        h, changes = self.machine()
        h.eject(10.0, "5 consecutive failed requests")
        self.assertEqual(
            changes.calls,
            [
                (
                    "127.0.0.1:3002",
                    "down",
                    "ejected for 10s: 5 consecutive failed requests",
                )
            ],
        )
        h.eject(20.0, "again")
        h.ejectionEnded()
        h.ejectionEnded()
        self.assertEqual(changes.states, ["down", "up"])
        self.assertEqual(changes.calls[-1][2], "ejection ended")

    def test_ejectionEndedEarlyByChecks(self) -> None:
        """Rise passes counted from the ejection bring an ejected backend up."""
        h, changes = self.machine(rise=2)
        h.probeSucceeded()
        h.probeSucceeded()
        h.eject(10.0, "5 consecutive failed requests")
        h.probeSucceeded()
        self.assertEqual(changes.states, ["down"])
        h.probeSucceeded()
        self.assertEqual(
            changes.calls[-1],
            ("127.0.0.1:3002", "up", "2 passed checks, ejection ended early"),
        )
        h.ejectionEnded()
        self.assertEqual(changes.states, ["down", "up"])

    def test_ejectedAndFailingStaysDown(self) -> None:
        """An ejected backend whose checks fail stays down when the ejection ends."""
        h, changes = self.machine(rise=2, fall=2)
        h.eject(10.0, "x")
        h.probeFailed("connection refused")
        h.probeFailed("connection refused")
        h.ejectionEnded()
        self.assertEqual(changes.states, ["down"])
        self.assertEqual(h.state, "down")
        h.probeSucceeded()
        h.probeSucceeded()
        self.assertEqual(changes.states, ["down", "up"])

    def test_ejectWhileDownIgnored(self) -> None:
        """Ejection inputs change nothing for a backend that is already down."""
        h, changes = self.machine(fall=1)
        h.probeFailed("x")
        h.eject(10.0, "y")
        h.ejectionEnded()
        self.assertEqual(changes.states, ["down"])

    def test_status(self) -> None:
        """status() reports the state, the counters, the last check and error."""
        now = [100.0]
        h, _changes = self.machine(fall=2, seconds=lambda: now[0])
        self.assertEqual(h.status()["lastCheck"], None)
        h.probeFailed("status 500")
        now[0] = 105.0
        h.probeFailed("connection refused")
        status = h.status()
        self.assertEqual(status["state"], "down")
        self.assertEqual(status["consecutiveFailures"], 2)
        self.assertEqual(status["consecutivePasses"], 0)
        self.assertEqual(status["lastCheck"], 105.0)
        self.assertEqual(status["lastError"], "connection refused")
        self.assertEqual(status["transitions"], 1)
        h.probeSucceeded()
        self.assertEqual(h.status()["consecutivePasses"], 1)
        self.assertEqual(h.status()["consecutiveFailures"], 0)

    def test_transitionLogLines(self) -> None:
        """Each transition is logged once, in the documented words."""
        h, _changes = self.machine(rise=2, fall=3)
        with capturedLogs() as events:
            for _ in range(4):
                h.probeFailed("connection refused")
            for _ in range(3):
                h.probeSucceeded()
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "backend 127.0.0.1:3002 down: 3 failed checks, last: connection refused",
                "backend 127.0.0.1:3002 up: 2 passed checks",
            ],
        )

    def test_onChangeRaising(self) -> None:
        """A callback that raises is logged and the machine carries on."""

        def broken(b: Any, state: str, reason: str) -> None:
            raise RuntimeError("oops")

        h = BackendHealth("b", broken, fall=1, rise=1)
        with capturedLogs() as events:
            h.probeFailed("x")
            h.probeSucceeded()
        self.assertEqual(h.state, "up")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertTrue(events)

    def test_publicStates(self) -> None:
        """The package names the three public states as the strings onChange reports."""
        from txbalancer.health import state

        self.assertEqual((UP, DOWN, DRAINING), ("up", "down", "draining"))
        self.assertIs(BackendHealth, state.BackendHealth)
