"""
A TCP backend for the TCP-mode tests (and bench/tcp.py): an echo server
with switches, run as ``python tcpbackend.py PORT [options]`` on 127.0.0.1.
It prints ``listening PORT`` on stdout once it accepts connections.

Options:
  --banner TEXT   send TEXT (``{port}`` is replaced by its port) and a
                  newline as soon as a client connects, before reading
                  anything: a server that speaks first, like SMTP or MySQL.
  --half-close    do not echo; read until the client's end of stream, then
                  answer ``got N sha256 HEX`` and close: proves a half-close
                  arrives, and that the other direction still works after.
  --abrupt        reset the connection (RST, not FIN) on the first bytes.
  --proxy         expect a PROXY protocol header (v1 or v2) first; answer
                  one line ``proxy VERSION SRC SPORT DST DPORT`` (or
                  ``proxy VERSION UNKNOWN``, or ``proxy bad REASON`` and
                  close), then echo.
  --http          with --proxy: instead of echoing, answer each HTTP
                  request (no body) with 200 and the body
                  ``proxy ... conn C request R``: what the header said, and
                  which connection and request of this backend it was.

Its PROXY parser is its own, small and strict, independent of the
balancer's encoder and of Twisted's parser.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import socket
import struct
import sys

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


async def read_proxy_header(reader: asyncio.StreamReader) -> str:
    first = await reader.readexactly(5)
    if first == b"PROXY":
        line = first + await reader.readuntil(b"\r\n")
        if len(line) > 107:
            return "bad v1 line too long"
        parts = line[:-2].decode("ascii").split(" ")
        if parts[1] == "UNKNOWN":
            return "v1 UNKNOWN"
        if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
            return "bad v1 " + line[:-2].decode("ascii", "replace")
        _, family, src, dst, sport, dport = parts
        version = 4 if family == "TCP4" else 6
        for address in (src, dst):
            if ipaddress.ip_address(address).version != version:
                return "bad v1 family"
        return f"v1 {src} {int(sport)} {dst} {int(dport)}"
    rest = await reader.readexactly(len(V2_SIGNATURE) - 5)
    if first + rest != V2_SIGNATURE:
        return "bad no header"
    command, family, length = struct.unpack("!BBH", await reader.readexactly(4))
    body = await reader.readexactly(length)
    if command >> 4 != 2:
        return "bad v2 version"
    if command & 0xF == 0:
        return "v2 UNKNOWN"
    if family == 0x11:
        src, dst = (str(ipaddress.IPv4Address(body[i : i + 4])) for i in (0, 4))
        sport, dport = struct.unpack("!HH", body[8:12])
    elif family == 0x21:
        src, dst = (str(ipaddress.IPv6Address(body[i : i + 16])) for i in (0, 16))
        sport, dport = struct.unpack("!HH", body[32:36])
    else:
        return f"bad v2 family {family:#x}"
    return f"v2 {src} {sport} {dst} {dport}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--banner")
    parser.add_argument("--half-close", action="store_true")
    parser.add_argument("--abrupt", action="store_true")
    parser.add_argument("--proxy", action="store_true")
    parser.add_argument("--http", action="store_true")
    options = parser.parse_args()
    connections = [0]

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        port = writer.get_extra_info("sockname")[1]
        try:
            if options.banner is not None:
                writer.write(
                    options.banner.replace("{port}", str(port)).encode() + b"\n"
                )
            connections[0] += 1
            conn = connections[0]
            if options.proxy:
                seen = await read_proxy_header(reader)
                if options.http:
                    requests = 0
                    while not seen.startswith("bad"):
                        try:
                            await reader.readuntil(b"\r\n\r\n")
                        except asyncio.IncompleteReadError:
                            break
                        requests += 1
                        body = f"proxy {seen} conn {conn} request {requests}".encode()
                        writer.write(
                            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                            % (len(body), body)
                        )
                        await writer.drain()
                    writer.close()
                    return
                writer.write(f"proxy {seen}\n".encode())
                if seen.startswith("bad"):
                    await writer.drain()
                    writer.close()
                    return
            if options.half_close:
                digest = hashlib.sha256()
                n = 0
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    n += len(data)
                    digest.update(data)
                writer.write(f"got {n} sha256 {digest.hexdigest()}\n".encode())
                await writer.drain()
                writer.close()
                return
            while True:
                data = await reader.read(262144)
                if not data:
                    break
                if options.abrupt:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.transport.abort()

    async def serve() -> None:
        server = await asyncio.start_server(
            handle, "127.0.0.1", options.port, backlog=1024
        )
        port = server.sockets[0].getsockname()[1]
        sys.stdout.write(f"listening {port}\n")
        sys.stdout.flush()
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
