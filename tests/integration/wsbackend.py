"""
A WebSocket backend for the integration tests, run as
``python wsbackend.py [--raw]`` on 127.0.0.1 (a free port); it prints
``listening PORT`` on stdout once it accepts connections.

Default: an echo server on the ``websockets`` library (text and binary
messages up to 32 MiB, pings answered by the library).  A text message
``close CODE REASON`` is answered with a close frame of that code and
reason, so a test can see close codes pass through.  Each connection's
first message is the request path it saw (``path /x``).

``--raw``: the smallest server that does the handshake (its own, from RFC
6455 4.2.2) and then relays bytes, for the fd and memory cycle test:
it echoes what it reads, except that ``bye`` makes it close the connection
and ``rst`` makes it reset it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import socket
import struct
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


async def raw_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        key = b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
        )
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if data == b"bye":
                break
            if data == b"rst":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                break
            writer.write(data)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def echo_handler(ws) -> None:
    import websockets

    await ws.send("path " + ws.request.path)
    try:
        async for message in ws:
            if isinstance(message, str) and message.startswith("close "):
                _, code, reason = message.split(" ", 2)
                await ws.close(int(code), reason)
                return
            await ws.send(message)
    except websockets.ConnectionClosed:
        pass


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args()
    if args.raw:
        server = await asyncio.start_server(raw_handler, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
    else:
        from websockets.asyncio.server import serve

        server = await serve(
            echo_handler, "127.0.0.1", 0, max_size=32 * 1024 * 1024, compression=None
        )
        port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
