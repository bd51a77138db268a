"""
The health of one backend as a state machine: up, down or draining.

L{BackendHealth} is one Automat state machine per backend
(C{TypeMachineBuilder}, as Twisted's own C{ClientService} is built).
Inputs come from the active checker (C{probeSucceeded}, C{probeFailed},
C{probeDraining}), from the operator (C{drain}, C{undrain}) and from the
outlier detector (C{eject}, C{ejectionEnded}).  Its only output is one
callback, C{onChange(backend, state, reason)}, called exactly once each time
the public state (C{"up"}, C{"down"} or C{"draining"}) changes, never
otherwise.  A backend starts B{up}, so traffic flows from the first second;
a dead backend is taken out after C{fall} failed checks (C{interval * fall}
seconds, plus the checker's start-up jitter).

Internally there are five states:

  - C{up}: takes traffic; C{fall} consecutive failed checks -> C{down}.
  - C{down}: C{rise} consecutive passed checks -> C{up}.
  - C{draining}: the check answered 503 with C{Retry-After}; no new
    requests.  C{rise} passes -> C{up}, C{fall} failures -> C{down}.
  - C{ejected} (reported as C{"down"}): the outlier detector took it out
    for a while.  C{ejectionEnded} -> C{up}; or C{rise} consecutive passed
    checks counted from the ejection -> C{up} early; or C{fall} failed
    checks -> C{down} (still reported C{"down"}, so no callback).
  - C{drained} (reported as C{"draining"}): the operator drained it.
    Checks keep running and keep their verdict; C{undrain} goes to C{up} if
    the last verdict was healthy, else C{down}.

Pure: no reactor, no I/O (a clock comes in as C{seconds}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from automat import TypeMachineBuilder
from twisted.logger import Logger

__all__ = ["DOWN", "DRAINING", "UP", "BackendHealth", "addressOf"]

log = Logger()

UP = "up"
DOWN = "down"
DRAINING = "draining"


def addressOf(backend: Any) -> str:
    """
    How logs name C{backend}: its C{address} attribute, or C{str()}.
    """
    return str(getattr(backend, "address", backend))


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
    lastResult: str | None = None
    results: dict[str, int] = field(
        default_factory=lambda: {"pass": 0, "fail": 0, "draining": 0}
    )

    def _checked(self, result: str) -> None:
        if self.seconds is not None:
            self.lastCheck = self.seconds()
        self.lastResult = result
        self.results[result] += 1

    def passed(self) -> int:
        self._checked("pass")
        self.passes += 1
        self.failures = 0
        if self.passes >= self.rise:
            self.healthy = True
        return self.passes

    def failed(self, reason: str) -> int:
        self._checked("fail")
        self.failures += 1
        self.passes = 0
        self.lastError = reason
        if self.failures >= self.fall:
            self.healthy = False
        return self.failures

    def drainingAnswer(self, reason: str) -> None:
        self._checked("draining")
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
            address=addressOf(self.backend),
            state=state,
            reason=reason,
        )
        try:
            self.onChange(self.backend, state, reason)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the machine
            self.log.failure(
                "onChange for backend {address} raised",
                address=addressOf(self.backend),
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
            "lastResult": c.lastResult,
            "lastError": c.lastError,
            "results": dict(c.results),
            "transitions": c.transitions,
            "rise": c.rise,
            "fall": c.fall,
        }

