"""
L{Balancer}: one frozen configuration value in, a running balancer out.

This is the only module that wires the parts together.  The command line
(C{tap.makeService}), the in-memory fake (C{txbalancer.testing}) and Python
users all build a balancer the same way::

    from txbalancer import Balancer

    balancer = Balancer(["127.0.0.1:3001", "127.0.0.1:3002 weight=2"],
                        strategy="least-conn", healthPath="/healthz")
    balancer.setServiceParent(application)        # an IService
    root.putChild(b"api", balancer.resource())    # a twisted.web IResource

What one pool is made of (L{PoolRuntime})::

    BackendPool        the backends, their state, the chooser (pool.py)
    HealthChecker      active checks on LoopingCall (health.py)
    OutlierDetector    passive ejection from real traffic (health.py)
    UpstreamPool       kept-alive connections to the backends (upstream.py)
    Forwarder          one ProxyExchange per request (proxy.py)

and what the balancer adds: the front ends (L{serverFactory} for the
strict HTTP/1.1 + h2 listener, L{resource} for twisted.web), the
listeners of the configuration (L{listen}), and the order of a graceful
stop: stop listening, let requests in flight finish (at most
C{drainTimeout} seconds), close the backend connections, stop the checks.
"""

from __future__ import annotations

import random as _random
import signal
from functools import partial
from typing import Any, Callable, Optional, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from txbalancer import settings as _settings
from txbalancer.accesslog import AccessLog
from txbalancer.choosers import STRATEGIES
from txbalancer.config import ConfigError, parse_backends
from txbalancer.downstream import HTTPServerFactory
from txbalancer.health import HealthChecker, OutlierDetector
from txbalancer.limits import ConnectionLimits, TrackedEndpoint
from txbalancer.pool import BackendPool
from txbalancer.proxy import Forwarder
from txbalancer.settings import BalancerConfig, ListenerConfig, PoolConfig
from txbalancer.upstream import UpstreamPool, backendTLSOptions, loadTrustRoot

__all__ = ["Balancer", "PoolRuntime"]

log = Logger()


