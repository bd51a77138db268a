"""
C{twistd balancer}: the command line, and the wiring of the service tree.
"""

from __future__ import annotations

from typing import Any, Optional

import re

from twisted.logger import Logger
from twisted.python import usage

from txbalancer import __version__
from txbalancer.choosers import STRATEGIES
from txbalancer.config import (
    ConfigError,
    load_backends,
    parse_cidrs,
    parse_port,
    parse_seconds,
    parse_size,
)


log = Logger()

_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def _seconds(option: str):
    def coerce(value: str) -> float:
        try:
            return parse_seconds(value, "--" + option)
        except ConfigError as e:
            raise ValueError(str(e))

    return coerce


def _number(kind: type, low: float, high: float = float("inf"), what: str = ""):
    """
    An option coercer: a C{kind} (int or float) between C{low} and C{high}.
    """

    def coerce(value: str):
        try:
            n = kind(value)
        except ValueError:
            noun = "whole number" if kind is int else "number"
            raise ValueError(f"{value!r} is not a {noun}")
        if not low <= n <= high:
            if what:
                raise ValueError(f"{value!r} is not {what}")
            raise ValueError(f"{value!r} is negative" if n < 0 else f"{value!r} is not at least {low}")
        return n

    return coerce


_count = _number(int, 0)
_positive = _number(int, 1)
_nonNegative = _number(float, 0)
_percent = _number(float, 0, 100, "a percentage between 0 and 100")


