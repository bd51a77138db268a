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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from txbalancer.framing import TOKEN
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

# RFC 6265 cookie names are RFC 9110 tokens (framing.TOKEN, in bytes).


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


def choice(*names: str) -> Callable[[Any, str], str]:
    """
    A coercer accepting one of C{names}.
    """

    def coerce(value: Any, option: str) -> str:
        if value not in names:
            raise ConfigError(
                f"{option}: {value!r} is not one of: " + ", ".join(names)
                + didYouMean(str(value), names)
            )
        return value

    return coerce


def cookieName(value: Any, option: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.isascii() or not TOKEN.match(value.encode()):
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


def dnsServer(value: Any, option: str) -> Optional[str]:
    """
    C{HOST:PORT} of a DNS server (an IP address; C{[::1]:53} for IPv6; the
    port is 53 when left out), normalised to C{HOST:PORT}.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{option}: expected HOST:PORT of a DNS server, got {value!r}"
        )
    host, port = splitDnsServer(value.strip(), option)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def splitDnsServer(value: str, option: str = "--dns-server") -> tuple[str, int]:
    """
    C{(host, port)} of a C{--dns-server} value.
    """
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        portText = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    elif value.count(":") == 1:
        host, _, portText = value.partition(":")
    else:
        host, portText = value, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"{option}: {value!r} is not HOST:PORT with HOST an IP address "
            "(e.g. 127.0.0.1:8600)"
        ) from None
    if portText is None or (portText and not portText.isdigit()):
        raise ConfigError(f"{option}: bad port in {value!r} (expected HOST:PORT)")
    port = int(portText) if portText else 53
    if not 1 <= port <= 65535:
        raise ConfigError(f"{option}: bad port in {value!r} (expected 1-65535)")
    return host, port


# -- tcp mode: coercers

MODES = ("http", "tcp")
PROXY_PROTOCOL_VERSIONS = ("off", "v1", "v2")


def mode(value: Any, option: str) -> str:
    if value not in MODES:
        raise ConfigError(f"{option}: {value!r} is not a mode; choose http or tcp")
    return value


def proxyProtocolVersion(value: Any, option: str) -> Optional[str]:
    """
    C{"v1"} or C{"v2"}; C{"off"} (or L{None}, or false) is L{None}.
    """
    if value is None or value is False or value == "off":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 2):
        return f"v{value}"
    if value not in PROXY_PROTOCOL_VERSIONS:
        raise ConfigError(f"{option}: {value!r} is not one of off, v1, v2")
    return value


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
    healthPath: Optional[str] = setting(
        "health-path", None, optionalText,
        "Active health check: GET this path on each backend; a status in "
        "--health-status is healthy. [default: /; in TCP mode and with "
        "--proxy-protocol, a TCP connect unless a path is given]")
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
    # -- tcp mode
    proxyProtocol: Optional[str] = setting(
        "proxy-protocol", None, proxyProtocolVersion,
        "Send a PROXY protocol header (v1 or v2) first on each backend "
        "connection: the client's address and port and the balancer's. "
        "[default: off]")


@dataclass(frozen=True)
class ListenerConfig:
    """
    One listening endpoint.

    @ivar endpoint: a Twisted server endpoint string (C{tcp:8000},
        C{unix:/run/lb.sock}, C{systemd:domain=INET:index=0}, ...).
    @ivar tls: a L{txbalancer.tls.CertSpec} when TLS is terminated here
        (the endpoint is then wrapped in the balancer's own TLS), or
        L{None}.
    @ivar mode: C{"http"} or C{"tcp"}; L{None} means the balancer's
        C{--mode}.
    @ivar pool: in TCP mode, the name of the pool its connections go to;
        L{None} means the first pool.
    @ivar acceptProxyProtocol: the peers this listener reads a PROXY header
        from; L{None} means the balancer's C{--accept-proxy-protocol}.
    """

    endpoint: str
    tls: Any = None
    # -- tcp mode
    mode: Optional[str] = None
    pool: Optional[str] = None
    acceptProxyProtocol: Optional[tuple[IPNetwork, ...]] = None

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
        "Write one line per request to this file, '-' for stdout; SIGUSR1 "
        "reopens it (for logrotate). [default: off]")
    accessLogFormat: str = setting(
        "access-log-format", "combined", choice("combined", "json"),
        "combined (the combined log format, then the backend, total, "
        "connect and first-byte seconds and the TCP peer) or json (one "
        "object per line).")
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
    # -- config file
    stickySecretFile: Optional[str] = setting(
        "sticky-secret-file", None, optionalText,
        "Sign sticky cookies with the key in this file (at least 16 bytes, "
        "surrounding whitespace stripped), so balancers sharing the file "
        "honour each other's cookies. [default: a random key at start-up]")
    # The admin server's, from the config file's [admin] table (plain
    # values: the admin server owns their command-line options).
    admin: Optional[str] = None
    adminToken: Optional[str] = None
    adminTokenFile: Optional[str] = None
    # -- tcp mode
    mode: str = setting(
        "mode", "http", mode,
        "http: an HTTP reverse proxy; tcp: relay bytes to one backend per "
        "client connection (layer 4), untouched.")
    acceptProxyProtocol: tuple[IPNetwork, ...] = setting(
        "accept-proxy-protocol", (), cidrs,
        "CIDR[,CIDR...]: peers (an NLB, HAProxy) that send a PROXY v1/v2 "
        "header first; its address is then the client's. Others may not "
        "send one. [default: none]")
    tunnelIdleTimeout: float = setting(
        "tunnel-idle-timeout", 3600.0, seconds,
        "Seconds a TCP-mode (or WebSocket) tunnel may carry no byte either "
        "way before both sides are closed.")
    # -- dns
    dnsServer: Optional[str] = setting(
        "dns-server", None, dnsServer,
        "HOST:PORT of the DNS server that srv: backends are looked up on "
        "(Consul: 127.0.0.1:8600). [default: the system's resolvers]")

    def listenerMode(self, listener: ListenerConfig) -> str:
        """
        C{listener}'s mode: its own, or the balancer's.
        """
        return listener.mode or self.mode

    def tcpPools(self) -> frozenset[str]:
        """
        The names of the pools that a TCP-mode listener sends to.
        """
        names = set()
        for listener in self.listeners:
            if self.listenerMode(listener) == "tcp" and self.pools:
                names.add(listener.pool or self.pools[0].name)
        return frozenset(names)

    # -- admin
    admin: Optional[str] = setting(
        "admin", None, optionalText,
        "Serve the admin server (dashboard at /, /status JSON, /metrics for "
        "Prometheus, the runtime API) on this Twisted endpoint, e.g. "
        "tcp:9000:interface=127.0.0.1. Without a token it must be loopback "
        "or a unix socket. [default: off]")
    adminToken: Optional[str] = setting(
        "admin-token", None, optionalText,
        "Every admin request must carry Authorization: Bearer TOKEN (else "
        "401). Prefer --admin-token-file: a command line is visible to every "
        "user of the machine.")
    adminTokenFile: Optional[str] = setting(
        "admin-token-file", None, optionalText,
        "Read the admin token from this file (surrounding whitespace is "
        "ignored).")

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
            "(--tls, --port ssl:... or --port txbtls:...)"
        )
    if config.adminToken and config.adminTokenFile:
        raise ConfigError("give --admin-token or --admin-token-file, not both")
    if (config.adminToken or config.adminTokenFile) and not config.admin:
        raise ConfigError("--admin-token and --admin-token-file need --admin ENDPOINT")
    if not config.pools:
        raise ConfigError("no pool of backends (give --backends FILE)")
    names = [pool.name for pool in config.pools]
    for pool in config.pools:
        if names.count(pool.name) > 1:
            raise ConfigError(f"pool {pool.name!r} is defined twice")
        if not pool.backends and not pool.source.startswith("srv:"):
            raise ConfigError(f"pool {pool.name!r} has no backends")
    # -- tcp mode
    for listener in config.listeners:
        if listener.mode is not None and listener.mode not in MODES:
            raise ConfigError(
                f"listener {listener.endpoint!r}: mode {listener.mode!r} is not "
                "http or tcp"
            )
        if listener.pool is not None and listener.pool not in names:
            raise ConfigError(
                f"listener {listener.endpoint!r}: undefined pool {listener.pool!r}"
                + didYouMean(listener.pool, names)
            )
    for pool in config.pools:
        if pool.proxyProtocol and any(b.scheme == "https" for b in pool.backends):
            raise ConfigError(
                f"pool {pool.name!r}: --proxy-protocol with https:// backends is "
                "not supported (the header would have to precede TLS)"
            )
    for route in config.routes:
        if route.pool not in names:
            raise ConfigError(
                f"route to undefined pool {route.pool!r}" + didYouMean(route.pool, names),
                route.filename or None,
                route.lineno or None,
            )


# -- config file
#
# What a TOML value of each kind of setting must be: TOML has types, so
# `backend-timeout = "30"` is a mistake the file reports, where the command
# line (strings only) would accept "30".

_TOML_TYPES: dict[Any, tuple[tuple[type, ...], str]] = {
    seconds: ((int, float), "a number of seconds"),
    count: ((int,), "a whole number"),
    positive: ((int,), "a whole number"),
    nonNegative: ((int, float), "a number"),
    percent: ((int, float), "a number"),
    text: ((str,), "a string"),
    optionalText: ((str,), "a string"),
    flag: ((bool,), "true or false"),
    statusRange: ((str, int, list), 'a status range such as "200-399"'),
    strategy: ((str,), "a strategy name (a string)"),
    cookieName: ((str,), "a cookie name (a string)"),
    cidrs: ((str, list), 'networks: "10.0.0.0/8,127.0.0.1" or a list of strings'),
    mode: ((str,), '"http" or "tcp"'),
    proxyProtocolVersion: ((str, int, bool), '"off", "v1" or "v2"'),
    size: ((int, str), 'a size in bytes: a number, or a string like "10M"'),
    hstsSeconds: ((int,), "a whole number of seconds"),
    dnsServer: ((str,), 'HOST:PORT of a DNS server (a string like "127.0.0.1:8600")'),
}


def tomlType(s: Setting) -> Optional[tuple[tuple[type, ...], str]]:
    """
    C{(types, description)}: the TOML types a value of C{s} may have and
    how to say so, or L{None} when its coercer alone decides.
    """
    return _TOML_TYPES.get(s.coerce)
