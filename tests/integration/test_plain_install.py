"""After a plain ``pip install .`` (no extras), as README.rst says, every
option works: ``--http2`` included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_tls import PKI  # tests/ is on sys.path (pytest's rootdir-relative import)

from .httpraw import HOST
from .support import START_TIMEOUT, accepts, free_port, stop_process, tail, write_backends

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 900  # seconds: a bound for a stuck pip, never a measurement


@pytest.fixture(scope="module")
def plain_venv(tmp_path_factory) -> Path:
    """A new virtualenv with nothing but ``pip install .`` of this checkout."""
    venv = tmp_path_factory.mktemp("plain") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return venv


def test_plain_install_has_h2_and_prometheus(plain_venv):
    """A plain install brings h2 (for --http2) and prometheus_client (for /metrics)."""
    done = subprocess.run(
        [str(plain_venv / "bin" / "python"), "-c", "import h2, prometheus_client"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_http2_after_plain_install(plain_venv, backend, tmp_path):
    """`twistd balancer --http2 --tls ...` from a plain install serves curl over HTTP/2."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed (.ci/run installs it)")
    be = backend()
    pki = PKI(str(tmp_path))
    spec = pki.server("lb", "localhost")
    port = free_port()
    log = tmp_path / "balancer.log"
    args = [
        str(plain_venv / "bin" / "twistd"), "-n", "--pidfile=", "balancer",
        "--backends", str(write_backends(tmp_path / "backends.txt", [be])),
        "--tls", f"{port}:cert={spec.cert}:key={spec.key}:interface={HOST}",
        "--http2",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(port):
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"not listening:\n{tail(log)}"
            time.sleep(0.05)
        done = subprocess.run(
            [
                curl, "-sS", "--http2", "--cacert", pki.caPath,
                "--resolve", f"localhost:{port}:{HOST}",
                "-w", "\n%{http_version} %{http_code}",
                f"https://localhost:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr + tail(log)
        body, _, status = done.stdout.rpartition("\n")
        assert status == "2 200", (done.stdout, tail(log))
        assert body.strip() == f"Response from server on port {be.port}"
    finally:
        stop_process(proc)
