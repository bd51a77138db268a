"""
Tests for txbalancer.config: the backends file and the command-line values.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from txbalancer.config import (
    BackendSpec,
    ConfigError,
    load_backends,
    parse_backends,
    parse_cidrs,
    parse_seconds,
    parse_size,
)

PYTHON = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_of(text: str, filename: str = "backends.txt") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_backends(text, filename)
    return info.value


# ---------------------------------------------------------------------------
# Happy paths


def test_example_from_the_design():
    """The example file of the design parses into four backends with their flags."""
    text = (
        "# one backend per line; blank lines and # comments are ignored\n"
        "127.0.0.1:3001\n"
        "127.0.0.1:3002  weight=2\n"
        "app3.internal:3003  max_conns=100\n"
        "\n"
        "127.0.0.1:3004  backup\n"
    )
    backends = parse_backends(text, "b.txt")
    assert backends == (
        BackendSpec("127.0.0.1", 3001, filename="b.txt", lineno=2),
        BackendSpec("127.0.0.1", 3002, weight=2, filename="b.txt", lineno=3),
        BackendSpec("app3.internal", 3003, max_conns=100, filename="b.txt", lineno=4),
        BackendSpec("127.0.0.1", 3004, backup=True, filename="b.txt", lineno=6),
    )


def test_defaults():
    """A bare host:port is plain http, weight 1, unlimited, not backup, verified."""
    (spec,) = parse_backends("localhost:80")
    assert (spec.scheme, spec.weight, spec.max_conns, spec.backup, spec.tls_verify) == (
        "http",
        1,
        0,
        False,
        True,
    )
    assert spec.filename == "<backends>"
    assert spec.lineno == 1


def test_all_flags_together():
    """Every flag can be given on one line, in any order."""
    (spec,) = parse_backends(
        "https://api.example.com:8443 tls_verify=off backup max_conns=7 weight=1000"
    )
    assert spec == BackendSpec(
        "api.example.com",
        8443,
        scheme="https",
        weight=1000,
        max_conns=7,
        backup=True,
        tls_verify=False,
        filename="<backends>",
        lineno=1,
    )


def test_comments_and_whitespace():
    """Whole-line and trailing comments, blank lines, tabs and indentation are ignored."""
    text = (
        "   # indented comment\n"
        "\n"
        "\t \n"
        "  127.0.0.1:3001\tweight=3   # trailing comment\n"
        "#127.0.0.1:3002\n"
        "127.0.0.1:3003 # comment with weight=9 in it\n"
    )
    backends = parse_backends(text)
    assert [(b.port, b.weight, b.lineno) for b in backends] == [
        (3001, 3, 4),
        (3003, 1, 6),
    ]


def test_crlf_line_endings():
    """A file saved with Windows line endings parses the same."""
    backends = parse_backends("127.0.0.1:3001\r\n127.0.0.1:3002 weight=2\r\n")
    assert [(b.port, b.weight) for b in backends] == [(3001, 1), (3002, 2)]


def test_line_numbers_count_newlines_only():
    """A form feed or Unicode line separator inside a line does not shift line numbers."""
    err = error_of("a:1\x0c\nb:2\u2028\nc:0\n")
    assert str(err).startswith("backends.txt:3: bad port")


def test_ipv6_in_brackets():
    """IPv6 addresses are written in brackets and stored without them."""
    (plain, secure) = parse_backends("[::1]:3001\nhttps://[2001:db8::5]:443/ backup\n")
    assert (plain.host, plain.port, plain.address) == ("::1", 3001, "[::1]:3001")
    assert (secure.scheme, secure.host, secure.address, secure.backup) == (
        "https",
        "2001:db8::5",
        "[2001:db8::5]:443",
        True,
    )


def test_schemes_and_trailing_slash():
    """http:// and https:// prefixes are accepted, in any case, with an optional trailing slash."""
    backends = parse_backends("http://a:1\nHTTPS://b:2/\nhttp://c:3/\n")
    assert [(b.scheme, b.host, b.port) for b in backends] == [
        ("http", "a", 1),
        ("https", "b", 2),
        ("http", "c", 3),
    ]


def test_tls_verify_values():
    """tls_verify takes on or off, in any case."""
    on, off = parse_backends("https://a:1 tls_verify=ON\nhttps://b:1 tls_verify=off\n")
    assert (on.tls_verify, off.tls_verify) == (True, False)


def test_address_and_key():
    """address formats host:port; key is (scheme, lower-cased host, port)."""
    spec = BackendSpec("App.Example", 80, scheme="https")
    assert spec.address == "App.Example:80"
    assert spec.key == ("https", "app.example", 80)
    assert BackendSpec("::1", 80).address == "[::1]:80"


