"""
The backend pool: a Twisted service that owns the backends, their health
and the chooser, and answers one question for the proxy: which backend gets
this request?

Which backends may be picked follows from their health, in one place
(L{BackendPool._refresh}):

- the primary backends (the lowest C{priority} present; C{priority=0} by
  default) that are up;
- if none is up, the backends of the next priority level that has one up
  (C{backup} is priority 1; DNS SRV priorities become levels too);
- in panic (fewer than C{panicThreshold} percent of the primaries up), all
  the primaries, up or not: better to spread the load over everything than
  to drown the few survivors.

Everything a later worker process would need to receive rather than compute
(the set of backends and their state) lives here behind L{choose},
L{setHealth} and L{status}.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import deque
from typing import Any, Iterable, Optional

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
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
        self,
        specs: Iterable[Any],
        chooser: Any,
        panicThreshold: float = 0.0,
        *,
        clock: Any = None,
        slowStart: float = 0.0,
        queueSize: int = 0,
        cookieSecret: Optional[bytes] = None,
    ) -> None:
        self.chooser = chooser
        self.panicThreshold = panicThreshold
        self.clock = clock
        self.slowStart = slowStart
        self.queueSize = queueSize
        self.backends: list[Backend] = [Backend(spec) for spec in specs]
        self.outliers: Any = None
        self.checker: Any = None
        self.panic = False
        self.waiting: deque[Any] = deque()
        self.leaving: dict[Backend, Any] = {}
        for backend in self.backends:
            self._stamp(backend)
        self._limited = any(b.maxConns for b in self.backends)
        self._secret = cookieSecret if cookieSecret is not None else os.urandom(32)
        self._byCookie = {self.cookieFor(b): b for b in self.backends}
        self._ramping: dict[Backend, float] = {}
        self._ramp: Optional[LoopingCall] = None
        self._refresh()

    def _refresh(self) -> None:
        # A disabled backend is out of the pool, for panic mode too.
        enabled = [b for b in self.backends if not b.disabled]
        levels = sorted({b.priority for b in enabled})
        primaries = [b for b in enabled if b.priority == levels[0]] if levels else []
        up = [b for b in primaries if b.state == "up"]
        available = up
        for level in levels[1:]:
            if available:
                break
            available = [b for b in enabled if b.priority == level and b.state == "up"]
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

    def setPanicThreshold(self, percent: float) -> None:
        """
        A new C{panicThreshold} (a reload), applied to the backends now.
        """
        if percent != self.panicThreshold:
            self.panicThreshold = percent
            self._refresh()

    def setHealth(self, backend: Backend, state: str, reason: str = "") -> None:
        """
        The health of C{backend} changed to C{state} (C{"up"}, C{"down"} or
        C{"draining"}): only backends that are up take new requests.  A
        backend that comes back up ramps its weight with C{slowStart}.
        """
        if backend.state != state:
            backend.state = state
            self._stamp(backend)
            if state == "up":
                self._startRamp(backend)
            self._refresh()
            if state == "up":
                self._wakeWaiters()

    def _stamp(self, backend: Backend) -> None:
        if self.clock is not None:
            backend.stateSince = self.clock.seconds()

    # -- the operator: disable and enable (drain is a health state, see
    # txbalancer.health)

    def disable(self, backend: Backend) -> None:
        """
        Take C{backend} out of the pool until L{enable}: no new requests
        (sticky ones included), whatever its health; requests in flight
        finish.  Its health checks go on, so L{enable} puts it back in the
        state they found.
        """
        if not backend.disabled:
            backend.disabled = True
            self._stamp(backend)
            self._refresh()

    def enable(self, backend: Backend) -> None:
        """
        Undo L{disable}.
        """
        if backend.disabled:
            backend.disabled = False
            self._stamp(backend)
            self._refresh()
            self._wakeWaiters()

    # -- changing the set of backends while requests flow

    def add(self, spec: Any) -> Backend:
        """
        A new backend from C{spec}: it takes requests from now on (it starts
        up; its health checks, wired by the balancer, take it down if not).
        """
        backend = Backend(spec)
        self._stamp(backend)
        self.backends.append(backend)
        self._byCookie[self.cookieFor(backend)] = backend
        self._limited = any(b.maxConns for b in self.backends)
        self._refresh()
        self._wakeWaiters()
        return backend

    def update(self, backend: Backend, spec: Any) -> None:
        """
        C{backend} keeps its state, counters and connections, and takes the
        weight, C{max_conns} and C{priority} (C{backup}) of C{spec} (same
        address).  A weight change reaches the chooser at once.
        """
        backend.spec = spec
        if backend not in self._ramping:
            backend.weight = spec.weight
        backend.maxConns = spec.max_conns
        backend.backup = spec.backup
        backend.priority = spec.priority
        self._limited = any(b.maxConns for b in self.backends)
        self._refresh()
        self._wakeWaiters()

    def remove(self, backend: Backend) -> Any:
        """
        Take C{backend} out: it gets no new request (sticky cookies naming
        it included), and the ones in flight finish.

        @return: a Deferred that fires once none is in flight any more.
        """
        from twisted.internet.defer import Deferred, succeed

        if backend not in self.backends:
            return succeed(None)
        self.backends.remove(backend)
        self._byCookie.pop(self.cookieFor(backend), None)
        self._ramping.pop(backend, None)
        self.chooser.forget(backend)
        if self.outliers is not None:
            self.outliers.forget(backend)
        self._limited = any(b.maxConns for b in self.backends)
        self._refresh()
        backend.available = False
        if not backend.active:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self.leaving[backend] = done
        return done

    # -- choosing

    def choose(
        self, request: Any = None, exclude: Any = (), key: Optional[str] = None
    ) -> Optional[Backend]:
        """
        The backend for a request from client C{key}: never one in
        C{exclude}, never one at its C{max_conns}; L{None} when none is
        left (see L{isFull} for why).
        """
        candidates = self._available
        if exclude or self._limited:
            candidates = [
                b
                for b in candidates
                if b not in exclude and not (b.maxConns and b.active >= b.maxConns)
            ]
        return self.chooser.choose(candidates, key)

    def isFull(self, exclude: Any = ()) -> bool:
        """
        Whether backends could take the request but every one is at its
        C{max_conns}: then the request may wait in the queue.
        """
        candidates = [b for b in self._available if b not in exclude]
        return bool(candidates) and all(
            b.maxConns and b.active >= b.maxConns for b in candidates
        )

    def acquire(self, backend: Backend) -> None:
        """
        A request is now in flight to C{backend}.
        """
        backend.active += 1
        backend.requests += 1

    def release(self, backend: Backend) -> None:
        """
        A request to C{backend} is over: a request waiting for a free
        backend may go.
        """
        backend.active -= 1
        if not backend.active and backend in self.leaving:
            self.leaving.pop(backend).callback(None)
        elif self.waiting and backend.maxConns and backend.active < backend.maxConns:
            self._wakeWaiters()

    def observe(self, backend: Backend, seconds: float) -> None:
        """
        C{backend} took C{seconds} to start its answer (for least-time).
        """
        self.chooser.observe(backend, seconds)

    # -- the queue of requests waiting for a backend under max_conns

    def enqueue(self, waiter: Any) -> bool:
        """
        Let C{waiter} wait for a free backend: its C{backendFreed()} is
        called, in FIFO order, when one may have room.

        @return: C{False} when the queue is full (or off).
        """
        if len(self.waiting) >= self.queueSize:
            return False
        self.waiting.append(waiter)
        return True

    def dequeue(self, waiter: Any) -> None:
        """
        C{waiter} no longer waits (it timed out, or its client left).
        """
        try:
            self.waiting.remove(waiter)
        except ValueError:
            pass

    def _wakeWaiters(self) -> None:
        # Wake waiters one at a time while there is room: each one that
        # finds a backend takes its slot before the next is woken.
        while self.waiting:
            if not any(
                not b.maxConns or b.active < b.maxConns for b in self._available
            ):
                return
            self.waiting.popleft().backendFreed()

    # -- sticky sessions

    def cookieFor(self, backend: Backend) -> str:
        """
        The sticky cookie value naming C{backend}: a keyed hash of its
        address, opaque to clients and unforgeable without the secret.
        """
        digest = hmac.new(
            self._secret, backend.address.encode("utf-8"), hashlib.sha256
        ).hexdigest()
        return digest[:24]

    def backendForCookie(self, value: str) -> Optional[Backend]:
        """
        The backend a sticky cookie names, if it is a valid cookie for a
        backend that may take a request now; otherwise L{None}.
        """
        backend = self._byCookie.get(value)
        if (
            backend is None
            or not backend.available
            or (backend.maxConns and backend.active >= backend.maxConns)
        ):
            return None
        return backend

    # -- slow start

    def _startRamp(self, backend: Backend) -> None:
        if not self.slowStart or self.clock is None:
            return
        self._ramping[backend] = self.clock.seconds()
        backend.weight = backend.spec.weight * 0.1
        if self._ramp is None or not self._ramp.running:
            self._ramp = LoopingCall(self._rampWeights)
            self._ramp.clock = self.clock
            self._ramp.start(max(0.1, self.slowStart / 20), now=False).addErrback(
                lambda f: log.failure("slow start stopped", f)
            )

    def _rampWeights(self) -> None:
        now = self.clock.seconds()
        for backend, since in list(self._ramping.items()):
            share = (now - since) / self.slowStart
            if share >= 1 or backend.state != "up":
                backend.weight = backend.spec.weight
                del self._ramping[backend]
            else:
                backend.weight = backend.spec.weight * max(0.1, share)
        if not self._ramping and self._ramp is not None and self._ramp.running:
            self._ramp.stop()

    def attemptFinished(self, backend: Backend, ok: bool) -> None:
        """
        An attempt on C{backend} ended: C{ok} is false when the backend is
        to blame (a failed connect, a timeout, a broken response, a 5xx
        status other than 501/505; see L{txbalancer.proxy.ProxyExchange}
        for what a client can provoke and so never counts).  Feeds passive
        outlier detection.
        """
        outliers = self.outliers
        if outliers is not None:
            outliers.record(backend, ok, len(self.backends))

    def stopService(self) -> Any:
        if self.outliers is not None:
            self.outliers.stop()
        if self._ramp is not None and self._ramp.running:
            self._ramp.stop()
        return Service.stopService(self)

    def status(self) -> list[dict[str, Any]]:
        """
        Each backend's state, as plain data.
        """
        result = []
        for backend in self.backends:
            status = backend.status()
            if self.checker is not None and backend not in self.checker:
                result.append(status)
                continue
            if self.checker is not None:
                status["health"] = self.checker.status(backend)
            if self.outliers is not None:
                status["outlier"] = self.outliers.status(backend)
            result.append(status)
        return result
