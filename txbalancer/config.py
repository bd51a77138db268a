"""
Parsing of the balancer's configuration into plain, immutable values.

This module is pure: it imports nothing from the reactor, and no other
txbalancer module at import time (L{load_config} imports the settings table,
the routes' checks and the certificate spec when it runs), so it can be used
(and tested) anywhere.  Two formats: the backends file, and the TOML
configuration file (L{load_config}).  Every error is a
L{ConfigError} whose text names the file and line when there is one::

    backends.txt:3: unknown flag 'wieght' (known flags: weight=N, ...)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

__all__ = [
    "BackendSpec",
    "ConfigError",
    "FILE_KEYS",
    "load_backends",
    "load_config",
    "load_secret",
    "parse_backends",
    "parse_cidrs",
    "parse_seconds",
    "parse_size",
]

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_SCHEMES = ("http", "https")
_WEIGHT_MIN, _WEIGHT_MAX = 1, 1000
_KNOWN_FLAGS = (
    "weight=N (1-1000), max_conns=N (0 = unlimited), tls_verify=on|off, "
    "priority=N (0-100), backup"
)
_PRIORITY_MAX = 100

# ASCII digits only: int() alone would also take "1_000", " 7" and "\u0663".
_DIGITS = re.compile(r"[0-9]+\Z")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


class ConfigError(Exception):
    """
    A configuration value is wrong; C{str(error)} is a message for a person,
    prefixed with C{FILE:LINE:} (or C{FILE:}) when the value came from a file.
    """

    def __init__(
        self,
        message: str,
        filename: str | None = None,
        lineno: int | None = None,
    ) -> None:
        self.message = message
        self.filename = filename
        self.lineno = lineno
        super().__init__(message, filename, lineno)

    def __str__(self) -> str:
        if self.filename is None:
            return self.message
        if self.lineno is None:
            return f"{self.filename}: {self.message}"
        return f"{self.filename}:{self.lineno}: {self.message}"

    def __repr__(self) -> str:
        return (
            f"ConfigError({self.message!r}, filename={self.filename!r}, "
            f"lineno={self.lineno!r})"
        )


@dataclass(frozen=True)
class BackendSpec:
    """
    One line of the backends file: where a backend is and how to treat it.
    """

    host: str  # hostname or IP address; IPv6 without brackets
    port: int
    scheme: str = "http"  # "http" or "https"
    weight: int = 1  # 1..1000
    max_conns: int = 0  # 0 = unlimited
    backup: bool = False  # the same as priority=1 (kept in step with it)
    tls_verify: bool = True  # only meaningful for https
    filename: str = ""
    lineno: int = 0
    # 0: a primary backend; 1, 2, ...: backup levels, each used only when
    # every lower level is down.
    priority: int = 0

    def __post_init__(self) -> None:
        # backup is priority 1; any priority above 0 is a backup.
        if self.backup and not self.priority:
            object.__setattr__(self, "priority", 1)
        object.__setattr__(self, "backup", self.priority > 0)

    @property
    def address(self) -> str:
        """
        C{host:port}, with the host in brackets when it is an IPv6 address.
        """
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def key(self) -> tuple[str, str, int]:
        """
        The identity of the backend, for duplicate detection and reload diffs:
        C{(scheme, host, port)} with the host lower-cased (and IP addresses in
        their canonical form, so C{::1} and C{0::1} are the same backend).
        """
        return (self.scheme, _canonical_host(self.host), self.port)


def _canonical_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host)).lower()
    except ValueError:
        return host.lower()


# ---------------------------------------------------------------------------
# The backends file


def parse_backends(text: str, filename: str = "<backends>") -> tuple[BackendSpec, ...]:
    """
    Parse the text of a backends file.

    @return: the backends in file order (empty if the text defines none).
    @raise ConfigError: on the first bad line, naming C{filename} and the line.
    """
    backends: list[BackendSpec] = []
    seen: dict[tuple[str, str, int], BackendSpec] = {}
    # split("\n"), not splitlines(): a stray form feed must not shift line numbers.
    for lineno, line in enumerate(text.split("\n"), start=1):
        words = _strip_comment(line).split()
        if not words:
            continue
        try:
            spec = _parse_backend_line(words, filename, lineno)
        except ConfigError as e:
            raise ConfigError(e.message, filename, lineno) from None
        first = seen.get(spec.key)
        if first is not None:
            raise ConfigError(
                f"duplicate backend {spec.scheme}://{spec.address} "
                f"(first defined on line {first.lineno})",
                filename,
                lineno,
            )
        seen[spec.key] = spec
        backends.append(spec)
    return tuple(backends)


def load_backends(path: str) -> tuple[BackendSpec, ...]:
    """
    Read and parse the backends file at C{path}.

    @raise ConfigError: when the file cannot be read, has a bad line, or
        defines no backends at all.
    """
    try:
        # utf-8-sig: a byte order mark left by a Windows editor is not a host.
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(
            f"cannot read backends file: {e.strerror or e}", filename=path
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"cannot read backends file: not UTF-8 text ({e.reason} at byte {e.start})",
            filename=path,
        ) from None
    backends = parse_backends(text, path)
    if not backends:
        raise ConfigError("no backends defined", filename=path)
    return backends


def _strip_comment(line: str) -> str:
    """
    Remove a C{#} comment: the whole line, or from a C{#} after whitespace.
    """
    if line.lstrip().startswith("#"):
        return ""
    match = re.search(r"\s#", line)
    if match is not None:
        return line[: match.start()]
    return line


def _parse_backend_line(words: list[str], filename: str, lineno: int) -> BackendSpec:
    scheme, host, port = _parse_backend_address(words[0])
    flags: dict[str, object] = {}
    for word in words[1:]:
        name, sep, value = word.partition("=")
        if name in flags:
            raise ConfigError(f"flag {name!r} given twice")
        if name == "backup":
            if "priority" in flags:
                raise ConfigError("give either 'backup' or 'priority=N', not both")
            if sep:
                raise ConfigError(
                    f"'backup' is a bare word and takes no value (got {word!r})"
                )
            flags[name] = True
        elif name == "weight":
            flags[name] = _flag_int(name, value, _WEIGHT_MIN, _WEIGHT_MAX, sep)
        elif name == "priority":
            if "backup" in flags:
                raise ConfigError("give either 'backup' or 'priority=N', not both")
            flags[name] = _flag_int(name, value, 0, _PRIORITY_MAX, sep)
        elif name == "max_conns":
            flags[name] = _flag_int(name, value, 0, None, sep)
        elif name == "tls_verify":
            flags[name] = _flag_on_off(name, value, sep)
        else:
            raise ConfigError(f"unknown flag {name!r} (known flags: {_KNOWN_FLAGS})")
    return BackendSpec(
        host=host,
        port=port,
        scheme=scheme,
        filename=filename,
        lineno=lineno,
        **flags,  # type: ignore[arg-type]
    )


def _flag_int(name: str, value: str, low: int, high: int | None, sep: str) -> int:
    if high is None:
        wanted = f"an integer >= {low}"
    else:
        wanted = f"an integer from {low} to {high}"
    if not sep or not value:
        raise ConfigError(f"flag {name!r} needs a value: {name}=N, N {wanted}")
    if not _DIGITS.match(value):
        raise ConfigError(f"bad value for {name}: {value!r} is not {wanted}")
    number = int(value)
    if number < low or (high is not None and number > high):
        raise ConfigError(f"bad value for {name}: {value} is not {wanted}")
    return number


def _flag_on_off(name: str, value: str, sep: str) -> bool:
    lowered = value.lower()
    if sep and lowered == "on":
        return True
    if sep and lowered == "off":
        return False
    raise ConfigError(f"bad value for {name}: {value!r} (use {name}=on or {name}=off)")


def _parse_backend_address(word: str) -> tuple[str, str, int]:
    """
    Split C{[scheme://]host:port[/]} into its parts, validating each.
    """
    scheme = "http"
    rest = word
    if "://" in word:
        scheme, _, rest = word.partition("://")
        scheme = scheme.lower()
        if scheme not in _SCHEMES:
            raise ConfigError(
                f"unsupported scheme {scheme!r} in {word!r} (use http:// or https://)"
            )
        slash = rest.find("/")
        if slash != -1:
            if rest[slash:] != "/":
                raise ConfigError(
                    f"a backend is host:port, not a URL with a path: {word!r}"
                )
            rest = rest[:slash]
    elif "/" in word:
        raise ConfigError(f"a backend is host:port, not a URL with a path: {word!r}")
    if "?" in rest or "#" in rest or "@" in rest:
        raise ConfigError(f"bad backend address {word!r} (expected host:port)")

    if rest.startswith("["):
        close = rest.find("]")
        if close == -1:
            raise ConfigError(f"missing ']' in IPv6 address {word!r}")
        host = rest[1:close]
        after = rest[close + 1 :]
        if not after:
            raise ConfigError(f"missing port in {word!r} (expected [ipv6]:port)")
        if not after.startswith(":"):
            raise ConfigError(f"bad backend address {word!r} (expected [ipv6]:port)")
        port_text = after[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"bad IPv6 address {host!r} in {word!r}") from None
    else:
        if rest.count(":") > 1:
            raise ConfigError(
                f"bad backend address {word!r}: write an IPv6 address in "
                f"brackets, e.g. [::1]:3001"
            )
        host, sep, port_text = rest.partition(":")
        if not sep:
            raise ConfigError(f"missing port in {word!r} (expected host:port)")
        _check_host(host, word)
    return scheme, host, _backend_port(port_text, word)


def _check_host(host: str, word: str) -> None:
    if not host:
        raise ConfigError(f"missing host in {word!r} (expected host:port)")
    name = host.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ConfigError(f"bad host {host!r} in {word!r}")
    # A name whose last label is all digits must be a dotted IPv4 address
    # (no top-level domain is numeric): 300.1.1.1 and 10.1 are typos.
    if _DIGITS.match(labels[-1]):
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            raise ConfigError(f"bad IPv4 address {host!r} in {word!r}") from None


def _backend_port(text: str, word: str) -> int:
    if not text:
        raise ConfigError(f"missing port in {word!r} (expected host:port)")
    if not _DIGITS.match(text) or not 1 <= int(text) <= 65535:
        raise ConfigError(
            f"bad port {text!r} in {word!r} (expected a number from 1 to 65535)"
        )
    return int(text)


# ---------------------------------------------------------------------------
# Command-line values


def check_endpoint(description: str, option: str = "--port") -> None:
    """
    Check that Twisted's endpoint parser takes C{description}, without
    listening (the parser builds an endpoint on a fake reactor).

    @raise ConfigError: naming the description and what Twisted said.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    if description.split(":", 1)[0].lower() == "systemd":
        # Its parser looks up the inherited sockets at once: it can only
        # be checked where systemd started the balancer, at listen time.
        return
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:  # Twisted's parsers raise what they like
        raise endpointError(description, e, option) from None


def endpointError(description: str, error: Exception, option: str = "--port") -> ConfigError:
    """
    The error for an endpoint string that Twisted's parser refused with
    C{error}.
    """
    return ConfigError(
        f"{option} {description!r}: not a usable endpoint "
        f"({type(error).__name__}: {error}); give a port number or an endpoint "
        "string such as tcp:8000:interface=127.0.0.1"
    )


def parse_cidrs(value: str, option: str = "--trusted-proxies") -> tuple[IPNetwork, ...]:
    """
    Parse comma-separated networks (C{10.0.0.0/8}) or single addresses
    (C{127.0.0.1}, meaning C{/32}); host bits are allowed (C{10.0.0.1/8} is
    C{10.0.0.0/8}).  Empty items are skipped, so C{""} means none.
    """
    networks: list[IPNetwork] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"{option}: {item!r} is not an IP address or network "
                f"(e.g. 10.0.0.0/8, 192.0.2.7, ::1)"
            ) from None
    return tuple(networks)


def parse_seconds(value: str, option: str) -> float:
    """
    Parse a positive, finite number of seconds (C{3}, C{0.5}).
    """
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(
            f"{option}: expected a number of seconds greater than 0, got {value!r}"
        )
    return seconds


_SIZE = re.compile(r"([0-9]+)\s*(?:([kmg])(?:i?b)?|b)?\Z", re.IGNORECASE)
_SIZE_UNITS = {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: str, option: str) -> int:
    """
    Parse a positive size in bytes: C{1048576}, C{512k}, C{10M}, C{1G}
    (binary units; C{KiB}, C{MB} and such are read the same way).
    """
    match = _SIZE.match(value.strip()) if isinstance(value, str) else None
    size = 0
    if match is not None:
        unit = match.group(2).lower() if match.group(2) else None
        size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size <= 0:
        raise ConfigError(
            f"{option}: expected a size in bytes greater than 0, "
            f"optionally with k, M or G (e.g. 10M), got {value!r}"
        )
    return size


# ---------------------------------------------------------------------------
# The TOML configuration file
#
# tomllib reads the file; what it cannot say is where a value was, so a
# small locator (not a parser: it only recognises table headers, "key ="
# lines and string literals) maps key paths to line numbers for the errors.

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # pragma: no cover - Python 3.9 and 3.10, and Debian's pypy3
    import tomli as _toml

_TOP_KEYS = ("listen", "pool", "route", "balancer", "admin")
_LISTEN_KEYS = ("endpoint", "tls", "mode", "pool", "accept-proxy-protocol")
_TLS_KEYS = ("cert", "key", "chain")
_ROUTE_KEYS = ("host", "path", "pool", "strip_prefix")
_POOL_KEYS = ("backends", "backends_file", "health")
# [admin] keys -> BalancerConfig attributes.
_ADMIN_KEYS = {"endpoint": "admin", "token": "adminToken", "token-file": "adminTokenFile"}
# health = { ... } keys -> option names.
_HEALTH_KEYS = {
    "path": "health-path",
    "interval": "health-interval",
    "timeout": "health-timeout",
    "rise": "rise",
    "fall": "fall",
    "host": "health-host",
    "status": "health-status",
}
# The keys of the file that are not settings, by table: what the
# configuration reference in README.rst must list besides the settings.
FILE_KEYS: dict[str, tuple[str, ...]] = {
    "": _TOP_KEYS,
    "listen": _LISTEN_KEYS,
    "listen.tls": _TLS_KEYS,
    "pool": _POOL_KEYS,
    "pool.health": tuple(_HEALTH_KEYS),
    "route": _ROUTE_KEYS,
    "admin": tuple(_ADMIN_KEYS),
}
# Settings whose values are files: a relative path in the config file is
# relative to the config file's directory (on the command line, to the
# current directory, as usual).
_PATH_OPTIONS = frozenset(
    ["access-log", "tls-cert-dir", "tls-client-ca", "backend-ca", "sticky-secret-file"]
)
# Prefixes of endpoint strings checked here; others (endpoint plugins) go
# to Twisted unchecked.

_BARE_KEY = r"[A-Za-z0-9_-]+"
_QUOTED_KEY = r'"(?:[^"\\]|\\.)*"' + r"|'[^']*'"
_KEY = rf"(?:{_BARE_KEY}|{_QUOTED_KEY})"
_KEY_PATH = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_ARRAY_HEADER = re.compile(rf"\s*\[\[\s*({_KEY_PATH})\s*\]\]")
_TABLE_HEADER = re.compile(rf"\s*\[\s*({_KEY_PATH})\s*\]")
_KEY_LINE = re.compile(rf"\s*({_KEY_PATH})\s*=")
_KEY_PART = re.compile(rf"\s*({_KEY})\s*(?:\.|\Z)")
_DECODE_POSITION = re.compile(r"\s*\(at line (\d+), column \d+\)\Z")


def _keyPath(text: str) -> tuple[str, ...]:
    parts = []
    for match in _KEY_PART.finditer(text):
        key = match.group(1)
        if key[:1] in "\"'":
            key = key[1:-1]
            if match.group(1)[0] == '"':
                key = key.encode("latin-1", "backslashreplace").decode("unicode_escape")
        parts.append(key)
    return tuple(parts)


class _Locator:
    """
    The lines of a TOML text's tables, keys and array items.

    Keys are paths: C{("pool", "api", "backends")}; a table of an array of
    tables has its index, C{("route", 2)}.  L{line} answers with the most
    specific path it knows (an inline table's keys are on its key's line).
    """

    def __init__(self, text: str) -> None:
        self.source = text.split("\n")
        self.lines: dict[tuple[Any, ...], int] = {}
        self.values: dict[tuple[Any, ...], tuple[int, int]] = {}
        counts: dict[tuple[Any, ...], int] = {}
        table: tuple[Any, ...] = ()
        index = 0
        while index < len(self.source):
            line = self.source[index]
            lineno = index + 1
            index += 1
            match = _ARRAY_HEADER.match(line)
            if match:
                path = _keyPath(match.group(1))
                n = counts.get(path, 0)
                counts[path] = n + 1
                table = path + (n,)
                self._record(table, lineno)
                continue
            match = _TABLE_HEADER.match(line)
            if match:
                table = _keyPath(match.group(1))
                self._record(table, lineno)
                continue
            match = _KEY_LINE.match(line)
            if match:
                path = table + _keyPath(match.group(1))
                self._record(path, lineno)
                self.values[path] = (index - 1, match.end())
                # Skip the value: a multi-line array or string is not keys.
                index = self._valueEnd(index - 1, match.end()) + 1

    def _record(self, path: tuple[Any, ...], lineno: int) -> None:
        for n in range(1, len(path) + 1):
            self.lines.setdefault(path[:n], lineno)

    def line(self, path: Sequence[Any]) -> Optional[int]:
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def _tokens(self, row: int, col: int) -> Iterator[tuple[int, str]]:
        """
        C{(line, token)} from C{(row, col)} on: C{"["}, C{"]"}, C{"{"},
        C{"}"}, C{"string"} (at the line where it starts) and C{"eol"}.
        """
        source = self.source
        while row < len(source):
            line = source[row]
            while col < len(line):
                char = line[col]
                if char == "#":
                    break
                if char in "\"'":
                    start = row + 1
                    row, col = self._stringEnd(row, col)
                    yield start, "string"
                    if row >= len(source):
                        return
                    line = source[row]
                    continue
                if char in "[]{}":
                    yield row + 1, char
                elif char not in " \t\r,=":
                    # A bare word: a number, a boolean, a date, a key.
                    yield row + 1, "atom"
                    while col + 1 < len(line) and line[col + 1] not in " \t\r,=[]{}#":
                        col += 1
                col += 1
            yield row + 1, "eol"
            row += 1
            col = 0

    def _stringEnd(self, row: int, col: int) -> tuple[int, int]:
        """
        Where the string literal starting at C{(row, col)} ends (just past it).
        """
        source = self.source
        quote = source[row][col]
        delimiter = quote * 3 if source[row].startswith(quote * 3, col) else quote
        col += len(delimiter)
        while row < len(source):
            line = source[row]
            while col < len(line):
                if quote == '"' and line[col] == "\\":
                    col += 2
                    continue
                if line.startswith(delimiter, col):
                    end = col + len(delimiter)
                    # """a"""" and friends: up to two more quotes belong in.
                    while len(delimiter) == 3 and line.startswith(quote, end) and end - col < 5:
                        end += 1
                    return row, end
                col += 1
            if len(delimiter) == 1:
                return row, len(line)  # unterminated: tomllib said so already
            row += 1
            col = 0
        return row, 0

    def _valueEnd(self, row: int, col: int) -> int:
        depth = 0
        for lineno, token in self._tokens(row, col):
            if token in ("[", "{"):
                depth += 1
            elif token in ("]", "}"):
                depth -= 1
            elif token == "eol" and depth <= 0:
                return lineno - 1
        return len(self.source) - 1

    def itemLines(self, path: Sequence[Any]) -> list[int]:
        """
        The line of each item of the array at C{path}.
        """
        start = self.values.get(tuple(path))
        if start is None:
            return []
        found = []
        depth = 0
        for lineno, token in self._tokens(*start):
            if token in ("[", "{"):
                if depth == 1:
                    found.append(lineno)
                depth += 1
            elif token in ("]", "}"):
                depth -= 1
                if depth <= 0:
                    break
            elif token == "eol":
                if depth <= 0:
                    break
            elif depth == 1:
                found.append(lineno)
        return found


def _typeName(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class _ConfigFile:
    """
    What a config file says, before the command line has its say.

    @ivar pools: the pools, each with the file's settings for it (its own
        table over C{[balancer]}'s pool settings).
    @ivar poolDefaults: the pool settings of C{[balancer]}, by attribute
        (for a pool that comes from C{--backends}).
    @ivar balancer: the balancer settings of C{[balancer]} and C{[admin]},
        by attribute.
    """

    path: str
    listeners: tuple[Any, ...]
    pools: tuple[Any, ...]
    routes: tuple[Any, ...]
    poolDefaults: dict[str, Any]
    balancer: dict[str, Any]


class _Reader:
    """
    Turns the tables of one TOML file into settings values, with errors
    that name the file and the line.
    """

    def __init__(self, path: str, text: str) -> None:
        from txbalancer import settings

        self.settings = settings
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))
        self.locator = _Locator(text)
        self.options = {s.option: s for s in settings.commandLineSettings()}

    def error(self, message: str, where: Sequence[Any]) -> ConfigError:
        return ConfigError(message, self.path, self.locator.line(where))

    def file(self, value: str) -> str:
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(value)))

    def expect(self, value: Any, types: tuple[type, ...], what: str, where: Sequence[Any]) -> Any:
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise self.error(
                f"{where[-1]}: expected {what}, got {_typeName(value)} ({_show(value)})",
                where,
            )
        return value

    def table(self, value: Any, where: Sequence[Any], how: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(f"{'.'.join(map(str, where))}: expected {how}, got "
                             f"{_typeName(value)}", where)
        return value

    def unknown(self, key: str, known: Sequence[str], where: Sequence[Any], table: str,
                expected: str = "") -> ConfigError:
        hint = self.settings.didYouMean(key, list(known))
        expected = expected or "one of: " + ", ".join(known)
        return self.error(f"unknown key {key!r} in {table}{hint}; expected {expected}",
                          tuple(where) + (key,))

    def setting(self, s: Any, value: Any, where: Sequence[Any]) -> Any:
        kind = self.settings.tomlType(s)
        if kind is not None:
            types, what = kind
            self.expect(value, types, what, where)
        if s.option in _PATH_OPTIONS and isinstance(value, str) and value not in ("", "-"):
            value = self.file(value)
        try:
            value = s.coerce(value, s.option)
        except ConfigError as e:
            raise self.error(e.message, where) from None
        if s.option == "sticky-secret-file":
            # Read now, so a missing or short key is named at its line.
            try:
                load_secret(value)
            except ConfigError as e:
                raise self.error(f"{s.option}: {value}: {e.message}", where) from None
        return value

    # -- the tables

    def read(self, data: dict[str, Any]) -> _ConfigFile:
        for key in data:
            if key not in _TOP_KEYS:
                raise self.unknown(key, _TOP_KEYS, (), "the top level",
                                   "[[listen]], [pool.NAME], [[route]], [balancer] or [admin]")
        poolDefaults: dict[str, Any] = {}
        balancer: dict[str, Any] = {}
        if "balancer" in data:
            self.balancerTable(data["balancer"], poolDefaults, balancer)
        if "admin" in data:
            self.adminTable(data["admin"], balancer)
        listeners = tuple(
            self.listener(item, ("listen", i))
            for i, item in enumerate(self.arrayOfTables(data.get("listen", []), "listen"))
        )
        pools = self.table(data.get("pool", {}), ("pool",), "[pool.NAME] tables")
        poolConfigs = tuple(
            self.pool(name, table, poolDefaults) for name, table in pools.items()
        )
        routes = tuple(
            self.route(item, ("route", i))
            for i, item in enumerate(self.arrayOfTables(data.get("route", []), "route"))
        )
        return _ConfigFile(self.path, listeners, poolConfigs, routes, poolDefaults, balancer)

    def arrayOfTables(self, value: Any, name: str) -> list[dict[str, Any]]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(
                f"{name}: expected an array of tables ([[{name}]]), got {_typeName(value)}",
                (name,),
            )
        return value

    def balancerTable(self, value: Any, poolDefaults: dict, balancer: dict) -> None:
        table = self.table(value, ("balancer",), "a table ([balancer])")
        for key, raw in table.items():
            s = self.options.get(key)
            if s is None:
                raise self.unknown(key, list(self.options), ("balancer",), "[balancer]",
                                   "a setting (the name of a command-line option "
                                   "without its dashes, as in twistd balancer --help)")
            value = self.setting(s, raw, ("balancer", key))
            (poolDefaults if s.scope == "pool" else balancer)[s.attribute] = value

    def adminTable(self, value: Any, balancer: dict) -> None:
        table = self.table(value, ("admin",), "a table ([admin])")
        if "token" in table and "token-file" in table:
            raise self.error("give token or token-file, not both", ("admin", "token-file"))
        for key, raw in table.items():
            if key not in _ADMIN_KEYS:
                raise self.unknown(key, list(_ADMIN_KEYS), ("admin",), "[admin]")
            where = ("admin", key)
            self.expect(raw, (str,), "a string", where)
            if not raw:
                raise self.error(f"{key}: expected a non-empty string", where)
            if key == "token-file":
                raw = self.file(raw)
            balancer[_ADMIN_KEYS[key]] = raw

    def listener(self, table: dict[str, Any], where: tuple[Any, ...]) -> Any:
        from txbalancer.settings import ListenerConfig

        for key in table:
            if key not in _LISTEN_KEYS:
                raise self.unknown(key, _LISTEN_KEYS, where, "[[listen]]")
        if "endpoint" not in table:
            raise self.error(
                'a [[listen]] needs an endpoint (e.g. endpoint = "tcp:8000")', where
            )
        at = where + ("endpoint",)
        endpoint = self.expect(table["endpoint"], (str, int), "an endpoint string", at)
        if isinstance(endpoint, int):
            endpoint = str(endpoint)
        stripped = endpoint.strip()
        tls = None
        if "tls" in table:
            tls = self.certificate(table["tls"], where + ("tls",))
        if stripped.split(":", 1)[0].lower() in ("ssl", "txbtls"):
            if tls is not None:
                raise self.error("an ssl: or txbtls: endpoint names its certificate itself: "
                                 "use tcp:PORT with tls = { cert, key }", at)
            from txbalancer.tls import CertSpec, parseTLSListener

            try:
                port, interface, spec = parseTLSListener(stripped)
            except ConfigError as e:
                raise self.error(e.message.replace("--port: ", "endpoint: "), at) from None
            tls = CertSpec(self.file(spec.cert), self.file(spec.key),
                           self.file(spec.chain) if spec.chain else None)
            stripped = f"tcp:{port}"
            if interface:
                stripped += ":interface=" + interface.replace(":", "\\:")
        elif _DIGITS.match(stripped):
            if int(stripped) > 65535:
                raise self.error(f"endpoint: {stripped} is not a port number (0-65535)", at)
            stripped = f"tcp:{int(stripped)}"
        elif not stripped:
            raise self.error("endpoint: empty (give a port or an endpoint string)", at)
        else:
            try:
                check_endpoint(stripped, "endpoint")
            except ConfigError as e:
                raise self.error(e.message, at) from None
        from txbalancer.settings import cidrs, mode

        extra: dict[str, Any] = {}
        for key, attribute, coerce, types, what in (
            ("mode", "mode", mode, (str,), '"http" or "tcp"'),
            ("pool", "pool", None, (str,), "a pool name"),
            ("accept-proxy-protocol", "acceptProxyProtocol", cidrs, (str, list),
             'networks: "10.0.0.0/8,127.0.0.1" or a list of strings'),
        ):
            if key in table:
                raw = self.expect(table[key], types, what, where + (key,))
                try:
                    extra[attribute] = coerce(raw, key) if coerce else raw
                except ConfigError as e:
                    raise self.error(e.message, where + (key,)) from None
        return ListenerConfig(stripped, tls=tls, **extra)

    def certificate(self, value: Any, where: tuple[Any, ...]) -> Any:
        from txbalancer.tls import CertSpec

        table = self.table(value, where, "a table: { cert = FILE, key = FILE }")
        for key in table:
            if key not in _TLS_KEYS:
                raise self.unknown(key, _TLS_KEYS, where, "tls")
        for key in ("cert", "key"):
            if key not in table:
                raise self.error(f"tls: needs {key} = FILE", where)
        files = {}
        for key, raw in table.items():
            self.expect(raw, (str,), "a file name", where + (key,))
            files[key] = self.file(raw)
        return CertSpec(files["cert"], files["key"], files.get("chain"))

    def pool(self, name: str, value: Any, defaults: dict[str, Any]) -> Any:
        from txbalancer.settings import PoolConfig

        where = ("pool", name)
        table = self.table(value, where, "a table ([pool.NAME])")
        own: dict[str, Any] = {}
        given: dict[str, str] = {}

        def put(s: Any, raw: Any, at: tuple[Any, ...], spelled: str) -> None:
            if s.attribute in given:
                raise self.error(f"{spelled}: {s.option} is already given by "
                                 f"{given[s.attribute]}", at)
            given[s.attribute] = spelled
            own[s.attribute] = self.setting(s, raw, at)

        if "backends" in table and "backends_file" in table:
            raise self.error("give backends or backends_file, not both",
                             where + ("backends_file",))
        backends: tuple[BackendSpec, ...] = ()
        source = "inline"
        for key, raw in table.items():
            at = where + (key,)
            if key == "backends":
                if isinstance(raw, str) and raw.startswith("srv:") and len(raw) > 4:
                    source = raw
                elif isinstance(raw, list):
                    backends = self.backendLines(raw, at)
                else:
                    raise self.error(
                        'backends: expected an array of backends-file lines '
                        '(["127.0.0.1:3001", "127.0.0.1:3002 weight=2"]) or '
                        f'"srv:NAME", got {_typeName(raw)} ({_show(raw)})', at)
            elif key == "backends_file":
                self.expect(raw, (str,), "a file name", at)
                source = self.file(raw)
                backends = self.backendsFile(source, at)
            elif key == "health":
                health = self.table(raw, at, "a table: { path = ..., interval = ... }")
                for hkey, hraw in health.items():
                    if hkey not in _HEALTH_KEYS:
                        raise self.unknown(hkey, list(_HEALTH_KEYS), at, "health")
                    put(self.options[_HEALTH_KEYS[hkey]], hraw, at + (hkey,), f"health.{hkey}")
            else:
                s = self.options.get(key)
                if s is None:
                    raise self.unknown(
                        key, list(_POOL_KEYS) + [o for o, s in self.options.items()
                                                  if s.scope == "pool"],
                        where, f"[pool.{name}]",
                        "backends, backends_file, health, or a pool setting "
                        "(a command-line option without its dashes)")
                if s.scope != "pool":
                    raise self.error(f"{key} is a setting of the whole balancer, not of "
                                     "one pool: put it in [balancer]", at)
                put(s, raw, at, key)
        if not backends and not source.startswith("srv:"):
            raise self.error(
                f"pool {name!r} has no backends: expected backends = [\"host:port\", ...], "
                'backends = "srv:NAME" or backends_file = "FILE"', where)
        return PoolConfig(name=name, backends=backends, source=source,
                          **{**defaults, **own})

    def backendLines(self, items: list[Any], where: tuple[Any, ...]) -> tuple[BackendSpec, ...]:
        lines = self.locator.itemLines(where)
        keyLine = self.locator.line(where)
        specs: list[BackendSpec] = []
        seen: dict[tuple[str, str, int], BackendSpec] = {}
        for i, item in enumerate(items):
            lineno = lines[i] if i < len(lines) else keyLine
            if not isinstance(item, str):
                raise ConfigError(
                    f"backends: expected backends-file lines (strings), got "
                    f"{_typeName(item)} ({_show(item)})", self.path, lineno)
            if "\n" in item:
                raise ConfigError("backends: one backend per string", self.path, lineno)
            try:
                parsed = parse_backends(item, self.path)
            except ConfigError as e:
                raise ConfigError(e.message, self.path, lineno) from None
            if not parsed:
                raise ConfigError(f"backends: {item!r} names no backend (expected "
                                  '"host:port [flags]")', self.path, lineno)
            spec = dataclasses.replace(parsed[0], filename=self.path, lineno=lineno or 0)
            first = seen.get(spec.key)
            if first is not None:
                raise ConfigError(
                    f"duplicate backend {spec.scheme}://{spec.address} "
                    f"(first defined on line {first.lineno})", self.path, lineno)
            seen[spec.key] = spec
            specs.append(spec)
        return tuple(specs)

    def backendsFile(self, path: str, where: tuple[Any, ...]) -> tuple[BackendSpec, ...]:
        try:
            return load_backends(path)
        except ConfigError as e:
            if e.lineno is None:
                # Unreadable or empty: say so where the file is named.
                raise self.error(f"backends_file {path}: {e.message}", where) from None
            raise

    def route(self, table: dict[str, Any], where: tuple[Any, ...]) -> Any:
        from txbalancer.routing import checkHost, checkPath
        from txbalancer.settings import RouteConfig

        for key in table:
            if key not in _ROUTE_KEYS:
                raise self.unknown(key, _ROUTE_KEYS, where, "[[route]]")
        if "pool" not in table:
            raise self.error('a [[route]] needs a pool (e.g. pool = "web")', where)
        pool = self.expect(table["pool"], (str,), "a pool name", where + ("pool",))
        host = path = None
        if "host" in table:
            host = self.expect(table["host"], (str,), "a host name", where + ("host",))
            try:
                checkHost(host)
            except ValueError as e:
                raise self.error(f"host: {e}", where + ("host",)) from None
        if "path" in table:
            path = self.expect(table["path"], (str,), "a path prefix", where + ("path",))
            try:
                checkPath(path)
            except ValueError as e:
                raise self.error(f"path: {e}", where + ("path",)) from None
        strip = False
        if "strip_prefix" in table:
            at = where + ("strip_prefix",)
            strip = self.expect(table["strip_prefix"], (bool,), "true or false", at)
            if strip and path is None:
                raise self.error("strip_prefix needs a path to strip", at)
        return RouteConfig(pool=pool, host=host, path=path, stripPrefix=strip,
                           filename=self.path, lineno=self.locator.line(where) or 0)


def _readConfig(path: str) -> _ConfigFile:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e.strerror or e}", path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"cannot read config file: not UTF-8 text ({e.reason} at byte {e.start})", path
        ) from None
    try:
        data = _toml.loads(text)
    except _toml.TOMLDecodeError as e:
        message = str(e)
        match = _DECODE_POSITION.search(message)
        lineno = None
        if match is not None:
            lineno = int(match.group(1))
            message = message[: match.start()]
        elif "end of document" in message:
            lineno = text.count("\n") + 1
        raise ConfigError(f"not valid TOML: {message}", path, lineno) from None
    return _Reader(path, text).read(data)


