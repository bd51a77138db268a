"""Writes sent at once on plain TCP (txbalancer.writethrough) keep every byte and its order."""

from __future__ import annotations

import hashlib
import json

import pytest

from .httpraw import RawClient, build_request

pytestmark = pytest.mark.integration


def test_pipelined_bodies_of_every_size_arrive_whole_and_in_order(backend, balancer):
    """Pipelined uploads from 0 bytes to past a socket buffer (2 MiB, and one
    chunked) on one connection each reach the backend whole, and the answers
    come back complete and in order."""
    lb = balancer([backend("echo")])
    sizes = [0, 1, 65536, 2 * 1024 * 1024 + 7, 13]
    bodies = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    data = b"".join(
        build_request("POST", f"/{i}", body=body) for i, body in enumerate(bodies)
    )
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [b"x" * 70000, b"y"])
    data += build_request(
        "POST", "/chunked", [("Transfer-Encoding", "chunked")]
    ) + chunked + b"0\r\n\r\n"
    with RawClient(lb.port, timeout=60) as client:
        client.send(data)
        for i, body in enumerate(bodies):
            resp = client.response("POST")
            assert resp.status == 200, (i, resp)
            echoed = json.loads(resp.body)
            assert echoed["url"] == f"/{i}"
            assert echoed["bodyLength"] == len(body)
            assert echoed["bodySha256"] == hashlib.sha256(body).hexdigest()
        resp = client.response("POST")
        echoed = json.loads(resp.body)
        assert echoed["url"] == "/chunked" and echoed["bodyLength"] == 70001


def test_large_responses_on_one_connection_arrive_whole(backend, balancer):
    """Responses of 1 byte, 64 KiB and 3 MiB in turn on one keep-alive
    connection arrive with exactly their bytes."""
    lb = balancer([backend("big")])
    block = bytes(i % 256 for i in range(65536))  # what the backend sends
    with RawClient(lb.port, timeout=60) as client:
        for n in (1, 65536, 3 * 1024 * 1024, 5):
            resp = client.request("GET", f"/__big?bytes={n}")
            assert resp.status == 200
            assert len(resp.body) == n
            assert resp.body == (block * (n // len(block) + 1))[:n]