def _statusRange(value: str) -> tuple[int, int]:
    low, dash, high = value.partition("-")
    try:
        lo, hi = int(low), int(high if dash else low)
    except ValueError:
        raise ValueError(f"{value!r} is not a status range like 200-399")
    if not (100 <= lo <= hi <= 599):
        raise ValueError(f"{value!r} is not a status range like 200-399")
    return (lo, hi)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An HTTP(S) load balancer and reverse proxy. Spreads requests over "
        "the backends listed in --backends, streaming bodies both ways over "
        "kept-alive backend connections. SIGTERM stops it gracefully."
    )

    optParameters = [
        ["backends", "b", None, "The backends file: one host:port per line, "
         "optional flags weight=N, max_conns=N, backup. (required)"],
        ["strategy", "s", "round-robin",
         "How to pick a backend: " + ", ".join(STRATEGIES)
         + " (see Strategies below)."],
        ["sticky-cookie", None, None,
         "Pin each client to a backend with a cookie of this name (an opaque, "
         "signed value); a missing, tampered or stale cookie falls back to the "
         "strategy and is replaced. [default: off]"],
        ["queue-size", None, 0,
         "Requests that may wait when every backend is at its max_conns; "
         "beyond it, 503 with Retry-After.", _count],
        ["queue-timeout", None, 5.0,
         "Seconds a request may wait in that queue before 503 with "
         "Retry-After.", _seconds("queue-timeout")],
        ["slow-start", None, 0.0,
         "Seconds over which a backend that comes back up ramps from a tenth "
         "of its weight to all of it. 0 turns slow start off.", _nonNegative],
        ["trusted-proxies", None, None,
         "CIDR[,CIDR...]: peers whose X-Forwarded-For and Forwarded headers "
         "are kept (the peer's address is appended). From any other peer they "
         "are replaced. [default: none]"],
        ["connect-timeout", None, 3.0,
         "Seconds to wait for a connection to a backend before trying the "
         "next one.", _seconds("connect-timeout")],
        ["backend-timeout", None, 60.0,
         "Seconds to wait for a backend's response headers before answering "
         "504.", _seconds("backend-timeout")],
        ["client-timeout", None, 60.0,
         "Seconds a client connection may stay idle (or take to send its "
         "request) before it is closed.", _seconds("client-timeout")],
        ["access-log", None, None,
         "Write one line per request (combined format + backend + seconds) "
         "to this file, '-' for stdout. [default: off]"],
        ["max-body-size", None, None,
         "Largest request body accepted, in bytes (suffixes k, m, g); larger "
         "ones get 413 before anything is forwarded. [default: unlimited]"],
        ["max-idle-per-backend", None, 64,
         "Idle kept-alive connections kept open per backend.", _count],
        ["upstream-idle-timeout", None, 4.0,
         "Seconds before an idle backend connection is closed; keep it below "
         "the backends' own keep-alive timeout (Node: 5).",
         _seconds("upstream-idle-timeout")],
        ["health-path", None, "/",
         "Active health check: GET this path on each backend; a status in "
         "--health-status is healthy."],
        ["health-host", None, None,
         "Host header of health checks. [default: the backend's host:port]"],
        ["health-status", None, "200-399",
         "Healthy status codes, LOW-HIGH inclusive.", _statusRange],
        ["health-interval", None, 5.0, "Seconds between two checks of a "
         "backend (each backend's first check is jittered).",
         _seconds("health-interval")],
        ["health-timeout", None, 2.0, "Seconds a health check may take.",
         _seconds("health-timeout")],
        ["rise", None, 2, "Consecutive passed checks that bring a backend up.",
         _positive],
        ["fall", None, 3,
         "Consecutive failed checks that take a backend down.", _positive],
        ["eject-after", None, 5,
         "Consecutive failed requests (connect errors, broken responses, 5xx) "
         "that eject a backend for a while (10 s, doubling on each repeat, up "
         "to 300 s); 0 turns passive ejection off.", _count],
        ["max-ejected-percent", None, 50.0,
         "Never eject more than this percentage of the backends.", _percent],
        ["panic-threshold", None, 0.0,
         "When fewer than this percentage of backends are up, balance over "
         "all of them. 0 turns panic mode off.", _percent],
        ["backend-ca", None, None,
         "Verify https:// backends against the CA certificates in this PEM "
         "file instead of the system's trusted CAs."],
        ["tls-cert-dir", None, None,
         "Serve every *.pem in this directory (certificate chain and key) on "
         "the TLS listeners, picked by SNI from the certificates' names."],
        ["tls-client-ca", None, None,
         "Require TLS clients to present a certificate signed by this CA; its "
         "subject goes to backends as X-Client-Cert-Subject."],
        ["hsts", None, None,
         "Add Strict-Transport-Security: max-age=SECONDS to TLS responses. "
         "[default: off]"],
        ["tls-reload-interval", None, 10.0,
         "Seconds between checks of the certificate files' modification "
         "times (changed files are reloaded; SIGHUP reloads at once).",
         _seconds("tls-reload-interval")],
        ["drain-timeout", None, 30.0,
         "On SIGTERM, seconds to let requests in flight finish before "
         "closing their connections.", _seconds("drain-timeout")],
    ]

    optFlags = [
        ["no-health-checks", None, "Turn active health checks off (backends "
         "are then only taken out by passive ejection)."],
        ["tls-client-optional", None, "With --tls-client-ca: ask for a client "
         "certificate but accept clients without one."],
        ["http2", None, "Offer HTTP/2 (ALPN h2) on TLS listeners; needs "
         "pip install 'txbalancer[http2]'."],
        ["redirect-https", None, "Answer every request on a plain-HTTP "
         "listener with 301 to the same URL over https."],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["port"] = []
        self["tls"] = []

    def getUsage(self, width: Optional[int] = None) -> str:
        """
        The usual help, then one line per strategy.
        """
        lines = ["", "Strategies (--strategy NAME; weights are honoured by every one):"]
        for name, cls in STRATEGIES.items():
            lines.append(f"  {name:<12} {cls.description}")
        return usage.Options.getUsage(self, width) + "\n".join(lines) + "\n"

    def opt_port(self, value: str) -> None:
        """
        Where to listen (repeatable): a TCP port number, or a Twisted
        endpoint string such as tcp:8000:interface=127.0.0.1 or
        ssl:8443:privateKey=key.pem:certKey=cert.pem. [default: 8000]
        """
        try:
            if value.split(":", 1)[0] == "ssl":
                # TLS listeners are built by the balancer (tls.py), not by
                # Twisted's ssl: endpoint, which cannot set versions,
                # ciphers, curves, SNI or ALPN.
                from txbalancer.tls import parseTLSListener

                self["tls"].append(parseTLSListener(value))
            else:
                self["port"].append(parse_port(value))
        except ConfigError as e:
            raise usage.UsageError(str(e))

    opt_p = opt_port

    def opt_tls(self, value: str) -> None:
        """
        A TLS listener (repeatable): PORT:cert=FULLCHAIN.pem:key=PRIVKEY.pem
        [:chain=CHAIN.pem][:interface=ADDRESS]. TLS 1.2 and 1.3 only, Mozilla
        intermediate ciphers.
        """
        from txbalancer.tls import parseTLSListener

        try:
            self["tls"].append(parseTLSListener(value))
        except ConfigError as e:
            raise usage.UsageError(str(e))

    def opt_version(self) -> None:
        """
        Print the txbalancer version and exit.
        """
        print(f"txbalancer {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["port"] and not self["tls"]:
            self["port"] = ["tcp:8000"]
        if self["tls-client-optional"] and not self["tls-client-ca"]:
            raise usage.UsageError("--tls-client-optional needs --tls-client-ca")
        if self["http2"]:
            try:
                import h2  # noqa: F401
            except ImportError:
                raise usage.UsageError(
                    "--http2 needs the h2 package: pip install 'txbalancer[http2]'"
                )
        if self["hsts"] is not None:
            try:
                self["hsts"] = int(self["hsts"])
                if self["hsts"] < 0:
                    raise ValueError()
            except ValueError:
                raise usage.UsageError(f"--hsts: {self['hsts']!r} is not a number of seconds")
        if self["strategy"] not in STRATEGIES:
            raise usage.UsageError(
                f"unknown --strategy {self['strategy']!r}; choose one of: "
                + ", ".join(sorted(STRATEGIES))
            )
        if isinstance(self["health-status"], str):
            # usage.Options coerces given values only, not defaults.
            self["health-status"] = _statusRange(self["health-status"])
        cookie = self["sticky-cookie"]
        if cookie is not None and not _COOKIE_NAME.match(cookie):
            raise usage.UsageError(f"--sticky-cookie: {cookie!r} is not a cookie name")
        if not self["backends"]:
            raise usage.UsageError("--backends FILE is required")
        try:
            self["trusted-proxies"] = parse_cidrs(self["trusted-proxies"] or "")
            if self["max-body-size"] is not None:
                self["max-body-size"] = parse_size(
                    self["max-body-size"], "--max-body-size"
                )
        except ConfigError as e:
            raise usage.UsageError(str(e))
        try:
            self["backendSpecs"] = load_backends(self["backends"])
            self["serverTLS"] = self._serverTLS()
            self["backendTrustRoot"] = None
            if self["backend-ca"]:
                from txbalancer.upstream import loadTrustRoot

                self["backendTrustRoot"] = loadTrustRoot(self["backend-ca"])
        except ConfigError as e:
            # A broken backends file or certificate is not a usage mistake:
            # say what and where in one line, without twistd's page of help.
            raise SystemExit(f"txbalancer: {e}")

    def _serverTLS(self) -> list[tuple[int, str, Any]]:
        """
        Load and check every TLS listener's certificates now, so a bad file
        stops start-up with its name.
        """
        if not self["tls"]:
            if self["tls-cert-dir"] or self["tls-client-ca"]:
                raise ConfigError(
                    "--tls-cert-dir and --tls-client-ca need a TLS listener "
                    "(--tls or --port ssl:...)"
                )
            return []
        from txbalancer.tls import ServerTLS

        alpn = (b"h2", b"http/1.1") if self["http2"] else (b"http/1.1",)
        return [
            (
                port,
                interface,
                ServerTLS(
                    [spec],
                    certDir=self["tls-cert-dir"],
                    clientCA=self["tls-client-ca"],
                    clientOptional=self["tls-client-optional"],
                    alpn=alpn,
                ),
            )
            for port, interface, spec in self["tls"]
        ]


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    """
    Build the balancer's service tree from parsed options.

    @param reactor: the reactor to use; the global one by default.  Tests
        pass a L{twisted.internet.testing.MemoryReactorClock}.
    """
    installSignalHandlers = reactor is None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor

    from twisted.internet.endpoints import serverFromString

    from txbalancer.accesslog import AccessLog
    from txbalancer.downstream import HTTPServerFactory
    from txbalancer.pool import BackendPool
    from txbalancer.proxy import Forwarder
    from txbalancer.service import BalancerService
    from txbalancer.tls import tlsServerEndpoint
    from txbalancer.upstream import UpstreamPool, backendTLSOptions

    from txbalancer.health import HealthChecker, OutlierDetector

    import random
    from functools import partial

    # One TLS policy for https:// backends, shared by the proxy and the checks.
    tlsOptionsFor = partial(backendTLSOptions, trustRoot=options["backendTrustRoot"])

    pool = BackendPool(
        options["backendSpecs"],
        STRATEGIES[options["strategy"]](random=random.Random(), clock=reactor.seconds),
        panicThreshold=options["panic-threshold"],
        clock=reactor,
        slowStart=options["slow-start"],
        queueSize=options["queue-size"],
    )

    def healthChanged(backend: Any, state: str, reason: str) -> None:
        pool.setHealth(backend, state, reason)
        if state == "up" and pool.outliers is not None:
            pool.outliers.returnEarly(backend)

    for backend in pool.backends:
        if backend.scheme == "https" and not backend.spec.tls_verify:
            log.warn(
                "{spec.filename}:{spec.lineno}: TLS to backend {address} is not "
                "verified (tls_verify=off)",
                spec=backend.spec,
                address=backend.address,
            )

    healthHost = options["health-host"]
    checker = HealthChecker(
        pool.backends,
        healthChanged,
        reactor,
        path=options["health-path"],
        host=healthHost.encode("idna") if healthHost else None,
        interval=options["health-interval"],
        timeout=options["health-timeout"],
        rise=options["rise"],
        fall=options["fall"],
        statusRange=options["health-status"],
        active=not options["no-health-checks"],
        tlsOptionsFor=tlsOptionsFor,
    )
    pool.checker = checker
    if options["eject-after"]:
        pool.outliers = OutlierDetector(
            checker.eject,
            checker.ejectionEnded,
            reactor,
            ejectAfter=options["eject-after"],
            maxEjectedPercent=options["max-ejected-percent"],
        )
    upstreams = UpstreamPool(
        reactor,
        tlsOptionsFor=tlsOptionsFor,
        connectTimeout=options["connect-timeout"],
        maxIdlePerBackend=options["max-idle-per-backend"],
        idleTimeout=options["upstream-idle-timeout"],
    )
    accessLog = None
    if options["access-log"]:
        accessLog = AccessLog.open(options["access-log"], reactor.seconds)
    forwarder = Forwarder(
        pool,
        upstreams,
        reactor,
        trustedProxies=options["trusted-proxies"],
        backendTimeout=options["backend-timeout"],
        accessLog=accessLog,
        hsts=options["hsts"],
        redirectHttps=options["redirect-https"],
        needsClientKey=options["strategy"] == "ip-hash",
        stickyCookie=options["sticky-cookie"],
        queueTimeout=options["queue-timeout"] if options["queue-size"] else 0.0,
    )
    listeners = []
    for description in options["port"]:
        factory = HTTPServerFactory(
            forwarder,
            reactor,
            clientTimeout=options["client-timeout"],
            maxBodySize=options["max-body-size"],
            secure=description.split(":", 1)[0].lower() == "ssl",
        )
        listeners.append((serverFromString(reactor, description), factory))
    for port, interface, serverTLS in options["serverTLS"]:
        factory = HTTPServerFactory(
            forwarder,
            reactor,
            clientTimeout=options["client-timeout"],
            maxBodySize=options["max-body-size"],
            secure=True,
            clientCertificates=bool(options["tls-client-ca"]),
        )
        if options["http2"]:
            from txbalancer.h2 import NegotiatingFactory

            factory = NegotiatingFactory(factory, reactor)
        listeners.append((tlsServerEndpoint(reactor, port, interface, serverTLS), factory))
    return BalancerService(
        listeners,
        pool,
        upstreams,
        forwarder,
        drainTimeout=options["drain-timeout"],
        accessLog=accessLog,
        checker=checker,
        reactor=reactor,
        serverTLS=[serverTLS for _, _, serverTLS in options["serverTLS"]],
        tlsReloadInterval=options["tls-reload-interval"],
        installSignalHandlers=installSignalHandlers,
    )
