"""Configuration errors stop the real command with one line naming the file and line."""

from __future__ import annotations

import subprocess

import pytest

from .httpraw import HOST
from .support import free_port, twistd_command

pytestmark = pytest.mark.integration


def run_balancer(tmp_path, *options):
    args = twistd_command(
        "-n",
        "--pidfile=",
        "balancer",
        "--port",
        f"tcp:{free_port()}:interface={HOST}",
        *options,
    )
    try:
        done = subprocess.run(
            args,
            check=False,
            cwd=str(tmp_path),
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired as e:  # it started instead of refusing
        raise AssertionError(
            f"the balancer started with a bad configuration: {e.output}"
        )
    return done.returncode, done.stdout + done.stderr


def assert_refused(tmp_path, location, *options):
    code, output = run_balancer(tmp_path, *options)
    assert code != 0, output
    lines = [line for line in output.splitlines() if location in line]
    assert lines, f"no line names {location!r}:\n{output}"
    assert "Traceback" not in output, output
    message = lines[0].split(location, 1)[1].strip()
    assert message, f"no message after {location!r}: {lines[0]}"


BAD_FILES = {
    # name: (file content, line number named in the error)
    "bad-port": ("# backends\n\n127.0.0.1:99999\n", 3),
    "non-numeric-port": ("127.0.0.1:3001\n127.0.0.1:http\n", 2),
    "unknown-flag": ("127.0.0.1:3001\n127.0.0.1:3002  colour=blue\n", 2),
    "unknown-bare-word": ("127.0.0.1:3001\n# c\n127.0.0.1:3002  sideways\n", 3),
    "duplicate-backend": ("127.0.0.1:3001\n# comment\n127.0.0.1:3001\n", 3),
    "bad-weight": ("127.0.0.1:3001  weight=heavy\n", 1),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_backends_line_names_file_and_line(tmp_path, name):
    """A bad line in the backends file stops start-up with FILE:LINE: and a message."""
    content, line = BAD_FILES[name]
    path = tmp_path / "backends.txt"
    path.write_text(content)
    assert_refused(tmp_path, f"{path}:{line}:", "--backends", str(path))


def test_missing_backends_file_named(tmp_path):
    """A missing backends file stops start-up with a message naming the file."""
    path = tmp_path / "no-such-backends.txt"
    assert_refused(tmp_path, f"{path}:", "--backends", str(path))


@pytest.mark.parametrize("content", ["", "# only a comment\n\n"])
def test_empty_backends_file_named(tmp_path, content):
    """A backends file without any backend stops start-up with a message naming the file."""
    path = tmp_path / "backends.txt"
    path.write_text(content)
    assert_refused(tmp_path, f"{path}:", "--backends", str(path))


def test_unknown_command_line_flag(tmp_path):
    """An unknown command-line option stops start-up with a message naming it."""
    path = tmp_path / "backends.txt"
    path.write_text("127.0.0.1:3001\n")
    code, output = run_balancer(tmp_path, "--backends", str(path), "--no-such-flag")
    assert code != 0, output
    assert "no-such-flag" in output, output
    assert "Traceback" not in output, output


def test_missing_backends_option(tmp_path):
    """Without --backends the command stops with a message naming the option."""
    code, output = run_balancer(tmp_path)
    assert code != 0, output
    assert "backends" in output, output
    assert "Traceback" not in output, output


BAD_CONFIGS = {
    # name: (config file content, line number named in the error)
    "unknown-key": ('[pool.web]\nbackends = ["127.0.0.1:3001"]\nbackend-timout = 3\n', 3),
    "wrong-type": ('[pool.web]\nbackends = ["127.0.0.1:3001"]\n\nrise = "two"\n', 4),
    "undefined-pool": ('[pool.web]\nbackends = ["127.0.0.1:3001"]\n[[route]]\npool = "api"\n', 3),
    "no-backends": ('\n[pool.web]\nstrategy = "random"\n', 2),
    "bad-backend-line": ('[pool.web]\nbackends = [\n  "127.0.0.1:3001",\n  "127.0.0.1:0",\n]\n', 4),
    "not-toml": ('[pool.web\nbackends = ["127.0.0.1:3001"]\n', 1),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_file_names_file_and_line(tmp_path, name):
    """A mistake in the --config file stops the real command with FILE:LINE: and a message, and no traceback."""
    content, line = BAD_CONFIGS[name]
    path = tmp_path / "balancer.toml"
    path.write_text(content)
    code, output = run_balancer(tmp_path, "--config", str(path))
    assert code != 0, output
    assert f"txbalancer: {path}:{line}: " in output, output
    assert "Traceback" not in output, output
