"""
Tests for txbalancer.failures: one phrase per kind of backend failure.
"""

from __future__ import annotations

import subprocess
import sys

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from txbalancer.failures import BadResponse, describe


class DescribeTests(SynchronousTestCase):
    def test_connectErrors(self) -> None:
        """Each kind of connect failure has its own short phrase."""
        self.assertEqual(describe(error.ConnectionRefusedError()), "connection refused")
        self.assertEqual(describe(error.TimeoutError()), "connect timed out")
        self.assertEqual(describe(error.DNSLookupError("x.invalid")), "DNS lookup failed")
        self.assertEqual(
            describe(error.NoRouteError(osError="113: No route to host")),
            "connect failed: 113: No route to host",
        )
        self.assertEqual(describe(error.ConnectError()), "connect failed")

    def test_closedEarly(self) -> None:
        """A connection that closed or broke off is one phrase, whichever way it ended."""
        for exc in (error.ConnectionDone(), error.ConnectionLost(), error.ConnectionAborted()):
            self.assertEqual(describe(exc), "connection closed before a complete response")

    def test_failureOrException(self) -> None:
        """A Failure is described by the exception it holds."""
        self.assertEqual(describe(Failure(error.ConnectionRefusedError())), "connection refused")

    def test_wrappedByAgent(self) -> None:
        """Agent's wrappers are unwrapped; a response that broke off says so."""
        refused = Failure(error.ConnectionRefusedError())
        self.assertEqual(describe(ResponseNeverReceived([refused])), "connection refused")
        lost = Failure(error.ConnectionLost())
        self.assertEqual(
            describe(ResponseFailed([lost])),
            "bad response: connection closed before a complete response",
        )

    def test_badResponse(self) -> None:
        """A malformed response names what was wrong with it."""
        self.assertEqual(
            describe(BadResponse("malformed status line")),
            "bad response: malformed status line",
        )

    def test_checkTimeout(self) -> None:
        """A timeout of the whole check keeps its own text."""
        self.assertEqual(
            describe(defer.TimeoutError("timed out after 2s")), "timed out after 2s"
        )

    def test_tls(self) -> None:
        """An OpenSSL error gives its reasons, not a list of tuples."""
        exc = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.assertEqual(describe(exc), "TLS handshake failed: certificate verify failed")

    def test_anythingElse(self) -> None:
        """Anything else is its type and the first line of its text, bounded."""
        self.assertEqual(describe(RuntimeError("boom")), "RuntimeError: boom")
        self.assertEqual(describe(RuntimeError()), "RuntimeError")
        long = describe(ValueError("x" * 1000 + "\nsecond line"))
        self.assertEqual(long, "ValueError: " + "x" * 200)

    def test_importLeavesReactorAlone(self) -> None:
        """Importing txbalancer.failures does not install the reactor."""
        out = subprocess.run(
            [sys.executable, "-c",
             "import sys, txbalancer.failures; "
             "print('twisted.internet.reactor' in sys.modules)"],
            capture_output=True, text=True, check=True,
        ).stdout
        self.assertEqual(out.strip(), "False")