def test_same_host_different_scheme_or_port_is_not_duplicate():
    """Backends differing in scheme or port are distinct."""
    backends = parse_backends("a:1\nhttps://a:1\na:2\n")
    assert len(backends) == 3


def test_empty_text_parses_to_nothing():
    """parse_backends of comments only is an empty tuple (load_backends is the one that refuses it)."""
    assert parse_backends("# nothing\n\n") == ()


def test_specs_are_immutable_and_hashable():
    """A BackendSpec is frozen and usable in sets."""
    (spec,) = parse_backends("a:1")
    with pytest.raises(AttributeError):
        spec.port = 2  # type: ignore[misc]
    assert spec in {spec}


# ---------------------------------------------------------------------------
# Errors in the backends file: one per kind, each naming file and line


def test_missing_port():
    """A host without a port is an error naming the file and line."""
    err = error_of("127.0.0.1:3001\n127.0.0.1\n")
    assert str(err).startswith("backends.txt:2: missing port")
    assert (err.filename, err.lineno) == ("backends.txt", 2)


@pytest.mark.parametrize("port", ["0", "65536", "99999", "http", "-1", "3O01", "٣٠٠١"])
def test_bad_port(port):
    """A port that is not a number from 1 to 65535 is an error naming file, line and value."""
    err = error_of(f"# header\nhost:{port}\n")
    assert str(err).startswith("backends.txt:2: bad port")
    assert repr(port) in err.message
    assert "1 to 65535" in err.message


@pytest.mark.parametrize(
    "address",
    [
        "bad..host:1",
        "-bad:1",
        "ho st:1",
        "300.1.1.1:80",
        "10.1:80",
        ":80",
        "user@host:80",
    ],
)
def test_bad_host(address):
    """A host that is neither a valid name nor an IP address is an error naming file and line."""
    err = error_of(f"ok:1\n\n{address}\n")
    assert str(err).startswith("backends.txt:3: ")
    assert "host" in err.message or "address" in err.message


def test_bad_ipv6():
    """A bracketed address that is not IPv6 is an error."""
    err = error_of("[not:an:address]:80")
    assert str(err).startswith("backends.txt:1: bad IPv6 address")


def test_ipv6_without_brackets():
    """An IPv6 address without brackets is an error that shows the bracket syntax."""
    err = error_of("::1:3001")
    assert str(err).startswith("backends.txt:1: ")
    assert "[::1]:3001" in err.message


def test_url_with_path():
    """A URL with a path is refused: a backend is an address, not a URL."""
    err = error_of("http://a:1/api")
    assert str(err).startswith("backends.txt:1: a backend is host:port")


def test_unsupported_scheme():
    """A scheme other than http or https is an error naming the scheme."""
    err = error_of("ftp://a:21")
    assert str(err).startswith("backends.txt:1: unsupported scheme 'ftp'")


def test_unknown_flag():
    """An unknown flag is an error that lists the known flags."""
    err = error_of("a:1\na:2 wieght=2\n")
    assert str(err).startswith("backends.txt:2: unknown flag 'wieght'")
    for known in ("weight=", "max_conns=", "tls_verify=", "backup"):
        assert known in err.message


@pytest.mark.parametrize(
    "flag, expect",
    [
        ("weight=0", "bad value for weight"),
        ("weight=1001", "bad value for weight"),
        ("weight=two", "bad value for weight"),
        ("weight=1.5", "bad value for weight"),
        ("weight=", "flag 'weight' needs a value"),
        ("weight", "flag 'weight' needs a value"),
        ("max_conns=-1", "bad value for max_conns"),
        ("max_conns=lots", "bad value for max_conns"),
        ("tls_verify=maybe", "bad value for tls_verify"),
        ("tls_verify", "bad value for tls_verify"),
        ("backup=yes", "'backup' is a bare word"),
        ("priority=101", "bad value for priority"),
        ("priority=-1", "bad value for priority"),
        ("priority", "flag 'priority' needs a value"),
        ("backup priority=2", "give either 'backup' or 'priority=N'"),
        ("priority=2 backup", "give either 'backup' or 'priority=N'"),
    ],
)
def test_bad_flag_value(flag, expect):
    """A flag with a bad or missing value is an error naming the flag and what it wants."""
    err = error_of(f"a:1 {flag}")
    assert str(err).startswith(f"backends.txt:1: {expect}")


def test_priority_levels():
    """priority=N sets a backend's level; backup is priority 1; any level above 0 is a backup."""
    plain, backup, second, zero = parse_backends(
        "a:1\nb:2 backup\nc:3 priority=2\nd:4 priority=0\n", "b.txt"
    )
    assert [(s.priority, s.backup) for s in (plain, backup, second, zero)] == [
        (0, False), (1, True), (2, True), (0, False)
    ]
    assert backup == BackendSpec("b", 2, priority=1, filename="b.txt", lineno=2)


