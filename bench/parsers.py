"""
A micro-benchmark of request-head parsing: txbalancer's own parser
(txbalancer.request.parseHead) beside httptools (llhttp, compiled), on
typical heads.

    python bench/parsers.py            # needs: pip install httptools

httptools is timed doing the least it could do for the balancer: parsing and
collecting (name, value) pairs through its callbacks, with none of the checks
parseHead makes on top (underscore shadows, Content-Length lists, Host
syntax, Transfer-Encoding lists, Connection tokens, ...).  Those checks would
still have to run in Python after it, so its time here is a lower bound of
what it would cost behind the same interface.
"""

from __future__ import annotations

import platform
import sys
import timeit

from txbalancer.request import parseHead

HEADS = {
    "wrk (2 headers)": b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000",
    "browser (10 headers)": (
        b"GET /static/app.js?v=12 HTTP/1.1\r\n"
        b"Host: www.example.com\r\n"
        b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
        b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        b"Accept-Language: en-US,en;q=0.5\r\n"
        b"Accept-Encoding: gzip, deflate, br\r\n"
        b"Connection: keep-alive\r\n"
        b"Referer: https://www.example.com/\r\n"
        b"Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n"
        b"Upgrade-Insecure-Requests: 1\r\n"
        b"Cache-Control: no-cache"
    ),
    "POST (6 headers)": (
        b"POST /api/v1/items HTTP/1.1\r\n"
        b"Host: api.example.com\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: 48\r\n"
        b"Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789\r\n"
        b"Accept: application/json\r\n"
        b"X-Request-Id: 5f3c2a1e-4b6d-4e8f-9a0b-1c2d3e4f5a6b"
    ),
}


def httptoolsParser():
    import httptools

    class Collect:
        __slots__ = ("headers", "url")

        def __init__(self):
            self.headers = []
            self.url = b""

        def on_url(self, url):
            self.url = url

        def on_header(self, name, value):
            self.headers.append((name, value))

    def parse(head: bytes):
        c = Collect()
        p = httptools.HttpRequestParser(c)
        p.feed_data(head + b"\r\n\r\n")
        return p.get_method(), c.url, p.get_http_version(), c.headers

    return parse


def main() -> None:
    n = 50000
    print(f"{platform.python_implementation()} {sys.version.split()[0]}, {n} parses each, best of 5")
    try:
        ht = httptoolsParser()
    except ImportError:
        ht = None
        print("httptools not installed: only parseHead is timed")
    print(f"| head | parseHead µs | httptools (bare) µs | ratio |")
    print(f"|---|---|---|---|")
    for name, head in HEADS.items():
        own = min(timeit.repeat(lambda: parseHead(head), number=n, repeat=5)) / n * 1e6
        if ht is not None:
            other = min(timeit.repeat(lambda: ht(head), number=n, repeat=5)) / n * 1e6
            print(f"| {name} | {own:.2f} | {other:.2f} | {own / other:.2f}x |")
        else:
            print(f"| {name} | {own:.2f} | - | - |")


if __name__ == "__main__":
    main()
