"""
The balancer as one Twisted service: its listeners, its backend pool, its
upstream connections, and the order in which they stop.

On stop (SIGTERM, or Ctrl-C under C{-n}) the balancer stops listening,
lets the requests in flight finish (for at most C{drainTimeout} seconds),
closes its kept-alive backend connections, then lets twistd exit.
"""

from __future__ import annotations

import signal
from typing import Any, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

log = Logger()


class BalancerService(MultiService):
    """
    @param listeners: C{(endpoint, factory)} pairs, one per C{--port}.
    @param pool: the L{txbalancer.pool.BackendPool}.
    @param checker: the L{txbalancer.health.HealthChecker}, or L{None}.
    @param upstreams: the L{txbalancer.upstream.UpstreamPool}.
    @param forwarder: the L{txbalancer.proxy.Forwarder}, for its count of
        requests in flight.
    """

    def __init__(
        self,
        listeners: Sequence[tuple[Any, Any]],
        pool: Any,
        upstreams: Any,
        forwarder: Any,
        drainTimeout: float = 30.0,
        accessLog: Any = None,
        checker: Any = None,
        reactor: Any = None,
        serverTLS: Sequence[Any] = (),
        tlsReloadInterval: float = 10.0,
        installSignalHandlers: bool = False,
    ) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.serverTLS = list(serverTLS)
        self.tlsReloadInterval = tlsReloadInterval
        self.installSignalHandlers = installSignalHandlers
        self.pool = pool
        self.upstreams = upstreams
        self.forwarder = forwarder
        self.drainTimeout = drainTimeout
        self.accessLog = accessLog
        self.factories = []
        self.listeners = []
        self.checker = checker
        pool.setServiceParent(self)
        if checker is not None:
            checker.setServiceParent(self)
        for endpoint, factory in listeners:
            listener = StreamServerEndpointService(endpoint, factory)
            # Fail start-up loudly when a port cannot be bound.
            listener._raiseSynchronously = True
            listener.setServiceParent(self)
            self.listeners.append(listener)
            self.factories.append(factory)

    def startService(self) -> None:
        MultiService.startService(self)
        self.upstreams.start()
        for serverTLS in self.serverTLS:
            serverTLS.watch(self.reactor, self.tlsReloadInterval)
        if self.installSignalHandlers:
            signal.signal(signal.SIGHUP, self._sighup)
        log.info(
            "balancing over {n} backends: {backends}",
            n=len(self.pool.backends),
            backends=", ".join(b.address for b in self.pool.backends),
        )

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """
        SIGHUP: reload the TLS certificates and keys.  New handshakes use
        the new ones, open connections go on; a broken file is logged and
        the old certificate kept.
        """
        log.info("SIGHUP: reloading certificates")
        for serverTLS in self.serverTLS:
            serverTLS.reload()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        log.info("stopping: no longer accepting connections")
        for serverTLS in self.serverTLS:
            serverTLS.stopWatching()
        yield defer.gatherResults(
            [defer.maybeDeferred(listener.stopService) for listener in self.listeners]
        )
        inFlight = self.forwarder.inFlight
        if inFlight:
            log.info(
                "waiting up to {timeout}s for {n} requests in flight",
                timeout=self.drainTimeout,
                n=inFlight,
            )
        yield defer.gatherResults(
            [factory.drain(self.drainTimeout) for factory in self.factories]
        )
        yield self.upstreams.close()
        if self.checker is not None:
            yield defer.maybeDeferred(self.checker.stopService)
        yield defer.maybeDeferred(self.pool.stopService)
        Service.stopService(self)
        if self.accessLog is not None:
            self.accessLog.close()
        # twistd kills itself with the signal that stopped the reactor, so
        # the exit status would say "killed by SIGTERM".  A SIGTERM that
        # ended in a finished graceful stop is a clean exit: status 0.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        log.info("stopped")
