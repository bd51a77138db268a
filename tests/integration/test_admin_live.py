"""
The admin server of the real twistd balancer over real sockets: /status
and /metrics against what the backends received, the token, the loopback
rule, and drain, add and remove under a continuous stream of requests with
every failure counted.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .admin_support import (
    TRAFFIC_PREFIX,
    Traffic,
    admin,
    backend_status,
    start_with_admin,
    status,
)
from .httpraw import HOST, get
from .support import MARGIN, free_port, twistd_command, wait_for, write_backends

pytestmark = pytest.mark.integration


def received(backend) -> int:
    """Proxied requests the backend really received (health checks excluded)."""
    return backend.counts(TRAFFIC_PREFIX)["started"]


def test_status_and_metrics_equal_what_backends_received(backend, balancer):
    """/status and /metrics count exactly the requests each backend received, by class."""
    backends = [backend(), backend()]
    lb, port = start_with_admin(balancer, backends)
    for i in range(40):
        resp = get(lb.port, f"{TRAFFIC_PREFIX}x/{i}")
        assert resp.status == 200, resp
    resp = get(lb.port, "/__status/503")  # one 5xx, outside the counted prefix
    assert resp.status == 503
    by_address = {b["address"]: b for b in status(port)["pools"]["default"]["backends"]}
    metrics = admin(port, "GET", "/metrics")
    assert metrics.status == 200
    assert metrics.value("Content-Type").startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(metrics.text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    fivexx = 0
    for b in backends:
        n = received(b)
        got = by_address[b.address]
        five = got["responses"]["5xx"]
        fivexx += five
        assert got["requests"] == n + five
        assert got["responses"]["2xx"] == n
        assert got["in_flight"] == 0
        assert got["state"] == "up"
        assert got["latency_ms"]["p50"] is not None
        by_code = {
            labels["code"]: value for labels, value in samples["txbalancer_backend_requests_total"]
            if labels["backend"] == b.address
        }
        assert by_code["2xx"] == n
        assert by_code["5xx"] == five
        count = [v for labels, v in samples["txbalancer_backend_response_seconds_count"]
                 if labels["backend"] == b.address]
        assert count == [n + five]
    assert fivexx == 1
    assert sum(received(b) for b in backends) == 40
    listeners = {ls["listener"]: v for ls, v in samples["txbalancer_listener_connections"]}
    assert list(listeners) == [f"tcp:{lb.port}:interface={HOST}"]


def test_token_enforced(backend, balancer, tmp_path):
    """With a token file, requests without the token get 401 and change nothing."""
    token_file = tmp_path / "token"
    token_file.write_text("tok-" + "x" * 28 + "\n")
    token = token_file.read_text().strip()
    b = backend()
    lb, port = start_with_admin(balancer, [b], token_file=token_file)
    for method, path in [("GET", "/"), ("GET", "/status"), ("GET", "/metrics"),
                         ("POST", f"/backends/{b.address}/disable"), ("POST", "/reload"),
                         ("DELETE", f"/backends/{b.address}")]:
        resp = admin(port, method, path)
        assert resp.status == 401, (method, path, resp)
        resp = admin(port, method, path, token="wrong")
        assert resp.status == 401, (method, path, resp)
    assert backend_status(port, b.address, token=token)["state"] == "up"
    assert get(lb.port, "/").status == 200
    resp = admin(port, "POST", f"/backends/{b.address}/disable", token=token)
    assert resp.status == 200 and resp.json()["backend"]["state"] == "disabled"


@pytest.mark.parametrize("endpoint", ["tcp:{port}", "tcp:{port}:interface=0.0.0.0"])
def test_refuses_public_admin_without_token(tmp_path, endpoint):
    """Without a token, --admin on every interface stops start-up with the reason."""
    backends = write_backends(tmp_path / "b.txt", ["127.0.0.1:1"])
    args = twistd_command("-n", "--pidfile=", "balancer", "--port",
                          f"tcp:{free_port()}:interface={HOST}", "--backends", str(backends),
                          "--admin", endpoint.format(port=free_port()))
    done = subprocess.run(args, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=30, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "refusing to serve the admin server without a token" in output, output
    assert "Traceback" not in output, output


def test_drain_add_remove_under_load_fail_nothing(backend, balancer):
    """Under a continuous request stream, drain, add and remove fail no request."""
    a, b = backend(), backend()
    lb, port = start_with_admin(balancer, [a, b])
    with Traffic(lb.port) as traffic:
        traffic.wait_for_more(100)

        # Drain a: it stops getting requests, b takes them all.
        resp = admin(port, "POST", f"/backends/{a.address}/drain")
        assert resp.status == 200 and resp.json()["backend"]["state"] == "draining"
        time.sleep(0.3)
        before = received(a)
        traffic.wait_for_more(200)
        assert received(a) == before

        # Add c: it starts getting requests.
        c = backend()
        resp = admin(port, "POST", "/backends", {"pool": "default", "address": c.address,
                                                 "weight": 2})
        assert resp.status == 201, resp
        wait_for(lambda: received(c) > 20, 15 + MARGIN, "the added backend to get traffic")

        # Remove b: it stops getting requests, c takes them all.
        resp = admin(port, "DELETE", f"/backends/{b.address}")
        assert resp.status == 202, resp
        assert resp.json()["removing"] == b.address
        time.sleep(0.3)
        before_b, before_c = received(b), received(c)
        traffic.wait_for_more(200)
        assert received(b) == before_b
        assert received(c) > before_c

        # Enable a again: it takes requests again.
        resp = admin(port, "POST", f"/backends/{a.address}/enable")
        assert resp.json()["backend"]["state"] == "up"
        wait_for(lambda: received(a) > before + 10, 15 + MARGIN, "the enabled backend")
        traffic.wait_for_more(100)
    assert traffic.failures == [], traffic.failures[:10]
    assert traffic.ok >= 700
    addresses = [x["address"] for x in status(port)["pools"]["default"]["backends"]]
    assert addresses == [a.address, c.address]


def test_reload_answers_json(backend, balancer):
    """POST /reload answers 200 with JSON on the running balancer."""
    _, port = start_with_admin(balancer, [backend()])
    resp = admin(port, "POST", "/reload")
    assert resp.status == 200, resp
    assert resp.json()["reloaded"] is True
