"""Clients that leave, dawdle or sit idle, and the options that govern them."""

from __future__ import annotations

import socket

import pytest

from .httpraw import HOST, RawClient, get
from .support import free_port, wait_for

pytestmark = pytest.mark.integration


def test_client_leaving_cancels_upstream_request(backend, balancer):
    """When the client goes away, the balancer drops the backend request it was waiting on."""
    be = backend()
    lb = balancer([be])
    with socket.create_connection((HOST, lb.port)) as s:
        s.sendall(b"GET /__delay?ms=20000 HTTP/1.1\r\nHost: example.test\r\n\r\n")
        wait_for(
            lambda: be.counts("/__delay")["started"] == 1, 10, "the request upstream"
        )
    # The backend would answer after 20 s; the balancer must hang up long before.
    wait_for(lambda: be.counts("/__delay")["cancelled"] == 1, 10, "the upstream cancel")
    assert get(lb.port, "/").status == 200


def test_slow_client_does_not_delay_others(backend, balancer):
    """A client that sends its headers one byte at a time does not hold up another client."""
    lb = balancer([backend()])
    with socket.create_connection((HOST, lb.port)) as dawdler:
        dawdler.sendall(b"GET /slow HTTP/1.1\r\nHo")
        resp = get(lb.port, "/", timeout=10)
        assert resp.status == 200, resp
        dawdler.sendall(b"st: example.test\r\n\r\n")
        assert RawClient.wrap(dawdler).response().status == 200


def test_idle_client_connection_closed_after_client_timeout(backend, balancer):
    """With --client-timeout 1, a connection that sends nothing is closed by the balancer."""
    lb = balancer([backend()], "--client-timeout", "1")
    with RawClient(lb.port) as idle:
        assert idle.request("GET", "/").status == 200
        # Closed after about 1 s; allow far more before calling it a failure.
        assert idle.at_eof(wait=20)


def test_access_log_has_one_line_per_request(backend, balancer, tmp_path):
    """--access-log FILE gets one line per request with its path and status."""
    access = tmp_path / "access.log"
    lb = balancer([backend()], "--access-log", str(access))
    for i in range(3):
        assert get(lb.port, f"/logged-{i}").status == 200

    def lines():
        try:
            found = [
                line for line in access.read_text().splitlines() if "/logged-" in line
            ]
        except FileNotFoundError:
            return None
        return found if len(found) == 3 else None

    found = wait_for(lines, 10, "three access log lines")
    for i, line in enumerate(found):
        assert f"/logged-{i}" in line and " 200 " in line, line


def test_port_is_repeatable(backend, balancer):
    """Two --port options make the balancer listen on both."""
    second = free_port()
    lb = balancer([backend()], "--port", f"tcp:{second}:interface={HOST}")
    for port in (lb.port, second):
        resp = get(port, "/")
        assert resp.status == 200, (port, resp)
