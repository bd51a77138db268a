"""
The dashboard in a real headless browser (Debian's chromium, driven by
Playwright), against the real twistd balancer and real backends: the
numbers change while traffic flows, and the drain button drains.

Set TXBALANCER_SCREENSHOT=docs/dashboard.png to save the screenshot the
README shows (by default it goes to the test's temporary directory).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from .admin_support import TRAFFIC_PREFIX, Traffic, start_with_admin
from .support import MARGIN, wait_for

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
WAIT_MS = int((10 + MARGIN) * 1000)


@pytest.fixture
def chromium():
    """A headless chromium page (``.browser`` opens more); skipped when chromium is not installed."""
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 560})
            yield page
        finally:
            browser.close()


def row(page, address):
    return page.locator(f'tr.backend[data-backend="{address}"]')


def field(page, address, name) -> str:
    return row(page, address).locator(f'[data-field="{name}"]').text_content()


def wait_updates(page, n: int) -> None:
    """Wait until the page has drawn ``n`` more updates from /status."""
    now = int(page.get_attribute("#updated", "data-updates"))
    page.wait_for_function(
        f"() => +document.getElementById('updated').dataset.updates >= {now + n}",
        timeout=WAIT_MS + n * 1500,
    )


def wait_text(page, address: str, name: str, text: str) -> None:
    """Wait until a backend's field reads ``text``."""
    page.wait_for_function(
        """([address, name, text]) => {
            const row = [...document.querySelectorAll("tr.backend")]
                .find(r => r.dataset.backend === address);
            const e = row && row.querySelector(`[data-field="${name}"]`);
            return e !== null && e !== undefined && e.textContent === text;
        }""",
        arg=[address, name, text],
        timeout=WAIT_MS,
    )


def number(text: str) -> float:
    return float(text) if text not in ("-", "") else float("nan")


def test_dashboard_live_numbers_and_drain(backend, balancer, chromium, tmp_path):
    """The dashboard's numbers move with the traffic, and its drain button stops a backend's traffic."""
    page = chromium
    a, b, c = backend(), backend(), backend("delay", DELAY_MS=8)
    lb, port = start_with_admin(balancer, [a, b, c])
    with Traffic(lb.port, threads=4, limit=100000, seconds=150, pause=0.004) as traffic:
        traffic.wait_for_more(50)
        page.goto(f"http://127.0.0.1:{port}/")
        assert page.title() == "txbalancer"
        wait_updates(page, 2)
        assert page.inner_text("#connection") == "live"
        # Every backend, with its state and numbers as text.
        for x in (a, b, c):
            assert field(page, x.address, "state") == "up"
        first = int(field(page, a.address, "requests"))
        wait_updates(page, 2)
        assert int(field(page, a.address, "requests")) > first
        assert number(field(page, a.address, "rps")) > 0
        assert number(field(page, c.address, "p50")) >= 8.0
        assert number(field(page, a.address, "error_rate")) == 0.0
        assert float(page.inner_text("#total-rps")) > 0

        # Drain a with its button.
        row(page, a.address).locator('button[data-action="drain"]').click()
        wait_text(page, a.address, "state", "draining")
        assert field(page, a.address, "state") == "draining"
        assert "drain" in page.inner_text("#message")
        time.sleep(0.5)
        before = a.counts(TRAFFIC_PREFIX)["started"]
        traffic.wait_for_more(300)
        assert a.counts(TRAFFIC_PREFIX)["started"] == before
        # Its requests per second fall to zero on the page too.
        wait_text(page, a.address, "rps", "0.0")
        assert number(field(page, b.address, "rps")) > 0
        # Let the charts fill a little, then keep a picture of the page.
        keep = os.environ.get("TXBALANCER_SCREENSHOT")
        wait_updates(page, 40 if keep else 5)
        shot = Path(keep or tmp_path / "dashboard.png")
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10000
    assert traffic.failures == [], traffic.failures[:10]


def test_dashboard_with_token(backend, balancer, chromium, tmp_path):
    """With a token the page asks for it (or reads #token=) and then shows live data."""
    page = chromium
    token_file = tmp_path / "token"
    token_file.write_text("dash-token-123\n")
    x = backend()
    _, port = start_with_admin(balancer, [x], token_file=token_file)
    page.goto(f"http://127.0.0.1:{port}/")
    page.wait_for_selector("#token-form", state="visible", timeout=WAIT_MS)
    assert page.inner_text("#connection") == "needs token"
    assert page.locator("tr.backend").count() == 0
    page.fill("#token-input", "dash-token-123")
    page.click('#token-form button[type="submit"]')
    page.wait_for_selector(f'tr.backend[data-backend="{x.address}"]', timeout=WAIT_MS)
    wait_for(lambda: page.inner_text("#connection") == "live", 10 + MARGIN, "live")

    # The fragment: read by the page, never sent, and removed from the address bar.
    other = page.context.browser.new_page()
    requests = []
    other.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
    other.goto(f"http://127.0.0.1:{port}/#token=dash-token-123")
    other.wait_for_selector(f'tr.backend[data-backend="{x.address}"]', timeout=WAIT_MS)
    assert "token" not in other.url
    status_calls = [auth for url, auth in requests if url.endswith("/status")]
    assert status_calls and all(auth == "Bearer dash-token-123" for auth in status_calls)
    assert all("dash-token-123" not in url for url, _ in requests)
