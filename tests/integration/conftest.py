"""
Fixtures for the integration tests: real Node.js backends and the real
``twistd balancer`` command, as subprocesses on 127.0.0.1.

Every process started here is stopped by its PID in a finalizer, and the
logs of the processes a failed test used are attached to its report.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .support import (
    BACKEND_JS,
    HOST,
    START_TIMEOUT,
    Backend,
    Balancer,
    accepts,
    free_port,
    start_twistd,
    tail,
    twistd_command,
    write_backends,
)

_logs_key = pytest.StashKey[list]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, path in item.stash.get(_logs_key, []):
            report.sections.append((f"log of {name}", tail(path)))


def _attach_log(request, name: str, path: Path) -> None:
    logs = request.node.stash.setdefault(_logs_key, [])
    logs.append((name, path))


@pytest.fixture
def attach_log(request):
    """``attach_log(name, path)``: show that file in the report if the test fails."""

    def attach(name: str, path: Path) -> None:
        _attach_log(request, name, path)

    return attach


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable; skipped when missing, except in CI where it fails."""
    path = shutil.which("node")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is required for the integration tests (CI=true)")
        pytest.skip("node not found on PATH: the integration tests need Node.js")
    return path


@pytest.fixture
def backend(node, tmp_path, request):
    """Factory: ``backend(mode="normal", *, port=0, **env)`` starts a Node
    backend on a free port (or on ``port``, to bring a killed one back)."""
    started: list[Backend] = []

    def start(mode: str = "normal", *, port: int = 0, **env: object) -> Backend:
        n = len(started)
        log = tmp_path / f"backend-{n}-{mode}.log"
        full_env = dict(os.environ)
        full_env.update({k: str(v) for (k, v) in env.items()})
        with open(log, "wb") as errors:
            proc = subprocess.Popen(
                [node, str(BACKEND_JS), str(port), mode],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                env=full_env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
            if not ready:
                proc.kill()
                proc.wait()
                raise AssertionError(f"backend did not start in time: {tail(log)}")
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                proc.wait()
                raise AssertionError(f"backend exited: {tail(log)}")
            line += byte
        port = int(line.split()[1])
        b = Backend(proc, port, mode, log)
        started.append(b)
        _attach_log(request, f"backend {mode} on {port}", log)
        return b

    yield start
    for b in started:
        b.kill()
        if b.proc.stdout:
            b.proc.stdout.close()


def _launch(request, tmp_path, started, name, port, options, backends_file=None) -> Balancer:
    """Run ``twistd -n balancer *options``; return once it accepts on ``port``."""
    log = tmp_path / f"{name}.log"
    args = twistd_command("-n", "--pidfile=", "balancer", *options)
    proc = start_twistd(args, tmp_path, log)
    b = Balancer(proc, port, log, backends_file, args)
    started.append(b)
    _attach_log(request, name, log)
    deadline = time.monotonic() + START_TIMEOUT
    while not accepts(port):
        if proc.poll() is not None:
            raise AssertionError(
                f"balancer exited with {proc.returncode} before listening:\n{tail(log)}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"balancer not listening on {port} after {START_TIMEOUT} s:\n{tail(log)}"
            )
        time.sleep(0.05)
    return b


def _stop_all(started) -> None:
    problems = []
    for b in started:
        b.stop()
        text = b.log_text()
        for marker in ("Unhandled error in Deferred", "Unhandled Error"):
            if marker in text:
                problems.append(f"{b.log}: {marker!r} in the balancer's log")
    if problems:
        pytest.fail("\n".join(problems))


@pytest.fixture
def balancer(tmp_path, request):
    """Factory: ``balancer(entries, *options)`` runs ``twistd -n balancer`` on a free port.

    ``entries`` are Backends or backends-file lines. It returns once the
    balancer accepts connections. At teardown the balancer gets SIGTERM (then
    SIGKILL), and its log must hold no unhandled error.
    """
    started: list[Balancer] = []

    def start(entries, *options: str, name: str | None = None) -> Balancer:
        name = name or f"balancer-{len(started)}"
        backends_file = write_backends(tmp_path / f"{name}-backends.txt", entries)
        port = free_port()
        return _launch(
            request, tmp_path, started, name, port,
            ["--port", f"tcp:{port}:interface={HOST}", "--backends", str(backends_file),
             *options],
            backends_file,
        )

    yield start
    _stop_all(started)


@pytest.fixture
def balancer_command(tmp_path, request):
    """Factory: ``balancer_command(port, *options)`` runs ``twistd -n balancer
    *options`` as given (say ``--config FILE``, whose listener is on ``port``)
    and returns once it accepts on ``port``; stopped like ``balancer``'s."""
    started: list[Balancer] = []

    def start(port: int, *options: str, name: str | None = None) -> Balancer:
        name = name or f"balancer-{len(started)}"
        return _launch(request, tmp_path, started, name, port, list(options))

    yield start
    _stop_all(started)
