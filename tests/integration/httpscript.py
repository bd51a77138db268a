"""
A scripted HTTP/1.1 backend for the raw-socket tests of the details a
proxy must get right, run as ``python httpscript.py`` on 127.0.0.1 (a free
port); it prints ``listening PORT`` once it accepts connections.  Its
answers, by path:

- ``/early``: a 103 Early Hints, then 200 with a 2-byte body.
- ``/trailers``: a chunked 200 ending with the trailer ``X-Checksum: abc``.
- ``/close``: a 200 without Content-Length, ended by closing.
- ``/cut``: a 200 with Content-Length 10 and 4 bytes, then a close.
- anything else: 200 whose body is the request head as received (so a
  test sees what reached the backend), kept alive.
"""

from __future__ import annotations

import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if path == b"/early":
                writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            elif path == b"/trailers":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                    b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\n\r\n"
                )
            elif path == b"/close":
                writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100000)
                await writer.drain()
                break
            elif path == b"/cut":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
                await writer.drain()
                break
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(head) + head)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
