"""The balancer mounted in a twisted.web site: etc/example.tac run as is with ``twistd -ny``."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .httpraw import HOST, get
from .support import (
    START_TIMEOUT,
    accepts,
    free_port,
    port_of,
    stop_process,
    tail,
    twistd_command,
)
from .test_memory import CHECK, CLIENT_RATE, LIMIT_KIB, PATTERN, RssWatcher

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "example.tac"
MIB = 1024**2


class Site:
    """A running ``twistd -ny example.tac``."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def example_site(tmp_path, attach_log):
    """Factory: ``example_site(backends, streaming=True)`` copies etc/example.tac
    into a temporary directory with a ``public/`` directory beside it, and runs
    it with ``twistd -ny`` on a free port; with ``streaming=False`` the copy
    uses a plain twisted.web Site instead of StreamingSite."""
    started: list[Site] = []

    def start(backends, streaming: bool = True) -> Site:
        n = len(started)
        workdir = tmp_path / f"site-{n}"
        (workdir / "public").mkdir(parents=True)
        (workdir / "public" / "hello.txt").write_text("hello from the static directory\n")
        text = EXAMPLE.read_text()
        if not streaming:
            for old, new in [
                ("from txbalancer.resource import StreamingSite\n",
                 "from twisted.web.server import Site\n"),
                ("site = StreamingSite(root)\n", "site = Site(root)\n"),
            ]:
                assert text.count(old) == 1, old
                text = text.replace(old, new)
        (workdir / "example.tac").write_text(text)
        port = free_port()
        env = dict(os.environ)
        env["TXB_BACKENDS"] = ",".join(b.address for b in backends)
        env["TXB_PORT"] = f"tcp:{port}:interface={HOST}"
        env.pop("TXB_STATIC", None)  # the default, "public", beside the .tac
        log = workdir / "twistd.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                twistd_command("--pidfile=", "-ny", "example.tac"),
                cwd=str(workdir),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        site = Site(proc, port, log)
        started.append(site)
        attach_log(f"example.tac {n}", log)
        deadline = time.monotonic() + START_TIMEOUT
        while not accepts(port):
            if proc.poll() is not None:
                raise AssertionError(f"twistd exited with {proc.returncode}:\n{tail(log)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"example.tac not listening after {START_TIMEOUT} s")
            time.sleep(0.05)
        return site

    yield start
    problems = []
    for site in started:
        stop_process(site.proc)
        text = site.log.read_text(errors="replace")
        for marker in ("Unhandled error in Deferred", "Unhandled Error", "Traceback"):
            if marker in text:
                problems.append(f"{site.log}: {marker!r} in the log")
    if problems:
        pytest.fail("\n".join(problems))


def test_readme_shows_the_example_verbatim():
    """README.rst holds etc/example.tac line for line, as a literal block."""
    readme = (REPO / "README.rst").read_text()
    block = "".join(
        ("    " + line if line.strip() else "\n")
        for line in EXAMPLE.read_text().splitlines(keepends=True)
    )
    assert block in readme


def test_static_and_api(backend, example_site):
    """The example serves its static directory and passes /api/... to a backend as /..., query byte-exact."""
    echo = backend("echo")
    site = example_site([echo])
    resp = get(site.port, "/static/hello.txt")
    assert resp.status == 200
    assert resp.text == "hello from the static directory\n"
    resp = get(site.port, "/api/items/a%2Fb?q=%2F&x", headers=[("X-Test", "1")])
    assert resp.status == 200, resp
    seen = resp.json()
    assert seen["url"] == "/items/a%2Fb?q=%2F&x"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-test"] == "1"
    assert headers["x-forwarded-for"] == HOST
    assert headers["host"] == "example.test"


def test_failover_when_a_backend_is_killed(backend, example_site):
    """With one of two backends killed, every request is answered by the other."""
    a, b = backend(), backend()
    site = example_site([a, b])
    ports = {port_of(get(site.port, "/api/")) for _ in range(6)}
    assert ports == {a.port, b.port}
    a.kill()
    for i in range(10):
        resp = get(site.port, f"/api/after-kill/{i}")
        assert resp.status == 200, resp
        assert port_of(resp) == b.port


def test_200mib_download_through_slow_client(backend, example_site):
    """A 200 MiB response read slowly through the resource leaves twistd's RSS growth under 64 MiB."""
    size = 200 * MIB
    site = example_site([backend("big", BYTES=size)])
    for _ in range(3):
        assert get(site.port, "/api/__normal").status == 200
    conn = http.client.HTTPConnection(HOST, site.port, timeout=60)
    view = memoryview(bytearray(256 * 1024))
    received = 0
    with RssWatcher(site.pid) as rss:
        conn.request("GET", f"/api/__big?bytes={size}")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Length") == str(size)
        start = time.monotonic()
        while True:
            n = resp.readinto(view)
            if not n:
                break
            offset = received % 256
            assert view[:n] == CHECK[offset : offset + n], f"wrong bytes after {received}"
            received += n
            ahead = received / CLIENT_RATE - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        conn.close()
    assert received == size
    print(f"resource download 200 MiB: RSS {rss.baseline // 1024} MiB, grew by {rss.growth_kib} KiB")
    assert rss.growth_kib < LIMIT_KIB, f"RSS grew by {rss.growth_kib // 1024} MiB"


@pytest.mark.parametrize("streaming", [True, False], ids=["StreamingSite", "Site"])
def test_50mib_upload(backend, example_site, streaming):
    """A 50 MiB upload to a slowly reading backend arrives intact and leaves twistd's RSS growth under 64 MiB, streamed or spooled."""
    size = 50 * MIB
    site = example_site([backend("sink", RATE=CLIENT_RATE // 2)], streaming=streaming)
    for _ in range(3):
        assert get(site.port, "/api/__normal").status == 200
    expected = hashlib.sha256()

    def body():
        sent = 0
        while sent < size:
            chunk = PATTERN[: min(len(PATTERN), size - sent)]
            expected.update(chunk)
            sent += len(chunk)
            yield chunk

    conn = http.client.HTTPConnection(HOST, site.port, timeout=120)
    with RssWatcher(site.pid) as rss:
        conn.request(
            "POST",
            "/api/upload",
            body=body(),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        resp = conn.getresponse()
        answer = resp.read()
        conn.close()
    assert resp.status == 200, answer
    result = json.loads(answer)
    kind = "StreamingSite" if streaming else "Site"
    print(f"resource upload 50 MiB via {kind}: RSS {rss.baseline // 1024} MiB, grew by {rss.growth_kib} KiB")
    assert result["bytes"] == size
    assert result["sha256"] == expected.hexdigest()
    assert rss.growth_kib < LIMIT_KIB, f"RSS grew by {rss.growth_kib // 1024} MiB"
