"""
One short phrase for why a connection to a backend failed, the same in the
proxy's answers and logs and in the health checks' verdicts::

    connection refused
    connect timed out
    connection closed before a complete response
    bad response: malformed status line
    TLS handshake failed: certificate verify failed

Pure: imports no reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

__all__ = ["BadResponse", "describe"]

_LIMIT = 200


class BadResponse(Exception):
    """
    The backend sent something that is not a well-formed HTTP/1.1 response.
    """


def describe(reason: Any) -> str:
    """
    A short, human description of a connection failure.

    @param reason: an exception or a L{Failure}.
    @return: one line of at most a few hundred characters.
    """
    exc = reason.value if isinstance(reason, Failure) else reason
    if isinstance(exc, ResponseFailed) and exc.reasons:
        # Agent (and treq) wrap the real reason: ResponseNeverReceived when
        # no response began, its base class ResponseFailed when one broke.
        inner = describe(exc.reasons[0])
        if isinstance(exc, ResponseNeverReceived):
            return inner
        return f"bad response: {inner}"
    if isinstance(exc, defer.TimeoutError):
        return _oneLine(str(exc)) or "timed out"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.TimeoutError):
        return "connect timed out"
    if isinstance(exc, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(exc, (error.ConnectionDone, error.ConnectionLost)):
        return "connection closed before a complete response"
    if isinstance(exc, error.ConnectError):
        if exc.osError:
            return f"connect failed: {_oneLine(str(exc.osError))}"
        return "connect failed"
    if isinstance(exc, BadResponse):
        return f"bad response: {_oneLine(str(exc))}" if str(exc) else "bad response"
    if _isTLSError(exc):
        return f"TLS handshake failed: {_tlsReason(exc)}"
    name = type(exc).__name__
    text = _oneLine(str(exc))
    return f"{name}: {text}" if text else name


def _oneLine(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:_LIMIT] if lines else ""


def _isTLSError(exc: Any) -> bool:
    try:
        from OpenSSL.SSL import Error
    except ImportError:  # pragma: no cover - pyOpenSSL is a dependency
        return False
    return isinstance(exc, Error)


def _tlsReason(exc: Any) -> str:
    """
    The reasons of an OpenSSL error (C{[(lib, func, reason), ...]}).
    """
    errors = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [e[-1] for e in errors if isinstance(e, tuple) and e and e[-1]]
    return _oneLine(", ".join(reasons)) or _oneLine(str(exc)) or "unknown error"
