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
    HealthChecker      active checks on LoopingCall (health/checker.py)
    OutlierDetector    passive ejection from real traffic (health/outliers.py)
    UpstreamPool       kept-alive connections to the backends (upstream.py)
    Forwarder          one ProxyExchange per request (proxy.py)

and what the balancer adds: the L{Router} when the configuration has
routes (the first matching route's pool serves a request, no match is a
404), the front ends (L{serverFactory} for the
strict HTTP/1.1 + h2 listener, L{resource} for twisted.web), the
listeners of the configuration (L{listen}), and the order of a graceful
stop: stop listening, let requests in flight finish (at most
C{drainTimeout} seconds), close the backend connections, stop the checks.

A reload (L{Balancer.reload}: SIGHUP, C{POST /reload}) and each answer of
the DNS lookups of C{srv:} pools (L{txbalancer.discovery}) go through one
path, L{Balancer.apply}: the new configuration is diffed against what runs
(L{txbalancer.diff}), new pools and the new router are built, one
reference is swapped, and the kept pools change in place.
"""

from __future__ import annotations

import dataclasses
import random as _random
import signal
from functools import partial
from typing import Any, Callable, Optional, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from txbalancer import settings as _settings
from txbalancer.accesslog import AccessLog
from txbalancer.choosers import STRATEGIES
from txbalancer.config import ConfigError, endpointError, load_secret, parse_backends
from txbalancer.downstream import HTTPServerFactory
from txbalancer.health import HealthChecker, OutlierDetector
from txbalancer.interfaces import IExchange
from txbalancer.limits import ConnectionLimits, TrackedEndpoint
from txbalancer.pool import BackendPool
from txbalancer.proxy import Forwarder
from txbalancer.routing import RouteTable
from txbalancer.settings import BalancerConfig, ListenerConfig, PoolConfig
from txbalancer.upstream import UpstreamPool, backendTLSOptions, loadTrustRoot

__all__ = ["Balancer", "NotFound", "PoolRuntime", "Router"]

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
        tcp: bool = False,
    ) -> None:
        self.config = config
        self.name = config.name
        # Set when a reload retires this pool: the loop waiting for it to
        # be idle, and the Deferred of its stop.
        self.retireLoop: Any = None
        self.retired: Any = None
        self._random = random
        self._clock = reactor
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
        checkerClass: Any = HealthChecker
        checkerOptions: dict[str, Any] = {}
        if (tcp or config.proxyProtocol) and config.healthPath is None:
            # -- tcp mode: a pool behind a TCP listener, or whose backends
            # expect a PROXY header, is checked by TCP connect.
            from txbalancer.tcpcheck import TCPConnectChecker as checkerClass

            checkerOptions["proxyProtocol"] = config.proxyProtocol
        # Whether the pool's checks may be TCP connects (then a health path
        # given or taken away changes the kind of checker).
        self.tcpChecks = bool(tcp or config.proxyProtocol)
        self.checker = checkerClass(
            pool.backends,
            healthChanged,
            reactor,
            **checkerOptions,
            path=config.healthPath or "/",
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

            def ejected(backend: Any, seconds: float, reason: str) -> None:
                backend.ejections += 1
                backend.ejectedUntil = reactor.seconds() + seconds
                self.checker.eject(backend, seconds, reason)

            self.outliers = pool.outliers = OutlierDetector(
                ejected,
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
            proxyProtocol=config.proxyProtocol,
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
            tunnelIdleTimeout=b.tunnelIdleTimeout,
            needsClientKey=config.strategy == "ip-hash",
            stickyCookie=config.stickyCookie,
            queueTimeout=config.queueTimeout if config.queueSize else 0.0,
        )

    @property
    def inFlight(self) -> int:
        return self.forwarder.inFlight

    # Requests waiting in other processes' queues (--workers: the master's
    # sum of its workers').
    queuedElsewhere = 0

    @property
    def queueLength(self) -> int:
        """
        Requests waiting for room (C{--queue-size}).
        """
        return len(self.pool.waiting) + self.queuedElsewhere

    # -- a reload

    # The pool settings a running pool cannot take in place: the health
    # state machines count rise/fall from their start, ejection and the
    # backends' TLS trust are built in.  A change of any of them gives the
    # pool a new PoolRuntime (its backends start over: up, unchecked) and
    # the old one finishes its requests in flight.  Every other pool
    # setting is applied in place by L{configure}.
    REBUILD = frozenset(
        ("rise", "fall", "noHealthChecks", "ejectAfter", "maxEjectedPercent",
         "backendCa", "proxyProtocol")
    )

    def needsRebuild(self, config: PoolConfig, changed: Sequence[str]) -> bool:
        """
        Whether the pool must get a new runtime to take C{config}, whose
        settings C{changed} differ: one of L{REBUILD}, or a health path
        given or taken away where that switches between HTTP and TCP
        checks.
        """
        if self.REBUILD.intersection(changed):
            return True
        return (
            "healthPath" in changed
            and self.tcpChecks
            and (self.config.healthPath is None) != (config.healthPath is None)
        )

    def configure(self, config: PoolConfig, balancerConfig: BalancerConfig) -> None:
        """
        Take the settings of C{config} (the same pool, reloaded) in place:
        strategy (a new chooser), sticky cookie, queue, slow start,
        timeouts, connection limits, health check path/host/status/interval/
        timeout, panic threshold, and the balancer-wide settings its
        forwarder reads.  Its backends are changed by L{applyBackends}.
        """
        old, self.config = self.config, config
        pool, forwarder, upstreams = self.pool, self.forwarder, self.upstreams
        if config.strategy != old.strategy:
            pool.chooser = STRATEGIES[config.strategy](
                random=self._random, clock=self._clock.seconds
            )
            forwarder.needsClientKey = config.strategy == "ip-hash"
            log.info("pool {pool}: strategy is now {strategy}", pool=self.name,
                     strategy=config.strategy)
        forwarder.stickyCookie = (
            config.stickyCookie.encode("ascii") if config.stickyCookie else None
        )
        pool.queueSize = config.queueSize
        forwarder.queueTimeout = config.queueTimeout if config.queueSize else 0.0
        pool.slowStart = config.slowStart
        forwarder.backendTimeout = config.backendTimeout
        upstreams.connectTimeout = config.connectTimeout
        upstreams.maxIdlePerBackend = config.maxIdlePerBackend
        upstreams.idleTimeout = config.upstreamIdleTimeout
        host = config.healthHost
        self.checker.configure(
            path=config.healthPath or "/",
            host=host.encode("idna") if host else None,
            interval=config.healthInterval,
            timeout=config.healthTimeout,
            statusRange=config.healthStatus,
        )
        b = balancerConfig
        forwarder.setTrustedProxies(b.trustedProxies)
        forwarder.hsts = (
            (b"Strict-Transport-Security", b"max-age=%d" % (b.hsts,))
            if b.hsts is not None
            else None
        )
        forwarder.redirectHttps = b.redirectHttps
        forwarder.httpsPort = _httpsPort(b.listeners)
        pool.setPanicThreshold(config.panicThreshold)

    def applyBackends(self, change: Any) -> list[Any]:
        """
        Apply a L{txbalancer.diff.BackendsDiff}: add the new backends (their
        checks start), update the changed ones in place, remove the ones that
        are gone (they finish their requests in flight).  Unchanged backends
        keep their health, counters and kept-alive connections.

        @return: the Deferreds of the removals.
        """
        byKey = {backend.spec.key: backend for backend in self.pool.backends}
        for old, new in change.changed:
            backend = byKey.get(new.key)
            if backend is not None:
                self.pool.update(backend, new)
                log.info(
                    "pool {pool}: backend {address} now weight={weight} "
                    "max_conns={maxConns} priority={priority}",
                    pool=self.name, address=backend.address, weight=new.weight,
                    maxConns=new.max_conns, priority=new.priority,
                )
        for spec in change.added:
            self.addBackend(spec)
        removals = []
        for spec in change.removed:
            backend = byKey.get(spec.key)
            if backend is not None:
                removals.append(self.removeBackend(backend))
        return removals

    # -- changing the set of backends while requests flow (reload, the
    # admin API, DNS discovery all come here)

    def backend(self, address: str) -> Any:
        """
        The backend at C{host:port} (C{scheme://host:port} also matches), or
        L{None}.
        """
        for backend in self.pool.backends:
            if address in (backend.address, f"{backend.scheme}://{backend.address}"):
                return backend
        return None

    def addBackend(self, spec: Any) -> Any:
        """
        Add a backend from its L{txbalancer.config.BackendSpec}; its health
        checks start now.
        """
        backend = self.pool.add(spec)
        self.checker.addBackend(backend)
        log.info("pool {pool}: added backend {address}", pool=self.name,
                 address=backend.address)
        return backend

    def removeBackend(self, backend: Any) -> Any:
        """
        Remove C{backend}: no new requests; those in flight finish, then its
        kept-alive connections close.

        @return: a Deferred that fires when it is gone.
        """
        self.checker.removeBackend(backend)
        d = self.pool.remove(backend)
        log.info("pool {pool}: removing backend {address} ({n} requests in flight)",
                 pool=self.name, address=backend.address, n=backend.active)

        def gone(_: object) -> None:
            self.upstreams.forget(backend)
            log.info("pool {pool}: backend {address} removed", pool=self.name,
                     address=backend.address)

        return d.addCallback(gone)

    def clearOperatorChanges(self) -> None:
        """
        Undo every drain and disable of the admin API (a reload: run-time
        changes last until then).  A backend draining because its own
        health check asked for it stays draining.
        """
        for backend in self.pool.backends:
            self.pool.enable(backend)
            if backend in self.checker:
                self.checker.undrain(backend)

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


@implementer(IExchange)
class NotFound:
    """
    The exchange of a request no route matches: 404 with a short plain-text
    body, logged and counted like the front end's refusals; nothing
    reaches a backend, and a body the client sends is read and dropped.
    """

    def __init__(self, router: "Router", request: Any, server: Any) -> None:
        self.router = router
        self.request = request
        self.server = server

    def start(self) -> None:
        request = self.request
        router = self.router
        router.notFound += 1
        factory = getattr(self.server, "factory", None) or getattr(
            getattr(self.server, "connection", None), "factory", None
        )
        counters = getattr(factory, "counters", None)
        if counters is not None:
            counters["refused"] = counters.get("refused", 0) + 1
        log.info(
            "refused request from {peer}: 404 no route for {host} {target}",
            peer=request.peer,
            host=(request.host or b"-").decode("latin-1"),
            target=request.target.decode("latin-1"),
        )
        if router.accessLog is not None:
            router.accessLog.log(request, 404, 0, None)
        self.server.sendError(404, "Not Found: no route for this host and path")

    def bodyReceived(self, data: bytes) -> None:
        pass

    def bodyFinished(self) -> None:
        pass

    def clientGone(self) -> None:
        pass


class Router:
    """
    The handler of a balancer with routes: C{router(request, server)} is the
    exchange of the pool the first matching route names (asking the backend
    for less of the target when the route strips its prefix), or
    L{NotFound}.

    @ivar table: the compiled L{RouteTable}, its values the pools'
        forwarders.
    @ivar notFound: how many requests matched no route.
    """

    def __init__(self, routes: Sequence[Any], pools: dict[str, "PoolRuntime"],
                 accessLog: Any = None) -> None:
        for route in routes:
            if route.pool not in pools:
                raise ConfigError(
                    f"route to undefined pool {route.pool!r}",
                    route.filename or None,
                    route.lineno or None,
                )
        self.table = RouteTable(routes, [pools[r.pool].forwarder for r in routes])
        self.accessLog = accessLog
        self.notFound = 0

    def __call__(self, request: Any, server: Any) -> Any:
        found = self.table.match(request.host, request.target)
        if found is None:
            return NotFound(self, request, server)
        forwarder, target = found
        exchange = forwarder(request, server)
        exchange.target = target
        return exchange


class _Dispatch:
    """
    The handler every front end holds: C{dispatch(request, server)} asks
    whatever serves requests now (the first pool's forwarder, or the router
    of the routes).  A reload builds the new pools and routes first, then
    swaps this one reference, so a request sees the old set or the new,
    never a mix.
    """

    __slots__ = ("current",)

    def __init__(self, current: Any) -> None:
        self.current = current

    def __call__(self, request: Any, server: Any) -> Any:
        return self.current(request, server)


def rereadBackendsFiles(config: BalancerConfig) -> BalancerConfig:
    """
    C{config} with the backends of every pool whose source is a backends
    file read again: the reload of a balancer built from command-line
    options or Python (one from a config file re-reads the file).

    @raise ConfigError: naming the file and line of the first mistake.
    """
    from txbalancer.config import load_backends

    pools = []
    for pool in config.pools:
        if pool.source not in ("inline",) and not pool.source.startswith("srv:"):
            pool = dataclasses.replace(
                pool, backends=load_backends(pool.source)
            )
        pools.append(pool)
    return config.replace(pools=tuple(pools))


# Balancer-wide settings a reload applies in place (the pools' forwarders
# read them); a change of any other (listeners, TLS, the access log, client
# limits) is logged and takes effect at the next start.
_LIVE_BALANCER_SETTINGS = frozenset(
    ("trustedProxies", "hsts", "redirectHttps", "drainTimeout")
)


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
    @param reloader: called by L{reload} for the new configuration: a
        callable returning a L{BalancerConfig} (or raising L{ConfigError}).
        C{tap.makeService} gives one that reads the files again with the
        command line's overrides kept; by default the config file the
        configuration came from is read again, or without one every pool's
        backends file (L{rereadBackendsFiles}).
    @param resolver: the C{IResolver} of C{srv:} pools (by default one for
        C{dnsServer}, or the system's; tests pass a fake).
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
        reloader: Optional[Callable[[], BalancerConfig]] = None,
        resolver: Any = None,
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
            AccessLog.open(config.accessLog, reactor.seconds, config.accessLogFormat)
            if config.accessLog
            else None
        )
        if cookieSecret is None and config.stickySecretFile:
            cookieSecret = load_secret(config.stickySecretFile)
        self.reloader = reloader
        self.resolver = resolver
        # The SRV lookups of the srv: pools, by pool name.
        self.discoveries: dict[str, Any] = {}
        self._random = random if random is not None else _random.Random()
        self._jitter = jitter or _random.random
        self._healthClient = healthClient
        self._cookieSecret = cookieSecret
        self.pools: dict[str, PoolRuntime] = {}
        for poolConfig in config.pools:
            self.pools[poolConfig.name] = self._runtime(poolConfig, config)
        # Pools replaced or removed by a reload, finishing their requests.
        self.retiring: list[PoolRuntime] = []
        self._dispatch = _Dispatch(self._serving(config, self.pools))
        self.factories: list[Any] = []
        # --max-connections and --max-conns-per-ip, shared by every
        # listener; it learns the listening ports through TrackedEndpoint
        # (see listenOn).
        self.limits = ConnectionLimits(
            config.maxConnections, config.maxConnsPerIp, clock=reactor.seconds
        )
        self.listeners: list[StreamServerEndpointService] = []
        # (endpoint string, protocol factory) of each client listener, for
        # the admin server's connection counts.
        self.listening: list[tuple[str, Any]] = []
        self.admin: Optional[StreamServerEndpointService] = None
        self.serverTLS: list[Any] = []
        self._h2Factories: dict[int, Any] = {}
        # (pool name, factory) of the TCP-mode listeners.
        self._tcpFactories: list[tuple[str, Any]] = []

    def _runtime(self, poolConfig: PoolConfig, config: BalancerConfig) -> PoolRuntime:
        return PoolRuntime(
            poolConfig,
            config,
            self.reactor,
            random=self._random,
            jitter=self._jitter,
            healthClient=self._healthClient,
            accessLog=self.accessLog,
            cookieSecret=self._cookieSecret,
            tcp=poolConfig.name in config.tcpPools(),
        )

    def _serving(self, config: BalancerConfig, pools: dict[str, PoolRuntime]) -> Any:
        """
        What requests are handed to under C{config} with C{pools}: the
        first pool's forwarder (every request goes there, at no cost), or
        with routes a new L{Router} (then L{router}).

        @raise ConfigError: for a route that cannot be compiled.
        """
        if not config.routes:
            return next(iter(pools.values())).forwarder
        try:
            return Router(config.routes, pools, self.accessLog)
        except ValueError as e:
            raise ConfigError(f"bad route: {e}") from None

    @property
    def router(self) -> Optional[Router]:
        """
        The L{Router} requests go through, or L{None} without routes.
        """
        current = self._dispatch.current
        return current if isinstance(current, Router) else None

    @classmethod
    def fromConfig(cls, path: str, **kwargs: Any) -> "Balancer":
        """
        A balancer built from the TOML configuration file at C{path}
        (C{kwargs} as for the constructor: C{reactor=} and such).

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
        Without routes, the first pool's forwarder; with routes, the
        L{Router}; through one object for the balancer's life: a reload
        changes what it hands requests to, not the handler the front ends
        hold.
        """
        return self._dispatch

    @property
    def inFlight(self) -> int:
        return sum(p.inFlight for p in self.pools.values())

    def connectionCounts(self) -> list[tuple[str, int]]:
        """
        C{(endpoint, open client connections)} of each client listener (the
        admin server's C{/status} and C{/metrics}).
        """
        return [(endpoint, len(factory.connections)) for endpoint, factory in self.listening]

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

    def tcpFactory(
        self, pool: Optional[str] = None, refuseProxyHeaders: bool = False
    ) -> Any:
        """
        A protocol factory for a TCP-mode listener: each connection relayed
        to one backend of C{pool} (the first pool by default).  Drained when
        the balancer stops.
        """
        from txbalancer.tcpproxy import TCPProxyFactory

        runtime = self.pools[pool] if pool is not None else self.defaultPool
        factory = TCPProxyFactory(
            runtime.pool,
            self.reactor,
            runtime.upstreams._endpointFor,
            idleTimeout=self.config.tunnelIdleTimeout,
            proxyProtocol=runtime.config.proxyProtocol,
            refuseProxyHeaders=refuseProxyHeaders,
            needsClientKey=runtime.config.strategy == "ip-hash",
        )
        self.factories.append(factory)
        # A reload that gives this pool a new runtime (or strategy) tells
        # the listener.
        self._tcpFactories.append((runtime.name, factory))
        return factory

    def _followPools(self) -> None:
        """
        Point each TCP-mode listener at its pool's runtime now (after a
        reload); a listener whose pool is gone keeps the old one.
        """
        for name, factory in self._tcpFactories:
            runtime = self.pools.get(name)
            if runtime is not None:
                factory.usePool(
                    runtime.pool,
                    runtime.upstreams._endpointFor,
                    proxyProtocol=runtime.config.proxyProtocol,
                    needsClientKey=runtime.config.strategy == "ip-hash",
                )

    def resource(self) -> Any:
        """
        A twisted.web C{IResource} that proxies every request below it: mount
        it anywhere in your own C{Site} (C{root.putChild(b"api", r)}); the
        backend sees the path below the mount point.
        """
        from txbalancer.resource import BalancerResource

        resource = BalancerResource(
            self.handler, self.reactor, maxBodySize=self.config.maxBodySize
        )
        # A graceful stop waits for its requests in flight, too.
        self.factories.append(resource)
        return resource

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
                endpoint = self.endpointFor(listener)
            except ConfigError:
                raise
            except Exception as e:  # Twisted's parsers raise what they like
                raise endpointError(listener.endpoint, e) from None
            # -- tcp mode: the listener's mode and the PROXY headers it reads
            acceptFrom = listener.acceptProxyProtocol
            if acceptFrom is None:
                acceptFrom = config.acceptProxyProtocol
            if config.listenerMode(listener) == "tcp":
                factory = self.tcpFactory(
                    listener.pool, refuseProxyHeaders=bool(acceptFrom)
                )
            else:
                factory = self.serverFactory(secure=listener.secure)
            self.listening.append((listener.endpoint, factory))
            if listener.secure:
                from twisted.protocols.tls import TLSMemoryBIOFactory

                tcp = config.listenerMode(listener) == "tcp"
                factory = TLSMemoryBIOFactory(
                    serverTLS[(listener.tls, tcp)], False, factory
                )
            if acceptFrom:
                from txbalancer.acceptproxy import AcceptProxyFactory

                factory = AcceptProxyFactory(
                    factory, acceptFrom, self.reactor, timeout=config.clientTimeout
                )
            self.listenOn(endpoint, factory)
        if config.admin:
            self.listenAdmin()

    def endpointFor(self, listener: ListenerConfig) -> Any:
        """
        The server endpoint of C{listener}: its endpoint string parsed (a
        worker of C{--workers} adopts the socket its master passed instead).
        """
        from twisted.internet.endpoints import serverFromString

        return serverFromString(self.reactor, listener.endpoint)

    def adminResource(self, token: Optional[str] = None) -> Any:
        """
        The admin server as a twisted.web C{IResource}: the dashboard, C{/status},
        C{/metrics} and the runtime API (see L{txbalancer.admin}).  With
        C{token}, every request must carry C{Authorization: Bearer TOKEN}.
        """
        from txbalancer.admin import AdminResource

        return AdminResource(self, token=token)

    def listenAdmin(self) -> StreamServerEndpointService:
        """
        Serve the admin server on C{config.admin} as a child service.  It is
        not drained like a client listener: a graceful stop keeps it up
        while requests in flight finish, and stops it last.

        @raise ConfigError: when the endpoint is not loopback-only and no
            token is set, or the token file cannot be read.
        """
        from twisted.internet.endpoints import serverFromString
        from twisted.web.server import Site

        from txbalancer.admin import AdminSite, adminToken, checkExposure

        config = self.config
        token = adminToken(config)
        try:
            endpoint = serverFromString(self.reactor, config.admin)
        except (ValueError, TypeError, KeyError) as e:
            raise ConfigError(
                f"--admin: cannot listen on {config.admin!r}: {e} (expected a "
                "Twisted endpoint such as tcp:9000:interface=127.0.0.1)"
            ) from None
        if token is None:
            checkExposure(config.admin, endpoint)
        site: Site = AdminSite(self.adminResource(token=token))
        service = StreamServerEndpointService(endpoint, site)
        service._raiseSynchronously = True
        service.setServiceParent(self)
        self.admin = service
        log.info("admin server on {endpoint}{auth}", endpoint=config.admin,
                 auth=" (token required)" if token else "")
        return service

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
            # -- tcp mode: a TCP-mode TLS listener offers no ALPN protocol
            tcp = config.listenerMode(listener) == "tcp"
            key = (listener.tls, tcp)
            if listener.secure and key not in contexts:
                contexts[key] = ServerTLS(
                    [listener.tls],
                    certDir=config.tlsCertDir,
                    clientCA=config.tlsClientCa,
                    clientOptional=config.tlsClientOptional,
                    alpn=() if tcp else alpn,
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
        for pool in self.config.pools:
            if pool.source.startswith("srv:"):
                self._startDiscovery(pool)
        if self.installSignalHandlers:
            signal.signal(signal.SIGHUP, self._sighup)
            signal.signal(signal.SIGUSR1, self._sigusr1)
        for runtime in self.pools.values():
            backends = runtime.pool.backends
            log.info(
                "pool {pool}: balancing over {n} backends: {backends}",
                pool=runtime.name,
                n=len(backends),
                backends=", ".join(b.address for b in backends),
            )

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._reloadOnSignal)

    def _reloadOnSignal(self) -> None:
        try:
            self.reload()
        except ConfigError:
            pass  # logged by reload(); the old configuration runs on
        except Exception:
            log.failure("reload failed")

    def _sigusr1(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reopenLogs)

    def reopenLogs(self) -> None:
        """
        SIGUSR1: reopen the access log file by name, after logrotate moved
        it away; no line is lost.
        """
        if self.accessLog is not None:
            log.info("SIGUSR1: reopening the access log")
            self.accessLog.reopen()

    def reload(self) -> Any:
        """
        SIGHUP and C{POST /reload}: read the configuration again (the
        config file, every backends file; see C{reloader}) and apply the
        difference in place (L{apply}); reload the TLS certificates and
        keys (new handshakes use the new ones, open connections go on).
        Run-time changes last until then: backends the admin API added or
        removed are undone by the diff, its drains and disables here.

        @return: the L{txbalancer.diff.ConfigDiff} applied.
        @raise ConfigError: when a file is broken: nothing changed, and the
            reason is logged.
        """
        log.info("reloading the configuration and certificates")
        for serverTLS in self.serverTLS:
            serverTLS.reload()
        try:
            if self.reloader is not None:
                new = self.reloader()
            elif self.config.configFile:
                from txbalancer.config import load_config

                new = load_config(self.config.configFile)
            else:
                new = rereadBackendsFiles(self.config)
        except ConfigError as e:
            log.error("reload failed, nothing changed: {error}", error=str(e))
            raise
        try:
            diff = self.apply(new)
        except ConfigError as e:
            log.error("reload failed, nothing changed: {error}", error=str(e))
            raise
        for runtime in self.pools.values():
            runtime.clearOperatorChanges()
        return diff

    def apply(self, new: BalancerConfig) -> Any:
        """
        Make C{new} the running configuration, changing only what differs
        from what runs (L{txbalancer.diff.diffConfigs}; backends added or
        removed at run time count as running, so C{new} undoes them):

            - new pools start; a removed pool takes no new requests and
              stops once its requests in flight are done;
            - in a kept pool, new backends start their checks, removed ones
              take no new requests and finish those in flight, changed ones
              are updated in place and unchanged ones keep their health,
              counters and pooled connections;
            - pool settings are applied in place, except those in
              L{PoolRuntime.REBUILD}, which give the pool a new runtime;
            - pools and routes change in one step: everything new is built
              first, then the one reference the front ends read is swapped.

        Connections, streams and tunnels in flight are never cut.

        @return: the L{txbalancer.diff.ConfigDiff} applied.
        @raise ConfigError: when the new configuration cannot be built;
            nothing changed then.
        """
        return self._apply(self._keepDiscovered(new))

    def _running(self) -> BalancerConfig:
        """
        The configuration that runs: C{self.config} with each pool's
        backends as they are now (run-time changes, such as the admin
        server's, included: a reload undoes them).
        """
        pools = []
        for pool in self.config.pools:
            runtime = self.pools.get(pool.name)
            if runtime is not None:
                pool = dataclasses.replace(
                    pool, backends=tuple(b.spec for b in runtime.pool.backends)
                )
            pools.append(pool)
        return self.config.replace(pools=tuple(pools))

    def _apply(self, new: BalancerConfig) -> Any:
        from txbalancer.diff import diffConfigs

        old = self.config
        diff = diffConfigs(self._running(), new)
        if diff.empty:
            log.info("reload: nothing changed")
            self.config = new
            return diff
        # Build everything first: a failure here changes nothing.
        replaced: dict[str, PoolRuntime] = {}
        for change in diff.changed:
            if self.pools[change.name].needsRebuild(
                new.pool(change.name), change.settings
            ):
                replaced[change.name] = self._runtime(new.pool(change.name), new)
        added = {p.name: self._runtime(p, new) for p in diff.added}
        pools: dict[str, PoolRuntime] = {}
        for poolConfig in new.pools:
            name = poolConfig.name
            pools[name] = replaced.get(name) or added.get(name) or self.pools[name]
        serving = self._serving(new, pools)
        # The swap.
        retired = [self.pools[p.name] for p in diff.removed]
        retired += [self.pools[name] for name in replaced]
        self.pools = pools
        self.config = new
        self._dispatch.current = serving
        # The kept pools change in place (same turn of the reactor: no
        # request sees half of it).
        for change in diff.changed:
            runtime = pools[change.name]
            if change.name in replaced:
                log.info(
                    "pool {pool}: {settings} changed: the pool starts afresh",
                    pool=change.name, settings=", ".join(change.settings),
                )
                continue
            runtime.configure(new.pool(change.name), new)
            runtime.applyBackends(change.backends)
        for name, runtime in list(replaced.items()) + list(added.items()):
            if self.running:
                runtime.start()
        if diff.settings:
            live = [s for s in diff.settings if s in _LIVE_BALANCER_SETTINGS]
            if live:
                for name in pools:
                    if name not in replaced and name not in added:
                        pools[name].configure(new.pool(name), new)
            later = [s for s in diff.settings if s not in _LIVE_BALANCER_SETTINGS]
            if later:
                log.warn(
                    "reload: {settings} changed; that takes effect when the "
                    "balancer is restarted",
                    settings=", ".join(later),
                )
        self._followPools()
        for runtime in retired:
            self._retire(runtime)
        self._discoveryChanged(old)
        log.info(
            "reload applied: pools added {added}, removed {removed}, changed "
            "{changed}{routes}",
            added=", ".join(p.name for p in diff.added) or "none",
            removed=", ".join(p.name for p in diff.removed) or "none",
            changed=", ".join(
                f"{c.name} ({c.backends.describe()})" for c in diff.changed
            ) or "none",
            routes="; routes changed" if diff.routes else "",
        )
        return diff

    def _retire(self, runtime: PoolRuntime) -> None:
        """
        C{runtime} gets no new requests: stop it once those it has are done.
        """
        from twisted.internet.task import LoopingCall

        self.retiring.append(runtime)
        log.info("pool {pool}: retiring once idle ({n} requests in flight)",
                 pool=runtime.name, n=runtime.inFlight)

        def check() -> None:
            # Idle: no request in flight, no connection (TCP-mode tunnels
            # included) to any of its backends.
            if runtime.inFlight or any(b.active for b in runtime.pool.backends):
                return
            loop.stop()

        def stopped(_: object) -> Any:
            if runtime in self.retiring:
                self.retiring.remove(runtime)
            log.info("pool {pool}: retired", pool=runtime.name)
            return runtime.stop()

        loop = runtime.retireLoop = LoopingCall(check)
        loop.clock = self.reactor
        runtime.retired = loop.start(1.0, now=True).addCallback(stopped).addErrback(
            lambda f: log.failure("retiring pool {pool}", f, pool=runtime.name)
        )

    # -- backends from DNS

    def _keepDiscovered(self, new: BalancerConfig) -> BalancerConfig:
        """
        C{new} (read from the files) with the backends that DNS gave each
        C{srv:} pool that runs on with the same name: a reload does not
        forget them until the next answer.
        """
        if not any(p.source.startswith("srv:") for p in new.pools):
            return new
        pools = []
        for pool in new.pools:
            if pool.source.startswith("srv:") and not pool.backends:
                try:
                    running = self.config.pool(pool.name)
                except KeyError:
                    running = None
                if running is not None and running.source == pool.source:
                    pool = dataclasses.replace(pool, backends=running.backends)
            pools.append(pool)
        return new.replace(pools=tuple(pools))

    def _discovered(self, name: str, specs: Any) -> None:
        """
        DNS gave the C{srv:} pool C{name} the backends C{specs}: applied
        through the same diff as a reload.
        """
        if name not in self.pools:
            return
        pools = tuple(
            dataclasses.replace(p, backends=tuple(specs)) if p.name == name else p
            for p in self.config.pools
        )
        self._apply(self.config.replace(pools=pools))

    def _startDiscovery(self, pool: PoolConfig) -> None:
        from txbalancer.discovery import SRVDiscovery, makeResolver

        if self.resolver is None:
            self.resolver = makeResolver(self.config.dnsServer, self.reactor)
        discovery = SRVDiscovery(
            pool.source[len("srv:"):],
            self.resolver,
            self.reactor,
            partial(self._discovered, pool.name),
        )
        self.discoveries[pool.name] = discovery
        discovery.start()

    def _stopDiscovery(self, name: str) -> None:
        discovery = self.discoveries.pop(name, None)
        if discovery is not None:
            discovery.stop()

    def _discoveryChanged(self, old: BalancerConfig) -> None:
        """
        Start the lookups of new C{srv:} pools (or pools whose source
        changed to one), stop those of pools gone or no longer C{srv:}.
        """
        if not self.running:
            return
        for pool in self.config.pools:
            try:
                before: Optional[str] = old.pool(pool.name).source
            except KeyError:
                before = None
            if before != pool.source:
                self._stopDiscovery(pool.name)
                if pool.source.startswith("srv:"):
                    self._startDiscovery(pool)
        names = {pool.name for pool in self.config.pools}
        for name in list(self.discoveries):
            if name not in names:
                self._stopDiscovery(name)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        log.info("stopping: no longer accepting connections")
        self.limits.forgetPorts()
        for serverTLS in self.serverTLS:
            serverTLS.stopWatching()
        for name in list(self.discoveries):
            self._stopDiscovery(name)
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
        # Retiring pools are idle by now (the drain is over): stop them.
        retired = []
        for runtime in list(self.retiring):
            if runtime.retireLoop.running:
                runtime.retireLoop.stop()
            retired.append(runtime.retired)
        yield defer.gatherResults(retired)
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
