"""
C{GET /}: the dashboard, one self-contained HTML page (inline script and
style, no external script, style sheet or font) shipped as package data.

The page holds no data of its own: it fetches C{/status} every second and
draws what it gets, and its buttons call the runtime API.  With a token,
the page reads it from the URL fragment (C{#token=...}, which browsers
never send to the server) or asks for it, and sends it only in the
C{Authorization} header of its own requests.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from txbalancer.admin.server import JSONResource

__all__ = ["DashboardResource", "page"]


def page() -> bytes:
    """
    The dashboard's HTML.
    """
    return resources.files(__package__).joinpath("dashboard.html").read_bytes()


class DashboardResource(JSONResource):
    isLeaf = True

    def __init__(self) -> None:
        JSONResource.__init__(self)
        self.html = page()

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        # The page may only talk to this server; nothing loads from elsewhere.
        request.setHeader(
            b"Content-Security-Policy",
            b"default-src 'none'; script-src 'unsafe-inline'; "
            b"style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
            b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        )
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        return self.html
