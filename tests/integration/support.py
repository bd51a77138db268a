"""
Helpers shared by the integration tests: free ports, process control, the
running backends and balancers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from .httpraw import HOST, RawClient, get

HERE = Path(__file__).resolve().parent
BACKEND_JS = HERE / "backend.js"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


# Health checks fast enough that a test can wait for their verdicts.
INTERVAL = 0.5
FALL = 2
RISE = 2
FAST_HEALTH = (
    "--health-interval",
    str(INTERVAL),
    "--fall",
    str(FALL),
    "--rise",
    str(RISE),
)
# Generous slack on top of what the configured intervals promise: a loaded
# two-core machine runs node, twistd and the test at once.
MARGIN = 3.0


def tail(path: Path, limit: int = 20000) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bind 0, then close)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout``."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def rss_kib(pid: int) -> int:
    """The resident set size of ``pid`` in KiB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Backend:
    """A running ``backend.js``."""

    def __init__(self, proc: subprocess.Popen, port: int, mode: str, log: Path):
        self.proc = proc
        self.port = port
        self.mode = mode
        self.log = log

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def counts(self, prefix: str = "", host: str | None = None) -> dict:
        """{started, completed, aborted, cancelled, urls} for requests whose
        target starts with ``prefix`` (and whose Host is ``host``)."""
        query = "prefix=" + quote(prefix, safe="")
        if host is not None:
            query += "&host=" + quote(host, safe="")
        resp = get(self.port, "/__count?" + query)
        assert resp.status == 200, resp
        return resp.json()

    def kill(self) -> None:
        """SIGKILL, as a crash would (a stopped process is woken to die)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def freeze(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after L{freeze}."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def set_health(self, status: int) -> None:
        """What ``GET /__health`` answers from now on (503 adds Retry-After)."""
        with RawClient(self.port, timeout=10) as client:
            resp = client.request("POST", f"/__health?status={status}")
        assert resp.status == 204, resp


class Balancer:
    """A running ``twistd -n balancer``."""

    def __init__(self, proc, port, log, backends_file, args):
        self.proc = proc
        self.port = port
        self.log = log
        self.backends_file = backends_file
        self.args = args

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        return stop_process(self.proc, timeout)

    def log_count(self, text: str) -> int:
        """How many lines of the balancer's log contain ``text``."""
        return sum(1 for line in self.log_text().splitlines() if text in line)

    def wait_for_log(self, text: str, timeout: float, count: int = 1) -> None:
        """Wait until at least ``count`` lines of the log contain ``text``."""
        wait_for(
            lambda: self.log_count(text) >= count,
            timeout,
            f"{count} line(s) with {text!r} in {self.log}",
        )


def write_backends(path: Path, entries) -> Path:
    """Write a backends file: each entry is a Backend or a line of text."""
    lines = ["# written by the integration tests"]
    for entry in entries:
        lines.append(entry.address if isinstance(entry, Backend) else str(entry))
    path.write_text("\n".join(lines) + "\n")
    return path


def twistd_command(*args: str) -> list[str]:
    return [TWISTD, *args]


def start_twistd(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            args,
            cwd=str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def json_body(resp) -> dict:
    return json.loads(resp.body)


def port_of(resp) -> int:
    """The port of the ``backend.js`` (normal or delay mode) that answered."""
    text = resp.text.strip()
    assert text.startswith("Response from server on port "), (resp.status, text)
    return int(text.rsplit(" ", 1)[1])


def get_from(
    source: str,
    port: int,
    target: str = "/",
    headers=None,
    timeout: float = 30.0,
):
    """One GET to the balancer on 127.0.0.1:port from the address ``source``
    (any 127.x address: the socket is bound to it before connecting)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect((HOST, port))
    except BaseException:
        sock.close()
        raise
    with RawClient.wrap(sock) as client:
        return client.request("GET", target, headers)
