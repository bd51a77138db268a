"""
Backends from DNS SRV with the real twistd: a DNS server started by the
test on 127.0.0.1 whose records change while traffic flows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .httpraw import HOST, get
from .support import MARGIN, START_TIMEOUT, free_port, port_of, stop_process, wait_for
from .test_reload_live import Stream

pytestmark = pytest.mark.integration

NAME = "_http._tcp.app.test"
DNS_SERVER = Path(__file__).resolve().parent / "dnsserver.py"


class DNSServer:
    def __init__(self, proc: subprocess.Popen, port: int, zone: Path, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.zone = zone
        self.log = log

    def serve(self, *backends, ttl: int = 1, name: str = NAME) -> None:
        """
        Answer NAME with these (backend, weight, priority) records.
        """
        records = [
            {"target": f"b{b.port}.app.test", "port": b.port, "weight": weight,
             "priority": priority, "address": "127.0.0.1"}
            for b, weight, priority in backends
        ]
        tmp = self.zone.with_suffix(".tmp")
        tmp.write_text(json.dumps({name: {"ttl": ttl, "records": records}}))
        tmp.replace(self.zone)


@pytest.fixture
def dns_server(tmp_path, attach_log):
    """A DNS server on UDP 127.0.0.1 answering from a file the test rewrites."""
    zone = tmp_path / "zone.json"
    zone.write_text("{}")
    log = tmp_path / "dns.log"
    attach_log("dns server", log)
    err = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, str(DNS_SERVER), str(zone)],
        stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
    )
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("listening "), line
        yield DNSServer(proc, int(line.split()[1]), zone, log)
    finally:
        stop_process(proc)
        proc.stdout.close()
        err.close()


def test_srv_backends_follow_dns_under_traffic(backend, balancer, dns_server):
    """Records added, removed and reweighted while requests flow: zero failed requests, new targets get traffic, removed ones stop, a failed lookup keeps the last good set."""
    a, b, c = backend(), backend(), backend()
    dns_server.serve((a, 1, 10), (b, 1, 10))
    lb = balancer(
        [], "--backends", f"srv:{NAME}", "--dns-server", f"127.0.0.1:{dns_server.port}",
    )
    lb.wait_for_log(f"srv:{NAME}: 2 backends", START_TIMEOUT)
    assert {port_of(get(lb.port, f"/{i}")) for i in range(6)} == {a.port, b.port}

    stream = Stream(lb.port)
    stream.start()
    try:
        wait_for(lambda: stream.sent > 50, 30, "the first requests")
        changes = 1  # the first answer was applied at start-up

        def change(*records) -> None:
            nonlocal changes
            dns_server.serve(*records)
            changes += 1
            lb.wait_for_log("reload applied", 10 * MARGIN, count=changes)

        # c appears: it gets traffic.
        change((a, 1, 10), (b, 1, 10), (c, 1, 10))
        mark = stream.snapshot()
        wait_for(lambda: stream.snapshot()[c.port] > mark[c.port] + 10, 30,
                 "traffic to c")

        # a goes away, c weighs 4, b becomes a backup level.
        change((c, 4, 10), (b, 1, 20))
        # Logged once the requests that were in flight to a are done.
        lb.wait_for_log(f"backend {a.address} removed", 10 * MARGIN)
        mark = stream.snapshot()
        wait_for(lambda: sum(stream.snapshot().values()) > sum(mark.values()) + 100,
                 30, "100 more requests")
        now = stream.snapshot()
        assert now[a.port] == mark[a.port], "a got requests after its record went"
        assert now[b.port] == mark[b.port], "b, a backup level, got requests"

        # The name disappears (NXDOMAIN): the last good set keeps serving.
        dns_server.serve((c, 1, 10), name="_other._tcp.app.test")
        lb.wait_for_log("lookup failed", 10 * MARGIN)
        mark = stream.snapshot()
        wait_for(lambda: sum(stream.snapshot().values()) > sum(mark.values()) + 50,
                 30, "50 more requests after the failed lookup")
        assert stream.snapshot()[c.port] > mark[c.port]
    finally:
        stream.stop()
    assert stream.failures == [], stream.failures[:5]
    print(f"requests: {stream.sent}, failures: {len(stream.failures)}, "
          f"served: {dict(stream.served)}")


def test_config_file_routes_and_srv_pool_reload(backend, balancer_command, dns_server, tmp_path):
    """With --config, a pool from srv: and a routed pool from a backends file: SIGHUP adds a route and a backend, DNS adds a target, and a request stream sees no failure."""
    api1, api2, web1, web2 = backend(), backend(), backend(), backend()
    dns_server.serve((api1, 1, 0))
    port = free_port()
    web_file = tmp_path / "web-backends.txt"
    web_file.write_text(f"{web1.address}\n")
    config = tmp_path / "balancer.toml"

    def write(extra_route: str = "") -> None:
        config.write_text(
            f'[[listen]]\nendpoint = "tcp:{port}:interface={HOST}"\n'
            f'[balancer]\ndns-server = "127.0.0.1:{dns_server.port}"\n'
            f'[pool.api]\nbackends = "srv:{NAME}"\n'
            f'[pool.web]\nbackends_file = "{web_file}"\n'
            + extra_route
            + '[[route]]\npath = "/api/"\npool = "api"\n'
            '[[route]]\npool = "web"\n'
        )

    write()
    lb = balancer_command(port, "--config", str(config))
    lb.wait_for_log(f"srv:{NAME}: 1 backends", START_TIMEOUT)
    assert port_of(get(port, "/api/x")) == api1.port
    assert port_of(get(port, "/x")) == web1.port

    stream = Stream(port)
    stream.start()
    try:
        wait_for(lambda: stream.sent > 50, 30, "the first requests")
        # DNS: api2 joins pool api.
        dns_server.serve((api1, 1, 0), (api2, 1, 0))
        lb.wait_for_log("reload applied", 10 * MARGIN, count=2)
        # SIGHUP: web2 joins pool web, /v2/ routes to api.
        web_file.write_text(f"{web1.address}\n{web2.address}\n")
        write('[[route]]\npath = "/v2/"\npool = "api"\n')
        os.kill(lb.pid, signal.SIGHUP)
        lb.wait_for_log("routes changed", 10 * MARGIN)
        mark = stream.snapshot()
        wait_for(lambda: stream.snapshot()[web2.port] > mark[web2.port] + 10, 30,
                 "traffic to web2")
    finally:
        stream.stop()
    assert stream.failures == [], stream.failures[:5]
    assert {port_of(get(port, f"/api/{i}")) for i in range(6)} == {api1.port, api2.port}
    assert {port_of(get(port, f"/v2/{i}")) for i in range(6)} == {api1.port, api2.port}
    # The srv: pool kept its DNS backends through the SIGHUP.
    assert lb.log_count("pool api: removing backend") == 0


def test_large_answer_over_tcp(backend, balancer, dns_server):
    """An answer too big for UDP (40 records) is fetched again over TCP: every record becomes a backend."""
    live = backend()
    records = [{"target": f"t{i}.app.test", "port": live.port if i == 0 else 1 + i,
                "weight": 1, "priority": 0 if i == 0 else 1, "address": "127.0.0.1"}
               for i in range(40)]
    dns_server.zone.write_text(json.dumps({NAME: {"ttl": 30, "records": records}}))
    lb = balancer(
        [], "--backends", f"srv:{NAME}", "--dns-server", f"127.0.0.1:{dns_server.port}",
    )
    lb.wait_for_log(f"srv:{NAME}: 40 backends", START_TIMEOUT)
    # The one primary (priority 0) serves; the 39 others are a backup level.
    assert {port_of(get(lb.port, f"/{i}")) for i in range(4)} == {live.port}
    queries = dns_server.log.read_text()
    assert f"query {NAME} over UDP" in queries and f"query {NAME} over TCP" in queries
