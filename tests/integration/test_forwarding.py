"""What reaches the backend, and what comes back: the request and response as sent."""

from __future__ import annotations

import hashlib
import re

import pytest

from .httpraw import RawClient, build_request

pytestmark = pytest.mark.integration

SPOOFED = "6.6.6.6"


def values(echo: dict, name: str) -> list[str]:
    """Every value of header ``name`` the echo backend saw, in order."""
    return [v for (k, v) in echo["headers"] if k.lower() == name.lower()]


def split_list(header_values: list[str]) -> list[str]:
    return [
        item.strip() for v in header_values for item in v.split(",") if item.strip()
    ]


def send_tricky_request(
    port: int, target: str, method: str = "POST", body: bytes = b""
):
    """One request carrying hop-by-hop headers, repeats and a spoofed client address."""
    headers = [
        ("Host", "example.test:8080"),
        ("X-Rep", "one"),
        ("X-Other", "between"),
        ("X-Rep", "two"),
        ("Connection", "keep-alive, X-Foo"),
        ("X-Foo", "must not pass"),
        ("Keep-Alive", "timeout=30"),
        ("TE", "gzip"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Forwarded-For", SPOOFED),
        ("Forwarded", f"for={SPOOFED}"),
    ]
    with RawClient(port) as client:
        resp = client.request(method, target, headers, body)
    assert resp.status == 200, resp
    return resp.json()


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb?x=1&y=%20&x=2",
        "/%7Euser/./x/../y;p=1?q=%2F&&z=%zz&%41",
        "/caf%C3%A9/%20space?",
    ],
)
def test_request_passes_unchanged(backend, balancer, target):
    """Method, path, query, repeated headers, Host and body reach the backend as sent."""
    echo_backend = backend("echo")
    lb = balancer([echo_backend])
    body = bytes(range(256)) * 40
    echo = send_tricky_request(lb.port, target, "POST", body)
    assert echo["method"] == "POST"
    assert echo["url"] == target
    assert echo["bodyLength"] == len(body)
    assert echo["bodySha256"] == hashlib.sha256(body).hexdigest()
    assert values(echo, "Host") == ["example.test:8080"]
    assert values(echo, "X-Rep") == ["one", "two"]
    names = [k.lower() for (k, _) in echo["headers"]]
    assert (
        names.index("x-rep")
        < names.index("x-other")
        < len(names) - 1 - names[::-1].index("x-rep")
    ), echo["headers"]


@pytest.mark.parametrize(
    "method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS", "PURGE"]
)
def test_methods_pass_unchanged(backend, balancer, method):
    """Any method, standard or not, reaches the backend as the client sent it."""
    echo_backend = backend("echo")
    lb = balancer([echo_backend])
    with RawClient(lb.port) as client:
        resp = client.request(method, "/m?x=1")
    assert resp.status == 200, resp
    assert resp.json()["method"] == method
    assert resp.json()["url"] == "/m?x=1"


def test_hop_by_hop_request_headers_removed(backend, balancer):
    """Connection, the headers it names, Keep-Alive, TE and Proxy-Connection never reach the backend."""
    echo_backend = backend("echo")
    lb = balancer([echo_backend])
    echo = send_tricky_request(lb.port, "/hop")
    for name in ("X-Foo", "Keep-Alive", "TE", "Proxy-Connection"):
        assert values(echo, name) == [], (name, echo["headers"])
    for token in split_list(values(echo, "Connection")):
        assert token.lower() not in ("x-foo", "te", "proxy-connection"), echo["headers"]


def test_spoofed_forwarding_headers_replaced(backend, balancer):
    """From an untrusted peer, X-Forwarded-For and Forwarded name only the real peer."""
    echo_backend = backend("echo")
    lb = balancer([echo_backend])
    echo = send_tricky_request(lb.port, "/xff")
    assert values(echo, "X-Forwarded-For") == ["127.0.0.1"], echo["headers"]
    forwarded = ", ".join(values(echo, "Forwarded"))
    assert SPOOFED not in forwarded, forwarded
    assert re.search(r'for="?127\.0\.0\.1', forwarded), forwarded
    assert values(echo, "X-Forwarded-Proto") == ["http"], echo["headers"]
    assert values(echo, "X-Forwarded-Host") == ["example.test:8080"], echo["headers"]
    assert values(echo, "Via"), echo["headers"]