class PoolRuntime:
    """
    The running parts of one pool, built from its L{PoolConfig}.

    @ivar pool: the L{BackendPool}.
    @ivar checker: its L{HealthChecker}.
    @ivar outliers: its L{OutlierDetector}, or L{None} with C{ejectAfter=0}.
    @ivar upstreams: its L{UpstreamPool}.
    @ivar forwarder: its L{Forwarder}: the handler of its requests.
    """

    def __init__(
        self,
        config: PoolConfig,
        balancerConfig: BalancerConfig,
        reactor: Any,
        *,
        random: Any,
        jitter: Callable[[], float],
        healthClient: Any,
        accessLog: Any,
        cookieSecret: Optional[bytes],
    ) -> None:
        self.config = config
        self.name = config.name
        trustRoot = loadTrustRoot(config.backendCa) if config.backendCa else None
        # One TLS policy for https:// backends, shared by proxy and checks.
        tlsOptionsFor = partial(backendTLSOptions, trustRoot=trustRoot)
        self.pool = pool = BackendPool(
            config.backends,
            STRATEGIES[config.strategy](random=random, clock=reactor.seconds),
            panicThreshold=config.panicThreshold,
            clock=reactor,
            slowStart=config.slowStart,
            queueSize=config.queueSize,
            cookieSecret=cookieSecret,
        )
        for backend in pool.backends:
            if backend.scheme == "https" and not backend.spec.tls_verify:
                log.warn(
                    "{spec.filename}:{spec.lineno}: TLS to backend {address} is "
                    "not verified (tls_verify=off)",
                    spec=backend.spec,
                    address=backend.address,
                )

        def healthChanged(backend: Any, state: str, reason: str) -> None:
            pool.setHealth(backend, state, reason)
            if state == "up" and pool.outliers is not None:
                pool.outliers.returnEarly(backend)

        host = config.healthHost
        self.checker = HealthChecker(
            pool.backends,
            healthChanged,
            reactor,
            path=config.healthPath,
            host=host.encode("idna") if host else None,
            interval=config.healthInterval,
            timeout=config.healthTimeout,
            rise=config.rise,
            fall=config.fall,
            statusRange=config.healthStatus,
            active=not config.noHealthChecks,
            tlsOptionsFor=tlsOptionsFor,
            jitter=jitter,
            client=healthClient,
        )
        pool.checker = self.checker
        self.outliers = None
        if config.ejectAfter:
            self.outliers = pool.outliers = OutlierDetector(
                self.checker.eject,
                self.checker.ejectionEnded,
                reactor,
                ejectAfter=config.ejectAfter,
                maxEjectedPercent=config.maxEjectedPercent,
            )
        self.upstreams = UpstreamPool(
            reactor,
            tlsOptionsFor=tlsOptionsFor,
            connectTimeout=config.connectTimeout,
            maxIdlePerBackend=config.maxIdlePerBackend,
            idleTimeout=config.upstreamIdleTimeout,
        )
        b = balancerConfig
        self.forwarder = Forwarder(
            pool,
            self.upstreams,
            reactor,
            trustedProxies=b.trustedProxies,
            backendTimeout=config.backendTimeout,
            accessLog=accessLog,
            hsts=b.hsts,
            redirectHttps=b.redirectHttps,
            httpsPort=_httpsPort(b.listeners),
            needsClientKey=config.strategy == "ip-hash",
            stickyCookie=config.stickyCookie,
            queueTimeout=config.queueTimeout if config.queueSize else 0.0,
        )

    @property
    def inFlight(self) -> int:
        return self.forwarder.inFlight

    def start(self) -> None:
        self.pool.startService()
        self.checker.startService()
        self.upstreams.start()

    @defer.inlineCallbacks
    def stop(self) -> Any:
        yield self.upstreams.close()
        yield defer.maybeDeferred(self.checker.stopService)
        yield defer.maybeDeferred(self.pool.stopService)


def _httpsPort(listeners: Sequence[ListenerConfig]) -> Optional[int]:
    """
    The port of the first TLS listener, if it is a TCP port: where
    C{--redirect-https} sends plain-HTTP clients.
    """
    for listener in listeners:
        if listener.secure:
            fields = listener.endpoint.split(":")
            if len(fields) > 1 and fields[0] in ("tcp", "tcp6") and fields[1].isdigit():
                return int(fields[1])
    return None


def _poolFromLines(lines: Any) -> PoolConfig:
    """
    The default pool from backends-file lines given in Python: a list of
    strings, or one string with a line per backend.
    """
    if isinstance(lines, str):
        text = lines
    else:
        text = "\n".join(lines)
    specs = parse_backends(text + "\n", "<Balancer backends>")
    if not specs:
        raise ConfigError("no backends given")
    return PoolConfig(backends=specs)


