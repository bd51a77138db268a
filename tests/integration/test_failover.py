"""Backends that are down, slow or dying: what the client gets."""

from __future__ import annotations

import pytest

from .httpraw import get
from .support import free_port

pytestmark = pytest.mark.integration


def port_of(resp) -> int:
    text = resp.text.strip()
    assert text.startswith("Response from server on port "), text
    return int(text.rsplit(" ", 1)[1])


def test_closed_backend_is_skipped(backend, balancer):
    """With one of three backends not listening, every request still succeeds."""
    a, c = backend(), backend()
    dead = f"127.0.0.1:{free_port()}"
    lb = balancer([a, dead, c])
    served = set()
    for i in range(12):
        resp = get(lb.port, f"/r{i}")
        assert resp.status == 200, (i, resp)
        served.add(port_of(resp))
    assert served == {a.port, c.port}


def test_all_backends_down_gives_502(balancer):
    """When no backend can be reached the client gets 502 with a short text body."""
    lb = balancer([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    resp = get(lb.port, "/")
    assert resp.status == 502, resp
    assert (resp.value("Content-Type") or "").startswith("text/plain"), resp.headers
    assert resp.body.strip(), resp


def test_slow_backend_gives_504(backend, balancer):
    """A backend that sends no response headers within --backend-timeout gives 504 with a short text body."""
    slow = backend("delay", DELAY_MS=20000)
    lb = balancer([slow], "--backend-timeout", "1")
    # The backend would answer after 20 s; the 504 must come well before that.
    resp = get(lb.port, "/", timeout=15)
    assert resp.status == 504, resp
    assert (resp.value("Content-Type") or "").startswith("text/plain"), resp.headers
    assert resp.body.strip(), resp


def test_backend_killed_mid_run(backend, balancer):
    """GET requests keep succeeding when a backend is killed while the balancer runs."""
    a, b, c = backend(), backend(), backend()
    lb = balancer([a, b, c])
    for i in range(9):
        resp = get(lb.port, f"/before{i}")
        assert resp.status == 200, (i, resp)
    b.kill()
    served = set()
    for i in range(30):
        resp = get(lb.port, f"/after{i}")
        assert resp.status == 200, (i, resp)
        served.add(port_of(resp))
    assert served == {a.port, c.port}


def test_backend_killed_mid_run_keep_alive_client(backend, balancer):
    """On one kept-alive client connection, GET requests keep succeeding when a backend dies."""
    from .httpraw import RawClient

    a, b, c = backend(), backend(), backend()
    lb = balancer([a, b, c])
    with RawClient(lb.port) as client:
        for i in range(9):
            resp = client.request("GET", f"/before{i}")
            assert resp.status == 200, (i, resp)
        b.kill()
        for i in range(30):
            resp = client.request("GET", f"/after{i}")
            assert resp.status == 200, (i, resp)
