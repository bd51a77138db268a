"""The quick start path: three backends behind the balancer, round robin."""

from __future__ import annotations

import pytest

from .httpraw import get

pytestmark = pytest.mark.integration


def _ports(balancer_port: int, n: int) -> list[int]:
    ports = []
    for _ in range(n):
        resp = get(balancer_port, "/")
        assert resp.status == 200, resp
        text = resp.text.strip()
        assert text.startswith("Response from server on port "), text
        ports.append(int(text.rsplit(" ", 1)[1]))
    return ports


def test_round_robin_rotates_over_three_backends(backend, balancer):
    """Six requests to three backends are answered by a, b, c, a, b, c."""
    a, b, c = backend(), backend(), backend()
    lb = balancer([a, b, c])
    assert _ports(lb.port, 6) == [a.port, b.port, c.port] * 2


def test_weights_give_smooth_order(backend, balancer):
    """Weights 5, 1, 1 spread requests smoothly: a a b a c a a, twice over."""
    a, b, c = backend(), backend(), backend()
    lb = balancer([f"{a.address} weight=5", f"{b.address} weight=1", c.address])
    order = [a.port, a.port, b.port, a.port, c.port, a.port, a.port]
    assert _ports(lb.port, 14) == order * 2


def test_keep_alive_client_also_rotates(backend, balancer):
    """Requests on one kept-alive client connection still rotate over the backends."""
    from .httpraw import RawClient

    a, b, c = backend(), backend(), backend()
    lb = balancer([a, b, c])
    seen = []
    with RawClient(lb.port) as client:
        for _ in range(6):
            resp = client.request("GET", "/")
            assert resp.status == 200, resp
            seen.append(int(resp.text.strip().rsplit(" ", 1)[1]))
    assert seen == [a.port, b.port, c.port] * 2
