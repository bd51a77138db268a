"""
The runtime API: change the backends while requests flow.  Every answer is
JSON; an error is C{{"error": "why"}}.

    POST   /backends/ADDRESS/drain     no new requests (sticky ones included);
                                       those in flight finish; checks go on
    POST   /backends/ADDRESS/disable   out of the pool, whatever its health;
                                       checks go on but do not bring it back
    POST   /backends/ADDRESS/enable    undo drain and disable: it takes the
                                       state its checks found
    GET    /backends/ADDRESS           its status (as in /status)
    DELETE /backends/ADDRESS           remove it once its requests finish: 202
    POST   /backends                   {"pool": NAME, "address": "host:port",
                                       "weight": N}: add one, checked like a
                                       line of the backends file: 201
    POST   /reload                     re-read the files: 400 with the reason
                                       when one is broken

C{ADDRESS} is C{host:port} (C{[v6]:port}); with the same address in several
pools, add C{?pool=NAME}.  Changes last until the next reload, which puts
the files' backends back as they are written.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import unquote

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from txbalancer.admin.server import JSONResource, jsonError, jsonResponse
from txbalancer.admin.status import backendStatus
from txbalancer.config import ConfigError, parse_backends

__all__ = ["BackendsResource", "ReloadResource"]

log = Logger()

# The keys of POST /backends, and the backends-file flag each becomes.
_ADD_KEYS = {"pool": None, "address": None, "weight": "weight",
             "max_conns": "max_conns", "backup": "backup"}
MAX_BODY = 64 * 1024


class _NotFound(Exception):
    code = 404


class _Ambiguous(Exception):
    code = 409


class _BadRequest(Exception):
    code = 400


def _query(request: Any, name: bytes) -> Optional[str]:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


class BackendsResource(JSONResource):
    """
    C{/backends} and everything below it.
    """

    isLeaf = True

    def __init__(self, balancer: Any) -> None:
        JSONResource.__init__(self)
        self.balancer = balancer

    def render(self, request: Any) -> Any:
        path = [unquote(p.decode("utf-8", "replace")) for p in request.postpath]
        if path and path[-1] == "":
            path.pop()
        method = request.method
        try:
            if not path:
                if method == b"POST":
                    return self._add(request)
                if method in (b"GET", b"HEAD"):
                    return self._list(request)
                return _notAllowed(request, "GET, POST")
            if len(path) == 1:
                if method == b"DELETE":
                    return self._remove(request, path[0])
                if method in (b"GET", b"HEAD"):
                    name, runtime, backend = self._find(request, path[0])
                    now = self.balancer.reactor.seconds()
                    return jsonResponse(request, 200, {
                        "pool": name, "backend": backendStatus(runtime, backend, now)})
                return _notAllowed(request, "GET, DELETE")
            if len(path) == 2 and path[1] in ("drain", "enable", "disable"):
                if method != b"POST":
                    return _notAllowed(request, "POST")
                return self._act(request, path[0], path[1])
            return jsonError(request, 404, "no such admin resource: "
                             + request.path.decode("utf-8", "replace"))
        except (_NotFound, _Ambiguous, _BadRequest) as e:
            return jsonError(request, e.code, str(e))

    # -- finding a backend

    def _find(self, request: Any, address: str) -> tuple[str, Any, Any]:
        wanted = _query(request, b"pool")
        pools = self.balancer.pools
        if wanted is not None:
            if wanted not in pools:
                raise _NotFound(f"no pool named {wanted!r} (pools: {', '.join(pools)})")
            candidates = {wanted: pools[wanted]}
        else:
            candidates = pools
        found = [
            (name, runtime, runtime.backend(address))
            for name, runtime in candidates.items()
            if runtime.backend(address) is not None
        ]
        if not found:
            where = f"pool {wanted!r}" if wanted is not None else "any pool"
            raise _NotFound(f"no backend {address} in {where}")
        if len(found) > 1:
            raise _Ambiguous(
                f"backend {address} is in several pools ("
                + ", ".join(name for name, _, _ in found)
                + "): add ?pool=NAME"
            )
        return found[0]

    # -- the actions

    def _act(self, request: Any, address: str, action: str) -> bytes:
        name, runtime, backend = self._find(request, address)
        pool, checker = runtime.pool, runtime.checker
        if action == "drain":
            checker.drain(backend)
        elif action == "disable":
            pool.disable(backend)
        else:
            pool.enable(backend)
            if backend in checker:
                checker.undrain(backend)
        log.info("admin: {action} backend {address} of pool {pool}: now {state}",
                 action=action, address=backend.address, pool=name,
                 state=backend.reported)
        now = self.balancer.reactor.seconds()
        return jsonResponse(request, 200, {
            "pool": name, "action": action,
            "backend": backendStatus(runtime, backend, now)})

    def _list(self, request: Any) -> bytes:
        now = self.balancer.reactor.seconds()
        return jsonResponse(request, 200, {
            name: [backendStatus(runtime, b, now) for b in runtime.pool.backends]
            for name, runtime in self.balancer.pools.items()
        })

    def _add(self, request: Any) -> bytes:
        body = request.content.read(MAX_BODY + 1) if request.content else b""
        if len(body) > MAX_BODY:
            raise _BadRequest(f"body larger than {MAX_BODY} bytes")
        try:
            data = json.loads(body or b"null")
        except ValueError as e:
            raise _BadRequest(f"body is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise _BadRequest(
                'expected a JSON object like {"pool": "default", "address": '
                '"127.0.0.1:3001", "weight": 1}'
            )
        unknown = sorted(set(data) - set(_ADD_KEYS))
        if unknown:
            raise _BadRequest(
                f"unknown key {unknown[0]!r} (known keys: {', '.join(_ADD_KEYS)})"
            )
        pools = self.balancer.pools
        name = data.get("pool")
        if name is None:
            if len(pools) != 1:
                raise _BadRequest(f'"pool" is required (pools: {", ".join(pools)})')
            name = next(iter(pools))
        if not isinstance(name, str) or name not in pools:
            raise _NotFound(f"no pool named {name!r} (pools: {', '.join(pools)})")
        runtime = pools[name]
        spec = _specFrom(data)
        if any(b.spec.key == spec.key for b in runtime.pool.backends):
            raise _Ambiguous(f"backend {spec.address} is already in pool {name!r}")
        backend = runtime.addBackend(spec)
        log.info("admin: added backend {address} to pool {pool}",
                 address=backend.address, pool=name)
        now = self.balancer.reactor.seconds()
        return jsonResponse(request, 201, {
            "pool": name, "added": backendStatus(runtime, backend, now)})

    def _remove(self, request: Any, address: str) -> bytes:
        name, runtime, backend = self._find(request, address)
        inFlight = backend.active
        d = runtime.removeBackend(backend)
        d.addErrback(lambda f: log.failure("removing backend {address}", f,
                                           address=backend.address))
        return jsonResponse(request, 202, {
            "pool": name, "removing": backend.address, "in_flight": inFlight})


def _specFrom(data: dict[str, Any]) -> Any:
    """
    The L{txbalancer.config.BackendSpec} of a POST /backends body, read
    by the backends-file parser so the same rules apply.
    """
    address = data.get("address")
    if not isinstance(address, str) or not address.strip():
        raise _BadRequest('"address" is required: a string like "127.0.0.1:3001"')
    if any(c.isspace() or c == "#" for c in address):
        raise _BadRequest(f'"address" {address!r} must be one word, host:port')
    words = [address]
    for key, flag in _ADD_KEYS.items():
        if flag is None or key not in data:
            continue
        value = data[key]
        if key == "backup":
            if not isinstance(value, bool):
                raise _BadRequest('"backup" must be true or false')
            if value:
                words.append("backup")
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise _BadRequest(f'"{key}" must be a whole number, got {value!r}')
        words.append(f"{flag}={value}")
    try:
        specs = parse_backends(" ".join(words) + "\n", "POST /backends")
    except ConfigError as e:
        raise _BadRequest(e.message) from None
    return specs[0]


def _notAllowed(request: Any, allowed: str) -> bytes:
    request.setHeader(b"Allow", allowed.encode("ascii"))
    return jsonError(request, 405, f"method not allowed here (allowed: {allowed})")


class ReloadResource(JSONResource):
    """
    C{POST /reload}: what SIGHUP does, with the answer.
    """

    isLeaf = True

    def __init__(self, balancer: Any) -> None:
        JSONResource.__init__(self)
        self.balancer = balancer

    def render_POST(self, request: Any) -> Any:
        d = defer.maybeDeferred(self.balancer.reload)

        def done(result: Any) -> None:
            body: dict[str, Any] = {"reloaded": True}
            if isinstance(result, dict):
                body.update(result)
            elif hasattr(result, "summary"):
                # A txbalancer.diff.ConfigDiff: what the reload changed.
                body.update(result.summary())
            _write(request, jsonResponse(request, 200, body))

        def failed(f: Any) -> None:
            if f.check(ConfigError):
                log.warn(  # noqa: G010 - twisted.logger.Logger.warn
                    "admin: reload refused: {reason}", reason=str(f.value))
                _write(request, jsonError(request, 400, str(f.value)))
            else:
                log.failure("admin: reload failed", f)
                _write(request, jsonError(request, 500, f"reload failed: {f.value}"))

        d.addCallbacks(done, failed)
        d.addErrback(lambda f: log.failure("admin: answering /reload", f))
        return NOT_DONE_YET


def _write(request: Any, body: bytes) -> None:
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.write(body)
    request.finish()
