"""
Socket activation as systemd does it: the listening socket is passed in as
file descriptor 3 with LISTEN_FDS and LISTEN_PID, and the balancer, given
``--port systemd:domain=INET:index=0``, serves on it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from .httpraw import get
from .support import HOST, START_TIMEOUT, stop_process, tail, twistd_command, write_backends

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_socket_activation(backend, tmp_path, workers):
    """twistd balancer serves on a socket it inherited, as from
    etc/txbalancer.socket; with --workers 2, the workers serve on it."""
    b = backend()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    backends = write_backends(tmp_path / "backends.txt", [b])
    args = twistd_command(
        "--nodaemon", "--pidfile=", "balancer",
        "--port", "systemd:domain=INET:index=0", "--backends", str(backends),
        "--workers", str(workers),
    )
    fd = listener.fileno()
    # What systemd does before exec: the socket becomes fd 3, and
    # LISTEN_PID is the pid of the process that will serve it (exec keeps it).
    wrapper = (
        "import os, sys\n"
        "fd = int(sys.argv[1])\n"
        "if fd != 3:\n"
        "    os.dup2(fd, 3)\n"
        "    os.close(fd)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    log = tmp_path / "balancer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", wrapper, str(fd), *args],
            cwd=str(tmp_path),
            env={**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "http"},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            pass_fds=(fd,),
        )
    listener.close()  # only the balancer holds it now
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "pool default: balancing" not in log.read_text(errors="replace"):
            assert proc.poll() is None, tail(log)
            assert time.monotonic() < deadline, tail(log)
            time.sleep(0.05)
        resp = get(port, "/activated")
        assert resp.status == 200, (resp, tail(log))
        if workers > 1:
            # Both workers adopted the inherited socket.
            while log.read_text(errors="replace").count(") serving") < 2:
                assert proc.poll() is None, tail(log)
                assert time.monotonic() < deadline + START_TIMEOUT, tail(log)
                time.sleep(0.05)
            assert get(port, "/again").status == 200
    finally:
        stop_process(proc)
