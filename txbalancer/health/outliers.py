"""
Passive outlier ejection: backends that fail real requests are taken out
for a while.

The proxy calls L{OutlierDetector.record}C{(backend, ok, total)} after each
attempt.  C{ejectAfter} consecutive failures (connect failures, 5xx) eject
the backend for C{baseEjection * 2 ** (n - 1)} seconds, n being how many
times it was ejected (capped at C{maxEjection}; n starts again from 1 once
a backend stays in for C{maxEjection} seconds after a return).  No ejection
that would take more than C{maxEjectedPercent} of C{total} backends out.

The detector only decides; C{onEject} and C{onReturn} (the health
checker's C{eject} and C{ejectionEnded}) carry the decision to the
backend's state machine.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

from txbalancer.health.state import addressOf

__all__ = ["OutlierDetector"]

log = Logger()


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
                    address=addressOf(backend),
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
