"""
``--workers 2`` through the real ``twistd balancer``: a master and two worker
processes sharing the listening socket, over real sockets.  Which worker
served what is read from the master's ``/status`` (``worker_processes``);
what the backends received from their own counts (``/__count``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from .admin_support import Traffic, admin, backend_status, start_with_admin, status
from .httpraw import RawClient, build_request, get
from .support import HOST, MARGIN, START_TIMEOUT, accepts, pid_alive, port_of, wait_for

pytestmark = pytest.mark.integration


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (from /proc)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.extend(int(p) for p in f.read().split())
    return found


def worker_pids(admin_port: int) -> list[int]:
    return [w["pid"] for w in status(admin_port)["worker_processes"]]


def wait_ready(admin_port: int, n: int = 2) -> list[dict]:
    """Wait until ``n`` workers have taken their configuration."""
    return wait_for(
        lambda: (lambda ws: ws if sum(w["ready"] for w in ws) == n else None)(
            status(admin_port)["worker_processes"]),
        START_TIMEOUT, f"{n} workers ready")


def start_workers(balancer, entries, *options):
    lb, admin_port = start_with_admin(balancer, entries, "--workers", "2", *options)
    wait_ready(admin_port)
    return lb, admin_port


def until_both_served(port: int, admin_port: int, prefix: str, headers=None,
                      limit: int = 4000) -> list[int]:
    """
    Send GETs on fresh connections from 4 threads until both workers served
    some (the kernel decides which accepts), at most ``limit``; the backend
    port that answered each.
    """
    ports: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        resp = get(port, f"{prefix}{i}", headers)
        assert resp.status == 200, resp
        with lock:
            ports.append(port_of(resp))

    sent = 0
    with ThreadPoolExecutor(4) as pool:
        while sent < limit:
            list(pool.map(one, range(sent, sent + 100)))
            sent += 100
            time.sleep(1.2)  # a report from each worker
            if all(w["requests"] > 0 for w in status(admin_port)["worker_processes"]):
                return ports
    raise AssertionError(f"one worker served all of {sent} requests")


def test_two_workers_spread_requests_and_status_shows_the_totals(backend, balancer):
    """Two worker processes run under the master and both serve requests,
    spread over both backends; once the workers reported, the master's
    /status totals equal what the backends received."""
    backends = [backend() for _ in range(2)]
    lb, admin_port = start_workers(balancer, backends)
    pids = worker_pids(admin_port)
    assert sorted(pids) == sorted(children(lb.pid)), (pids, children(lb.pid))
    assert status(admin_port)["workers"] == 2

    ports = until_both_served(lb.port, admin_port, "/spread/")
    assert set(ports) == {b.port for b in backends}

    received = {b.address: b.counts("/spread/")["started"] for b in backends}
    assert sum(received.values()) == len(ports)

    def totals_match():
        shown = {b["address"]: b["responses"]["2xx"]
                 for b in status(admin_port)["pools"]["default"]["backends"]}
        return shown == received

    wait_for(totals_match, 5 + MARGIN, f"/status totals {received}")
    # An open client connection is counted by the worker holding it.
    with RawClient(lb.port) as idle:
        assert idle.request("GET", "/idle").status == 200
        wait_for(lambda: status(admin_port)["listeners"][0]["connections"] == 1,
                 5 + MARGIN, "the open connection in /status")
    metrics = admin(admin_port, "GET", "/metrics").text
    total = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
        if line.startswith("txbalancer_backend_requests_total{") and 'code="2xx"' in line
    )
    assert total == len(ports) + 1, total  # and /idle


def test_kill_9_of_a_worker_under_load(backend, balancer):
    """A worker killed with SIGKILL while clients keep sending: new
    connections are always accepted, only requests on the dead worker's
    connections fail (at most one per client), and the worker comes back."""
    backends = [backend() for _ in range(2)]
    lb, admin_port = start_workers(balancer, backends)
    victim = worker_pids(admin_port)[0]
    refused = []
    probing = threading.Event()

    def probe() -> None:
        while not probing.is_set():
            if not accepts(lb.port):
                refused.append(time.monotonic())
            time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    with Traffic(lb.port, threads=3, seconds=60) as traffic:
        prober.start()
        traffic.wait_for_more(100)
        os.kill(victim, signal.SIGKILL)
        workers = wait_for(
            lambda: (lambda ws: ws if ws[0]["pid"] not in (None, victim)
                     and ws[0]["ready"] else None)(status(admin_port)["worker_processes"]),
            START_TIMEOUT + MARGIN, "the killed worker back")
        traffic.wait_for_more(200)
    probing.set()
    prober.join(10)
    assert workers[0]["restarts"] == 1, workers
    assert workers[0]["pid"] in children(lb.pid)
    assert refused == [], f"{len(refused)} connections refused"
    print(f"kill -9 under load: {len(traffic.failures)} of {traffic.sent} failed: "
          f"{traffic.failures}")
    assert len(traffic.failures) <= 3, traffic.failures
    assert traffic.ok > 300


def test_admin_api_and_sighup_reach_every_worker(backend, balancer):
    """Disabling a backend through the master's admin API takes it out in
    both workers; SIGHUP (a reload undoes run-time changes) puts it back in
    both; a backend added through the API is used by both."""
    a, b, c = backend(), backend(), backend()
    lb, admin_port = start_workers(balancer, [a, b])
    resp = admin(admin_port, "POST", f"/backends/{a.address}/disable")
    assert resp.status == 200, resp
    time.sleep(0.5)  # the master pushes changes within 0.2 s
    ports = until_both_served(lb.port, admin_port, "/disabled/")
    assert set(ports) == {b.port}, ports

    os.kill(lb.pid, signal.SIGHUP)
    wait_for(lambda: backend_status(admin_port, a.address)["state"] == "up",
             5 + MARGIN, "a enabled again")
    time.sleep(0.5)
    before = a.counts("/after-hup/")["started"]
    assert before == 0
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda i: port_of(get(lb.port, f"/after-hup/{i}")), range(200)))
    assert set(served) == {a.port, b.port}, served

    resp = admin(admin_port, "POST", "/backends", {"address": c.address})
    assert resp.status in (200, 201), resp
    time.sleep(0.5)
    seen_by = {}
    for w in range(40):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: get(lb.port, f"/added/{w}/{i}"), range(30)))
        time.sleep(1.2)
        now = {x["pid"]: x["requests"] for x in status(admin_port)["worker_processes"]}
        seen_by = now
        if c.counts("/added/")["started"] and all(now.values()):
            break
    assert c.counts("/added/")["started"] > 0, seen_by


def test_sigterm_drains_the_workers_and_exits_0(backend, balancer):
    """SIGTERM to the master: a request in flight in a worker finishes with
    200, the listening socket closes, the workers exit and the master exits
    with status 0."""
    slow = backend("delay", DELAY_MS=1500)
    lb, admin_port = start_workers(balancer, [slow], "--drain-timeout", "20")
    pids = worker_pids(admin_port)
    client = RawClient(lb.port, timeout=30)
    client.send(build_request("GET", "/in-flight"))
    wait_for(lambda: slow.counts("/in-flight")["started"] == 1, 10, "the slow request")
    os.kill(lb.pid, signal.SIGTERM)
    resp = client.response()
    client.close()
    assert resp.status == 200, resp
    assert lb.proc.wait(30) == 0, lb.log_text()[-3000:]
    assert not accepts(lb.port)
    for pid in pids:
        wait_for(lambda: not pid_alive(pid), 5, f"worker {pid} gone")


def test_sticky_cookie_is_honoured_by_every_worker(backend, balancer):
    """One secret for all workers: a cookie set by one worker sends the
    request to the same backend whichever worker accepts it."""
    backends = [backend() for _ in range(3)]
    lb, admin_port = start_workers(balancer, backends, "--sticky-cookie", "srv")
    first = get(lb.port, "/first")
    cookie = next(h for h in first.values("Set-Cookie") if h.startswith("srv="))
    value = cookie.split(";", 1)[0]
    home = port_of(first)
    ports = until_both_served(lb.port, admin_port, "/sticky/", [("Cookie", value)])
    assert set(ports) == {home}, ports


def test_max_conns_is_shared_between_the_workers(backend, balancer):
    """max_conns=2 with 2 workers: each worker may have 1 request in flight
    to the backend, so of 6 concurrent slow requests at most 2 are served
    and the rest get 503 at once; /status shows the configured limit."""
    slow = backend("delay", DELAY_MS=1500)
    lb, admin_port = start_workers(balancer, [f"{slow.address} max_conns=2"])
    assert backend_status(admin_port, slow.address)["max_conns"] == 2
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: get(lb.port, f"/limited/{i}").status, range(6)))
    assert 1 <= answers.count(200) <= 2, answers
    assert answers.count(503) == 6 - answers.count(200), answers
    assert slow.counts("/limited/")["started"] == answers.count(200)


def test_tcp_mode_with_two_workers(backend, balancer):
    """TCP mode with --workers 2: connections are relayed to both backends
    by both workers."""
    backends = [backend() for _ in range(2)]
    lb, admin_port = start_workers(balancer, backends, "--mode", "tcp")
    ports = until_both_served(lb.port, admin_port, "/tcp/")
    assert set(ports) == {b.port for b in backends}


def test_workers_option_is_checked(balancer_command, tmp_path):
    """--workers 0 is a usage error naming the option."""
    import subprocess

    from .support import twistd_command

    out = subprocess.run(
        twistd_command("-n", "--pidfile=", "balancer", "--backends", os.devnull,
                       "--workers", "0"),
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert out.returncode != 0
    assert "--workers" in out.stdout + out.stderr


def test_tls_listener_with_two_workers(backend, balancer, tmp_path):
    """A --tls listener with --workers 2: both workers terminate TLS with
    the certificate and serve HTTPS requests."""
    import socket
    import ssl

    from test_tls import PKI  # tests/ is on sys.path

    from .support import free_port

    spec = PKI(str(tmp_path)).server("www", "www.example")
    b = backend()
    tls_port = free_port()
    lb, admin_port = start_workers(
        balancer, [b], "--tls", f"{tls_port}:cert={spec.cert}:key={spec.key}:interface={HOST}")
    ctx = ssl.create_default_context(cafile=spec.cert)

    def one(i: int) -> int:
        raw = socket.create_connection((HOST, tls_port), timeout=15)
        s = ctx.wrap_socket(raw, server_hostname="www.example")
        with RawClient.wrap(s) as client:
            resp = client.request("GET", f"/tls/{i}", host="www.example")
        return port_of(resp)

    for _ in range(20):
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(one, range(40))) == {b.port}
        time.sleep(1.2)
        if all(w["requests"] for w in status(admin_port)["worker_processes"]):
            break
    assert all(w["requests"] for w in status(admin_port)["worker_processes"])


def test_workers_exit_when_the_master_dies(backend, balancer):
    """The master killed with SIGKILL: its workers see the channel close,
    drain and exit."""
    lb, admin_port = start_workers(balancer, [backend()])
    pids = worker_pids(admin_port)
    os.kill(lb.pid, signal.SIGKILL)
    lb.proc.wait(10)
    for pid in pids:
        wait_for(lambda: not pid_alive(pid), 10 + MARGIN, f"worker {pid} gone")


def test_sighup_with_a_changed_backends_file_reaches_every_worker(backend, balancer):
    """SIGHUP after the backends file changed: the master reloads and both
    workers send only to the new set of backends."""
    from .support import write_backends

    a, b, c = backend(), backend(), backend()
    lb, admin_port = start_workers(balancer, [a, b])
    write_backends(lb.backends_file, [b, c])
    os.kill(lb.pid, signal.SIGHUP)
    wait_for(lambda: {x["address"] for x in status(admin_port)["pools"]["default"]["backends"]}
             == {b.address, c.address}, 5 + MARGIN, "the reload in the master")
    time.sleep(0.5)  # pushed within 0.2 s
    before = {w["pid"]: w["requests"] for w in status(admin_port)["worker_processes"]}
    ports = until_both_served(lb.port, admin_port, "/reloaded/")
    after = {w["pid"]: w["requests"] for w in status(admin_port)["worker_processes"]}
    assert all(after[p] > before[p] for p in after), (before, after)
    assert set(ports) == {b.port, c.port}, ports
    assert a.counts("/reloaded/")["started"] == 0


def test_access_log_written_by_both_workers(backend, balancer, tmp_path):
    """--access-log with --workers 2: both workers append to the one file,
    one whole line per request, none cut or lost."""
    import re

    path = tmp_path / "access.log"
    lb, admin_port = start_workers(balancer, [backend()], "--access-log", str(path))
    ports = until_both_served(lb.port, admin_port, "/log/")
    assert lb.stop() == 0
    lines = [line for line in path.read_text().splitlines() if "/log/" in line]
    pattern = re.compile(r'^127\.0\.0\.1 - - \[[^\]]+\] "GET /log/\d+ HTTP/1\.1" 200 \d+ ')
    bad = [line for line in lines if not pattern.match(line)]
    assert bad == [], bad[:5]
    assert len(lines) == len(ports)


def test_daemonized_master_logs_its_workers(backend, tmp_path):
    """A daemonized twistd (no -n) with --workers 2: the workers' log lines,
    their graceful stop included, are in the master's log file."""
    import subprocess

    from .support import free_port, twistd_command, write_backends

    port = free_port()
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    backends = write_backends(tmp_path / "backends.txt", [backend()])
    subprocess.run(
        twistd_command(f"--pidfile={pidfile}", f"--logfile={logfile}", "balancer",
                       "--port", f"tcp:{port}:interface={HOST}",
                       "--backends", str(backends), "--workers", "2"),
        cwd=tmp_path, check=True, timeout=60)
    pid = wait_for(lambda: pidfile.exists() and int(pidfile.read_text()), 15, "the pid file")
    try:
        wait_for(lambda: logfile.read_text().count(") serving") == 2, START_TIMEOUT,
                 "both workers serving")
        assert get(port, "/daemon").status == 200
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid), 30, "the master gone")
    text = logfile.read_text()
    for index in (0, 1):
        assert f"[worker {index} pid " in text
    assert text.count("] stopped") >= 3, text[-3000:]  # both workers and the master