def test_trusted_proxy_forwarding_headers_appended(backend, balancer):
    """From a --trusted-proxies peer, X-Forwarded-For and Forwarded keep the chain and add the peer."""
    echo_backend = backend("echo")
    lb = balancer([echo_backend], "--trusted-proxies", "127.0.0.1/32")
    echo = send_tricky_request(lb.port, "/xff")
    assert split_list(values(echo, "X-Forwarded-For")) == [SPOOFED, "127.0.0.1"], echo[
        "headers"
    ]
    forwarded = ", ".join(values(echo, "Forwarded"))
    spoofed_at = forwarded.find(f"for={SPOOFED}")
    peer = re.search(r'for="?127\.0\.0\.1', forwarded)
    assert spoofed_at >= 0 and peer and spoofed_at < peer.start(), forwarded


def test_hop_by_hop_response_headers_removed(backend, balancer):
    """The backend's Connection, the headers it names, Keep-Alive and Proxy-Connection never reach the client; repeated headers do, in order."""
    lb = balancer([backend()])
    with RawClient(lb.port) as client:
        resp = client.request("GET", "/__hop")
    assert resp.status == 200, resp
    assert resp.text.startswith("Response from server on port")
    for name in ("X-Bar", "Keep-Alive", "Proxy-Connection"):
        assert resp.values(name) == [], (name, resp.headers)
    for token in split_list(resp.values("Connection")):
        assert token.lower() not in ("x-bar", "proxy-connection"), resp.headers
    assert resp.values("Set-Cookie") == ["first=1", "second=2"], resp.headers
    assert resp.values("X-Rep") == ["one", "two"], resp.headers


def test_backend_connection_close_keeps_client_connection(backend, balancer):
    """A backend that says Connection: close does not close the client's kept-alive connection."""
    lb = balancer([backend("close")])
    with RawClient(lb.port) as client:
        first = client.request("GET", "/one")
        assert first.status == 200, first
        assert "close" not in ",".join(first.values("Connection")).lower(), (
            first.headers
        )
        second = client.request("GET", "/two")
        assert second.status == 200, second
        assert second.text.startswith("Response from server on port")


def test_body_less_responses_carry_no_body(backend, balancer):
    """HEAD, 204 and 304 answers carry no body, so the next answer on the connection parses cleanly."""
    lb = balancer([backend()])
    with RawClient(lb.port) as client:
        head = client.request("HEAD", "/")
        assert head.status == 200, head
        no_content = client.request("GET", "/__status/204")
        assert no_content.status == 204, no_content
        assert no_content.values("Transfer-Encoding") == [], no_content.headers
        assert no_content.values("Content-Length") in ([], ["0"]), no_content.headers
        not_modified = client.request("GET", "/__status/304")
        assert not_modified.status == 304, not_modified
        assert not_modified.values("Transfer-Encoding") == [], not_modified.headers
        last = client.request("GET", "/")
        assert last.status == 200, last
        assert last.text.startswith("Response from server on port")
        assert not client.at_eof(wait=0.2)
        assert client.buf == b"", bytes(client.buf)


def test_expect_100_continue_upload(backend, balancer):
    """A client that sends Expect: 100-continue gets 100 Continue, then its upload goes through."""
    lb = balancer([backend("echo")])
    body = b"x" * 100_000
    with RawClient(lb.port, timeout=15) as client:
        client.send(
            build_request(
                "POST",
                "/upload",
                [("Expect", "100-continue"), ("Content-Length", str(len(body)))],
            )
        )
        interim = client.response(interim=True)
        assert interim.status == 100, interim
        client.send(body)
        final = client.response("POST")
    assert final.status == 200, final
    assert final.json()["bodyLength"] == len(body)
    assert final.json()["bodySha256"] == hashlib.sha256(body).hexdigest()
