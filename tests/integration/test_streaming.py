"""Responses stream through the balancer as the backend sends them."""

from __future__ import annotations

import http.client
import time

import pytest

from .httpraw import HOST

pytestmark = pytest.mark.integration

CHUNKS = 10
INTERVAL_MS = 300


def test_slow_response_arrives_chunk_by_chunk(backend, balancer):
    """A backend sending a chunk every 300 ms is seen chunk by chunk, not all at the end."""
    lb = balancer([backend("slow", CHUNKS=CHUNKS, INTERVAL_MS=INTERVAL_MS)])
    conn = http.client.HTTPConnection(HOST, lb.port, timeout=30)
    try:
        conn.request("GET", "/stream")
        resp = conn.getresponse()
        assert resp.status == 200
        arrivals = []  # (wall-clock arrival in ms, the backend's sent_at in ms)
        pending = b""
        while True:
            data = resp.read1(65536)
            if not data:
                break
            now = time.time() * 1000
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                sent_at = int(line.rsplit(b"sent_at=", 1)[1])
                arrivals.append((now, sent_at))
    finally:
        conn.close()
    assert len(arrivals) == CHUNKS
    first_arrival = arrivals[0][0]
    last_sent = arrivals[-1][1]
    # The backend spends about 2.7 s sending; the first chunk must reach the
    # client while the backend is still sending, with a wide margin.
    assert first_arrival < last_sent - 1000, (
        f"first chunk arrived {first_arrival - arrivals[0][1]:.0f} ms after it was sent,"
        f" {first_arrival - last_sent:.0f} ms relative to the last chunk being sent"
    )
