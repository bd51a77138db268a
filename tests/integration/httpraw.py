"""
A tiny HTTP/1.1 client over a raw socket, for tests that must see the bytes.

``http.client`` hides what these tests look at (repeated headers, interim
responses, whether the connection stayed open, requests that are malformed on
purpose), so this module writes requests byte for byte and parses responses
strictly: a stray byte after a body-less response makes the next status line
fail to parse.
"""

from __future__ import annotations

import json
import select
import socket
from dataclasses import dataclass, field

HOST = "127.0.0.1"


class ProtocolError(Exception):
    """The peer sent something that is not an HTTP/1.1 response."""


@dataclass
class Response:
    """One parsed response; headers keep their order and repetitions."""

    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        name = name.lower()
        return [v for (k, v) in self.headers if k.lower() == name]

    def value(self, name: str) -> str | None:
        """The only value of header ``name``, or None; fails on repeats."""
        values = self.values(name)
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class RawClient:
    """One client connection to 127.0.0.1:port, with its own read buffer."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = bytearray()
        self.eof = False

    @classmethod
    def wrap(cls, sock: socket.socket) -> RawClient:
        """A client over an already connected socket."""
        client = cls.__new__(cls)
        client.sock, client.buf, client.eof = sock, bytearray(), False
        return client

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send bytes; a peer that already answered and closed is no error."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        host: str = "example.test",
    ) -> Response:
        """Send a well-formed request and read its final response."""
        self.send(build_request(method, target, headers, body, host))
        return self.response(method)

    def response(self, method: str = "GET", interim: bool = False) -> Response:
        """Read one response. 1xx responses are skipped unless ``interim``."""
        while True:
            resp = self._read_head()
            if 100 <= resp.status < 200 and resp.status != 101:
                if interim:
                    return resp
                continue
            break
        resp.body = self._read_body(resp, method)
        return resp

    def at_eof(self, wait: float = 0.5) -> bool:
        """True when the peer has closed the connection and nothing is left to read."""
        if self.buf:
            return False
        if not self.eof:
            readable, _, _ = select.select([self.sock], [], [], wait)
            if readable:
                self._fill()
        return self.eof and not self.buf

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if data:
            self.buf += data
        else:
            self.eof = True

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > 65536:
                raise ProtocolError(f"line too long: {bytes(self.buf[:200])!r}")
            if self.eof:
                raise ProtocolError(
                    f"connection closed before a complete response: {bytes(self.buf[:200])!r}"
                )
            self._fill()

    def _read_head(self) -> Response:
        status_line = self._line()
        parts = status_line.split(b" ", 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or not parts[1].isdigit()
        ):
            raise ProtocolError(f"bad status line: {status_line[:200]!r}")
        resp = Response(
            int(parts[1]), parts[2].decode("latin-1") if len(parts) > 2 else ""
        )
        while True:
            line = self._line()
            if not line:
                return resp
            name, sep, value = line.partition(b":")
            if not sep or name != name.strip() or not name:
                raise ProtocolError(f"bad header line: {line[:200]!r}")
            resp.headers.append(
                (name.decode("latin-1"), value.strip().decode("latin-1"))
            )

    def _read_body(self, resp: Response, method: str) -> bytes:
        if method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            return b""
        te = ",".join(resp.values("transfer-encoding")).lower()
        if "chunked" in te:
            return self._read_chunked()
        lengths = resp.values("content-length")
        if lengths:
            if len(set(lengths)) != 1:
                raise ProtocolError(f"conflicting Content-Length: {lengths}")
            return self._exactly(int(lengths[0]))
        return self._until_eof()

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n and not self.eof:
            self._fill()
        if len(self.buf) < n:
            raise ProtocolError(f"body ended after {len(self.buf)} of {n} bytes")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _until_eof(self) -> bytes:
        while not self.eof:
            self._fill()
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def _read_chunked(self) -> bytes:
        body = []
        while True:
            size_line = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size: {size_line[:100]!r}") from None
            if size == 0:
                while self._line():  # trailers
                    pass
                return b"".join(body)
            body.append(self._exactly(size))
            if self._line() != b"":
                raise ProtocolError("chunk not followed by CRLF")


def build_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str = "example.test",
) -> bytes:
    """The bytes of a request; Host and Content-Length added when missing."""
    headers = list(headers or [])
    names = {k.lower() for (k, _) in headers}
    if "host" not in names:
        headers.insert(0, ("Host", host))
    if body and "content-length" not in names and "transfer-encoding" not in names:
        headers.append(("Content-Length", str(len(body))))
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for (k, v) in headers
    )
    return head.encode("latin-1") + b"\r\n" + body


def exchange(
    port: int, data: bytes, timeout: float = 30.0, method: str = "GET"
) -> Response:
    """Send raw bytes on a fresh connection and read one final response."""
    with RawClient(port, timeout=timeout) as client:
        client.send(data)
        return client.response(method)


def get(
    port: int,
    target: str = "/",
    headers=None,
    timeout: float = 30.0,
    host: str = "example.test",
) -> Response:
    """One GET on a fresh connection."""
    with RawClient(port, timeout=timeout) as client:
        return client.request("GET", target, headers, host=host)
