"""
The admin server's front door: the twisted.web resource tree, who may use
it (the token, or loopback only), and the Site it is served by.

    /                  the dashboard (dashboard.py)
    /status            JSON (status.py)
    /metrics           Prometheus text (metrics.py)
    /backends...       the runtime API (api.py)
    /reload            the runtime API (api.py)

The rules, in the order they are applied to every request:

    1. with a token, a request without C{Authorization: Bearer TOKEN}
       (compared in constant time) gets 401 and changes nothing;
    2. without a token (the server then listens on loopback only, see
       L{checkExposure}), the C{Host} header must name a loopback address
       or C{localhost}, so a web page on another site cannot reach it
       through DNS rebinding;
    3. a request that changes something and carries an C{Origin} header
       (a browser's) must come from a page of this server, so another
       site's page cannot POST to it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Optional
from urllib.parse import urlsplit

from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
)
from twisted.web.resource import Resource
from twisted.web.server import Site

from txbalancer.config import ConfigError

__all__ = [
    "AdminResource",
    "AdminSite",
    "JSONResource",
    "adminToken",
    "checkExposure",
    "isLoopback",
    "jsonResponse",
]

SAFE_METHODS = frozenset([b"GET", b"HEAD", b"OPTIONS"])


def jsonResponse(request: Any, code: int, body: Any) -> bytes:
    """
    Answer C{request} with C{code} and C{body} as JSON; the bytes to return
    from C{render}.
    """
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, indent=1, sort_keys=False).encode("utf-8") + b"\n"


def jsonError(request: Any, code: int, message: str) -> bytes:
    return jsonResponse(request, code, {"error": message})


class JSONResource(Resource):
    """
    A resource whose every answer is JSON, a method it does not serve
    included (405 with C{Allow}).
    """

    def render(self, request: Any) -> Any:
        method = request.method.decode("ascii", "replace")
        if method == "HEAD" and not hasattr(self, "render_HEAD"):
            method = "GET"
        handler = getattr(self, "render_" + method, None)
        if handler is None:
            allowed = sorted(
                name[len("render_"):] for name in dir(self)
                if name.startswith("render_")
            )
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
            return jsonError(
                request, 405, f"method not allowed here (allowed: {', '.join(allowed)})"
            )
        return handler(request)


class _Error(Resource):
    isLeaf = True

    def __init__(self, code: int, message: str, headers: Any = ()) -> None:
        Resource.__init__(self)
        self.code = code
        self.message = message
        self.headers = headers

    def render(self, request: Any) -> bytes:
        for name, value in self.headers:
            request.setHeader(name, value)
        return jsonError(request, self.code, self.message)


class _Unauthorized(Resource):
    """
    401 for a request without the token.  The dashboard's address answers
    401 with the dashboard page itself (it holds no data): the page then
    asks for the token and sends it with each of its own requests.
    """

    isLeaf = True

    def __init__(self, message: str, page: Optional[Resource]) -> None:
        Resource.__init__(self)
        self.message = message
        self.page = page

    def render(self, request: Any) -> bytes:
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="txbalancer admin"')
        if self.page is not None and request.method in (b"GET", b"HEAD"):
            body = self.page.render(request)
            request.setResponseCode(401)
            return body
        return jsonError(request, 401, self.message)


class AdminResource(Resource):
    """
    The root of the admin server for one L{txbalancer.Balancer}.

    @param balancer: the balancer shown and controlled.
    @param token: the bearer token every request must carry, or L{None}.
    """

    def __init__(self, balancer: Any, token: Optional[str] = None) -> None:
        from txbalancer.admin.api import BackendsResource, ReloadResource
        from txbalancer.admin.dashboard import DashboardResource
        from txbalancer.admin.metrics import MetricsResource
        from txbalancer.admin.status import StatusResource

        Resource.__init__(self)
        self.balancer = balancer
        self._expected = (
            None if token is None else b"Bearer " + token.encode("utf-8")
        )
        self.dashboard = DashboardResource()
        self.putChild(b"", self.dashboard)
        self.putChild(b"status", StatusResource(balancer))
        self.putChild(b"metrics", MetricsResource(balancer))
        self.putChild(b"backends", BackendsResource(balancer))
        self.putChild(b"reload", ReloadResource(balancer))

    def getChildWithDefault(self, path: bytes, request: Any) -> Resource:
        refused = self._refusal(path, request)
        if refused is not None:
            return refused
        return Resource.getChildWithDefault(self, path, request)

    def getChild(self, path: bytes, request: Any) -> Resource:
        return _Error(404, f"no such admin resource: /{path.decode('latin-1')}")

    def _refusal(self, path: bytes, request: Any) -> Optional[Resource]:
        if self._expected is not None:
            given = request.getHeader(b"authorization") or b""
            if not hmac.compare_digest(given, self._expected):
                why = (
                    "wrong token" if given else
                    "this admin server needs Authorization: Bearer TOKEN"
                )
                return _Unauthorized(why, self.dashboard if path == b"" else None)
        else:
            host = _header(request, b"host")
            if host is not None and not _loopbackHost(host):
                return _Error(
                    403,
                    f"Host {host!r} is not a loopback address: an admin server "
                    "without a token answers only requests to 127.0.0.1, ::1 "
                    "or localhost",
                )
        origin = _header(request, b"origin")
        if request.method not in SAFE_METHODS and origin is not None:
            host = _header(request, b"host") or ""
            if urlsplit(origin).netloc.lower() != host.lower():
                return _Error(
                    403,
                    f"Origin {origin!r} is not this admin server: changes are "
                    "taken only from its own dashboard or from clients that "
                    "send no Origin",
                )
        return None


def _header(request: Any, name: bytes) -> Optional[str]:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _loopbackHost(host: str) -> bool:
    """
    Whether a C{Host} header names a loopback address or C{localhost}.
    """
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    return isLoopback(name)


def isLoopback(address: str) -> bool:
    """
    Whether C{address} is an IP address in 127.0.0.0/8 or C{::1}.
    """
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def checkExposure(description: str, endpoint: Any) -> None:
    """
    Refuse to serve the admin server without a token anywhere but loopback.

    @param description: the endpoint string (for the message).
    @param endpoint: what Twisted's parser made of it.
    @raise ConfigError: saying why, when C{endpoint} may be reached from
        another machine.
    """
    if isinstance(endpoint, UNIXServerEndpoint):
        return
    fix = (
        "; listen on loopback (tcp:PORT:interface=127.0.0.1) or a unix "
        "socket, or set --admin-token-file"
    )
    if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)):
        interface = endpoint._interface
        if interface in ("", "0.0.0.0", "::"):
            raise ConfigError(
                f"--admin {description}: refusing to serve the admin server "
                "without a token on every network interface" + fix
            )
        if not isLoopback(interface):
            raise ConfigError(
                f"--admin {description}: refusing to serve the admin server "
                f"without a token on {interface}, which is not a loopback "
                "address (127.0.0.0/8 or ::1)" + fix
            )
        return
    raise ConfigError(
        f"--admin {description}: cannot tell whether this endpoint is reachable "
        "only from this machine, so the admin server needs a token" + fix
    )


def adminToken(config: Any) -> Optional[str]:
    """
    The token of C{config}: C{adminToken}, or the content of
    C{adminTokenFile} without surrounding whitespace, or L{None}.

    @raise ConfigError: naming the file when it cannot be read or is empty.
    """
    if config.adminToken:
        return config.adminToken
    path = config.adminTokenFile
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--admin-token-file: cannot read it: {e}", path) from None
    if not token:
        raise ConfigError("--admin-token-file: the file is empty", path)
    if any(c.isspace() for c in token) or not token.isprintable():
        raise ConfigError(
            "--admin-token-file: the token must be one word of printable "
            "characters", path,
        )
    return token


class AdminSite(Site):
    """
    The Site of the admin server: no access-log line per request (the
    dashboard polls every second), no tracebacks shown.
    """

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass
