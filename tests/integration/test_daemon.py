"""Daemon mode and graceful stop through the real twistd command."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from .httpraw import HOST, ProtocolError, get
from .support import (
    accepts,
    free_port,
    pid_alive,
    stop_process,
    tail,
    twistd_command,
    wait_for,
    write_backends,
)

pytestmark = pytest.mark.integration

SLOW_MS = 3000


class InFlight:
    """A slow GET running in a thread; ``result`` holds the response or the error."""

    def __init__(self, port: int, target: str):
        self.result = None
        self.done = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(port, target), daemon=True
        )
        self.thread.start()

    def _run(self, port, target):
        try:
            self.result = get(port, target, timeout=30)
        except (OSError, AssertionError, ProtocolError) as e:  # reported by the test
            self.result = e
        finally:
            self.done.set()

    def wait(self):
        assert self.done.wait(40), "the request in flight never finished"
        return self.result


def start_slow_request(port, be):
    """Start a request the backend answers after SLOW_MS, and wait until it reached the backend."""
    flight = InFlight(port, f"/__delay?ms={SLOW_MS}")
    wait_for(
        lambda: be.counts("/__delay")["started"] == 1, 10, "the slow request to arrive"
    )
    return flight


def test_daemon_detaches_serves_and_stops_gracefully(
    backend, tmp_path, request, attach_log
):
    """Without -n, twistd detaches, writes its pid file and log, and on SIGTERM finishes the request in flight, removes the pid file and exits."""
    be = backend()
    pidfile = tmp_path / "balancer.pid"
    logfile = tmp_path / "balancer.log"
    port = free_port()
    backends_file = write_backends(tmp_path / "backends.txt", [be])
    attach_log("daemon", logfile)
    args = twistd_command(
        f"--pidfile={pidfile}",
        f"--logfile={logfile}",
        "balancer",
        "--port",
        f"tcp:{port}:interface={HOST}",
        "--backends",
        str(backends_file),
    )
    launcher = subprocess.run(
        args, check=False, cwd=str(tmp_path), capture_output=True, text=True, timeout=30
    )
    pid = None

    def cleanup():
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)

    request.addfinalizer(cleanup)
    assert launcher.returncode == 0, launcher.stdout + launcher.stderr

    pid = wait_for(
        lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "the pid file"
    )
    pid = int(pid)
    assert pid_alive(pid)
    wait_for(lambda: accepts(port), 15, "the daemon to listen")
    try:
        resp = get(port, "/")
        assert resp.status == 200, resp
        assert resp.text.startswith("Response from server on port")

        flight = start_slow_request(port, be)
        os.kill(pid, signal.SIGTERM)
        # It stops listening while the request in flight is still running.
        wait_for(
            lambda: not accepts(port) or flight.done.is_set(),
            15,
            "the listener to close",
        )
        assert not flight.done.is_set(), (
            "the listener was still open when the request ended"
        )
        answer = flight.wait()
        assert not isinstance(answer, Exception), answer
        assert answer.status == 200, answer
        assert answer.text.startswith("Response from server on port")

        wait_for(lambda: not pid_alive(pid), 30, "the daemon to exit")
        assert not pidfile.exists()
    finally:
        log = tail(logfile)
    assert log.strip(), "the log file is empty"
    assert "Unhandled" not in log, log


def test_foreground_sigterm_finishes_request_and_exits_0(backend, balancer):
    """Under -n, SIGTERM lets the request in flight finish, then twistd exits with code 0."""
    be = backend()
    lb = balancer([be])
    flight = start_slow_request(lb.port, be)
    os.kill(lb.pid, signal.SIGTERM)
    answer = flight.wait()
    assert not isinstance(answer, Exception), answer
    assert answer.status == 200, answer
    code = lb.proc.wait(30)
    assert code == 0, f"twistd exited with {code}, not 0 (its log is below)"


def test_foreground_sigterm_when_idle_exits_0(backend, balancer):
    """Under -n, SIGTERM with nothing in flight exits promptly with code 0."""
    lb = balancer([backend()])
    assert get(lb.port, "/").status == 200
    code = stop_process(lb.proc, timeout=30)
    assert code == 0, f"twistd exited with {code}, not 0 (its log is below)"
