"""Pooled upstream connections and backends that close idle connections."""

from __future__ import annotations

import time

import pytest

from .httpraw import get

pytestmark = pytest.mark.integration


def test_requests_at_the_backend_keep_alive_timeout_never_fail(backend, balancer):
    """Requests spaced about 5 s apart (Node's keep-alive timeout) never get a 502."""
    lb = balancer([backend()])
    assert get(lb.port, "/first").status == 200
    for i, gap in enumerate([5.0, 4.95, 5.05, 5.0]):
        time.sleep(gap)
        resp = get(lb.port, f"/after-{gap}")
        assert resp.status == 200, (i, gap, resp)


def test_pooled_connection_closed_by_backend_is_retried(backend, balancer):
    """Requests after the backend closed its idle connections (1 s keep-alive) all succeed."""
    lb = balancer([backend(KEEPALIVE_MS=1000)])
    for i in range(4):
        assert get(lb.port, f"/warm{i}").status == 200
    for i, gap in enumerate([1.0, 1.05, 0.95, 1.5]):
        time.sleep(gap)
        resp = get(lb.port, f"/after{i}")
        assert resp.status == 200, (i, gap, resp)
