"""
Tests for txbalancer.health.outliers: passive ejection on a fake clock, and
the detector wired to the checker as the package docstring says.
"""

from __future__ import annotations

from typing import Any

from test_health_checker import FakeClient
from test_health_state import Changes, backend
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.health import HealthChecker, OutlierDetector


class OutlierDetectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ejected: list[tuple[Any, float, str]] = []
        self.returned: list[Any] = []

    def detector(self, **kw: Any) -> OutlierDetector:
        return OutlierDetector(
            lambda b, s, r: self.ejected.append((b, s, r)),
            self.returned.append,
            self.clock,
            **kw,
        )

    def test_ejectAfterN(self) -> None:
        """The N-th consecutive failure ejects for the base time, then it returns."""
        d = self.detector(ejectAfter=5, baseEjection=10.0)
        for _ in range(4):
            d.record("a", False, 4)
        self.assertEqual(self.ejected, [])
        d.record("a", False, 4)
        self.assertEqual(self.ejected, [("a", 10.0, "5 consecutive failed requests")])
        self.assertTrue(d.isEjected("a"))
        self.clock.advance(9.9)
        self.assertEqual(self.returned, [])
        self.clock.advance(0.1)
        self.assertEqual(self.returned, ["a"])
        self.assertFalse(d.isEjected("a"))

    def test_successResetsStreak(self) -> None:
        """A success between failures starts the count again."""
        d = self.detector(ejectAfter=3)
        for _ in range(5):
            d.record("a", False, 4)
            d.record("a", False, 4)
            d.record("a", True, 4)
        self.assertEqual(self.ejected, [])

    def test_failuresWhileEjectedIgnored(self) -> None:
        """Late failures of an ejected backend neither re-eject nor extend it."""
        d = self.detector(ejectAfter=2)
        for _ in range(10):
            d.record("a", False, 4)
        self.assertEqual(len(self.ejected), 1)

    def test_doublingUpToCap(self) -> None:
        """Each repeat ejection lasts twice as long, up to the cap."""
        d = self.detector(ejectAfter=1, baseEjection=10.0, maxEjection=50.0)
        for _ in range(5):
            d.record("a", False, 4)
            self.clock.advance(self.ejected[-1][1])
        self.assertEqual(
            [s for _, s, _ in self.ejected], [10.0, 20.0, 40.0, 50.0, 50.0]
        )
        self.assertEqual(self.returned, ["a"] * 5)

    def test_repeatCountDecays(self) -> None:
        """A backend that stays in for maxEjection seconds starts from base again."""
        d = self.detector(ejectAfter=1, baseEjection=10.0, maxEjection=50.0)
        d.record("a", False, 4)
        self.clock.advance(10.0)
        d.record("a", False, 4)
        self.clock.advance(20.0)
        self.clock.advance(50.0)
        d.record("a", False, 4)
        self.assertEqual([s for _, s, _ in self.ejected], [10.0, 20.0, 10.0])

    def test_maxEjectedPercent(self) -> None:
        """No ejection takes out more than the allowed share of backends."""
        d = self.detector(ejectAfter=1, baseEjection=10.0, maxEjectedPercent=50)
        d.record("a", False, 3)
        d.record("b", False, 3)
        self.assertEqual([b for b, _, _ in self.ejected], ["a"])
        self.clock.advance(10.0)
        d.record("b", False, 3)
        self.assertEqual([b for b, _, _ in self.ejected], ["a", "b"])

    def test_maxEjectedPercentHalf(self) -> None:
        """With two backends and 50%, one may be ejected, never both."""
        d = self.detector(ejectAfter=1, maxEjectedPercent=50)
        d.record("a", False, 2)
        d.record("b", False, 2)
        self.assertEqual([b for b, _, _ in self.ejected], ["a"])

    def test_soleBackendNeverEjected(self) -> None:
        """A lone backend is never ejected at the default 50%."""
        d = self.detector(ejectAfter=1)
        for _ in range(10):
            d.record("a", False, 1)
        self.assertEqual(self.ejected, [])

    def test_returnEarly(self) -> None:
        """returnEarly cancels the ejection without calling onReturn."""
        d = self.detector(ejectAfter=1, baseEjection=10.0)
        self.assertFalse(d.returnEarly("a"))
        d.record("a", False, 4)
        self.assertTrue(d.returnEarly("a"))
        self.assertFalse(d.isEjected("a"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.returned, [])
        d.record("a", False, 4)
        self.assertEqual([s for _, s, _ in self.ejected], [10.0, 20.0])

    def test_stopCancelsTimers(self) -> None:
        """stop() cancels every ejection timer and calls nothing."""
        d = self.detector(ejectAfter=1)
        d.record("a", False, 4)
        d.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.returned, [])

    def test_wiredToChecker(self) -> None:
        """Wired as the package docstring says: eject marks down, return or checks bring it up."""
        client = FakeClient()
        client.next = "ok"
        changes = Changes()
        outliers: list[OutlierDetector] = []

        def onChange(b: Any, state: str, reason: str) -> None:
            changes(b, state, reason)
            if state == "up":
                outliers[0].returnEarly(b)

        b = backend()
        checker = HealthChecker(
            [b],
            onChange,
            self.clock,
            client=client,
            jitter=lambda: 0,
            rise=2,
            interval=5.0,
        )
        detector = OutlierDetector(
            checker.eject,
            checker.ejectionEnded,
            self.clock,
            ejectAfter=2,
            baseEjection=100.0,
        )
        outliers.append(detector)
        detector.record(b, False, 3)
        detector.record(b, False, 3)
        self.assertEqual(changes.states, ["down"])
        self.assertTrue(detector.isEjected(b))
        checker.startService()
        self.clock.advance(0)
        self.clock.advance(5.0)
        self.assertEqual(changes.states, ["down", "up"])
        self.assertFalse(detector.isEjected(b))
        checker.stopService()
