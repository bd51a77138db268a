"""
Parsing of the balancer's configuration into plain, immutable values.

This module is pure: it imports no other txbalancer module and nothing from
the reactor, so it can be used (and tested) anywhere.  Every error is a
L{ConfigError} whose text names the file and line when there is one::

    backends.txt:3: unknown flag 'wieght' (known flags: weight=N, ...)
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Union

__all__ = [
    "BackendSpec",
    "ConfigError",
    "load_backends",
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