def test_duplicate_backend():
    """A backend listed twice is an error that names the line of the first occurrence."""
    err = error_of("a:1\nb:2\n\nA:1 weight=3\n")
    assert str(err) == (
        "backends.txt:4: duplicate backend http://A:1 (first defined on line 1)"
    )


def test_duplicate_ipv6_in_another_spelling():
    """Two spellings of the same IPv6 address are the same backend."""
    err = error_of("[::1]:80\n[0:0::1]:80\n")
    assert str(err).startswith("backends.txt:2: duplicate backend")


def test_flag_given_twice():
    """A flag given twice on one line is an error."""
    err = error_of("a:1 weight=2 weight=3")
    assert str(err) == "backends.txt:1: flag 'weight' given twice"
    err = error_of("a:1 backup backup")
    assert str(err) == "backends.txt:1: flag 'backup' given twice"


# ---------------------------------------------------------------------------
# ConfigError and load_backends


def test_config_error_str():
    """ConfigError prints FILE:LINE: message, FILE: message, or the message alone."""
    assert str(ConfigError("m", "f", 3)) == "f:3: m"
    assert str(ConfigError("m", "f")) == "f: m"
    assert str(ConfigError("m")) == "m"
    err = ConfigError("m", filename="f", lineno=3)
    assert (err.message, err.filename, err.lineno) == ("m", "f", 3)


def test_load_backends(tmp_path):
    """load_backends reads a file and records its path in each spec."""
    path = tmp_path / "backends.txt"
    path.write_text("127.0.0.1:3001\n127.0.0.1:3002 weight=2\n")
    backends = load_backends(str(path))
    assert [(b.port, b.weight, b.filename) for b in backends] == [
        (3001, 1, str(path)),
        (3002, 2, str(path)),
    ]


def test_load_backends_with_byte_order_mark(tmp_path):
    """A UTF-8 byte order mark at the start of the file is ignored."""
    path = tmp_path / "backends.txt"
    path.write_bytes(b"\xef\xbb\xbf127.0.0.1:3001\n")
    assert load_backends(str(path))[0].host == "127.0.0.1"


def test_load_backends_missing_file(tmp_path):
    """A missing file is a ConfigError naming the file and the operating system's reason."""
    path = str(tmp_path / "nope.txt")
    with pytest.raises(ConfigError) as info:
        load_backends(path)
    assert (
        str(info.value)
        == f"{path}: cannot read backends file: No such file or directory"
    )
    assert info.value.lineno is None


