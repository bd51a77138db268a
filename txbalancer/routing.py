"""
Routes: which pool serves a request, from its host and path.

A L{RouteTable} is compiled once from the L{txbalancer.settings.RouteConfig}s
of a configuration, in order; L{RouteTable.match} tries them in that order
and the first match wins.  A route matches when both of its keys match (a
route with neither is the default):

    - C{host}: the request's Host (or C{:authority}), compared without the
      port and without regard to case.  C{"api.example.com"} matches that
      name exactly; C{"*.example.com"} matches any name below example.com,
      one label or more (C{a.example.com}, C{a.b.example.com}), but not
      C{example.com} itself (as nginx's C{*.example.com} does).  An IPv6
      literal is written with or without brackets (C{"[::1]"}, C{"::1"}).
      A trailing dot (C{example.com.}) is ignored on both sides.
    - C{path}: a prefix of the request's path, matched at a segment
      boundary: C{"/api"} (or C{"/api/"}, the same) matches C{/api},
      C{/api/}, C{/api/x} and C{/api?q}, never C{/apix}.  Paths are
      compared byte for byte as the client sent them (no percent-decoding,
      no dot-segment removal) and case-sensitively.

With C{strip_prefix}, the backend sees the target without the prefix:
C{/x} for C{/api/x}, C{/} for C{/api}, C{/?q} for C{/api?q}; the query is
kept byte for byte.

A request costs a few comparisons: hosts are lower-cased and paths
normalised when the table is compiled, the request's host once per
request, and no regular expression runs per request.  Pure: no reactor.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Optional, Sequence

__all__ = ["RouteTable", "checkHost", "checkPath", "normalizeHost"]

# A host name (labels of letters, digits, "-" and "_"), or an IPv4 address.
_NAME = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\Z")


def checkHost(host: str) -> str:
    """
    The host pattern of a route, normalised (lower case, no brackets, no
    trailing dot).

    @raise ValueError: with a message saying what a host pattern is.
    """
    if not isinstance(host, str) or not host:
        raise ValueError(f"expected a host name such as 'api.example.com', got {host!r}")
    pattern = host.lower()
    if pattern.startswith("[") and pattern.endswith("]"):
        pattern = pattern[1:-1]
    if ":" in pattern:
        try:
            return str(ipaddress.IPv6Address(pattern))
        except ValueError:
            raise ValueError(
                f"bad host {host!r}: a route's host has no port (the port is "
                "ignored when matching); IPv6 addresses are written [::1]"
            ) from None
    if pattern.endswith(".") and len(pattern) > 1:
        pattern = pattern[:-1]
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if "*" in name or not _NAME.match(name):
        raise ValueError(
            f"bad host {host!r}: expected a name such as 'api.example.com', "
            "a wildcard such as '*.example.com', or an IP address"
        )
    return pattern


def checkPath(path: str) -> str:
    """
    The path prefix of a route, normalised: without a trailing C{/}
    (C{"/api/"} and C{"/api"} are the same prefix; C{"/"} becomes C{""},
    which matches every path).

    @raise ValueError: with a message saying what a path prefix is.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"expected a path prefix starting with '/', got {path!r}")
    if any(c in path for c in "?# \t\r\n") or not path.isascii():
        raise ValueError(
            f"bad path prefix {path!r}: no query, fragment, spaces or non-ASCII "
            "characters (percent-encode them as clients send them)"
        )
    return path.rstrip("/")


def normalizeHost(host: Optional[bytes]) -> str:
    """
    A request's Host as routes compare it: lower case, without the port,
    brackets or a trailing dot; C{""} when there is none.
    """
    if not host:
        return ""
    text = host.decode("latin-1").lower()
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            return text
        try:
            return str(ipaddress.IPv6Address(text[1:end]))
        except ValueError:
            return text[1:end]
    colon = text.find(":")
    if colon >= 0:
        if text.count(":") > 1:
            # An IPv6 address without brackets (not valid in Host, but an
            # h2 :authority or a lax client may send one): no port to cut.
            try:
                return str(ipaddress.IPv6Address(text))
            except ValueError:
                return text
        text = text[:colon]
    if text[-1:] == ".":
        text = text[:-1]
    return text


class _Route:
    """
    One compiled route.
    """

    __slots__ = ("exact", "suffix", "prefix", "length", "strip", "value", "config")

    def __init__(self, config: Any, value: Any) -> None:
        self.config = config
        self.value = value
        self.exact: Optional[str] = None
        self.suffix: Optional[str] = None
        if config.host is not None:
            pattern = checkHost(config.host)
            if pattern.startswith("*."):
                self.suffix = pattern[1:]  # ".example.com"
            else:
                self.exact = pattern
        self.prefix: Optional[bytes] = None
        self.length = 0
        if config.path is not None:
            self.prefix = checkPath(config.path).encode("ascii")
            self.length = len(self.prefix)
        self.strip = bool(config.stripPrefix) and self.prefix is not None


class RouteTable:
    """
    A compiled table of routes.

    @param routes: L{txbalancer.settings.RouteConfig}s (anything with
        C{host}, C{path}, C{stripPrefix} and C{pool}), in order.
    @param values: what a match returns for each route, in the same order
        (the balancer passes each route's pool handler); by default each
        route's pool name.
    @raise ValueError: for a bad host or path.
    """

    def __init__(self, routes: Sequence[Any], values: Optional[Sequence[Any]] = None) -> None:
        if values is None:
            values = [route.pool for route in routes]
        if len(values) != len(routes):
            raise ValueError("one value per route")
        self.routes = tuple(_Route(r, v) for r, v in zip(routes, values))
        self._hosts = any(r.exact is not None or r.suffix is not None for r in self.routes)

    def __len__(self) -> int:
        return len(self.routes)

    def match(self, host: Optional[bytes], target: bytes) -> Optional[tuple[Any, bytes]]:
        """
        The first route that matches a request.

        @param host: the request's Host header (or L{None}).
        @param target: the request target (origin form, query included).
        @return: C{(value, target)}: the route's value and the target to
            send the backend (the same object unless the route strips its
            prefix); L{None} when no route matches.
        """
        name = normalizeHost(host) if self._hosts else ""
        for route in self.routes:
            if route.exact is not None:
                if name != route.exact:
                    continue
            elif route.suffix is not None and not name.endswith(route.suffix):
                continue
            prefix = route.prefix
            if prefix is not None:
                n = route.length
                if not target.startswith(prefix):
                    continue
                after = target[n : n + 1]
                if after and after != b"/" and after != b"?":
                    continue
                if route.strip:
                    rest = target[n:]
                    if not rest or rest[:1] == b"?":
                        rest = b"/" + rest
                    return route.value, rest
            return route.value, target
        return None
