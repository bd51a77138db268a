"""
C{twistd balancer}: the command line, and the wiring of the service tree.
"""

from __future__ import annotations

from typing import Any, Optional

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


def _seconds(option: str):
    def coerce(value: str) -> float:
        try:
            return parse_seconds(value, "--" + option)
        except ConfigError as e:
            raise ValueError(str(e))

    return coerce


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number")
    if n < 0:
        raise ValueError(f"{value!r} is negative")
    return n


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
         "How to pick a backend: " + ", ".join(sorted(STRATEGIES)) + "."],
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
        ["drain-timeout", None, 30.0,
         "On SIGTERM, seconds to let requests in flight finish before "
         "closing their connections.", _seconds("drain-timeout")],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["port"] = []

    def opt_port(self, value: str) -> None:
        """
        Where to listen (repeatable): a TCP port number, or a Twisted
        endpoint string such as tcp:8000:interface=127.0.0.1 or
        ssl:8443:privateKey=key.pem:certKey=cert.pem. [default: 8000]
        """
        try:
            self["port"].append(parse_port(value))
        except ConfigError as e:
            raise usage.UsageError(str(e))

    opt_p = opt_port

    def opt_version(self) -> None:
        """
        Print the txbalancer version and exit.
        """
        print(f"txbalancer {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["port"]:
            self["port"] = ["tcp:8000"]
        if self["strategy"] not in STRATEGIES:
            raise usage.UsageError(
                f"unknown --strategy {self['strategy']!r}; choose one of: "
                + ", ".join(sorted(STRATEGIES))
            )
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
        except ConfigError as e:
            # A broken backends file is not a usage mistake: say what and
            # where in one line, without twistd's page of help.
            raise SystemExit(f"txbalancer: {e}")


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    """
    Build the balancer's service tree from parsed options.

    @param reactor: the reactor to use; the global one by default.  Tests
        pass a L{twisted.internet.testing.MemoryReactorClock}.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor

    from twisted.internet.endpoints import serverFromString

    from txbalancer.accesslog import AccessLog
    from txbalancer.downstream import HTTPServerFactory
    from txbalancer.pool import BackendPool
    from txbalancer.proxy import Forwarder
    from txbalancer.service import BalancerService
    from txbalancer.upstream import UpstreamPool

    pool = BackendPool(options["backendSpecs"], STRATEGIES[options["strategy"]]())
    upstreams = UpstreamPool(
        reactor,
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
    return BalancerService(
        listeners,
        pool,
        upstreams,
        forwarder,
        drainTimeout=options["drain-timeout"],
        accessLog=accessLog,
    )
