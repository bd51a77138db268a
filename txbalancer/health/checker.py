"""
Active health checks: a C{GET} of each backend on a C{LoopingCall}.

L{HealthChecker} is a C{Service} holding one L{BackendHealth} and one
C{LoopingCall} per backend.  Each check is C{GET path} with a C{Host}
header and a timeout, over treq on its own non-persistent connection pool
(never the proxy's).  The first check of each backend runs after
C{interval * jitter() * 0.1} seconds (so up to a tenth of an interval; with
many backends their checks do not all fire in the same instant), then every
C{interval} seconds.  A probe never fails: whatever goes wrong (refused,
timed out, garbage, an exception raised synchronously) is logged in one
line and fed to the machine as a failed check, so the C{LoopingCall} never
sees an errback and never stops.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol as _WireProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers

from txbalancer.failures import describe
from txbalancer.health.state import DOWN, DRAINING, UP, BackendHealth, addressOf

__all__ = ["HealthChecker"]

log = Logger()


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
        return f"{scheme}://{addressOf(backend)}{self.path}"

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
            self._failed(backend, rec, describe(f))

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
        host = self.host if self.host is not None else addressOf(backend).encode()
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
            address=addressOf(backend),
            reason=reason,
        )
        rec.health.probeFailed(reason)

