"""
Writing to a plain TCP connection at once, when nothing is queued before.

Twisted's TCP transport queues every write and sends it when the reactor
next finds the socket writable, so every response costs two C{epoll_ctl}
calls (start watching for writability, stop again) besides its C{send}:
under C{strace -c} on the small keep-alive benchmark, 4 of the balancer's
8 system calls per request.  A writer from L{writerFor} sends at once when
the transport has nothing queued and hands whatever the socket does not
take, and any error, to the transport's own C{write}: ordering,
back-pressure (producers), closing and error handling stay Twisted's.

Anything that is not a plain TCP transport (TLS, StringTransport in tests)
gets its own C{write} back unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import tcp


def writerFor(transport: Any) -> Callable[[bytes], None]:
    """
    A C{write(data)} for C{transport}: its own, or for a plain TCP transport
    one that sends at once when its queue is empty.
    """
    write = transport.write
    if not isinstance(transport, tcp.Connection) or not hasattr(
        transport, "_tempDataBuffer"
    ):
        return write
    send = transport.socket.send

    def writeNow(data: bytes) -> None:
        if (
            transport.dataBuffer
            or transport._tempDataBuffer
            or transport.TLS
            or transport.disconnecting
            or not transport.connected
        ):
            write(data)
            return
        try:
            sent = send(data)
        except OSError:
            # EAGAIN: the transport queues it; a broken connection: the
            # transport finds out on its own send and reports the loss.
            write(data)
            return
        if sent < len(data):
            write(data[sent:])

    return writeNow
