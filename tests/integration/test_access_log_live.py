"""The access log of a real twistd balancer: SIGUSR1 reopens it, as logrotate needs."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from .httpraw import get

pytestmark = pytest.mark.integration


def _lines(path) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return f.read().splitlines()


def _wait_lines(path, n: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _lines(path)
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    return _lines(path)


def test_sigusr1_reopens_the_log_and_loses_no_line(backend, balancer, tmp_path):
    """Moving the log away and sending SIGUSR1 starts a new file; every request is in one of the two."""
    path = tmp_path / "access.log"
    lb = balancer([backend()], "--access-log", str(path), "--access-log-format", "json")
    for i in range(20):
        assert get(lb.port, f"/before/{i}").status == 200
    assert len(_wait_lines(path, 20)) == 20
    os.rename(path, str(path) + ".1")
    os.kill(lb.pid, signal.SIGUSR1)
    lb.wait_for_log("reopening the access log", timeout=10)
    for i in range(20):
        assert get(lb.port, f"/after/{i}").status == 200
    new = _wait_lines(path, 20)
    old = _lines(str(path) + ".1")
    assert [json.loads(line)["target"] for line in old] == [f"/before/{i}" for i in range(20)]
    assert [json.loads(line)["target"] for line in new] == [f"/after/{i}" for i in range(20)]
