"""
Tests for txbalancer.demo, the tiny demo backends: no sockets, no real time.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from txbalancer.demo import PortResource, listen, main

PYTHON = (
    "/work/venv/bin/python"
    if os.path.exists("/work/venv/bin/python")
    else sys.executable
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(resource, data: bytes) -> StringTransport:
    """Feed raw bytes to a real Site channel and return its transport."""
    channel = Site(resource).buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return transport


def test_render_says_which_port():
    """Any path gets 200 text/plain 'Response from server on port N'."""
    request = DummyRequest([b"some", b"path"])
    body = PortResource(3001).render(request)
    assert body == b"Response from server on port 3001\n"
    assert request.responseCode == 200
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/plain"]


def test_keep_alive_over_a_site():
    """GET, POST and HEAD on one connection are all answered and the connection stays open."""
    transport = serve(
        PortResource(3002),
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /b/c?d=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    out = transport.value()
    assert out.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert out.count(b"Response from server on port 3002\n") == 2  # HEAD has no body
    assert out.lower().count(b"content-length: 34\r\n") == 3
    assert b"connection: close" not in out.lower()
    assert not transport.disconnecting


def test_other_methods_answered_too():
    """Methods beyond GET/HEAD/POST get the same answer rather than 405."""
    transport = serve(
        PortResource(3003), b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n")


def test_listen_one_site_per_port():
    """listen() binds every port on the host, each with its own resource, and prints a line per port."""
    reactor = MemoryReactor()
    out = io.StringIO()
    listen(reactor, [3001, 3002], "127.0.0.1", out)
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (3001, "127.0.0.1"),
        (3002, "127.0.0.1"),
    ]
    assert [site.resource.port for _, site, _, _ in reactor.tcpServers] == [3001, 3002]
    assert out.getvalue() == (
        "Listening on http://127.0.0.1:3001/\nListening on http://127.0.0.1:3002/\n"
    )


def test_listen_ipv6_host_printed_in_brackets():
    """An IPv6 --host is shown in brackets in the printed URL."""
    out = io.StringIO()
    listen(MemoryReactor(), [3001], "::1", out)
    assert out.getvalue() == "Listening on http://[::1]:3001/\n"


def test_main_runs_the_reactor(capsys):
    """main() listens on the given ports and host, runs the reactor, and exits 0."""
    reactor = MemoryReactor()
    assert main(["--host", "127.0.0.2", "3001", "3002"], reactor=reactor) == 0
    assert reactor.hasRun
    assert [(s[0], s[3]) for s in reactor.tcpServers] == [
        (3001, "127.0.0.2"),
        (3002, "127.0.0.2"),
    ]
    assert capsys.readouterr().out.count("Listening on") == 2


@pytest.mark.parametrize("argv", [["30x"], ["3001", "-1"], ["70000"], []])
def test_main_usage_error(argv, capsys):
    """A missing or non-numeric port prints a message and returns exit status 2."""
    reactor = MemoryReactor()
    assert main(argv, reactor=reactor) == 2
    assert not reactor.tcpServers
    err = capsys.readouterr().err
    assert "Usage:" in err
    assert "txbalancer.demo: " in err


def test_module_usage_error_exit_status():
    """python -m txbalancer.demo with a bad port exits with status 2 without listening."""
    result = subprocess.run(
        [PYTHON, "-m", "txbalancer.demo", "abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "not a port number" in result.stderr
    assert result.stdout == ""
