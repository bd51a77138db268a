"""
Tests for txbalancer.health.checker: the active checks, on a fake clock
with a fake HTTP client (and treq's StubTreq over a real Agent).
"""

from __future__ import annotations

from typing import Any

from test_health_state import Changes, backend
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

from txbalancer.health import HealthChecker


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
