"""
Every setting of the balancer, once, and the frozen values built from them.

A setting is a field of L{PoolConfig} (it concerns one pool: how backends
are picked, checked, connected to) or of L{BalancerConfig} (it concerns the
whole balancer: listeners, clients, logs).  Each field carries its option
name, its coercer and its help text in its metadata, and that one list is
read by everything that takes settings:

    - the command line: C{tap.Options} is built from L{commandLineSettings};
    - the TOML file: a key of a C{[balancer]} or C{[pool.NAME]} table is an
      option name (C{backend-timeout = 30}), checked against the same list;
    - Python: C{Balancer(backends, backendTimeout=30)} takes the field names.

So an option exists everywhere or nowhere, with one default and one rule
for what it accepts.  Pure: no reactor, no I/O.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from txbalancer.config import (
    BackendSpec,
    ConfigError,
    parse_cidrs,
    parse_seconds,
    parse_size,
)

__all__ = [
    "BalancerConfig",
    "ListenerConfig",
    "PoolConfig",
    "RouteConfig",
    "Setting",
    "STRATEGY_NAMES",
    "commandLineSettings",
    "settingFor",
]

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# The names of the strategies (their classes live in choosers.py, which this
# pure module does not import).
STRATEGY_NAMES = ("round-robin", "least-conn", "ip-hash", "random", "p2c", "least-time")

# RFC 6265 cookie names are RFC 9110 tokens.
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


# -- coercers: (value, option name) -> value, or ConfigError
#
# Values come as strings from the command line and as native values from
# TOML and Python; every coercer takes both.


def _isNumber(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seconds(value: Any, option: str) -> float:
    """
    A number of seconds greater than 0.
    """
    if _isNumber(value):
        value = str(value)
    if not isinstance(value, str):
        raise ConfigError(f"{option}: expected a number of seconds, got {value!r}")
    return parse_seconds(value, option)


def _number(kind: type, low: float, high: float = math.inf, what: str = "") -> Callable:
    noun = "a whole number" if kind is int else "a number"

    def coerce(value: Any, option: str) -> Any:
        if isinstance(value, bool) or (kind is int and isinstance(value, float)):
            raise ConfigError(f"{option}: expected {noun}, got {value!r}")
        try:
            n = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{option}: expected {noun}, got {value!r}") from None
        if kind is float and not math.isfinite(n):
            raise ConfigError(f"{option}: expected {noun}, got {value!r}")
        if not low <= n <= high:
            if what:
                raise ConfigError(f"{option}: {value!r} is not {what}")
            if n < 0:
                raise ConfigError(f"{option}: {value!r} is negative")
            raise ConfigError(f"{option}: {value!r} is not at least {low:g}")
        return n

    return coerce


count = _number(int, 0)
positive = _number(int, 1)
nonNegative = _number(float, 0)
percent = _number(float, 0, 100, "a percentage between 0 and 100")


def text(value: Any, option: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{option}: expected a non-empty string, got {value!r}")
    return value


def optionalText(value: Any, option: str) -> Optional[str]:
    return None if value is None else text(value, option)


def flag(value: Any, option: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "on", "yes", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "off", "no", "0"):
        return False
    raise ConfigError(f"{option}: expected true or false, got {value!r}")


def statusRange(value: Any, option: str) -> tuple[int, int]:
    """
    C{"200-399"}, C{"200"}, or a pair C{[200, 399]}: an inclusive range.
    """
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = value
    else:
        low, dash, high = str(value).partition("-")
        try:
            lo, hi = int(low), int(high if dash else low)
        except ValueError:
            lo = hi = 0
    if not (
        isinstance(lo, int) and isinstance(hi, int) and 100 <= lo <= hi <= 599
    ):
        raise ConfigError(f"{option}: {value!r} is not a status range like 200-399")
    return (lo, hi)


def strategy(value: Any, option: str) -> str:
    if value not in STRATEGY_NAMES:
        close = difflib.get_close_matches(str(value), STRATEGY_NAMES, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{option}: unknown strategy {value!r}{hint}; choose one of: "
            + ", ".join(STRATEGY_NAMES)
        )
    return value


def cookieName(value: Any, option: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not _COOKIE_NAME.match(value):
        raise ConfigError(f"{option}: {value!r} is not a cookie name")
    return value


def cidrs(value: Any, option: str) -> tuple[IPNetwork, ...]:
    """
    C{"10.0.0.0/8,127.0.0.1"} or a list of such strings.
    """
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (ipaddress.IPv4Network, ipaddress.IPv6Network))
               for v in value):
            return tuple(value)
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise ConfigError(f"{option}: expected networks like 10.0.0.0/8, got {value!r}")
    return parse_cidrs(value, option)


def size(value: Any, option: str) -> Optional[int]:
    if value is None:
        return None
    if _isNumber(value):
        value = str(value)
    return parse_size(value, option)


def hstsSeconds(value: Any, option: str) -> Optional[int]:
    if value is None:
        return None
    return _number(int, 0)(value, option)


# -- the fields


def setting(
    option: str,
    default: Any,
    coerce: Callable[[Any, str], Any],
    help: str,
    *,
    isFlag: bool = False,
    short: Optional[str] = None,
) -> Any:
    """
    A dataclass field that is also an option: C{option} is its name on the
    command line and in the TOML file.
    """
    return field(
        default=default,
        metadata={
            "setting": Setting(option, default, coerce, help, isFlag, short)
        },
    )


@dataclass(frozen=True)
class Setting:
    """
    What the command line and the config file need to know of one field.
    """

    option: str
    default: Any
    coerce: Callable[[Any, str], Any]
    help: str
    isFlag: bool = False
    short: Optional[str] = None
    attribute: str = ""
    scope: str = ""  # "pool" or "balancer"


@dataclass(frozen=True)
class PoolConfig:
    """
    One pool: its backends and every setting that concerns one pool.

    @ivar source: where the backends came from: C{"inline"} (a list in the
        config file or in Python), a backends file's path, or C{"srv:NAME"}.
    """

    name: str = "default"
    backends: tuple[BackendSpec, ...] = ()
    source: str = "inline"

    strategy: str = setting(
        "strategy", "round-robin", strategy,
        "How to pick a backend: " + ", ".join(STRATEGY_NAMES)
        + " (see Strategies below).", short="s")
    stickyCookie: Optional[str] = setting(
        "sticky-cookie", None, cookieName,
        "Pin each client to a backend with a cookie of this name (an opaque, "
        "signed value); a missing, tampered or stale cookie falls back to the "
        "strategy and is replaced. [default: off]")
    queueSize: int = setting(
        "queue-size", 0, count,
        "Requests that may wait when every backend is at its max_conns; "
        "beyond it, 503 with Retry-After.")
    queueTimeout: float = setting(
        "queue-timeout", 5.0, seconds,
        "Seconds a request may wait in that queue before 503 with Retry-After.")
    slowStart: float = setting(
        "slow-start", 0.0, nonNegative,
        "Seconds over which a backend that comes back up ramps from a tenth "
        "of its weight to all of it. 0 turns slow start off.")
    connectTimeout: float = setting(
        "connect-timeout", 3.0, seconds,
        "Seconds to wait for a connection to a backend before trying the "
        "next one.")
    backendTimeout: float = setting(
        "backend-timeout", 60.0, seconds,
        "Seconds to wait for a backend's response headers before answering 504.")
    maxIdlePerBackend: int = setting(
        "max-idle-per-backend", 64, count,
        "Idle kept-alive connections kept open per backend.")
    upstreamIdleTimeout: float = setting(
        "upstream-idle-timeout", 4.0, seconds,
        "Seconds before an idle backend connection is closed; keep it below "
        "the backends' own keep-alive timeout (Node: 5).")
    healthPath: str = setting(
        "health-path", "/", text,
        "Active health check: GET this path on each backend; a status in "
        "--health-status is healthy.")
    healthHost: Optional[str] = setting(
        "health-host", None, optionalText,
        "Host header of health checks. [default: the backend's host:port]")
    healthStatus: tuple[int, int] = setting(
        "health-status", (200, 399), statusRange,
        "Healthy status codes, LOW-HIGH inclusive. [default: 200-399]")
    healthInterval: float = setting(
        "health-interval", 5.0, seconds,
        "Seconds between two checks of a backend (each backend's first check "
        "is jittered).")
    healthTimeout: float = setting(
        "health-timeout", 2.0, seconds, "Seconds a health check may take.")
    rise: int = setting(
        "rise", 2, positive, "Consecutive passed checks that bring a backend up.")
    fall: int = setting(
        "fall", 3, positive, "Consecutive failed checks that take a backend down.")
    noHealthChecks: bool = setting(
        "no-health-checks", False, flag,
        "Turn active health checks off (backends are then only taken out by "
        "passive ejection).", isFlag=True)
    ejectAfter: int = setting(
        "eject-after", 5, count,
        "Consecutive failed requests (connect errors, broken responses, 5xx) "
        "that eject a backend for a while (10 s, doubling on each repeat, up "
        "to 300 s); 0 turns passive ejection off.")
    maxEjectedPercent: float = setting(
        "max-ejected-percent", 50.0, percent,
        "Never eject more than this percentage of the backends.")
    panicThreshold: float = setting(
        "panic-threshold", 0.0, percent,
        "When fewer than this percentage of backends are up, balance over "
        "all of them. 0 turns panic mode off.")
    backendCa: Optional[str] = setting(
        "backend-ca", None, optionalText,
        "Verify https:// backends against the CA certificates in this PEM "
        "file instead of the system's trusted CAs.")


@dataclass(frozen=True)
class ListenerConfig:
    """
    One listening endpoint.

    @ivar endpoint: a Twisted server endpoint string (C{tcp:8000},
        C{unix:/run/lb.sock}, C{systemd:domain=INET:index=0}, ...).
    @ivar tls: a L{txbalancer.tls.CertSpec} when TLS is terminated here
        (the endpoint is then wrapped in the balancer's own TLS), or
        L{None}.
    """

    endpoint: str
    tls: Any = None

    @property
    def secure(self) -> bool:
        return self.tls is not None


@dataclass(frozen=True)
class RouteConfig:
    """
    One route: requests whose host and path match go to C{pool}.
    """

    pool: str
    host: Optional[str] = None
    path: Optional[str] = None
    stripPrefix: bool = False
    filename: str = ""
    lineno: int = 0


@dataclass(frozen=True)
class BalancerConfig:
    """
    A whole balancer: listeners, pools, routes, and every setting that
    concerns the whole balancer.  Frozen: a reload builds a new one.
    """

    listeners: tuple[ListenerConfig, ...] = (ListenerConfig("tcp:8000"),)
    pools: tuple[PoolConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    configFile: Optional[str] = None

    trustedProxies: tuple[IPNetwork, ...] = setting(
        "trusted-proxies", (), cidrs,
        "CIDR[,CIDR...]: peers whose X-Forwarded-For and Forwarded headers "
        "are kept (the peer's address is appended). From any other peer they "
        "are replaced. [default: none]")
    clientTimeout: float = setting(
        "client-timeout", 60.0, seconds,
        "Seconds a client connection may stay idle between requests, send "
        "no byte of a request body, or leave the response unread, before it "
        "is closed (with 408 when no response has begun).")
    maxBodySize: Optional[int] = setting(
        "max-body-size", None, size,
        "Largest request body accepted, in bytes (suffixes k, m, g); larger "
        "ones get 413 before anything is forwarded. [default: unlimited]")
    accessLog: Optional[str] = setting(
        "access-log", None, optionalText,
        "Write one line per request (combined format + backend + seconds) "
        "to this file, '-' for stdout. [default: off]")
    drainTimeout: float = setting(
        "drain-timeout", 30.0, seconds,
        "On SIGTERM, seconds to let requests in flight finish before "
        "closing their connections.")
    redirectHttps: bool = setting(
        "redirect-https", False, flag,
        "Answer every request on a plain-HTTP listener with 301 to the same "
        "URL over https (to the port of the first TLS listener).", isFlag=True)
    hsts: Optional[int] = setting(
        "hsts", None, hstsSeconds,
        "Add Strict-Transport-Security: max-age=SECONDS to TLS responses. "
        "[default: off]")
    http2: bool = setting(
        "http2", False, flag,
        "Offer HTTP/2 (ALPN h2) on TLS listeners.", isFlag=True)
    tlsCertDir: Optional[str] = setting(
        "tls-cert-dir", None, optionalText,
        "Serve every *.pem in this directory (certificate chain and key) on "
        "the TLS listeners, picked by SNI from the certificates' names.")
    tlsClientCa: Optional[str] = setting(
        "tls-client-ca", None, optionalText,
        "Require TLS clients to present a certificate signed by this CA; its "
        "subject goes to backends as X-Client-Cert-Subject.")
    tlsClientOptional: bool = setting(
        "tls-client-optional", False, flag,
        "With --tls-client-ca: ask for a client certificate but accept "
        "clients without one.", isFlag=True)
    tlsReloadInterval: float = setting(
        "tls-reload-interval", 10.0, seconds,
        "Seconds between checks of the certificate files' modification "
        "times (changed files are reloaded; SIGHUP reloads at once).")

    # -- slow clients
    headerTimeout: float = setting(
        "header-timeout", 10.0, seconds,
        "Seconds a client has to send a whole request head, from its first "
        "byte (from the connect, for a connection's first request); after "
        "that it gets 408 and the connection is closed.")
    maxConnections: int = setting(
        "max-connections", 0, count,
        "Client connections open at once, over every listener; at the limit "
        "the listeners stop accepting (new connections wait in the kernel's "
        "listen queue) until one closes. 0: unlimited. [default: unlimited]")
    maxConnsPerIp: int = setting(
        "max-conns-per-ip", 0, count,
        "Client connections one address may have open at once; beyond it a "
        "new connection from that address is closed at once. 0: unlimited. "
        "[default: unlimited]")

    def pool(self, name: str) -> PoolConfig:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)

    def replace(self, **changes: Any) -> "BalancerConfig":
        return dataclasses.replace(self, **changes)


def _settings(cls: type, scope: str) -> list[Setting]:
    found = []
    for f in dataclasses.fields(cls):
        s = f.metadata.get("setting")
        if s is not None:
            found.append(dataclasses.replace(s, attribute=f.name, scope=scope))
    return found


POOL_SETTINGS: tuple[Setting, ...] = tuple(_settings(PoolConfig, "pool"))
BALANCER_SETTINGS: tuple[Setting, ...] = tuple(_settings(BalancerConfig, "balancer"))
_BY_OPTION = {s.option: s for s in POOL_SETTINGS + BALANCER_SETTINGS}
_BY_ATTRIBUTE = {s.attribute: s for s in POOL_SETTINGS + BALANCER_SETTINGS}


def commandLineSettings() -> tuple[Setting, ...]:
    """
    Every setting, pool settings first, in declaration order.
    """
    return POOL_SETTINGS + BALANCER_SETTINGS


def settingFor(name: str) -> Setting:
    """
    The setting called C{name}: an option name (C{backend-timeout}) or an
    attribute name (C{backendTimeout}).

    @raise ConfigError: naming the closest known setting when there is one.
    """
    found = _BY_OPTION.get(name) or _BY_ATTRIBUTE.get(name)
    if found is None:
        # Suggest in the spelling used: option names have dashes.
        known = _BY_OPTION if "-" in name or name.islower() else _BY_ATTRIBUTE
        raise ConfigError(f"unknown setting {name!r}" + didYouMean(name, list(known)))
    return found


def didYouMean(name: str, known: Sequence[str]) -> str:
    """
    C{" (did you mean 'x'?)"} when a known name is close to C{name}, else
    C{""}.
    """
    close = difflib.get_close_matches(name, list(known), 1, 0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(values: dict[str, Any]) -> dict[str, Any]:
    """
    C{values} (setting names, option or attribute names, to raw values)
    checked and converted, keyed by attribute name.

    @raise ConfigError: for an unknown setting or a bad value.
    """
    result = {}
    for name, raw in values.items():
        s = settingFor(name)
        if raw is None and s.default is None:
            result[s.attribute] = None
        else:
            result[s.attribute] = s.coerce(raw, "--" + s.option)
    return result


def build(
    pools: Sequence[PoolConfig],
    values: dict[str, Any],
    listeners: Sequence[ListenerConfig] = (),
    routes: Sequence[RouteConfig] = (),
    configFile: Optional[str] = None,
) -> BalancerConfig:
    """
    A L{BalancerConfig} from pools and C{values} (see L{coerce}): pool
    settings apply to every pool, the others to the balancer.

    @raise ConfigError: for an unknown setting, a bad value, or settings
        that disagree.
    """
    poolValues: dict[str, Any] = {}
    balancerValues: dict[str, Any] = {}
    for attribute, value in coerce(values).items():
        if _BY_ATTRIBUTE[attribute].scope == "pool":
            poolValues[attribute] = value
        else:
            balancerValues[attribute] = value
    pools = [dataclasses.replace(p, **poolValues) for p in pools]
    if listeners:
        balancerValues["listeners"] = tuple(listeners)
    config = BalancerConfig(
        pools=tuple(pools), routes=tuple(routes), configFile=configFile, **balancerValues
    )
    check(config)
    return config


def check(config: BalancerConfig) -> None:
    """
    The rules that span settings.

    @raise ConfigError: naming the settings that disagree.
    """
    if config.tlsClientOptional and not config.tlsClientCa:
        raise ConfigError("--tls-client-optional needs --tls-client-ca")
    secure = any(listener.secure for listener in config.listeners)
    if not secure and (config.tlsCertDir or config.tlsClientCa):
        raise ConfigError(
            "--tls-cert-dir and --tls-client-ca need a TLS listener "
            "(--tls or --port ssl:...)"
        )
    if not config.pools:
        raise ConfigError("no pool of backends (give --backends FILE)")
    names = [pool.name for pool in config.pools]
    for pool in config.pools:
        if names.count(pool.name) > 1:
            raise ConfigError(f"pool {pool.name!r} is defined twice")
        if not pool.backends and not pool.source.startswith("srv:"):
            raise ConfigError(f"pool {pool.name!r} has no backends")
    for route in config.routes:
        if route.pool not in names:
            raise ConfigError(
                f"route to undefined pool {route.pool!r}" + didYouMean(route.pool, names),
                route.filename or None,
                route.lineno or None,
            )
