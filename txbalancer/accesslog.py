"""
The access log: one line per request, in the combined log format (with the
backend and the times appended) or as one JSON object per line.

Combined::

    CLIENT - - [TIME] "METHOD TARGET VERSION" STATUS BYTES "REFERER" "USER-AGENT" BACKEND TOTAL CONNECT FIRST_BYTE PEER

C{CLIENT} is the real client: behind a C{--trusted-proxies} peer, the
address it forwarded; C{PEER} is the TCP peer the request came from.
C{TOTAL}, C{CONNECT} (to the backend; 0 on a kept-alive connection) and
C{FIRST_BYTE} (from the end of the request head to the backend's response
head) are seconds, C{-} when there was none.

Writing never blocks the reactor on a slow disk: lines go to a bounded
buffer that a thread writes out (L{ThreadedFileWriter}); when the disk is
so slow that the buffer fills, lines are dropped and counted, and the count
is logged.  SIGUSR1 (see L{txbalancer.balancer.Balancer}) reopens the file,
so logrotate can move it away without losing a line.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from typing import IO, Any, Callable, Optional

from twisted.logger import Logger

log = Logger()

# At most this many characters of lines go in one write().

_MONTHS = "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
FORMATS = ("combined", "json")


def _quote(value: Optional[bytes]) -> str:
    if value is None:
        return "-"
    text = value.decode("latin-1")
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else "%.3f" % (max(0.0, value),)


class StreamWriter:
    """
    Writes lines to an open text stream at once (stdout, or a test's
    C{StringIO}).
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.dropped = 0

    def write(self, line: str) -> None:
        self.stream.write(line)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        if self.stream is not sys.stdout and self.stream is not sys.__stdout__:
            self.stream.close()