class Balancer(MultiService):
    """
    A load balancer over the pools of one L{BalancerConfig}.

    Build it from backends-file lines and settings as keyword arguments
    (their names are the attributes of L{PoolConfig} and
    L{BalancerConfig}), from a config value (C{config=}), or from a TOML
    file with L{fromConfig}.

    It is an C{IService}: starting it starts every pool's health checks and
    connection sweeps; stopping it stops listening, drains the requests in
    flight, then closes the backend connections.

    @param reactor: the reactor; the global one by default.  Tests pass a
        L{twisted.internet.testing.MemoryReactorClock}.
    @param random: the randomness of the strategies (a C{random.Random}).
    @param jitter: the jitter of the first health checks (returns [0, 1)).
    @param healthClient: the HTTP client of the health checks (treq by
        default; tests pass a fake).
    @param installSignalHandlers: whether SIGHUP reloads (twistd's service
        sets this; a library user's balancer leaves signals alone).
    """

    def __init__(
        self,
        backends: Any = None,
        *,
        config: Optional[BalancerConfig] = None,
        reactor: Any = None,
        random: Any = None,
        jitter: Optional[Callable[[], float]] = None,
        healthClient: Any = None,
        cookieSecret: Optional[bytes] = None,
        installSignalHandlers: bool = False,
        **settings: Any,
    ) -> None:
        MultiService.__init__(self)
        if config is None:
            if backends is None:
                raise ConfigError("Balancer needs backends or config=")
            config = _settings.build([_poolFromLines(backends)], settings)
        elif backends is not None or settings:
            raise TypeError("give either config= or backends and settings, not both")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.reactor = reactor
        self.installSignalHandlers = installSignalHandlers
        self.accessLog = (
            AccessLog.open(config.accessLog, reactor.seconds)
            if config.accessLog
            else None
        )
        randomness = random if random is not None else _random.Random()
        self.pools: dict[str, PoolRuntime] = {}
        for poolConfig in config.pools:
            self.pools[poolConfig.name] = PoolRuntime(
                poolConfig,
                config,
                reactor,
                random=randomness,
                jitter=jitter or _random.random,
                healthClient=healthClient,
                accessLog=self.accessLog,
                cookieSecret=cookieSecret,
            )
        self.factories: list[Any] = []
        # --max-connections and --max-conns-per-ip, shared by every
        # listener; it learns the listening ports through TrackedEndpoint
        # (see listenOn).
        self.limits = ConnectionLimits(
            config.maxConnections, config.maxConnsPerIp, clock=reactor.seconds
        )
        self.listeners: list[StreamServerEndpointService] = []
        self.serverTLS: list[Any] = []
        self._h2Factories: dict[int, Any] = {}

    @classmethod
    def fromConfig(cls, path: str, **kwargs: Any) -> "Balancer":
        """
        A balancer built from the TOML configuration file at C{path}.

        @raise ConfigError: naming the file, the line and what is wrong.
        """
        from txbalancer.config import load_config

        return cls(config=load_config(path), **kwargs)

    # -- what requests are handed to

    @property
    def defaultPool(self) -> PoolRuntime:
        """
        The first pool (with C{--backends} alone, the only one).
        """
        return next(iter(self.pools.values()))

    @property
    def handler(self) -> Any:
        """
        C{handler(request, server)}: the exchange that serves C{request}.
        """
        return self.defaultPool.forwarder

    @property
    def inFlight(self) -> int:
        return sum(p.inFlight for p in self.pools.values())

    # -- front ends

    def serverFactory(self, secure: bool = False, serverTLS: Any = None) -> Any:
        """
        A protocol factory for one listener: the balancer's own strict
        HTTP/1.1 server, or (with C{secure} and C{http2}) one that speaks
        HTTP/2 to clients choosing it by ALPN.  The factory is drained when
        the balancer stops.

        @param secure: whether the listener terminates TLS (requests are
            then C{https} to the backends' eyes).
        """
        config = self.config
        factory: Any = HTTPServerFactory(
            self.handler,
            self.reactor,
            clientTimeout=config.clientTimeout,
            maxBodySize=config.maxBodySize,
            secure=secure,
            clientCertificates=secure and bool(config.tlsClientCa),
            headerTimeout=config.headerTimeout,
            limits=self.limits,
        )
        if secure and config.http2:
            from txbalancer.h2 import NegotiatingFactory

            factory = NegotiatingFactory(factory, self.reactor)
        self.factories.append(factory)
        return factory

    def resource(self) -> Any:
        """
        A twisted.web C{IResource} that proxies every request below it: mount
        it anywhere in your own C{Site} (C{root.putChild(b"api", r)}); the
        backend sees the path below the mount point.
        """
        from txbalancer.resource import BalancerResource

        return BalancerResource(self.handler, self.reactor)

    # -- listeners

    def listen(self) -> None:
        """
        Listen on every listener of the configuration (as child services:
        they start and stop with the balancer).
        """
        from twisted.internet.endpoints import serverFromString

        config = self.config
        serverTLS = None
        if any(listener.secure for listener in config.listeners):
            serverTLS = self._serverTLS()
        for listener in config.listeners:
            try:
                endpoint = serverFromString(self.reactor, listener.endpoint)
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(
                    f"cannot listen on {listener.endpoint!r}: {e} (expected a port "
                    "number or a Twisted endpoint such as tcp:8000:interface=127.0.0.1)"
                ) from None
            factory = self.serverFactory(secure=listener.secure)
            if listener.secure:
                from twisted.protocols.tls import TLSMemoryBIOFactory

                factory = TLSMemoryBIOFactory(serverTLS[listener.tls], False, factory)
            self.listenOn(endpoint, factory)

    def listenOn(self, endpoint: Any, factory: Any) -> StreamServerEndpointService:
        """
        Listen on C{endpoint} with C{factory} as a child service; start-up
        fails loudly when the port cannot be bound.  The port, once
        listening, is handed to L{limits}, which pauses it at
        C{--max-connections}.
        """
        service = StreamServerEndpointService(
            TrackedEndpoint(endpoint, self.limits.addPort), factory
        )
        service._raiseSynchronously = True
        service.setServiceParent(self)
        self.listeners.append(service)
        return service

    def _serverTLS(self) -> dict[Any, Any]:
        """
        One L{txbalancer.tls.ServerTLS} per certificate of the TLS
        listeners, loaded now so a bad file stops start-up with its name.
        """
        from txbalancer.tls import ServerTLS

        config = self.config
        alpn = (b"h2", b"http/1.1") if config.http2 else (b"http/1.1",)
        contexts: dict[Any, Any] = {}
        for listener in config.listeners:
            if listener.secure and listener.tls not in contexts:
                contexts[listener.tls] = ServerTLS(
                    [listener.tls],
                    certDir=config.tlsCertDir,
                    clientCA=config.tlsClientCa,
                    clientOptional=config.tlsClientOptional,
                    alpn=alpn,
                )
        self.serverTLS = list(contexts.values())
        return contexts

    # -- IService

    def startService(self) -> None:
        for runtime in self.pools.values():
            runtime.start()
        MultiService.startService(self)
        for serverTLS in self.serverTLS:
            serverTLS.watch(self.reactor, self.config.tlsReloadInterval)
        if self.installSignalHandlers:
            signal.signal(signal.SIGHUP, self._sighup)
        for runtime in self.pools.values():
            backends = runtime.pool.backends
            log.info(
                "pool {pool}: balancing over {n} backends: {backends}",
                pool=runtime.name,
                n=len(backends),
                backends=", ".join(b.address for b in backends),
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
        self.limits.forgetPorts()
        for serverTLS in self.serverTLS:
            serverTLS.stopWatching()
        yield defer.gatherResults(
            [defer.maybeDeferred(listener.stopService) for listener in self.listeners]
        )
        inFlight = self.inFlight
        if inFlight:
            log.info(
                "waiting up to {timeout}s for {n} requests in flight",
                timeout=self.config.drainTimeout,
                n=inFlight,
            )
        yield defer.gatherResults(
            [factory.drain(self.config.drainTimeout) for factory in self.factories]
        )
        for service in list(self):
            if service not in self.listeners:
                yield defer.maybeDeferred(service.stopService)
        yield defer.gatherResults([p.stop() for p in self.pools.values()])
        Service.stopService(self)
        if self.accessLog is not None:
            self.accessLog.close()
        # twistd kills itself with the signal that stopped the reactor, so
        # the exit status would say "killed by SIGTERM".  A SIGTERM that
        # ended in a finished graceful stop is a clean exit: status 0.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None
        log.info("stopped")
