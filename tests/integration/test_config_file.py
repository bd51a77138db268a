"""
The TOML configuration file through the real ``twistd balancer --config``:
routes by host and path over real sockets, and several balancers that agree.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .httpraw import HOST, get
from .support import free_port

pytestmark = pytest.mark.integration

ETC = Path(__file__).resolve().parents[2] / "etc"


def echoed(resp) -> tuple[int, str]:
    """The port of the echo backend that answered, and the target it received."""
    assert resp.status == 200, (resp.status, resp.text)
    body = json.loads(resp.body)
    return body["port"], body["url"]


def test_shipped_example_routes(backend, balancer_command, tmp_path):
    """etc/balancer.toml, with its addresses pointed at real backends, routes /api/ (prefix stripped), admin.example.com/admin/ and the rest to their pools."""
    api1, api2, admin, web = (backend("echo") for _ in range(4))
    port = free_port()
    text = (ETC / "balancer.toml").read_text()
    for old, new in (
        ('endpoint = "tcp:8000"', f'endpoint = "tcp:{port}:interface={HOST}"'),
        ('"127.0.0.1:3001"', f'"{api1.address}"'),
        ('"127.0.0.1:3002 weight=2"', f'"{api2.address} weight=2"'),
        ('"127.0.0.1:3003"', f'"{web.address}"'),
        ("tcp:9000:interface=127.0.0.1", f"tcp:{free_port()}:interface={HOST}"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    config = tmp_path / "balancer.toml"
    config.write_text(text)
    (tmp_path / "admin-backends.txt").write_text(f"{admin.address}\n")
    balancer_command(port, "--config", str(config))

    apis = {api1.port, api2.port}
    for _ in range(3):
        got, url = echoed(get(port, "/api/x/y?q=1&r=%2F"))
        assert (got in apis, url) == (True, "/x/y?q=1&r=%2F")
    got, url = echoed(get(port, "/api"))
    assert (got in apis, url) == (True, "/")
    assert echoed(get(port, "/admin/users", host="admin.example.com")) == (admin.port, "/admin/users")
    assert echoed(get(port, "/admin", host="ADMIN.example.com:80")) == (admin.port, "/admin")
    assert echoed(get(port, "/admin/users", host="www.example.com")) == (web.port, "/admin/users")
    assert echoed(get(port, "/apix")) == (web.port, "/apix")
    assert echoed(get(port, "/")) == (web.port, "/")
    # Every /api request reached an api backend, as /x..., and nothing else did.
    assert web.counts("/x")["started"] == 0 and admin.counts("/x")["started"] == 0


def test_no_route_is_404(backend, balancer_command, tmp_path):
    """Without a default route, a request no route matches gets 404 and reaches no backend."""
    api = backend("echo")
    port = free_port()
    config = tmp_path / "balancer.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{port}:interface={HOST}"\n'
        f'[pool.api]\nbackends = ["{api.address}"]\n'
        '[[route]]\nhost = "*.example.com"\npath = "/api"\npool = "api"\n'
    )
    balancer_command(port, "--config", str(config))
    assert echoed(get(port, "/api/v1", host="a.b.example.com")) == (api.port, "/api/v1")
    resp = get(port, "/api/v1", host="example.com")
    assert resp.status == 404
    assert "no route" in resp.text
    resp = get(port, "/other", host="a.example.com")
    assert resp.status == 404
    assert api.counts("/other")["started"] == 0
    assert api.counts("/api/v1")["started"] == 1


def test_command_line_overrides_listeners(backend, balancer_command, tmp_path):
    """--port on the command line replaces the file's [[listen]]: the file's port stays closed."""
    web = backend("echo")
    file_port, port = free_port(), free_port()
    config = tmp_path / "balancer.toml"
    config.write_text(
        f'[[listen]]\nendpoint = "tcp:{file_port}:interface={HOST}"\n'
        f'[pool.web]\nbackends = ["{web.address}"]\n'
    )
    lb = balancer_command(port, "--config", str(config), "--port", f"tcp:{port}:interface={HOST}")
    assert echoed(get(port, "/x")) == (web.port, "/x")
    from .support import accepts

    assert not accepts(file_port), lb.log_text()


def cookie_from(resp, name: str) -> str | None:
    for header in resp.values("Set-Cookie"):
        key, _, rest = header.partition("=")
        if key == name:
            return rest.split(";", 1)[0]
    return None


def test_shared_sticky_secret(backend, balancer, tmp_path):
    """Two balancers started with the same --sticky-secret-file honour each other's sticky cookies; one without it does not."""
    backends = [backend() for _ in range(3)]
    secret = tmp_path / "sticky-secret"
    secret.write_text("a shared key of more than sixteen bytes\n")
    shared = ("--sticky-cookie", "lb", "--sticky-secret-file", str(secret))
    one = balancer(backends, *shared, name="one")
    two = balancer(backends, *shared, name="two")
    other = balancer(backends, "--sticky-cookie", "lb", name="other")

    first = get(one.port, "/")
    cookie = cookie_from(first, "lb")
    assert cookie, first.headers
    pinned = first.text
    for _ in range(6):
        resp = get(two.port, "/", headers=[("Cookie", f"lb={cookie}")])
        assert resp.status == 200
        assert resp.text == pinned
        assert cookie_from(resp, "lb") is None  # the cookie is valid there: not replaced
    # Without the shared key, the cookie means nothing: it is replaced.
    resp = get(other.port, "/", headers=[("Cookie", f"lb={cookie}")])
    replaced = cookie_from(resp, "lb")
    assert replaced is not None and replaced != cookie
