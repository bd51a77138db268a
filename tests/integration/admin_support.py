"""
Helpers for the admin server's integration tests: a balancer started with
--admin, requests to its admin port, and a steady stream of client
requests that counts its failures.
"""

from __future__ import annotations

import json
import threading
import time

from .httpraw import HOST, RawClient
from .support import FAST_HEALTH, START_TIMEOUT, accepts, free_port, wait_for

TRAFFIC_PREFIX = "/t/"


def start_with_admin(balancer, entries, *options, token_file=None):
    """``(Balancer, admin port)``: twistd balancer with --admin on 127.0.0.1."""
    port = free_port()
    args = ["--admin", f"tcp:{port}:interface={HOST}", "--health-path", "/__health",
            *FAST_HEALTH, *options]
    if token_file is not None:
        args += ["--admin-token-file", str(token_file)]
    lb = balancer(entries, *args)
    wait_for(lambda: accepts(port), START_TIMEOUT, f"the admin server on {port}")
    return lb, port


def admin(port, method, path, body=None, token=None, headers=()):
    """One request to the admin server: the parsed response."""
    hs = list(headers)
    if token is not None:
        hs.append(("Authorization", f"Bearer {token}"))
    data = b""
    if body is not None:
        data = json.dumps(body).encode()
        hs.append(("Content-Type", "application/json"))
    with RawClient(port, timeout=30) as client:
        return client.request(method, path, hs, data, host=f"{HOST}:{port}")


def status(port, token=None):
    resp = admin(port, "GET", "/status", token=token)
    assert resp.status == 200, resp
    return resp.json()


def backend_status(port, address, pool="default", token=None):
    for b in status(port, token)["pools"][pool]["backends"]:
        if b["address"] == address:
            return b
    return None


class Traffic:
    """
    ``threads`` clients sending GETs to the balancer in a loop (kept-alive
    connections, a new one after any error), until ``stop()``, at most
    ``limit`` requests or ``seconds`` (``pause`` seconds between two
    requests of a client).  Counts answers by status and
    failures (anything but a 200, or a broken connection).
    """

    def __init__(self, port, threads=3, limit=20000, seconds=90.0, pause=0.0):
        self.port = port
        self.pause = pause
        self.limit = limit
        self.deadline = time.monotonic() + seconds
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def sent(self) -> int:
        return self.ok + len(self.failures)

    def _run(self, n: int) -> None:
        client = None
        i = 0
        while not self._stop.is_set() and self.sent < self.limit \
                and time.monotonic() < self.deadline:
            i += 1
            try:
                if client is None:
                    client = RawClient(self.port, timeout=30)
                resp = client.request("GET", f"{TRAFFIC_PREFIX}{n}/{i}")
                with self._lock:
                    if resp.status == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{resp.status} {resp.text[:200]}")
                if resp.value("Connection") == "close":
                    client.close()
                    client = None
                if self.pause:
                    time.sleep(self.pause)
            except Exception as e:  # noqa: BLE001 - every failure is counted
                with self._lock:
                    self.failures.append(f"{type(e).__name__}: {e}")
                if client is not None:
                    client.close()
                client = None
        if client is not None:
            client.close()

    def wait_for_more(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` more requests have been answered."""
        target = self.sent + n
        wait_for(lambda: self.sent >= target, timeout, f"{n} more requests")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
