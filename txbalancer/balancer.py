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
from zope.interface import implementer

from txbalancer import settings as _settings
from txbalancer.accesslog import AccessLog
from txbalancer.choosers import STRATEGIES
from txbalancer.config import ConfigError, load_secret, parse_backends
from txbalancer.downstream import HTTPServerFactory
from txbalancer.health import HealthChecker, OutlierDetector
from txbalancer.interfaces import IExchange
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
            AccessLog.open(config.accessLog, reactor.seconds, config.accessLogFormat)
            if config.accessLog
            else None
        )
        if cookieSecret is None and config.stickySecretFile:
            cookieSecret = load_secret(config.stickySecretFile)
        randomness = random if random is not None else _random.Random()
        self.pools: dict[str, PoolRuntime] = {}
        tcpPools = config.tcpPools()
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
                tcp=poolConfig.name in tcpPools,
            )
        self.router: Optional[Router] = None
        if config.routes:
            try:
                self.router = Router(config.routes, self.pools, self.accessLog)
            except ValueError as e:
                raise ConfigError(f"bad route: {e}") from None
        self.factories: list[Any] = []
        self.listeners: list[StreamServerEndpointService] = []
        # (endpoint string, protocol factory) of each client listener, for
        # the admin server's connection counts.
        self.listening: list[tuple[str, Any]] = []
        self.admin: Optional[StreamServerEndpointService] = None
        self.serverTLS: list[Any] = []
        self._h2Factories: dict[int, Any] = {}

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
        Without routes, the first pool's forwarder itself (every request
        goes there, at no cost); with routes, the L{Router}.
        """
        if self.router is not None:
            return self.router
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
        return factory

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
                endpoint = serverFromString(self.reactor, listener.endpoint)
            except ConfigError:
                raise
            except Exception as e:  # Twisted's parsers raise what they like
                raise ConfigError(
                    f"--port {listener.endpoint!r}: not a usable endpoint "
                    f"({type(e).__name__}: {e}); give a port number or an "
                    "endpoint string such as tcp:8000:interface=127.0.0.1"
                ) from None
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
        fails loudly when the port cannot be bound.
        """
        service = StreamServerEndpointService(endpoint, factory)
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
        self.reactor.callFromThread(self.reload)

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

    def reload(self) -> None:
        """
        SIGHUP (and the admin API's C{POST /reload}): reload the TLS
        certificates and keys.  New handshakes use the new ones, open
        connections go on; a broken file is logged and the old certificate
        kept.  The admin API's drains and disables are undone: run-time
        changes last until the next reload.
        """
        log.info("SIGHUP: reloading certificates")
        for serverTLS in self.serverTLS:
            serverTLS.reload()
        # Run-time changes (the admin API's drains and disables) last until
        # the next reload.
        for runtime in self.pools.values():
            runtime.clearOperatorChanges()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        log.info("stopping: no longer accepting connections")
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