def load_config(
    path: str,
    *,
    commandLine: Optional[dict[str, Any]] = None,
    backends: Any = None,
    listeners: Optional[Sequence[Any]] = None,
) -> Any:
    """
    Read the TOML configuration file at C{path} into a
    L{txbalancer.settings.BalancerConfig}.

    Each setting takes the first value found in: C{commandLine}, the
    pool's own table (for pool settings), C{[balancer]}, the default.

    @param commandLine: settings given on the command line (option or
        attribute names to raw values, as C{tap.Options.given()}): they win
        over C{[balancer]} and over every pool's table.
    @param backends: a L{txbalancer.settings.PoolConfig} from
        C{--backends}: it gives the pool named C{default} its backends (the
        file's pool of that name keeps its settings), or is the only pool of
        a file that defines none.
    @param listeners: L{txbalancer.settings.ListenerConfig}s from the
        command line: they replace the file's C{[[listen]]} tables.
    @raise ConfigError: naming the file, the line and what was expected.
    """
    from txbalancer import settings

    read = _readConfig(path)
    given = settings.coerce(commandLine or {})
    poolGiven = {}
    balancerGiven = {}
    for attribute, value in given.items():
        if settings.settingFor(attribute).scope == "pool":
            poolGiven[attribute] = value
        else:
            balancerGiven[attribute] = value
    pools = list(read.pools)
    if backends is not None:
        names = [pool.name for pool in pools]
        if backends.name in names:
            i = names.index(backends.name)
            pools[i] = dataclasses.replace(
                pools[i], backends=backends.backends, source=backends.source
            )
        elif not pools:
            pools = [dataclasses.replace(backends, **read.poolDefaults)]
        else:
            raise ConfigError(
                f"--backends gives the backends of the pool named {backends.name!r}, "
                f"but this file's pools are {', '.join(names)}: give their backends "
                f"in the file, or name one of them {backends.name!r}",
                path,
            )
    if not pools:
        raise ConfigError(
            "no pool of backends: add a [pool.NAME] table with backends (or give "
            "--backends FILE)", path
        )
    pools = [dataclasses.replace(pool, **poolGiven) for pool in pools]
    values = {**read.balancer, **balancerGiven}
    if listeners:
        values["listeners"] = tuple(listeners)
    elif read.listeners:
        values["listeners"] = read.listeners
    config = settings.BalancerConfig(
        pools=tuple(pools), routes=read.routes, configFile=path, **values
    )
    try:
        settings.check(config)
    except ConfigError as e:
        if e.filename is None:
            raise ConfigError(e.message, path) from None
        raise
    return config


# ---------------------------------------------------------------------------
# Secrets

SECRET_MIN = 16


def load_secret(path: str, what: str = "sticky secret") -> bytes:
    """
    The key in the file at C{path}: its bytes, surrounding whitespace
    stripped (so a trailing newline is not part of it).

    @raise ConfigError: when the file cannot be read or holds fewer than
        L{SECRET_MIN} bytes.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cannot read {what} file: {e.strerror or e}", path) from None
    if len(secret) < SECRET_MIN:
        raise ConfigError(
            f"the {what} is {len(secret)} bytes; it must be at least {SECRET_MIN} "
            "(make one with: head -c 32 /dev/urandom | base64 > FILE)",
            path,
        )
    return secret
