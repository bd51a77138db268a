"""Huge bodies stream both ways without pinning the balancer's memory."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time

import pytest

from .httpraw import HOST, get
from .support import rss_kib

pytestmark = pytest.mark.integration

GIB = 1024**3
LIMIT_KIB = 64 * 1024
PATTERN = bytes(range(256)) * 1024  # 256 KiB; byte at offset i is i % 256
CHECK = memoryview(bytes(range(256)) * 1025)
CLIENT_RATE = 40 * 1024**2  # bytes per second: slower than the balancer can move them


class RssWatcher:
    """Samples a process's VmRSS in a thread and keeps the largest value."""

    def __init__(self, pid: int):
        self.pid = pid
        self.baseline = rss_kib(pid)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
            except (OSError, AssertionError):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_kib(self.pid))

    @property
    def growth_kib(self) -> int:
        return self.peak - self.baseline


def warm_up(port: int) -> None:
    for _ in range(5):
        assert get(port, "/__normal").status == 200


def test_gigabyte_download_through_slow_client(backend, balancer):
    """A 1 GiB response read slowly by the client leaves the balancer's RSS growth under 64 MiB."""
    lb = balancer([backend("big", BYTES=GIB)])
    warm_up(lb.port)
    conn = http.client.HTTPConnection(HOST, lb.port, timeout=60)
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    received = 0
    with RssWatcher(lb.pid) as rss:
        conn.request("GET", f"/__big?bytes={GIB}")
        resp = conn.getresponse()
        assert resp.status == 200
        start = time.monotonic()
        while True:
            n = resp.readinto(view)
            if not n:
                break
            offset = received % 256
            assert view[:n] == CHECK[offset : offset + n], (
                f"wrong bytes after {received}"
            )
            received += n
            ahead = received / CLIENT_RATE - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        conn.close()
    assert received == GIB
    print(
        f"download: RSS {rss.baseline // 1024} MiB, grew by {rss.growth_kib // 1024} MiB"
    )
    assert rss.growth_kib < LIMIT_KIB, (
        f"RSS grew by {rss.growth_kib // 1024} MiB (from {rss.baseline // 1024} MiB)"
    )


def test_gigabyte_upload_to_slow_backend(backend, balancer):
    """A 1 GiB upload to a backend that reads slowly leaves the balancer's RSS growth under 64 MiB."""
    lb = balancer([backend("sink", RATE=CLIENT_RATE)])
    warm_up(lb.port)
    expected = hashlib.sha256()

    def body():
        sent = 0
        while sent < GIB:
            chunk = PATTERN[: min(len(PATTERN), GIB - sent)]
            expected.update(chunk)
            sent += len(chunk)
            yield chunk

    conn = http.client.HTTPConnection(HOST, lb.port, timeout=60)
    with RssWatcher(lb.pid) as rss:
        conn.request(
            "POST",
            "/upload",
            body=body(),
            headers={
                "Content-Length": str(GIB),
                "Content-Type": "application/octet-stream",
            },
        )
        resp = conn.getresponse()
        answer = resp.read()
        conn.close()
    assert resp.status == 200, answer
    result = json.loads(answer)
    print(
        f"upload: RSS {rss.baseline // 1024} MiB, grew by {rss.growth_kib // 1024} MiB"
    )
    assert result["bytes"] == GIB
    assert result["sha256"] == expected.hexdigest()
    assert rss.growth_kib < LIMIT_KIB, (
        f"RSS grew by {rss.growth_kib // 1024} MiB (from {rss.baseline // 1024} MiB)"
    )