def test_ip_hash_is_the_same_in_every_worker(backend, balancer):
    """--strategy ip-hash with --workers 2: each client address goes to one
    backend whichever worker accepts its connection."""
    from .support import get_from

    backends = [backend() for _ in range(3)]
    lb, admin_port = start_workers(balancer, backends, "--strategy", "ip-hash")
    sources = [f"127.0.0.{i}" for i in range(2, 14)]
    homes: dict[str, set] = {s: set() for s in sources}
    for round_ in range(30):
        with ThreadPoolExecutor(4) as pool:
            for source, resp in zip(
                    sources * 4,
                    pool.map(lambda s: get_from(s, lb.port, f"/h/{round_}"), sources * 4)):
                assert resp.status == 200, resp
                homes[source].add(port_of(resp))
        time.sleep(1.2)
        if all(w["requests"] for w in status(admin_port)["worker_processes"]):
            break
    assert all(w["requests"] for w in status(admin_port)["worker_processes"])
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) > 1, homes


def test_a_hung_worker_is_killed_and_started_again(backend, balancer):
    """A worker that stops answering (SIGSTOP: its reactor is stuck) is
    killed after 15 s without a report and started again; the other serves
    meanwhile."""
    lb, admin_port = start_workers(balancer, [backend()])
    victim = worker_pids(admin_port)[0]
    os.kill(victim, signal.SIGSTOP)
    try:
        assert get(lb.port, "/while-hung").status == 200
        workers = wait_for(
            lambda: (lambda ws: ws if ws[0]["pid"] not in (None, victim)
                     and ws[0]["ready"] else None)(status(admin_port)["worker_processes"]),
            15 + 5 + START_TIMEOUT, "the hung worker replaced")
    finally:
        if pid_alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert workers[0]["restarts"] == 1
    lb.wait_for_log("sent nothing for", 5)


def test_sigterm_to_one_worker_drains_it_and_it_is_started_again(backend, balancer):
    """SIGTERM to a worker (not the master): its request in flight finishes
    with 200, it exits, and the master starts it again."""
    slow = backend("delay", DELAY_MS=2000)
    lb, admin_port = start_workers(balancer, [slow])
    clients = []
    for i in range(6):  # on fresh connections: some land on each worker
        client = RawClient(lb.port, timeout=30)
        client.send(build_request("GET", f"/slow/{i}"))
        clients.append(client)
    wait_for(lambda: slow.counts("/slow/")["started"] == 6, 10, "the slow requests")
    time.sleep(1.2)
    busy = [w for w in status(admin_port)["worker_processes"]]
    victim = max(busy, key=lambda w: w["requests"])["pid"]
    os.kill(victim, signal.SIGTERM)
    answers = [c.response().status for c in clients]
    for c in clients:
        c.close()
    assert answers == [200] * 6
    wait_for(lambda: not pid_alive(victim), 10, "the worker gone")
    wait_ready(admin_port)
    lb.wait_for_log(f"(pid {victim}) died (exit status 0)", 5)
