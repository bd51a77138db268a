"""
The backend pool: a Twisted service that owns the backends, their health
and the chooser, and answers one question for the proxy: which backend gets
this request?

Which backends may be picked follows from their health, in one place
(L{BackendPool._refresh}):

- the primary backends that are up;
- if none is up, the C{backup} backends that are up;
- in panic (fewer than C{panicThreshold} percent of the primaries up), all
  the primaries, up or not: better to spread the load over everything than
  to drown the few survivors.

Everything a later worker process would need to receive rather than compute
(the set of backends and their state) lives here behind L{choose},
L{setHealth} and L{status}.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from twisted.application.service import Service
from twisted.logger import Logger

from txbalancer.backend import Backend

log = Logger()


class BackendPool(Service):
    """
    The backends behind the listeners and the strategy that picks among them.

    @ivar backends: every backend, in the order of the backends file.
    @ivar outliers: an L{txbalancer.health.OutlierDetector} fed by
        L{attemptFinished}, or L{None}.
    @ivar checker: the L{txbalancer.health.HealthChecker}, or L{None}.
    """

    def __init__(
        self, specs: Iterable[Any], chooser: Any, panicThreshold: float = 0.0
    ) -> None:
        self.chooser = chooser
        self.panicThreshold = panicThreshold
        self.backends: list[Backend] = [Backend(spec) for spec in specs]
        self.outliers: Any = None
        self.checker: Any = None
        self.panic = False
        self._refresh()

    def _refresh(self) -> None:
        primaries = [b for b in self.backends if not b.backup]
        up = [b for b in primaries if b.state == "up"]
        available = up or [b for b in self.backends if b.backup and b.state == "up"]
        panic = bool(
            self.panicThreshold
            and primaries
            and len(up) * 100.0 < self.panicThreshold * len(primaries)
        )
        if panic:
            available = primaries
        if panic != self.panic:
            self.panic = panic
            if panic:
                log.warn(
                    "panic: only {up} of {total} backends are up, below "
                    "{threshold}%: balancing over all of them",
                    up=len(up),
                    total=len(primaries),
                    threshold=self.panicThreshold,
                )
            else:
                log.info("panic over: {up} of {total} backends are up",
                         up=len(up), total=len(primaries))
        for backend in self.backends:
            backend.available = False
        for backend in available:
            backend.available = True
        self._available = available

    def setHealth(self, backend: Backend, state: str, reason: str = "") -> None:
        """
        The health of C{backend} changed to C{state} (C{"up"}, C{"down"} or
        C{"draining"}): only backends that are up take new requests.
        """
        if backend.state != state:
            backend.state = state
            self._refresh()

    def choose(
        self, request: Any = None, exclude: Any = (), key: Optional[str] = None
    ) -> Optional[Backend]:
        """
        The backend for C{request}, never one in C{exclude}; L{None} when
        no backend is left.
        """
        candidates = self._available
        if exclude:
            candidates = [b for b in candidates if b not in exclude]
        return self.chooser.choose(candidates)

    def attemptFinished(self, backend: Backend, ok: bool) -> None:
        """
        An attempt on C{backend} ended: C{ok} is false for a failed connect,
        a broken response or a 5xx status.  Feeds passive outlier detection.
        """
        outliers = self.outliers
        if outliers is not None:
            outliers.record(backend, ok, len(self.backends))

    def stopService(self) -> Any:
        if self.outliers is not None:
            self.outliers.stop()
        return Service.stopService(self)

    def status(self) -> list[dict[str, Any]]:
        """
        Each backend's state, as plain data.
        """
        result = []
        for backend in self.backends:
            status = backend.status()
            if self.checker is not None:
                status["health"] = self.checker.status(backend)
            if self.outliers is not None:
                status["outlier"] = self.outliers.status(backend)
            result.append(status)
        return result