class ThreadedFileWriter:
    """
    Appends lines to a file from a thread of its own, through a buffer of
    at most C{maxLines} lines, so a slow disk never blocks the reactor.

    @ivar dropped: lines dropped because the buffer was full.
    """

    _REOPEN = object()
    _CLOSE = object()

    def __init__(self, path: str, maxLines: int = 10000) -> None:
        self.path = path
        self.dropped = 0
        self._reported = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxLines)
        self._file = self._open()
        self._thread = threading.Thread(
            target=self._run, name="txbalancer-access-log", daemon=True
        )
        self._thread.start()

    def _open(self) -> Any:
        # Unbuffered, appending: each batch of whole lines is one write(),
        # so several processes appending to the file (--workers) never cut
        # each other's lines.
        return open(self.path, "ab", buffering=0)

    def write(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1
            if self.dropped - self._reported >= 1000 or not self._reported:
                self._reported = self.dropped
                log.warn(
                    "access log {path}: the disk is too slow, {n} lines dropped so far",
                    path=self.path,
                    n=self.dropped,
                )

    def reopen(self) -> None:
        """
        Close the file and open it again by name (after logrotate moved it).
        """
        self._queue.put(self._REOPEN)

    def close(self, timeout: float = 5.0) -> None:
        """
        Write out what is buffered (waiting at most C{timeout} seconds),
        then close the file.
        """
        self._queue.put(self._CLOSE)
        self._thread.join(timeout)

    # After each batch the thread waits this long before taking the next,
    # so lines go out in batches and the reactor's thread is not made to
    # wake this one (and hand it the GIL) once per request: measured, that
    # doubled the CPU time of a proxied request.
    BATCH_INTERVAL = 0.05

    def _run(self) -> None:
        get, getNow = self._queue.get, self._queue.get_nowait
        while True:
            items = [get()]
            while True:
                try:
                    items.append(getNow())
                except queue.Empty:
                    break
            lines: list[str] = []
            for item in items:
                if item is self._CLOSE or item is self._REOPEN:
                    self._writeOut(lines)
                    lines = []
                    try:
                        self._file.close()
                        if item is self._CLOSE:
                            return
                        self._file = self._open()
                    except OSError as e:
                        sys.stderr.write(f"txbalancer: access log {self.path}: {e}\n")
                else:
                    lines.append(item)
            self._writeOut(lines)
            time.sleep(self.BATCH_INTERVAL)

    def _writeOut(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            # One write() per batch of whole lines, unbuffered (see _open).
            self._writeLines(self._file, lines)
        except (OSError, ValueError) as e:  # ValueError: the file is closed
            # A full disk or a vanished directory: keep going, say so.
            sys.stderr.write(f"txbalancer: access log {self.path}: {e}\n")

    @staticmethod
    def _writeLines(f: Any, lines: list[str]) -> None:
        if not lines:
            return
        data = memoryview("".join(lines).encode("utf-8"))
        while data:
            data = data[f.write(data):]


class AccessLog:
    """
    Formats one line per request and hands it to a writer.

    @param writer: a L{StreamWriter} or L{ThreadedFileWriter} (or an open
        text stream, which is wrapped in a L{StreamWriter}).
    @param clock: returns the current time; the reactor's C{seconds}.
    @param format: C{"combined"} or C{"json"}.
    """

    def __init__(
        self, writer: Any, clock: Callable[[], float], format: str = "combined"
    ) -> None:
        if not hasattr(writer, "reopen"):
            writer = StreamWriter(writer)
        self.writer = writer
        self.clock = clock
        self.format = format
        self._line = self._json if format == "json" else self._combined
        self._second = -1
        self._stamp = ""

    @property
    def stream(self) -> Any:
        """
        The open file or stream being written.
        """
        writer = self.writer
        return getattr(writer, "stream", None) or getattr(writer, "_file", None)

    @classmethod
    def open(
        cls, path: str, clock: Callable[[], float], format: str = "combined"
    ) -> "AccessLog":
        """
        An access log writing to the file at C{path} (appending), or to
        stdout for C{-}.
        """
        if path == "-":
            return cls(StreamWriter(sys.stdout), clock, format)
        return cls(ThreadedFileWriter(path), clock, format)

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            t = time.gmtime(second)
            self._second = second
            self._stamp = "%02d/%s/%04d:%02d:%02d:%02d +0000" % (
                t.tm_mday,
                _MONTHS[t.tm_mon - 1],
                t.tm_year,
                t.tm_hour,
                t.tm_min,
                t.tm_sec,
            )
        return self._stamp

    def log(
        self,
        request: Any,
        status: int,
        size: int,
        backend: Any,
        client: Optional[str] = None,
        connect: Optional[float] = None,
        firstByte: Optional[float] = None,
    ) -> None:
        """
        Write the line of one finished request.

        @param client: the real client's address (behind trusted proxies);
            the TCP peer when L{None}.
        @param connect: seconds spent connecting to the backend.
        @param firstByte: seconds from the end of the request head to the
            backend's response head.
        """
        now = self.clock()
        self.writer.write(
            self._line(request, status, size, backend, client, connect, firstByte, now)
        )

    def _headers(self, request: Any) -> tuple[Optional[bytes], Optional[bytes]]:
        referer = agent = None
        for name, value in request.headers:
            lname = name.lower()
            if lname == b"referer":
                referer = value
            elif lname == b"user-agent":
                agent = value
        return referer, agent

    def _combined(
        self, request: Any, status: int, size: int, backend: Any,
        client: Optional[str], connect: Optional[float], firstByte: Optional[float],
        now: float,
    ) -> str:
        referer, agent = self._headers(request)
        return '%s - - [%s] "%s %s %s" %d %d "%s" "%s" %s %s %s %s %s\n' % (
            client or request.peer or "-",
            self._timestamp(now),
            request.method.decode("latin-1"),
            _quote(request.target),
            request.version.decode("latin-1"),
            status,
            size,
            _quote(referer),
            _quote(agent),
            backend.address if backend is not None else "-",
            _seconds(now - request.received),
            _seconds(connect),
            _seconds(firstByte),
            request.peer or "-",
        )

    def _json(
        self, request: Any, status: int, size: int, backend: Any,
        client: Optional[str], connect: Optional[float], firstByte: Optional[float],
        now: float,
    ) -> str:
        referer, agent = self._headers(request)

        def text(value: Optional[bytes]) -> Optional[str]:
            return None if value is None else value.decode("latin-1")

        return json.dumps(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                + ".%03dZ" % (int(now * 1000) % 1000,),
                "client": client or request.peer,
                "peer": request.peer,
                "method": text(request.method),
                "target": text(request.target),
                "version": text(request.version),
                "host": text(request.host),
                "status": status,
                "bytes": size,
                "referer": text(referer),
                "user_agent": text(agent),
                "backend": backend.address if backend is not None else None,
                "total_s": round(max(0.0, now - request.received), 6),
                "connect_s": None if connect is None else round(max(0.0, connect), 6),
                "first_byte_s": None if firstByte is None else round(max(0.0, firstByte), 6),
            },
            separators=(",", ":"),
        ) + "\n"

    def reopen(self) -> None:
        self.writer.reopen()

    def close(self) -> None:
        self.writer.close()
