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


# ---------------------------------------------------------------------------
# The TOML configuration file

from txbalancer.config import load_config, load_secret  # noqa: E402


def write(tmp_path, text: str, name: str = "balancer.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


SEED = """\
[[listen]]
endpoint = "tcp:8000"

[pool.api]
backends = [
    "127.0.0.1:3001",
    "127.0.0.1:3002 weight=2",
]
strategy = "least-conn"
health = { path = "/healthz", interval = 5, timeout = 2, rise = 2, fall = 3 }

[pool.admin]
backends_file = "admin-backends.txt"

[pool.web]
backends = ["127.0.0.1:3003"]
backend-timeout = 30

[[route]]
path = "/api/"
pool = "api"
strip_prefix = true

[[route]]
host = "admin.example.com"
path = "/admin/"
pool = "admin"

[[route]]
pool = "web"

[balancer]
client-timeout = 10
backend-timeout = 20

[admin]
endpoint = "tcp:9000:interface=127.0.0.1"
"""


def seed(tmp_path) -> str:
    (tmp_path / "admin-backends.txt").write_text("# admin\n127.0.0.1:4001\n")
    return write(tmp_path, SEED)


def test_toml_seed_example(tmp_path):
    """The design's example reads into three pools, three routes, a listener and the admin endpoint."""
    path = seed(tmp_path)
    config = load_config(path)
    assert [p.name for p in config.pools] == ["api", "admin", "web"]
    api, admin, web = config.pools
    assert [(b.address, b.weight, b.lineno) for b in api.backends] == [
        ("127.0.0.1:3001", 1, 6),
        ("127.0.0.1:3002", 2, 7),
    ]
    assert all(b.filename == path for b in api.backends)
    assert api.strategy == "least-conn"
    assert (api.healthPath, api.healthInterval, api.healthTimeout, api.rise, api.fall) == (
        "/healthz", 5.0, 2.0, 2, 3)
    assert admin.source == str(tmp_path / "admin-backends.txt")
    assert [b.address for b in admin.backends] == ["127.0.0.1:4001"]
    assert [(r.pool, r.host, r.path, r.stripPrefix, r.lineno) for r in config.routes] == [
        ("api", None, "/api/", True, 19),
        ("admin", "admin.example.com", "/admin/", False, 24),
        ("web", None, None, False, 29),
    ]
    assert [listener.endpoint for listener in config.listeners] == ["tcp:8000"]
    assert config.admin == "tcp:9000:interface=127.0.0.1"
    assert config.configFile == path


def test_toml_precedence(tmp_path):
    """A pool's own table wins over [balancer], which wins over the default; the command line wins over both."""
    config = load_config(seed(tmp_path))
    api, admin, web = config.pools
    assert (api.backendTimeout, admin.backendTimeout, web.backendTimeout) == (20.0, 20.0, 30.0)
    assert api.connectTimeout == 3.0
    assert config.clientTimeout == 10.0
    config = load_config(
        seed(tmp_path), commandLine={"backend-timeout": "7", "client-timeout": "9"}
    )
    assert [p.backendTimeout for p in config.pools] == [7.0, 7.0, 7.0]
    assert config.clientTimeout == 9.0


def test_toml_command_line_listeners_replace_the_file(tmp_path):
    """Listeners given on the command line replace the file's [[listen]] tables."""
    from txbalancer.settings import ListenerConfig

    config = load_config(seed(tmp_path), listeners=[ListenerConfig("tcp:9999")])
    assert [listener.endpoint for listener in config.listeners] == ["tcp:9999"]


def test_toml_no_listen_means_the_default(tmp_path):
    """A file without [[listen]] listens on the default port."""
    path = write(tmp_path, '[pool.default]\nbackends = ["127.0.0.1:3001"]\n')
    assert [listener.endpoint for listener in load_config(path).listeners] == ["tcp:8000"]


def test_toml_backends_from_the_command_line(tmp_path):
    """--backends gives a file without pools its one pool, named default, with [balancer]'s pool settings."""
    from txbalancer.settings import PoolConfig
    from txbalancer.testing import backendSpecs

    path = write(tmp_path, '[balancer]\nstrategy = "ip-hash"\nclient-timeout = 5\n')
    pool = PoolConfig(backends=backendSpecs("127.0.0.1:3001"), source="b.txt")
    config = load_config(path, backends=pool)
    (only,) = config.pools
    assert (only.name, only.strategy, only.source) == ("default", "ip-hash", "b.txt")
    assert config.clientTimeout == 5.0
    e = pytest.raises(ConfigError, load_config, seed(tmp_path), backends=pool).value
    assert "default" in str(e)


def test_toml_listeners_and_tls(tmp_path):
    """A listener takes any endpoint string, a bare port, tls = { cert, key, chain } relative to the file, or ssl:."""
    path = write(tmp_path, """\
[[listen]]
endpoint = "tcp:8443:interface=127.0.0.1"
tls = { cert = "fullchain.pem", key = "privkey.pem", chain = "/etc/chain.pem" }
[[listen]]
endpoint = 8080
[[listen]]
endpoint = "unix:/run/lb.sock"
[[listen]]
endpoint = "ssl:9443:privateKey=key.pem:certKey=cert.pem"
[[listen]]
endpoint = "systemd:domain=INET:index=0"
[pool.web]
backends = ["127.0.0.1:3003"]
""")
    listeners = load_config(path).listeners
    assert [listener.endpoint for listener in listeners] == [
        "tcp:8443:interface=127.0.0.1", "tcp:8080", "unix:/run/lb.sock", "tcp:9443",
        "systemd:domain=INET:index=0",
    ]
    tls = listeners[0].tls
    assert (tls.cert, tls.key, tls.chain) == (
        str(tmp_path / "fullchain.pem"), str(tmp_path / "privkey.pem"), "/etc/chain.pem")
    assert (listeners[3].tls.cert, listeners[3].tls.key) == (
        str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
    assert [listener.secure for listener in listeners] == [True, False, False, True, False]


def test_toml_srv_backends(tmp_path):
    """backends = "srv:NAME" records the source and no backends (the DNS lookup resolves it)."""
    path = write(tmp_path, '[pool.app]\nbackends = "srv:_http._tcp.app.service.consul"\n')
    (pool,) = load_config(path).pools
    assert (pool.source, pool.backends) == ("srv:_http._tcp.app.service.consul", ())


def test_toml_settings_of_every_kind(tmp_path):
    """Every kind of setting takes its TOML type: numbers, flags, sizes, networks, status ranges, paths."""
    (tmp_path / "secret").write_text("0123456789abcdef0123\n")
    path = write(tmp_path, """\
[pool.web]
backends = ["127.0.0.1:3003"]
no-health-checks = true
health = { status = "200-299", host = "web.internal" }
sticky-cookie = "lb"
max-ejected-percent = 25.5
[balancer]
max-body-size = "10M"
trusted-proxies = ["10.0.0.0/8", "127.0.0.1"]
access-log = "logs/access.log"
hsts = 3600
sticky-secret-file = "secret"
""")
    config = load_config(path)
    (pool,) = config.pools
    assert pool.noHealthChecks is True
    assert (pool.healthStatus, pool.healthHost, pool.stickyCookie) == ((200, 299), "web.internal", "lb")
    assert pool.maxEjectedPercent == 25.5
    assert config.maxBodySize == 10 * 1024**2
    assert [str(n) for n in config.trustedProxies] == ["10.0.0.0/8", "127.0.0.1/32"]
    assert config.accessLog == str(tmp_path / "logs" / "access.log")
    assert config.stickySecretFile == str(tmp_path / "secret")
    assert config.hsts == 3600


# (file text, the line the error names, words the message contains)
POOL = '[pool.web]\nbackends = ["127.0.0.1:3003"]\n'
TOML_ERRORS = {
    "unknown top-level key": ("[pool.web]\nbackends = [\"127.0.0.1:1\"]\n[pools.x]\n", 3,
                              ["unknown key 'pools'", "did you mean 'pool'"]),
    "unknown pool key": (POOL + "backend-timout = 3\n", 3,
                         ["unknown key 'backend-timout'", "did you mean 'backend-timeout'"]),
    "unknown balancer key": (POOL + "\n[balancer]\n\nclient-timout = 3\n", 6,
                             ["did you mean 'client-timeout'"]),
    "unknown health key": (POOL + "health = { pth = '/x' }\n", 3,
                           ["unknown key 'pth'", "did you mean 'path'"]),
    "unknown route key": (POOL + "[[route]]\npool = 'web'\n[[route]]\npool = 'web'\npth = '/x'\n",
                          7, ["unknown key 'pth'", "did you mean 'path'"]),
    "unknown listen key": ("[[listen]]\nendpont = 'tcp:1'\n" + POOL, 2,
                           ["did you mean 'endpoint'"]),
    "unknown admin key": (POOL + "[admin]\ntoken_file = 'x'\n", 4,
                          ["did you mean 'token-file'"]),
    "wrong type": (POOL + 'backend-timeout = "30"\n', 3,
                   ["backend-timeout", "expected a number of seconds", "a string"]),
    "wrong type of flag": (POOL + 'no-health-checks = "yes"\n', 3, ["true or false"]),
    "bad value": (POOL + "rise = 0\n", 3, ["rise", "not at least 1"]),
    "bad strategy": (POOL + 'strategy = "least-con"\n', 3, ["did you mean 'least-conn'"]),
    "balancer setting in a pool": (POOL + "client-timeout = 3\n", 3, ["[balancer]"]),
    "route to undefined pool": (POOL + "\n[[route]]\npath = '/x'\npool = 'wbe'\n", 4,
                                ["undefined pool 'wbe'", "did you mean 'web'"]),
    "route without pool": (POOL + "[[route]]\npath = '/x'\n", 3, ["needs a pool"]),
    "route with a bad path": (POOL + "[[route]]\npool = 'web'\npath = 'api'\n", 5,
                              ["path", "starting with '/'"]),
    "route with a bad host": (POOL + "[[route]]\npool = 'web'\nhost = 'a.*.com'\n", 5, ["host"]),
    "route host with a port": (POOL + "[[route]]\npool = 'web'\nhost = 'a.com:80'\n", 5,
                               ["no port"]),
    "strip_prefix without path": (POOL + "[[route]]\npool = 'web'\nstrip_prefix = true\n", 5,
                                  ["needs a path"]),
    "pool without backends": ("[pool.web]\nstrategy = 'random'\n", 1,
                              ["pool 'web' has no backends"]),
    "pool with empty backends": ("\n[pool.web]\nbackends = []\n", 2, ["no backends"]),
    "bad backends line": ('[pool.web]\nbackends = [\n  "127.0.0.1:1",\n  # c\n'
                          '  "127.0.0.1:2 wieght=2",\n]\n', 5, ["unknown flag 'wieght'"]),
    "bad backends line on one line": ('[pool.web]\nbackends = ["127.0.0.1:1", "127.0.0.1:99999"]\n',
                                      2, ["bad port"]),
    "duplicate backend": ('[pool.web]\nbackends = [\n"127.0.0.1:1",\n"127.0.0.1:1"]\n', 4,
                          ["duplicate backend", "first defined on line 3"]),
    "backends not strings": ("[pool.web]\nbackends = [\n 3001,\n]\n", 3, ["strings"]),
    "backends a number": ("[pool.web]\nbackends = 3001\n", 2, ['"srv:NAME"']),
    "backends and backends_file": ('[pool.web]\nbackends = ["127.0.0.1:1"]\nbackends_file = "x"\n',
                                   3, ["not both"]),
    "missing backends file": ('[pool.web]\n\nbackends_file = "nowhere.txt"\n', 3,
                              ["nowhere.txt", "cannot read"]),
    "listen without endpoint": ("[[listen]]\ntls = { cert = 'c', key = 'k' }\n" + POOL, 1,
                                ["needs an endpoint"]),
    "bad endpoint": ("[[listen]]\nendpoint = 'nosuch:99'\n" + POOL, 2, ["not a usable endpoint", "nosuch:99"]),
    "tls without key": ("[[listen]]\nendpoint = 'tcp:1'\ntls = { cert = 'c' }\n" + POOL, 3,
                        ["key = FILE"]),
    "listen as a table": ("[listen]\nendpoint = 'tcp:1'\n" + POOL, 1, ["[[listen]]"]),
    "setting given twice": (POOL + "health-path = '/a'\nhealth = { path = '/b' }\n", 4,
                            ["already given"]),
    "missing sticky secret": (POOL + "[balancer]\nsticky-secret-file = 'nowhere'\n", 4,
                              ["sticky-secret-file", "nowhere", "cannot read"]),
    "not TOML": (POOL + "backend-timeout = \n", 3, ["not valid TOML"]),
    "key after a multi-line array": ('[pool.web]\nbackends = [\n"127.0.0.1:1",\n]\nfoo = 1\n', 5,
                                     ["unknown key 'foo'"]),
}


@pytest.mark.parametrize("case", sorted(TOML_ERRORS))
def test_toml_errors_name_file_and_line(tmp_path, case):
    """Each kind of mistake in the config file is an error naming the file, the right line and what was expected."""
    text, line, words = TOML_ERRORS[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    e = info.value
    assert (e.filename, e.lineno) == (path, line), str(e)
    assert str(e).startswith(f"{path}:{line}: ")
    for word in words:
        assert word in e.message, str(e)


def test_toml_backends_file_error_names_that_file(tmp_path):
    """A bad line in a pool's backends_file is named by that file and its line."""
    (tmp_path / "b.txt").write_text("127.0.0.1:1\n127.0.0.1:x\n")
    path = write(tmp_path, '[pool.web]\nbackends_file = "b.txt"\n')
    e = pytest.raises(ConfigError, load_config, path).value
    assert (e.filename, e.lineno) == (str(tmp_path / "b.txt"), 2)


def test_toml_missing_file(tmp_path):
    """A config file that cannot be read is an error naming it."""
    e = pytest.raises(ConfigError, load_config, str(tmp_path / "none.toml")).value
    assert e.filename == str(tmp_path / "none.toml")
    assert "cannot read config file" in e.message


def test_toml_no_pools(tmp_path):
    """A file without pools (and no --backends) is an error that says what to add."""
    e = pytest.raises(ConfigError, load_config, write(tmp_path, "[balancer]\n")).value
    assert "[pool.NAME]" in e.message


def test_toml_locator_ignores_lookalikes_in_strings(tmp_path):
    """Brackets, quotes and key = value inside strings and comments do not move the lines of later keys."""
    path = write(tmp_path, '''\
[pool.web]  # a [comment]
health-host = "a]b[c"
backends = [  # [
    "127.0.0.1:1",  # "x = 1"
  '127.0.0.1:2', 
]
health-path = """/a
[pool.other]
x = 1"""
bogus = 1
''')
    e = pytest.raises(ConfigError, load_config, path).value
    assert (e.lineno, "unknown key 'bogus'" in e.message) == (10, True), str(e)


def test_load_secret(tmp_path):
    """A secret file's bytes are the key, whitespace stripped; fewer than 16 bytes is an error naming the file."""
    good = tmp_path / "good"
    good.write_bytes(b"  0123456789abcdef\n")
    assert load_secret(str(good)) == b"0123456789abcdef"
    short = tmp_path / "short"
    short.write_bytes(b"0123456789abcde\n")
    e = pytest.raises(ConfigError, load_secret, str(short)).value
    assert e.filename == str(short) and "at least 16" in e.message
    e = pytest.raises(ConfigError, load_secret, str(tmp_path / "none")).value
    assert "cannot read" in e.message


def _referenceSection() -> str:
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("\nConfiguration reference\n-----------------------\n")
    # The section ends at the next heading of its level or above.
    rest = text[start + 50 :]
    ends = [i for i in (rest.find("\n----"), rest.find("\n====")) if i >= 0]
    return rest[: min(ends)] if ends else rest


def _everyKey() -> list[str]:
    from txbalancer.config import FILE_KEYS
    from txbalancer.settings import commandLineSettings

    # The admin server's settings are spelt endpoint, token and token-file
    # in the file's [admin] table.
    admin = {"admin", "admin-token", "admin-token-file"}
    keys = [s.option for s in commandLineSettings() if s.option not in admin]
    for table in FILE_KEYS.values():
        keys.extend(table)
    return keys


def test_readme_reference_lists_every_key():
    """README.rst's configuration reference lists every key the parser accepts: each setting and each key of the file's tables."""
    section = _referenceSection()
    missing = [key for key in _everyKey() if f"   * - ``{key}``" not in section
               and f"   * - ``{key}`` (in" not in section]
    assert not missing, f"README.rst's configuration reference lacks: {missing}"


def test_shipped_example_uses_every_key(tmp_path):
    """etc/balancer.toml loads as shipped (the seed's /api/, /admin/ and default routes) and shows every key."""
    path = os.path.join(ROOT, "etc", "balancer.toml")
    config = load_config(path)
    assert [(r.pool, r.host, r.path, r.stripPrefix) for r in config.routes] == [
        ("api", None, "/api/", True),
        ("admin", "admin.example.com", "/admin/", False),
        ("web", None, None, False),
    ]
    (admin,) = [p for p in config.pools if p.name == "admin"]
    assert admin.source == os.path.join(ROOT, "etc", "admin-backends.txt")
    assert admin.backends
    with open(path, encoding="utf-8") as f:
        text = f.read()
    import re

    shown = set(re.findall(r"^[#\s]*\[{1,2}([a-z]+)", text, re.M))
    shown |= set(re.findall(r"^[#\s]*([a-z0-9_-]+)\s*=", text, re.M))
    shown |= set(re.findall(r"[{,]\s*([a-z0-9_-]+)\s*=", text))
    missing = [key for key in _everyKey() if key not in shown]
    assert not missing, f"etc/balancer.toml does not show: {missing}"


def test_shipped_example_commented_keys_are_valid(tmp_path):
    """The keys etc/balancer.toml shows commented out are valid too: with them uncommented (and their files made) it loads."""
    import re
    import shutil

    with open(os.path.join(ROOT, "etc", "balancer.toml"), encoding="utf-8") as f:
        text = f.read()
    lines = []
    for line in text.split("\n"):
        match = re.match(r"# ((?:\[\[listen\]\]|[a-z_-]+ = ).*)", line)
        if match and not line.startswith("# token ="):  # token or token-file
            line = match.group(1)
        if line.startswith("backends = \"srv:"):
            continue  # the alternative to backends_file
        lines.append(line)
    path = tmp_path / "balancer.toml"
    path.write_text("\n".join(lines))
    shutil.copy(os.path.join(ROOT, "etc", "admin-backends.txt"), tmp_path)
    (tmp_path / "sticky-secret").write_text("0123456789abcdef0123\n")
    config = load_config(str(path))
    assert [listener.secure for listener in config.listeners] == [False, True, False]
    assert [listener.mode for listener in config.listeners] == [None, None, "tcp"]
    assert config.listeners[2].pool == "web"
    assert config.hsts == 31536000
    assert config.stickySecretFile == str(tmp_path / "sticky-secret")
    assert config.adminTokenFile == str(tmp_path / "admin-token")


def test_toml_crlf_lines(tmp_path):
    """A file with Windows line endings names the same lines."""
    text = '[pool.web]\r\nbackends = [\r\n  "127.0.0.1:1",\r\n  "127.0.0.1:x",\r\n]\r\n'
    path = tmp_path / "balancer.toml"
    path.write_bytes(text.encode())
    e = pytest.raises(ConfigError, load_config, str(path)).value
    assert e.lineno == 4, str(e)
