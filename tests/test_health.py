"""
Tests for txbalancer.health: the per-backend state machine, the active
checker (on a fake clock with a fake HTTP client) and passive ejection.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from txbalancer.backend import Backend
from txbalancer.config import BackendSpec
from txbalancer.health import (
    BackendHealth,
    HealthChecker,
    OutlierDetector,
    panicActive,
)


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


# ---------------------------------------------------------------------------
# The machine alone
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------


class Flippable(Resource):
    """
    A health endpoint whose answer a test flips.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.headers: dict[bytes, bytes] = {}
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> bytes:
        self.requests.append(request)
        request.setResponseCode(self.code)
        for k, v in self.headers.items():
            request.setHeader(k, v)
        return b"ok\n"


class FakeResponse:
    def __init__(self, code: int = 200) -> None:
        self.code = code
        self.length = 3
        self.headers = Headers()
        self.delivered: list[Any] = []

    def deliverBody(self, protocol: Any) -> None:
        from twisted.web.client import ResponseDone

        self.delivered.append(protocol)
        protocol.makeConnection(None)
        protocol.dataReceived(b"ok\n")
        protocol.connectionLost(Failure(ResponseDone()))


class FakeClient:
    """
    A hand fake of treq's client: each get() does what C{self.next} says.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.pending: list[Deferred] = []
        self.cancelled = 0
        self.next = "hang"

    def get(self, url: str, **kw: Any) -> Any:
        self.calls.append((url, kw))
        if self.next == "raise":
            raise RuntimeError("boom")
        if self.next == "fail":
            return defer.fail(ConnectionRefusedError())
        if self.next == "garbage":
            return defer.succeed(object())
        if self.next == "ok":
            return defer.succeed(FakeResponse(200))

        def cancel(d: Deferred) -> None:
            self.cancelled += 1

        d: Deferred = Deferred(cancel)
        self.pending.append(d)
        return d


class HealthCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.changes = Changes()
        self.resource = Flippable()
        self.b = backend()

    def checker(
        self, client: Any = None, backends: Any = None, **kw: Any
    ) -> HealthChecker:
        kw.setdefault("jitter", lambda: 0)
        if client is None:
            client = StubTreq(self.resource)
        checker = HealthChecker(
            [self.b] if backends is None else backends,
            self.changes,
            self.clock,
            client=client,
            **kw,
        )
        self.addCleanup(lambda: checker.running and checker.stopService())
        return checker

    def test_probeCountPerInterval(self) -> None:
        """One check at start, then exactly one per interval."""
        checker = self.checker(interval=5.0)
        checker.startService()
        self.clock.advance(0)
        self.assertEqual(len(self.resource.requests), 1)
        self.clock.pump([5.0] * 4)
        self.assertEqual(len(self.resource.requests), 5)
        self.clock.advance(4.9)
        self.assertEqual(len(self.resource.requests), 5)

    def test_jitterDelaysFirstCheck(self) -> None:
        """The first check waits interval * jitter() * 0.1 seconds."""
        checker = self.checker(interval=10.0, jitter=lambda: 0.5)
        checker.startService()
        self.clock.advance(0.49)
        self.assertEqual(len(self.resource.requests), 0)
        self.clock.advance(0.01)
        self.assertEqual(len(self.resource.requests), 1)
        self.clock.advance(10.0)
        self.assertEqual(len(self.resource.requests), 2)

    def test_hostHeaderAndPath(self) -> None:
        """A check is GET path with the backend's address as Host."""
        checker = self.checker(path=b"/healthz")
        checker.startService()
        self.clock.advance(0)
        [request] = self.resource.requests
        self.assertEqual(request.method, b"GET")
        self.assertEqual(request.uri, b"/healthz")
        self.assertEqual(request.getHeader(b"host"), b"127.0.0.1:3001")

    def test_customHost(self) -> None:
        """A configured Host header is sent instead of the address."""
        checker = self.checker(host=b"app.internal")
        checker.startService()
        self.clock.advance(0)
        self.assertEqual(self.resource.requests[0].getHeader(b"host"), b"app.internal")

    def test_urlAndNoRedirects(self) -> None:
        """The probe URL names scheme, address and path; redirects are not followed."""
        client = FakeClient()
        client.next = "ok"
        checker = self.checker(
            client=client, backends=[backend(3443, "https")], path="st"
        )
        checker.startService()
        self.clock.advance(0)
        [(url, kw)] = client.calls
        self.assertEqual(url, "https://127.0.0.1:3443/st")
        self.assertFalse(kw["allow_redirects"])

    def test_fallAndRiseThroughChecks(self) -> None:
        """A failing endpoint goes down after fall checks and up after rise."""
        checker = self.checker(interval=5.0, rise=2, fall=3)
        checker.startService()
        self.clock.advance(0)
        self.resource.code = 500
        self.clock.pump([5.0] * 2)
        self.assertEqual(self.changes.calls, [])
        self.clock.advance(5.0)
        self.assertEqual(
            self.changes.calls, [(self.b, "down", "3 failed checks, last: status 500")]
        )
        self.resource.code = 204
        self.clock.advance(5.0)
        self.assertEqual(self.changes.states, ["down"])
        self.clock.advance(5.0)
        self.assertEqual(self.changes.calls[-1], (self.b, "up", "2 passed checks"))
        self.assertEqual(checker.state(self.b), "up")

    def test_statusRange(self) -> None:
        """Codes outside the configured range are failures."""
        checker = self.checker(statusRange=(200, 299), fall=1)
        self.resource.code = 302
        checker.startService()
        self.clock.advance(0)
        self.assertEqual(
            self.changes.calls, [(self.b, "down", "1 failed checks, last: status 302")]
        )

    def test_draining503(self) -> None:
        """503 with Retry-After drains; 503 without it is a failure."""
        checker = self.checker(fall=2)
        self.resource.code = 503
        checker.startService()
        self.clock.advance(0)
        self.assertEqual(self.changes.calls, [])
        self.assertEqual(checker.status(self.b)["consecutiveFailures"], 1)
        self.resource.headers[b"Retry-After"] = b"30"
        self.clock.advance(5.0)
        self.assertEqual(
            self.changes.calls,
            [(self.b, "draining", "check answered 503, Retry-After: 30")],
        )

    def test_timeout(self) -> None:
        """A hung check fails after the timeout, is cancelled, and the loop goes on."""
        client = FakeClient()
        checker = self.checker(client=client, interval=5.0, timeout=2.0, fall=1)
        checker.startService()
        self.clock.advance(0)
        self.assertEqual(len(client.calls), 1)
        self.clock.advance(1.9)
        self.assertEqual(self.changes.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(
            self.changes.calls,
            [(self.b, "down", "1 failed checks, last: timed out after 2s")],
        )
        self.clock.advance(3.0)
        self.assertEqual(len(client.calls), 2)

    def test_survivesSynchronousRaise(self) -> None:
        """A client that raises is a failed check, and checks keep coming."""
        client = FakeClient()
        client.next = "raise"
        checker = self.checker(client=client, interval=5.0, fall=2)
        checker.startService()
        self.clock.advance(0)
        self.clock.pump([5.0] * 5)
        self.assertEqual(len(client.calls), 6)
        self.assertEqual(checker.status(self.b)["lastError"], "RuntimeError: boom")
        self.assertEqual(self.changes.states, ["down"])

    def test_survivesAsynchronousFailure(self) -> None:
        """A check whose Deferred fails later is a failed check; the loop goes on."""
        client = FakeClient()
        checker = self.checker(client=client, interval=5.0, timeout=4.0, fall=1)
        checker.startService()
        self.clock.advance(0)
        client.pending[0].errback(ConnectionRefusedError())
        self.assertEqual(
            self.changes.calls[-1][2], "1 failed checks, last: connection refused"
        )
        self.clock.advance(5.0)
        client.pending[1].errback(ValueError("garbled"))
        self.clock.advance(5.0)
        self.assertEqual(len(client.calls), 3)
        self.assertEqual(checker.status(self.b)["lastError"], "ValueError: garbled")

    def test_survivesGarbage(self) -> None:
        """A response that is not a response is a failed check, not a dead loop."""
        client = FakeClient()
        client.next = "garbage"
        checker = self.checker(client=client, interval=5.0)
        checker.startService()
        self.clock.advance(0)
        self.clock.pump([5.0] * 3)
        self.assertEqual(len(client.calls), 4)
        self.assertEqual(checker.state(self.b), "down")

    def test_oneLogLinePerFailedCheck(self) -> None:
        """Each failed check logs exactly one line; the transition logs one more."""
        client = FakeClient()
        client.next = "fail"
        checker = self.checker(client=client, interval=5.0, fall=2)
        with capturedLogs() as events:
            checker.startService()
            self.clock.advance(0)
            self.clock.advance(5.0)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "health check of 127.0.0.1:3001 failed: connection refused",
                "health check of 127.0.0.1:3001 failed: connection refused",
                "backend 127.0.0.1:3001 down: 2 failed checks, last: connection refused",
            ],
        )

    def test_bodyIsRead(self) -> None:
        """The response body is read to its end, so the connection is released."""
        response = FakeResponse(200)
        client = FakeClient()
        client.get = lambda url, **kw: defer.succeed(response)  # type: ignore[method-assign]
        checker = self.checker(client=client)
        checker.startService()
        self.clock.advance(0)
        self.assertEqual(len(response.delivered), 1)
        self.assertEqual(checker.status(self.b)["consecutivePasses"], 1)

    def test_stopCancelsInFlight(self) -> None:
        """Stopping cancels the check in flight, reports nothing, and stops the loop."""
        client = FakeClient()
        checker = self.checker(client=client, fall=1)
        checker.startService()
        self.clock.advance(0)
        self.assertEqual(len(client.calls), 1)
        checker.stopService()
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(self.changes.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(len(client.calls), 1)

    def test_stopBeforeFirstCheck(self) -> None:
        """Stopping before the jittered first check leaves nothing scheduled."""
        checker = self.checker(jitter=lambda: 0.9)
        checker.startService()
        checker.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(self.resource.requests, [])

    def test_addAndRemoveBackend(self) -> None:
        """A backend added while running is checked; a removed one no longer is."""
        client = FakeClient()
        client.next = "ok"
        checker = self.checker(client=client, interval=5.0)
        checker.startService()
        self.clock.advance(0)
        other = backend(3002)
        checker.addBackend(other)
        self.clock.advance(0)
        self.assertEqual(
            [u for u, _ in client.calls],
            ["http://127.0.0.1:3001/", "http://127.0.0.1:3002/"],
        )
        checker.removeBackend(self.b)
        client.calls.clear()
        self.clock.pump([5.0] * 2)
        self.assertEqual([u for u, _ in client.calls], ["http://127.0.0.1:3002/"] * 2)
        self.assertRaises(KeyError, checker.status, self.b)

    def test_removeCancelsInFlight(self) -> None:
        """Removing a backend cancels its check in flight without a callback."""
        client = FakeClient()
        checker = self.checker(client=client, fall=1)
        checker.startService()
        self.clock.advance(0)
        checker.removeBackend(self.b)
        self.assertEqual(client.cancelled, 1)
        self.assertEqual(self.changes.calls, [])

    def test_inactive(self) -> None:
        """With checks off nothing is probed, but drains and ejections still work."""
        client = FakeClient()
        checker = self.checker(client=client, active=False)
        checker.startService()
        self.clock.advance(60)
        self.assertEqual(client.calls, [])
        checker.eject(self.b, 10.0, "5 consecutive failed requests")
        checker.ejectionEnded(self.b)
        checker.drain(self.b)
        checker.undrain(self.b)
        self.assertEqual(self.changes.states, ["down", "up", "draining", "up"])

    def test_lastCheckTime(self) -> None:
        """status() carries the clock time of the last check."""
        checker = self.checker(interval=5.0)
        self.clock.advance(1000)
        checker.startService()
        self.clock.advance(0)
        self.clock.advance(5.0)
        self.assertEqual(checker.status(self.b)["lastCheck"], 1005.0)

    def test_defaultClientOwnConnection(self) -> None:
        """Without a client, a check opens its own connection to the backend."""
        reactor = MemoryReactorClock()
        checker = HealthChecker([self.b], self.changes, reactor, jitter=lambda: 0)
        checker.startService()
        reactor.advance(0)
        [(host, port, _factory, timeout, _bind)] = reactor.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 3001, 2.0))
        checker.stopService()
        self.assertEqual(self.changes.calls, [])
        self.assertEqual(reactor.getDelayedCalls(), [])


