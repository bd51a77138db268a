"""
txbalancer.writethrough: a write to a plain TCP transport goes to its socket
at once when nothing is queued, and to the transport's queue otherwise.

No sockets: the transport is a twisted.internet.tcp.Connection built
without __init__, with a fake socket.
"""

from __future__ import annotations

import errno

from twisted.internet import tcp
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from txbalancer.writethrough import writerFor


class FakeSocket:
    def __init__(self, accept: int | None = None, error: int | None = None) -> None:
        self.accept = accept
        self.error = error
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise OSError(self.error, "fake")
        n = len(data) if self.accept is None else min(self.accept, len(data))
        self.sent.append(bytes(data[:n]))
        return n


class QueueingConnection(tcp.Connection):
    """A tcp.Connection whose write only records what it would queue."""

    def write(self, data: bytes) -> None:
        self.queued.append(data)


def connection(sock: FakeSocket) -> QueueingConnection:
    conn = QueueingConnection.__new__(QueueingConnection)
    conn.socket = sock
    conn.connected = 1
    conn.disconnecting = 0
    conn.TLS = False
    conn.dataBuffer = b""
    conn._tempDataBuffer = []
    conn.queued = []
    return conn


class WriterTests(SynchronousTestCase):

    def test_sent_at_once_when_nothing_is_queued(self) -> None:
        """With an empty queue the data goes straight to the socket."""
        sock = FakeSocket()
        conn = connection(sock)
        writerFor(conn)(b"hello")
        self.assertEqual(sock.sent, [b"hello"])
        self.assertEqual(conn.queued, [])

    def test_what_the_socket_does_not_take_is_queued(self) -> None:
        """A partial send queues the rest, in order, with the transport."""
        sock = FakeSocket(accept=3)
        conn = connection(sock)
        writerFor(conn)(b"hello")
        self.assertEqual(sock.sent, [b"hel"])
        self.assertEqual(conn.queued, [b"lo"])

    def test_would_block_is_queued(self) -> None:
        """EAGAIN leaves the whole write to the transport's queue."""
        sock = FakeSocket(error=errno.EAGAIN)
        conn = connection(sock)
        writerFor(conn)(b"hello")
        self.assertEqual(conn.queued, [b"hello"])

    def test_a_broken_connection_is_left_to_the_transport(self) -> None:
        """Any other socket error also goes to the transport, which reports the loss."""
        sock = FakeSocket(error=errno.EPIPE)
        conn = connection(sock)
        writerFor(conn)(b"hello")
        self.assertEqual(conn.queued, [b"hello"])

    def test_queued_data_keeps_its_place(self) -> None:
        """While anything is queued, new data queues behind it, never jumps ahead."""
        for field, value in (("dataBuffer", b"x"), ("_tempDataBuffer", [b"x"])):
            sock = FakeSocket()
            conn = connection(sock)
            setattr(conn, field, value)
            writerFor(conn)(b"hello")
            self.assertEqual(sock.sent, [])
            self.assertEqual(conn.queued, [b"hello"])

    def test_closing_or_tls_connections_use_the_transport(self) -> None:
        """A closing, closed or TLS connection gets every write through the transport."""
        for field, value in (("disconnecting", 1), ("connected", 0), ("TLS", True)):
            sock = FakeSocket()
            conn = connection(sock)
            setattr(conn, field, value)
            writerFor(conn)(b"hello")
            self.assertEqual(sock.sent, [])
            self.assertEqual(conn.queued, [b"hello"])

    def test_other_transports_get_their_own_write(self) -> None:
        """A transport that is not plain TCP keeps its own write."""
        transport = StringTransport()
        write = writerFor(transport)
        write(b"hello")
        self.assertEqual(transport.value(), b"hello")
