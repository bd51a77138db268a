"""
Tests for txbalancer.accesslog: the line formats, the real client address,
and the writer that never blocks the reactor.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import tempfile
import threading

from twisted.trial.unittest import SynchronousTestCase

from txbalancer.accesslog import AccessLog, ThreadedFileWriter
from txbalancer.testing import InMemoryBalancer

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
TRUSTED = [ipaddress.ip_network("10.0.0.0/8")]


def _served(lb: InMemoryBalancer, head: bytes, peer: str = "203.0.113.7") -> None:
    client = lb.client(peer=peer)
    client.send(head)
    lb.reactor.advance(0.25)
    backend = lb.acceptConnect()
    lb.reactor.advance(0.5)
    backend.respond(OK)


class FormatTests(SynchronousTestCase):
    def balancer(self, fmt: str) -> tuple[InMemoryBalancer, io.StringIO]:
        stream = io.StringIO()
        lb = InMemoryBalancer(["127.0.0.1:3001"], trustedProxies=TRUSTED)
        lb.forwarder.accessLog = AccessLog(stream, lb.reactor.seconds, fmt)
        return lb, stream

    def test_combined_appends_backend_and_times(self) -> None:
        """A combined line ends with the backend, total, connect and first-byte seconds and the peer."""
        lb, stream = self.balancer("combined")
        _served(lb, b"GET /x?a=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: t\r\nReferer: r\r\n\r\n")
        (line,) = stream.getvalue().splitlines()
        self.assertTrue(line.startswith("203.0.113.7 - - ["), line)
        self.assertTrue(
            line.endswith('"GET /x?a=1 HTTP/1.1" 200 2 "r" "t" 127.0.0.1:3001 0.750 0.250 0.500 203.0.113.7'),
            line,
        )

    def test_real_client_behind_trusted_proxy(self) -> None:
        """Behind a trusted proxy the line starts with the forwarded client, and the peer comes last."""
        lb, stream = self.balancer("combined")
        _served(lb, b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 198.51.100.9\r\n\r\n", peer="10.1.2.3")
        (line,) = stream.getvalue().splitlines()
        self.assertTrue(line.startswith("198.51.100.9 - - ["), line)
        self.assertTrue(line.endswith(" 10.1.2.3"), line)

    def test_untrusted_forwarded_for_is_not_believed(self) -> None:
        """From an untrusted peer an X-Forwarded-For does not change the logged client."""
        lb, stream = self.balancer("combined")
        _served(lb, b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 198.51.100.9\r\n\r\n")
        (line,) = stream.getvalue().splitlines()
        self.assertTrue(line.startswith("203.0.113.7 - - ["), line)

    def test_json(self) -> None:
        """The json format writes one object per line with the same facts."""
        lb, stream = self.balancer("json")
        _served(lb, b"GET /j HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 198.51.100.9\r\n\r\n", peer="10.1.2.3")
        (line,) = stream.getvalue().splitlines()
        entry = json.loads(line)
        self.assertEqual(entry["client"], "198.51.100.9")
        self.assertEqual(entry["peer"], "10.1.2.3")
        self.assertEqual((entry["method"], entry["target"], entry["status"], entry["bytes"]), ("GET", "/j", 200, 2))
        self.assertEqual(entry["backend"], "127.0.0.1:3001")
        self.assertEqual((entry["connect_s"], entry["first_byte_s"], entry["total_s"]), (0.25, 0.5, 0.75))
        self.assertEqual(entry["host"], "h")

    def test_refused_request_has_no_backend(self) -> None:
        """A request no backend served logs '-' for the backend and its times."""
        lb, stream = self.balancer("combined")
        lb.pool.setHealth(lb.backend("127.0.0.1:3001"), "down")
        client = lb.client()
        client.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        (line,) = stream.getvalue().splitlines()
        self.assertIn('" 503 ', line)
        self.assertTrue(line.endswith(' "-" "-" - 0.000 - - 203.0.113.7'), line)


class ThreadedWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="txbalancer-log-")
        self.path = os.path.join(self.dir, "access.log")

    def test_lines_reach_the_file(self) -> None:
        """Every line written reaches the file by the time it is closed."""
        writer = ThreadedFileWriter(self.path)
        for i in range(1000):
            writer.write(f"line {i}\n")
        writer.close()
        with open(self.path) as f:
            self.assertEqual(f.read().splitlines(), [f"line {i}" for i in range(1000)])

    def test_reopen_after_rotation_loses_nothing(self) -> None:
        """After the file is moved away and reopened, new lines go to a new file and none is lost."""
        writer = ThreadedFileWriter(self.path)
        for i in range(50):
            writer.write(f"a{i}\n")
        os.rename(self.path, self.path + ".1")
        writer.reopen()
        for i in range(50):
            writer.write(f"b{i}\n")
        writer.close()
        with open(self.path + ".1") as f:
            old = f.read().splitlines()
        with open(self.path) as f:
            new = f.read().splitlines()
        self.assertEqual(old, [f"a{i}" for i in range(50)])
        self.assertEqual(new, [f"b{i}" for i in range(50)])

    def test_slow_disk_never_blocks(self) -> None:
        """When the disk stalls, writes return at once and lines beyond the buffer are dropped and counted."""
        stalled = threading.Event()
        entered = threading.Event()

        class StallingFile(io.BytesIO):
            def write(self, data) -> int:
                entered.set()
                stalled.wait(10)
                return len(data)

        class Stalling(ThreadedFileWriter):
            def _open(self):
                return StallingFile()

        writer = Stalling(self.path, maxLines=10)
        writer.write("first\n")
        # The writer thread is now stuck inside write(): the buffer alone
        # takes the next lines.
        self.assertTrue(entered.wait(10))
        for i in range(100):
            writer.write(f"{i}\n")
        self.assertEqual(writer.dropped, 100 - 10)
        stalled.set()
        writer.close()
        self.flushLoggedErrors()