# ---------------------------------------------------------------------------
# Passive ejection
# ---------------------------------------------------------------------------


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
        """Wired as the module says: eject marks down, return or checks bring it up."""
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


def test_panicActive() -> None:
    """Panic is on only with a threshold and fewer healthy than it."""
    assert not panicActive(0, 3, 0)
    assert panicActive(1, 3, 50)
    assert not panicActive(2, 3, 50)
    assert not panicActive(1, 2, 50)
    assert panicActive(0, 2, 50)
    assert not panicActive(0, 0, 50)


class Hanging(Resource):
    """
    A health endpoint that never answers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


class StubTreqHangTests(SynchronousTestCase):
    def test_hangThroughRealAgent(self) -> None:
        """Over treq's real Agent, a hung check times out and the next one runs."""
        clock = Clock()
        changes = Changes()
        resource = Hanging()
        b = backend()
        stub = StubTreq(resource)
        checker = HealthChecker(
            [b],
            changes,
            clock,
            client=stub,
            jitter=lambda: 0,
            interval=5.0,
            timeout=2.0,
            fall=2,
        )
        checker.startService()
        clock.advance(0)
        clock.advance(2.0)
        self.assertEqual(checker.status(b)["lastError"], "timed out after 2s")
        stub.flush()
        self.assertTrue(resource.requests[0]._disconnected)
        clock.advance(3.0)
        clock.advance(2.0)
        self.assertEqual(len(resource.requests), 2)
        self.assertEqual(
            changes.calls, [(b, "down", "2 failed checks, last: timed out after 2s")]
        )
        clock.advance(5.0)
        checker.stopService()
        self.assertEqual(len(resource.requests), 3)
        self.assertEqual(clock.getDelayedCalls(), [])