def test_load_backends_directory(tmp_path):
    """A directory given as the backends file is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError) as info:
        load_backends(str(tmp_path))
    assert info.value.message.startswith("cannot read backends file: ")


def test_load_backends_not_utf8(tmp_path):
    """A file that is not UTF-8 text is a ConfigError."""
    path = tmp_path / "backends.txt"
    path.write_bytes(b"\xff\xfe1\x00")
    with pytest.raises(ConfigError) as info:
        load_backends(str(path))
    assert info.value.message.startswith("cannot read backends file: not UTF-8")


def test_load_backends_empty(tmp_path):
    """A file without any backend is a ConfigError 'no backends defined'."""
    path = tmp_path / "backends.txt"
    path.write_text("# all commented out\n# 127.0.0.1:3001\n\n")
    with pytest.raises(ConfigError) as info:
        load_backends(str(path))
    assert str(info.value) == f"{path}: no backends defined"


def test_load_backends_error_names_path(tmp_path):
    """A bad line in a loaded file is reported as PATH:LINE."""
    path = tmp_path / "backends.txt"
    path.write_text("127.0.0.1:3001\n127.0.0.1:0\n")
    with pytest.raises(ConfigError) as info:
        load_backends(str(path))
    assert str(info.value).startswith(f"{path}:2: bad port")


def test_shipped_backends_file():
    """etc/backends.txt loads and holds the three demo backends."""
    backends = load_backends(os.path.join(ROOT, "etc", "backends.txt"))
    assert [b.address for b in backends] == [
        "127.0.0.1:3001",
        "127.0.0.1:3002",
        "127.0.0.1:3003",
    ]


# ---------------------------------------------------------------------------
# --trusted-proxies, seconds, sizes


def test_parse_cidrs():
    """Networks and single addresses, IPv4 and IPv6, with host bits allowed."""
    assert parse_cidrs("10.0.0.1/8, 192.0.2.7,::1,2001:db8::/32") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("2001:db8::/32"),
    )


def test_parse_cidrs_empty():
    """An empty value means no trusted proxies."""
    assert parse_cidrs("") == ()


@pytest.mark.parametrize(
    "bad", ["10.0.0.0/33", "example.com", "10.0.0.256", "1.2.3.4/x"]
)
def test_parse_cidrs_error(bad):
    """A bad item is a ConfigError naming that item and the option."""
    with pytest.raises(ConfigError) as info:
        parse_cidrs(f"127.0.0.1,{bad}")
    assert str(info.value).startswith(f"--trusted-proxies: {bad!r} is not an IP")


@pytest.mark.parametrize("value, expected", [("3", 3.0), ("0.5", 0.5), (" 60 ", 60.0)])
def test_parse_seconds(value, expected):
    """A positive number of seconds parses to a float."""
    assert parse_seconds(value, "--connect-timeout") == expected


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "nan", "inf"])
def test_parse_seconds_error(value):
    """Zero, negative, infinite or non-numeric seconds are a ConfigError naming the option."""
    with pytest.raises(ConfigError) as info:
        parse_seconds(value, "--connect-timeout")
    assert str(info.value).startswith("--connect-timeout: expected a number of seconds")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1", 1),
        ("1000000", 1000000),
        ("64k", 64 * 1024),
        ("64K", 64 * 1024),
        ("10m", 10 * 1024**2),
        ("10M", 10 * 1024**2),
        ("2g", 2 * 1024**3),
        ("1G", 1024**3),
        ("1KiB", 1024),
        ("5MB", 5 * 1024**2),
        ("100b", 100),
    ],
)
def test_parse_size(value, expected):
    """Sizes are bytes, with optional binary k/M/G suffixes."""
    assert parse_size(value, "--max-body-size") == expected


@pytest.mark.parametrize("value", ["0", "0k", "-1", "1.5M", "10T", "M", "", "ten"])
def test_parse_size_error(value):
    """A non-positive or unparseable size is a ConfigError naming the option."""
    with pytest.raises(ConfigError) as info:
        parse_size(value, "--max-body-size")
    assert str(info.value).startswith("--max-body-size: expected a size in bytes")


# ---------------------------------------------------------------------------
# Purity


def test_import_leaves_reactor_alone():
    """Importing txbalancer.config neither installs the reactor nor imports other txbalancer modules."""
    code = (
        "import sys, txbalancer.config; "
        "bad = [m for m in sys.modules if m == 'twisted.internet.reactor' "
        "or (m.startswith('txbalancer.') and m != 'txbalancer.config')]; "
        "print(bad)"
    )
    out = subprocess.run(
        [PYTHON, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------
# Round trip


labels = (
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
    .map(lambda label: label.strip("-"))
    .filter(bool)
)
hostnames = (
    st.lists(labels, min_size=1, max_size=4)
    .map(".".join)
    .filter(lambda h: not h.split(".")[-1].isdigit())
)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)


@st.composite
def backend_specs(draw):
    return BackendSpec(
        host=draw(st.one_of(hostnames, ipv4s, ipv6s)),
        port=draw(st.integers(1, 65535)),
        scheme=draw(st.sampled_from(["http", "https"])),
        weight=draw(st.integers(1, 1000)),
        max_conns=draw(st.integers(0, 10**6)),
        backup=draw(st.booleans()),
        tls_verify=draw(st.booleans()),
    )


def format_line(spec: BackendSpec, style: int) -> str:
    """Write a spec the way a person might, varying what is spelled out."""
    address = spec.address
    if spec.scheme == "https" or style % 3 == 1:
        address = f"{spec.scheme}://{address}"
        if style % 2:
            address += "/"
    words = [address]
    if spec.weight != 1 or style % 4 == 0:
        words.append(f"weight={spec.weight}")
    if spec.max_conns or style % 5 == 0:
        words.append(f"max_conns={spec.max_conns}")
    if not spec.tls_verify or style % 6 == 0:
        words.append("tls_verify=" + ("on" if spec.tls_verify else "off"))
    if spec.backup:
        words.append("backup")
    flags = words[1:]
    if style % 7 == 0:
        flags.reverse()
    line = " \t "[style % 3].join([words[0]] + flags)
    if style % 8 == 0:
        line += "  # a comment"
    return line


@given(
    specs=st.lists(backend_specs(), max_size=10, unique_by=lambda s: s.key),
    styles=st.lists(st.integers(0, 1000), min_size=10, max_size=10),
    blank_every=st.integers(1, 4),
)
def test_round_trip(specs, styles, blank_every):
    """Any valid backends file written from specs parses back to the same specs, lines included."""
    lines = ["# generated"]
    expected = []
    for i, (spec, style) in enumerate(zip(specs, styles)):
        if i % blank_every == 0:
            lines.append("")
        lines.append(format_line(spec, style))
        expected.append(
            BackendSpec(
                spec.host,
                spec.port,
                spec.scheme,
                spec.weight,
                spec.max_conns,
                spec.backup,
                spec.tls_verify,
                filename="gen.txt",
                lineno=len(lines),
            )
        )
    assert parse_backends("\n".join(lines) + "\n", "gen.txt") == tuple(expected)
