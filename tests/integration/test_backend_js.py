"""The Node test backend itself behaves as the other integration tests assume."""

from __future__ import annotations

import hashlib
import socket

import pytest

from .httpraw import RawClient, exchange, get
from .support import wait_for

pytestmark = pytest.mark.integration


def test_normal_mode_names_its_port(backend):
    """A normal backend answers "Response from server on port N" with its own port."""
    be = backend()
    resp = get(be.port, "/")
    assert resp.status == 200
    assert resp.text == f"Response from server on port {be.port}"


def test_echo_mode_reports_the_request_as_sent(backend):
    """The echo backend reports method, target, headers in order and the body's digest."""
    be = backend("echo")
    body = b"hello world"
    with RawClient(be.port) as client:
        resp = client.request(
            "PATCH", "/a%2Fb?x=1&y=%20&x=2", [("X-Rep", "one"), ("X-Rep", "two")], body
        )
    echo = resp.json()
    assert echo["method"] == "PATCH"
    assert echo["url"] == "/a%2Fb?x=1&y=%20&x=2"
    assert [v for (k, v) in echo["headers"] if k == "X-Rep"] == ["one", "two"]
    assert echo["bodyLength"] == len(body)
    assert echo["bodySha256"] == hashlib.sha256(body).hexdigest()


def test_counts_started_and_completed_requests(backend):
    """/__count counts requests by target prefix, and a body cut short never completes."""
    be = backend("echo")
    assert get(be.port, "/bad-not-really").status == 200
    with socket.create_connection(("127.0.0.1", be.port)) as s:
        s.sendall(
            b"POST /bad-cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"
        )
    wait_for(lambda: be.counts("/bad-cut")["aborted"] == 1, 10, "the aborted request")
    assert be.counts("/bad") == {
        "started": 2,
        "completed": 1,
        "aborted": 1,
        "cancelled": 1,
        "urls": ["/bad-not-really", "/bad-cut"],
    }
    assert be.counts("/other") == {
        "started": 0,
        "completed": 0,
        "aborted": 0,
        "cancelled": 0,
        "urls": [],
    }


def test_hop_route_sends_hop_by_hop_and_repeated_headers(backend):
    """/__hop answers with hop-by-hop headers and repeated headers, in order."""
    resp = get(backend().port, "/__hop")
    assert resp.values("Set-Cookie") == ["first=1", "second=2"]
    assert resp.values("X-Bar") == ["hop-by-hop"]
    assert resp.values("Keep-Alive")


def test_close_mode_closes(backend):
    """The close backend says Connection: close and closes the connection."""
    with RawClient(backend("close").port) as client:
        resp = client.request("GET", "/")
        assert resp.value("Connection") == "close"
        assert client.at_eof(wait=5)


def test_status_route_and_slow_and_big(backend):
    """/__status, /__slow and /__big answer as documented."""
    be = backend()
    with RawClient(be.port) as client:
        assert client.request("GET", "/__status/204").status == 204
        assert client.request("GET", "/__status/304").status == 304
        slow = client.request("GET", "/__slow?chunks=3&interval=10")
        assert slow.text.count("sent_at=") == 3
        big = client.request("GET", "/__big?bytes=300000")
        assert big.body == (bytes(range(256)) * 1200)[:300000]
    resp = exchange(be.port, b"GET /__delay?ms=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
