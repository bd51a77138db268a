"""
Tests for txbalancer.demo, the tiny demo backends: no sockets, no real time.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from txbalancer.demo import PortResource, listen, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve(resource, data: bytes) -> StringTransport:
    """Feed raw bytes to a real Site channel and return its transport."""
    channel = Site(resource).buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return transport


class PortResourceTests(SynchronousTestCase):
    def test_renderSaysWhichPort(self) -> None:
        """Any path gets 200 text/plain 'Response from server on port N'."""
        request = DummyRequest([b"some", b"path"])
        body = PortResource(3001).render(request)
        self.assertEqual(body, b"Response from server on port 3001\n")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"), [b"text/plain"]
        )

    def test_keepAliveOverASite(self) -> None:
        """GET, POST and HEAD on one connection are all answered and the connection stays open."""
        transport = serve(
            PortResource(3002),
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /b/c?d=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        out = transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 200 OK\r\n"), 3)
        # HEAD has no body.
        self.assertEqual(out.count(b"Response from server on port 3002\n"), 2)
        self.assertEqual(out.lower().count(b"content-length: 34\r\n"), 3)
        self.assertNotIn(b"connection: close", out.lower())
        self.assertFalse(transport.disconnecting)

    def test_otherMethodsAnsweredToo(self) -> None:
        """Methods beyond GET/HEAD/POST get the same answer rather than 405."""
        transport = serve(
            PortResource(3003), b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))


class ListenTests(SynchronousTestCase):
    def test_oneSitePerPort(self) -> None:
        """listen() binds every port on the host, each with its own resource, and prints a line per port."""
        reactor = MemoryReactor()
        out = io.StringIO()
        listen(reactor, [3001, 3002], "127.0.0.1", out)
        self.assertEqual(
            [(port, interface) for port, _, _, interface in reactor.tcpServers],
            [(3001, "127.0.0.1"), (3002, "127.0.0.1")],
        )
        self.assertEqual(
            [site.resource.port for _, site, _, _ in reactor.tcpServers], [3001, 3002]
        )
        self.assertEqual(
            out.getvalue(),
            "Listening on http://127.0.0.1:3001/\nListening on http://127.0.0.1:3002/\n",
        )

    def test_ipv6HostPrintedInBrackets(self) -> None:
        """An IPv6 --host is shown in brackets in the printed URL."""
        out = io.StringIO()
        listen(MemoryReactor(), [3001], "::1", out)
        self.assertEqual(out.getvalue(), "Listening on http://[::1]:3001/\n")


class MainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)

    def test_runsTheReactor(self) -> None:
        """main() listens on the given ports and host, runs the reactor, and exits 0."""
        reactor = MemoryReactor()
        self.assertEqual(main(["--host", "127.0.0.2", "3001", "3002"], reactor=reactor), 0)
        self.assertTrue(reactor.hasRun)
        self.assertEqual(
            [(s[0], s[3]) for s in reactor.tcpServers],
            [(3001, "127.0.0.2"), (3002, "127.0.0.2")],
        )
        self.assertEqual(self.stdout.getvalue().count("Listening on"), 2)

    def test_usageError(self) -> None:
        """A missing or non-numeric port prints a message and returns exit status 2."""
        for argv in (["30x"], ["3001", "-1"], ["70000"], []):
            self.stderr.truncate(0)
            self.stderr.seek(0)
            reactor = MemoryReactor()
            self.assertEqual(main(argv, reactor=reactor), 2, argv)
            self.assertFalse(reactor.tcpServers, argv)
            self.assertIn("Usage:", self.stderr.getvalue(), argv)
            self.assertIn("txbalancer.demo: ", self.stderr.getvalue(), argv)

    def test_moduleUsageErrorExitStatus(self) -> None:
        """python -m txbalancer.demo with a bad port exits with status 2 without listening."""
        result = subprocess.run(
            [sys.executable, "-m", "txbalancer.demo", "abc"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("not a port number", result.stderr)
        self.assertEqual(result.stdout, "")
