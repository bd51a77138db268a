"""
Backend health: active checks, passive outlier ejection, and the state
machine that turns both into one answer per backend: up, down or draining.

Three pieces, each usable alone:

L{BackendHealth}
    One Automat state machine per backend (C{TypeMachineBuilder}, as
    Twisted's own C{ClientService} is built).  Inputs come from the active
    checker (C{probeSucceeded}, C{probeFailed}, C{probeDraining}), from the
    operator (C{drain}, C{undrain}) and from the outlier detector (C{eject},
    C{ejectionEnded}).  Its only output is one callback,
    C{onChange(backend, state, reason)}, called exactly once each time the
    public state (C{"up"}, C{"down"} or C{"draining"}) changes, never
    otherwise.  A backend starts B{up}, so traffic flows from the first
    second; a dead backend is taken out after C{fall} failed checks
    (C{interval * fall} seconds, plus the start-up jitter below).

    Internally there are five states:

      - C{up}: takes traffic; C{fall} consecutive failed checks -> C{down}.
      - C{down}: C{rise} consecutive passed checks -> C{up}.
      - C{draining}: the check answered 503 with C{Retry-After}; no new
        requests.  C{rise} passes -> C{up}, C{fall} failures -> C{down}.
      - C{ejected} (reported as C{"down"}): the outlier detector took it out
        for a while.  C{ejectionEnded} -> C{up}; or C{rise} consecutive
        passed checks counted from the ejection -> C{up} early; or C{fall}
        failed checks -> C{down} (still reported C{"down"}, so no callback).
      - C{drained} (reported as C{"draining"}): the operator drained it.
        Checks keep running and keep their verdict; C{undrain} goes to
        C{up} if the last verdict was healthy, else C{down}.

L{HealthChecker}
    A C{Service} holding one L{BackendHealth} and one C{LoopingCall} per
    backend.  Each check is C{GET path} with a C{Host} header and a
    timeout, over treq on its own non-persistent connection pool (never the
    proxy's).  The first check of each backend runs after
    C{interval * jitter() * 0.1} seconds (so up to a tenth of an interval;
    with many backends their checks do not all fire in the same instant),
    then every C{interval} seconds.  A probe never fails: whatever goes
    wrong (refused, timed out, garbage, an exception raised synchronously)
    is logged in one line and fed to the machine as a failed check, so the
    C{LoopingCall} never sees an errback and never stops.

L{OutlierDetector}
    Passive ejection from real traffic.  The proxy calls
    C{record(backend, ok, total)} after each attempt.  C{ejectAfter}
    consecutive failures (connect failures, 5xx) eject the backend for
    C{baseEjection * 2 ** (n - 1)} seconds, n being how many times it was
    ejected (capped at C{maxEjection}; n starts again from 1 once a backend
    stays in for C{maxEjection} seconds after a return).  No ejection that
    would take more than C{maxEjectedPercent} of C{total} backends out.

How they meet (what C{tap.makeService} wires)::

    def onChange(backend, state, reason):
        pool.setHealth(backend, state, reason)
        if state == "up":
            outliers.returnEarly(backend)   # checks brought it back sooner

    checker = HealthChecker(pool.backends, onChange, reactor, ...)
    outliers = OutlierDetector(checker.eject, checker.ejectionEnded, reactor)
    # in the proxy, after each attempt:
    outliers.record(backend, ok, total=len(pool.backends))

So an ejection marks the backend down at once (C{onEject} -> C{eject});
when its time is up the detector calls C{onReturn} -> C{ejectionEnded} ->
up.  If active checks pass C{rise} times in a row first, the machine goes
up by itself and C{onChange} tells the detector with C{returnEarly}, which
cancels its timer and forgets the ejection (without calling C{onReturn}).

L{panicActive} answers whether so few backends are healthy that the
chooser should ignore health and balance over all of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from automat import TypeMachineBuilder
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol as _WireProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

log = Logger()

UP = "up"
DOWN = "down"
DRAINING = "draining"


def _address(backend: Any) -> str:
    return str(getattr(backend, "address", backend))


# ---------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------


class _HealthInputs(Protocol):
    def probeSucceeded(self) -> None:
        "An active check passed."

    def probeFailed(self, reason: str) -> None:
        "An active check failed, for C{reason}."

    def probeDraining(self, reason: str) -> None:
        "An active check answered 503 with Retry-After."

    def drain(self) -> None:
        "The operator drains the backend."

    def undrain(self) -> None:
        "The operator puts the backend back."

    def eject(self, seconds: float, reason: str) -> None:
        "The outlier detector ejected the backend for C{seconds}."

    def ejectionEnded(self) -> None:
        "The ejection is over."

    def _risen(self) -> None:
        "Enough passes in a row (internal)."

    def _fallen(self, reason: str) -> None:
        "Enough failures in a row (internal)."


@dataclass
class _HealthCore:
    backend: Any
    onChange: Callable[[Any, str, str], object]
    rise: int
    fall: int
    seconds: Callable[[], float] | None
    log: Logger
    state: str = UP
    healthy: bool = True
    passes: int = 0
    failures: int = 0
    lastCheck: float | None = None
    lastError: str | None = None
    transitions: int = 0

    def _checked(self) -> None:
        if self.seconds is not None:
            self.lastCheck = self.seconds()

    def passed(self) -> int:
        self._checked()
        self.passes += 1
        self.failures = 0
        if self.passes >= self.rise:
            self.healthy = True
        return self.passes

    def failed(self, reason: str) -> int:
        self._checked()
        self.failures += 1
        self.passes = 0
        self.lastError = reason
        if self.failures >= self.fall:
            self.healthy = False
        return self.failures

    def drainingAnswer(self, reason: str) -> None:
        self._checked()
        self.passes = 0
        self.failures = 0
        self.lastError = reason

    def changed(self, state: str, reason: str) -> None:
        """
        Enter public C{state}; log and call C{onChange} only if it differs.
        """
        if state == self.state:
            return
        self.state = state
        self.transitions += 1
        emit = self.log.info if state == UP else self.log.warn
        emit(
            "backend {address} {state}: {reason}",
            address=_address(self.backend),
            state=state,
            reason=reason,
        )
        try:
            self.onChange(self.backend, state, reason)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the machine
            self.log.failure(
                "onChange for backend {address} raised",
                address=_address(self.backend),
            )


def _makeMachine():
    m = TypeMachineBuilder(_HealthInputs, _HealthCore)
    In = _HealthInputs
    Up = m.state("up")
    Down = m.state("down")
    Draining = m.state("draining")
    Ejected = m.state("ejected")
    Drained = m.state("drained")

    # -- counting, in every state --------------------------------------

    @Up.upon(In.probeSucceeded).loop()
    @Drained.upon(In.probeSucceeded).loop()
    def justPassed(c: _HealthInputs, s: _HealthCore) -> None:
        s.passed()

    @Down.upon(In.probeSucceeded).loop()
    @Draining.upon(In.probeSucceeded).loop()
    @Ejected.upon(In.probeSucceeded).loop()
    def passedMaybeRise(c: _HealthInputs, s: _HealthCore) -> None:
        if s.passed() >= s.rise:
            c._risen()

    @Down.upon(In.probeFailed).loop()
    @Drained.upon(In.probeFailed).loop()
    def justFailed(c: _HealthInputs, s: _HealthCore, reason: str) -> None:
        s.failed(reason)

    @Up.upon(In.probeFailed).loop()
    @Draining.upon(In.probeFailed).loop()
    @Ejected.upon(In.probeFailed).loop()
    def failedMaybeFall(c: _HealthInputs, s: _HealthCore, reason: str) -> None:
        if s.failed(reason) >= s.fall:
            c._fallen(reason)

    @Draining.upon(In.probeDraining).loop()
    @Drained.upon(In.probeDraining).loop()
    def stillDraining(c: _HealthInputs, s: _HealthCore, reason: str) -> None:
        s.drainingAnswer(reason)

    @Up.upon(In.probeDraining).to(Draining)
    @Down.upon(In.probeDraining).to(Draining)
    @Ejected.upon(In.probeDraining).to(Draining)
    def startDraining(c: _HealthInputs, s: _HealthCore, reason: str) -> None:
        s.drainingAnswer(reason)
        s.changed(DRAINING, reason)

    # -- rise and fall -------------------------------------------------

    @Down.upon(In._risen).to(Up)
    @Draining.upon(In._risen).to(Up)
    def risen(c: _HealthInputs, s: _HealthCore) -> None:
        s.changed(UP, f"{s.passes} passed checks")

    @Ejected.upon(In._risen).to(Up)
    def risenEarly(c: _HealthInputs, s: _HealthCore) -> None:
        s.changed(UP, f"{s.passes} passed checks, ejection ended early")

    @Up.upon(In._fallen).to(Down)
    @Draining.upon(In._fallen).to(Down)
    @Ejected.upon(In._fallen).to(Down)
    def fallen(c: _HealthInputs, s: _HealthCore, reason: str) -> None:
        s.changed(DOWN, f"{s.failures} failed checks, last: {reason}")

    # -- the operator --------------------------------------------------

    @Up.upon(In.drain).to(Drained)
    @Down.upon(In.drain).to(Drained)
    @Draining.upon(In.drain).to(Drained)
    @Ejected.upon(In.drain).to(Drained)
    def drained(c: _HealthInputs, s: _HealthCore) -> None:
        s.changed(DRAINING, "drained by operator")

    @Drained.upon(In.undrain).loop()
    def undrained(c: _HealthInputs, s: _HealthCore) -> None:
        if s.healthy:
            c._risen()
        else:
            c._fallen(s.lastError or "failing checks")

    @Drained.upon(In._risen).to(Up)
    def undrainedUp(c: _HealthInputs, s: _HealthCore) -> None:
        s.changed(UP, "undrained by operator")

    @Drained.upon(In._fallen).to(Down)
    def undrainedDown(c: _HealthInputs, s: _HealthCore, reason: str) -> None:
        s.changed(DOWN, f"undrained by operator, checks failing, last: {reason}")

    # -- passive ejection ----------------------------------------------

    @Up.upon(In.eject).to(Ejected)
    def ejected(c: _HealthInputs, s: _HealthCore, seconds: float, reason: str) -> None:
        s.passes = 0
        s.lastError = reason
        s.changed(DOWN, f"ejected for {seconds:g}s: {reason}")

    @Ejected.upon(In.ejectionEnded).to(Up)
    def ejectionOver(c: _HealthInputs, s: _HealthCore) -> None:
        s.changed(UP, "ejection ended")

    # -- everything else is ignored, explicitly --------------------------

    for state in (Up, Down, Draining, Ejected):
        state.upon(In.undrain).loop().returns(None)
    for state in (Down, Draining, Ejected, Drained):
        state.upon(In.eject).loop().returns(None)
    for state in (Up, Down, Draining, Drained):
        state.upon(In.ejectionEnded).loop().returns(None)
    Drained.upon(In.drain).loop().returns(None)
    Up.upon(In._risen).loop().returns(None)
    Down.upon(In._fallen).loop().returns(None)

    return m.build(), {
        UP: Up,
        DOWN: Down,
        DRAINING: Draining,
        "ejected": Ejected,
        "drained": Drained,
    }


_HealthMachine, _STATES = _makeMachine()


class BackendHealth:
    """
    The health of one backend, as an explicit state machine.

    @param backend: the backend (anything; passed back to C{onChange} and
        named in logs by its C{address} attribute, or C{str()}).
    @param onChange: C{onChange(backend, state, reason)}, state one of
        C{"up"}, C{"down"}, C{"draining"}; called once per change.
    @param rise: consecutive passed checks that bring a backend up.
    @param fall: consecutive failed checks that take it down.
    @param initial: C{"up"} (the default: traffic flows at start-up) or
        C{"down"} (wait for C{rise} passes).
    @param seconds: a clock (C{reactor.seconds}) to stamp the last check;
        without one C{lastCheck} stays L{None}.
    """

    def __init__(
        self,
        backend: Any,
        onChange: Callable[[Any, str, str], object],
        *,
        rise: int = 2,
        fall: int = 3,
        initial: str = UP,
        seconds: Callable[[], float] | None = None,
        logger: Logger | None = None,
    ) -> None:
        if initial not in (UP, DOWN):
            raise ValueError(f"initial state must be 'up' or 'down', not {initial!r}")
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.backend = backend
        self._core = _HealthCore(
            backend,
            onChange,
            rise,
            fall,
            seconds,
            logger or log,
            state=initial,
            healthy=initial == UP,
        )
        self._machine = _HealthMachine(self._core, _STATES[initial])

    # inputs
    def probeSucceeded(self) -> None:
        self._machine.probeSucceeded()

    def probeFailed(self, reason: str) -> None:
        self._machine.probeFailed(reason)

    def probeDraining(self, reason: str) -> None:
        self._machine.probeDraining(reason)

    def drain(self) -> None:
        self._machine.drain()

    def undrain(self) -> None:
        self._machine.undrain()

    def eject(self, seconds: float, reason: str) -> None:
        self._machine.eject(seconds, reason)

    def ejectionEnded(self) -> None:
        self._machine.ejectionEnded()

    @property
    def state(self) -> str:
        """
        C{"up"}, C{"down"} or C{"draining"}.
        """
        return self._core.state

    def status(self) -> dict[str, Any]:
        """
        This backend's health as plain data, for the status page and logs.
        """
        c = self._core
        return {
            "state": c.state,
            "consecutivePasses": c.passes,
            "consecutiveFailures": c.failures,
            "lastCheck": c.lastCheck,
            "lastError": c.lastError,
            "transitions": c.transitions,
            "rise": c.rise,
            "fall": c.fall,
        }


# ---------------------------------------------------------------------------
# Active checks
# ---------------------------------------------------------------------------


class _Discard(_WireProtocol):
    """
    Read a response body and throw it away; C{finished} fires when it ends.
    Cancelling C{finished} closes the connection.
    """

    def __init__(self) -> None:
        self.finished: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[None]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[override]
        if self.finished.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(None)
        else:
            self.finished.errback(reason)


def _discardBody(response: Any) -> Deferred[None]:
    if getattr(response, "length", None) == 0:
        return defer.succeed(None)
    p = _Discard()
    response.deliverBody(p)
    return p.finished


def _describe(failure: Failure) -> str:
    """
    One short phrase for why a check failed.
    """
    exc = failure.value
    if isinstance(exc, (ResponseNeverReceived, ResponseFailed)) and exc.reasons:
        inner = exc.reasons[0]
        if isinstance(inner, Failure):
            what = _describe(inner)
            return f"bad response: {what}" if isinstance(exc, ResponseFailed) else what
    if isinstance(exc, defer.TimeoutError):
        return str(exc) or "timed out"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.TimeoutError):
        return "connect timed out"
    if isinstance(exc, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(exc, (error.ConnectionDone, error.ConnectionLost)):
        return "connection closed"
    if isinstance(exc, error.ConnectError):
        return f"connect failed: {exc.osError}" if exc.osError else "connect failed"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _timedOut(result: object, timeout: float) -> Failure:
    return Failure(defer.TimeoutError(f"timed out after {timeout:g}s"))


class _Checked:
    """
    What the checker keeps per backend.
    """

    __slots__ = ("gone", "health", "inflight", "loop", "starting")

    def __init__(self, health: BackendHealth) -> None:
        self.health = health
        self.loop: LoopingCall | None = None
        self.starting: Any = None
        self.inflight: Deferred | None = None
        self.gone = False


class _BackendTLSPolicy:
    """
    An C{IPolicyForHTTPS} that asks C{tlsOptionsFor(backend)} for the
    backend being checked, so checks verify (or not) as the proxy does.
    """

    def __init__(self, checker: HealthChecker) -> None:
        self._checker = checker

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        host = hostname.decode("ascii")
        tlsOptionsFor = self._checker.tlsOptionsFor
        if tlsOptionsFor is not None:
            for backend in self._checker._checked:
                if getattr(backend, "port", None) == port and (
                    getattr(backend, "host", "").strip("[]") == host.strip("[]")
                ):
                    return tlsOptionsFor(backend)
        from twisted.internet.ssl import optionsForClientTLS

        return optionsForClientTLS(host)


def _defaultClient(checker: HealthChecker) -> Any:
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.iweb import IPolicyForHTTPS
    from zope.interface import directlyProvides

    reactor = checker._reactor
    policy = _BackendTLSPolicy(checker)
    directlyProvides(policy, IPolicyForHTTPS)
    pool = HTTPConnectionPool(reactor, persistent=False)
    # One "Starting/Stopping factory" log line per probe is noise: a pool
    # builds a factory per connection, so its factory class is made quiet.
    pool._factory = type(
        "_QuietHTTP11ClientFactory", (pool._factory,), {"noisy": False}
    )
    agent = Agent(
        reactor, contextFactory=policy, connectTimeout=checker.timeout, pool=pool
    )
    return HTTPClient(agent)


class HealthChecker(Service):
    """
    Active health checks of a set of backends, one C{LoopingCall} each.

    @param backends: the backends (each with C{address}, and C{scheme}
        C{"http"} or C{"https"}, default C{"http"}).
    @param onChange: C{onChange(backend, state, reason)}; see
        L{BackendHealth}.
    @param reactor: an C{IReactorTime} (and, for the default client,
        C{IReactorTCP}); tests pass a C{MemoryReactorClock}.
    @param path: the path checked, C{bytes} or C{str}.
    @param host: the C{Host} header sent; the backend's address by default.
    @param interval: seconds between two checks of one backend.
    @param timeout: seconds a check may take, connect and body included.
    @param rise: consecutive passes to come up.
    @param fall: consecutive failures to go down.
    @param statusRange: inclusive range of healthy status codes.
    @param jitter: returns a float in [0, 1); the first check of each backend
        runs C{interval * jitter() * 0.1} seconds after start.
    @param client: a treq C{HTTPClient} (or anything with
        C{get(url, headers=..., allow_redirects=..., unbuffered=...)});
        default: treq over its own non-persistent C{HTTPConnectionPool}.
    @param active: C{False} for C{--no-health-checks}: no probes, but the
        state machines still take drains and ejections.
    @param tlsOptionsFor: for C{https} backends and the default client,
        C{tlsOptionsFor(backend)} gives the client TLS options (the same
        hook as the upstream pool's); by default the certificate is verified
        against the backend's host.
    """

    def __init__(
        self,
        backends: list,
        onChange: Callable[[Any, str, str], object],
        reactor: Any,
        *,
        path: bytes | str = b"/",
        host: bytes | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
        rise: int = 2,
        fall: int = 3,
        statusRange: tuple[int, int] = (200, 399),
        jitter: Callable[[], float] = random.random,
        client: Any = None,
        active: bool = True,
        tlsOptionsFor: Callable[[Any], Any] | None = None,
    ) -> None:
        if isinstance(path, bytes):
            path = path.decode("ascii")
        if not path.startswith("/"):
            path = "/" + path
        self.path = path
        self.host = host
        self.interval = interval
        self.timeout = timeout
        self.rise = rise
        self.fall = fall
        self.statusRange = statusRange
        self.active = active
        self.tlsOptionsFor = tlsOptionsFor
        self._onChange = onChange
        self._reactor = reactor
        self._jitter = jitter
        self._client = client
        self._checked: dict[Any, _Checked] = {}
        for backend in backends:
            self.addBackend(backend)

    # -- the set of backends ---------------------------------------------

    def addBackend(self, backend: Any) -> BackendHealth:
        """
        Watch C{backend} (it starts up); its checks start now if running.
        """
        if backend in self._checked:
            return self._checked[backend].health
        health = BackendHealth(
            backend,
            self._onChange,
            rise=self.rise,
            fall=self.fall,
            seconds=self._reactor.seconds,
        )
        rec = self._checked[backend] = _Checked(health)
        if self.running:
            self._start(backend, rec)
        return health

    def removeBackend(self, backend: Any) -> None:
        """
        Stop watching C{backend}: its loop stops, a check in flight is
        cancelled, and no more C{onChange} calls are made for it.
        """
        rec = self._checked.pop(backend, None)
        if rec is not None:
            self._halt(rec)

    def configure(
        self,
        *,
        path: str,
        host: bytes | None,
        interval: float,
        timeout: float,
        statusRange: tuple[int, int],
    ) -> None:
        """
        Take new check settings (a reload): the next check of each backend
        uses them, and a new C{interval} spaces the checks from the next one
        on.  Health states and their counts are kept.
        """
        if not path.startswith("/"):
            path = "/" + path
        self.path = path
        self.host = host
        self.timeout = timeout
        self.statusRange = statusRange
        if interval != self.interval:
            self.interval = interval
            for rec in self._checked.values():
                if rec.loop is not None:
                    rec.loop.interval = interval

    def __contains__(self, backend: Any) -> bool:
        return backend in self._checked

    def health(self, backend: Any) -> BackendHealth:
        return self._checked[backend].health

    def state(self, backend: Any) -> str:
        return self._checked[backend].health.state

    def status(self, backend: Any) -> dict[str, Any]:
        """
        C{backend}'s health as plain data (see L{BackendHealth.status}).
        """
        return self._checked[backend].health.status()

    # -- operator and passive inputs, by backend -------------------------

    def drain(self, backend: Any) -> None:
        self._checked[backend].health.drain()

    def undrain(self, backend: Any) -> None:
        self._checked[backend].health.undrain()

    def eject(self, backend: Any, seconds: float, reason: str) -> None:
        rec = self._checked.get(backend)
        if rec is not None:
            rec.health.eject(seconds, reason)

    def ejectionEnded(self, backend: Any) -> None:
        rec = self._checked.get(backend)
        if rec is not None:
            rec.health.ejectionEnded()

    # -- the service -----------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        if self.active and self._client is None:
            self._client = _defaultClient(self)
        for backend, rec in list(self._checked.items()):
            self._start(backend, rec)

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        for rec in list(self._checked.values()):
            self._halt(rec)
        return defer.succeed(None)

    def _start(self, backend: Any, rec: _Checked) -> None:
        if not self.active:
            return
        rec.gone = False
        rec.loop = LoopingCall(self._probe, backend, rec)
        rec.loop.clock = self._reactor
        delay = max(0.0, self.interval * self._jitter() * 0.1)
        rec.starting = self._reactor.callLater(delay, self._startLoop, rec)

    def _startLoop(self, rec: _Checked) -> None:
        rec.starting = None
        if rec.gone or rec.loop is None:
            return
        rec.loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("health check loop failed", f)
        )

    def _halt(self, rec: _Checked) -> None:
        rec.gone = True
        if rec.starting is not None and rec.starting.active():
            rec.starting.cancel()
        rec.starting = None
        if rec.loop is not None and rec.loop.running:
            rec.loop.stop()
        rec.loop = None
        if rec.inflight is not None:
            d, rec.inflight = rec.inflight, None
            d.cancel()

    # -- one probe ---------------------------------------------------------

    def _url(self, backend: Any) -> str:
        scheme = getattr(backend, "scheme", "http") or "http"
        return f"{scheme}://{_address(backend)}{self.path}"

    def _probe(self, backend: Any, rec: _Checked) -> Deferred[None]:
        """
        Check C{backend} once.  The result never fails.
        """
        d = maybeDeferred(self._request, backend)
        d.addCallback(self._judge)
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=_timedOut)
        settledNow = []

        def done(verdict: tuple[str, str]) -> None:
            if rec.gone:
                return
            kind, reason = verdict
            if kind == UP:
                rec.health.probeSucceeded()
            elif kind == DRAINING:
                rec.health.probeDraining(reason)
            else:
                self._failed(backend, rec, reason)

        def failed(f: Failure) -> None:
            if rec.gone:
                return
            self._failed(backend, rec, _describe(f))

        def settled(result: object) -> None:
            settledNow.append(True)
            if rec.inflight is d:
                rec.inflight = None

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: log.failure("health check of {b} broke", f, b=backend))
        d.addBoth(settled)
        if not settledNow:
            rec.inflight = d
        return d

    def _request(self, backend: Any) -> Any:
        host = self.host if self.host is not None else _address(backend).encode()
        return self._client.get(
            self._url(backend),
            headers=Headers({b"Host": [host]}),
            allow_redirects=False,
            unbuffered=True,
        )

    def _judge(self, response: Any) -> Deferred[tuple[str, str]]:
        code = response.code
        low, high = self.statusRange
        if low <= code <= high:
            verdict = (UP, f"status {code}")
        elif code == 503 and response.headers.hasHeader(b"retry-after"):
            after = response.headers.getRawHeaders(b"retry-after")[0]
            verdict = (
                DRAINING,
                (
                    f"check answered 503, Retry-After: "
                    f"{after.decode('latin-1', 'replace')}"
                ),
            )
        else:
            verdict = (DOWN, f"status {code}")
        return _discardBody(response).addCallback(lambda _: verdict)

    def _failed(self, backend: Any, rec: _Checked, reason: str) -> None:
        emit = log.debug if rec.health.state == DOWN else log.info
        emit(
            "health check of {address} failed: {reason}",
            address=_address(backend),
            reason=reason,
        )
        rec.health.probeFailed(reason)


# ---------------------------------------------------------------------------
# Passive outlier ejection
# ---------------------------------------------------------------------------


class _Outlier:
    __slots__ = ("ejections", "failures", "refused", "returnedAt", "seconds", "timer")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.timer: Any = None
        self.seconds = 0.0
        self.returnedAt: float | None = None
        self.refused = False


class OutlierDetector:
    """
    Eject backends that fail real requests, for a time that doubles on each
    repeat.

    @param onEject: C{onEject(backend, seconds, reason)}.
    @param onReturn: C{onReturn(backend)} when an ejection times out.
    @param clock: an C{IReactorTime}.
    @param ejectAfter: consecutive failed attempts that eject a backend.
    @param baseEjection: seconds of the first ejection.
    @param maxEjection: cap on the doubling ejection time.
    @param maxEjectedPercent: never eject more than this share of backends.
    """

    def __init__(
        self,
        onEject: Callable[[Any, float, str], object],
        onReturn: Callable[[Any], object],
        clock: Any,
        *,
        ejectAfter: int = 5,
        baseEjection: float = 10.0,
        maxEjection: float = 300.0,
        maxEjectedPercent: float = 50,
    ) -> None:
        self._onEject = onEject
        self._onReturn = onReturn
        self._clock = clock
        self.ejectAfter = ejectAfter
        self.baseEjection = baseEjection
        self.maxEjection = maxEjection
        self.maxEjectedPercent = maxEjectedPercent
        self._outliers: dict[Any, _Outlier] = {}

    def _ejectedCount(self) -> int:
        return sum(1 for o in self._outliers.values() if o.timer is not None)

    def isEjected(self, backend: Any) -> bool:
        o = self._outliers.get(backend)
        return o is not None and o.timer is not None

    def record(self, backend: Any, ok: bool, total: int) -> None:
        """
        One finished attempt to C{backend}: C{ok} is C{False} for a connect
        failure or a 5xx response.  C{total} is how many backends there are.
        """
        if self.ejectAfter <= 0:
            return
        o = self._outliers.get(backend)
        if ok:
            if o is not None:
                o.failures = 0
                o.refused = False
            return
        if o is None:
            o = self._outliers[backend] = _Outlier()
        if o.timer is not None:
            return  # already out; late answers from before do not count
        o.failures += 1
        if o.failures < self.ejectAfter:
            return
        if total <= 0 or (
            (self._ejectedCount() + 1) * 100.0 / total > self.maxEjectedPercent
        ):
            if not o.refused:
                o.refused = True
                log.warn(  # noqa: G010 - twisted.logger.Logger.warn
                    "backend {address} failed {n} requests in a row but is not "
                    "ejected: that would eject more than {p:g}% of backends",
                    address=_address(backend),
                    n=o.failures,
                    p=self.maxEjectedPercent,
                )
            return
        now = self._clock.seconds()
        if o.returnedAt is not None and now - o.returnedAt >= self.maxEjection:
            o.ejections = 0
        o.ejections += 1
        try:
            seconds = self.baseEjection * 2 ** (o.ejections - 1)
        except OverflowError:
            seconds = self.maxEjection
        seconds = min(seconds, self.maxEjection)
        reason = f"{o.failures} consecutive failed requests"
        o.failures = 0
        o.refused = False
        o.seconds = seconds
        o.timer = self._clock.callLater(seconds, self._timedOut, backend)
        self._onEject(backend, seconds, reason)

    def _timedOut(self, backend: Any) -> None:
        o = self._outliers.get(backend)
        if o is None:
            return
        self._release(o)
        self._onReturn(backend)

    def _release(self, o: _Outlier) -> None:
        if o.timer is not None and o.timer.active():
            o.timer.cancel()
        o.timer = None
        o.failures = 0
        o.returnedAt = self._clock.seconds()

    def returnEarly(self, backend: Any) -> bool:
        """
        C{backend} is back before its time (active checks passed): cancel
        its ejection.  Does not call C{onReturn}.  L{True} if it was ejected.
        """
        o = self._outliers.get(backend)
        if o is None or o.timer is None:
            return False
        self._release(o)
        return True

    def forget(self, backend: Any) -> None:
        """
        C{backend} was removed (reload): drop its record and timer.
        """
        o = self._outliers.pop(backend, None)
        if o is not None and o.timer is not None and o.timer.active():
            o.timer.cancel()

    def stop(self) -> None:
        """
        Cancel every ejection timer (service stop), calling nothing.
        """
        for backend in list(self._outliers):
            self.forget(backend)

    def status(self, backend: Any) -> dict[str, Any]:
        o = self._outliers.get(backend) or _Outlier()
        return {
            "ejected": o.timer is not None,
            "consecutiveRequestFailures": o.failures,
            "ejections": o.ejections,
            "ejectedFor": o.seconds if o.timer is not None else None,
        }


def panicActive(healthy: int, total: int, threshold_percent: float) -> bool:
    """
    Whether fewer than C{threshold_percent} of C{total} backends are healthy,
    so the chooser should balance over all of them.  Off when the threshold
    is 0.
    """
    if threshold_percent <= 0 or total <= 0:
        return False
    return healthy * 100.0 / total < threshold_percent
