"""
The desync corpus of tests/test_desync_corpus.py over real sockets: each
case goes to the real ``twistd balancer``, in front of a Python backend
that records every byte it receives and counts the requests in them with
the corpus's own strict parser.  A rejected case must leave the backend
untouched; a forwarded one must reach it as exactly one clean request.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from test_desync_corpus import (
    CORPUS,
    FORWARD,
    REJECT,
    Malformed,
    Message,
    checkForwarded,
    strictParse,
)

from .httpraw import HOST, ProtocolError, RawClient, get

pytestmark = pytest.mark.integration

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RecordingBackend:
    """
    An HTTP/1.1 backend on 127.0.0.1 that answers 200 to each complete
    request and records them (L{messages}), any connection that carried
    something malformed (L{malformed}), and bytes left over when a
    connection ends (L{leftovers}).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Message] = []
        self.malformed: list[str] = []
        self.leftovers: list[bytes] = []
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> RecordingBackend:
        self.acceptor.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping = True
        self.acceptor.join(5)
        for thread in self.threads:
            thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        data = b""
        answered = 0
        with conn:
            while not self.stopping:
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
                try:
                    complete, _ = strictParse(data)
                except Malformed as e:
                    with self.lock:
                        self.malformed.append(f"{e}: {data[:300]!r}")
                    return
                for message in complete[answered:]:
                    with self.lock:
                        self.messages.append(message)
                    conn.sendall(OK)
                answered = len(complete)
        try:
            _, rest = strictParse(data)
        except Malformed:
            return
        if rest:
            with self.lock:
                self.leftovers.append(rest)

    def count(self) -> int:
        with self.lock:
            return len(self.messages)


def send_case(port: int, raw: bytes) -> int:
    """
    Send C{raw} on a fresh connection; the status of the answer (0 when the
    balancer closed without a parseable one).
    """
    with RawClient(port, timeout=15) as client:
        client.send(raw)
        try:
            return client.response("GET").status
        except (ProtocolError, OSError):
            return 0


def wait_for_count(backend: RecordingBackend, n: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while backend.count() < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return backend.count()


def test_corpus_through_twistd(balancer):
    """Over real sockets, each corpus case is refused untouched or reaches the backend as one clean request."""
    with RecordingBackend() as backend:
        lb = balancer([f"{HOST}:{backend.port}"], "--no-health-checks")
        problems = []
        forwarded = 0
        for case in CORPUS:
            before = backend.count()
            status = send_case(lb.port, case.raw)
            if case.expect == REJECT:
                if status not in case.statuses:
                    problems.append(f"{case.name}: status {status}, expected {case.statuses}")
            else:
                forwarded += 1
                after = wait_for_count(backend, before + 1)
                if status != 200 or after != before + 1:
                    problems.append(f"{case.name}: status {status}, {after - before} requests upstream")
                    continue
                try:
                    checkForwarded(case, backend.messages[before])
                except AssertionError as e:
                    problems.append(f"{case.name}: {e}")
            # Anything the balancer wrongly sent for this case has reached
            # the backend by the time a later request has gone round.
            if get(lb.port, "/__sentinel", host="example.com").status != 200:
                problems.append(f"{case.name}: the sentinel after it failed")
            if wait_for_count(backend, before + (case.expect == FORWARD) + 1) != before + (
                case.expect == FORWARD
            ) + 1:
                problems.append(f"{case.name}: the backend saw {backend.count() - before} requests")
        assert problems == [], "\n".join(problems)
        assert backend.malformed == []
        sentinels = [m for m in backend.messages if m.target == b"/__sentinel"]
        assert len(sentinels) == len(CORPUS)
        assert len(backend.messages) - len(sentinels) == forwarded
    assert backend.leftovers == []
