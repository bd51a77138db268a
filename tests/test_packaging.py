"""The twistd plugin is found from an installed copy of the project."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

# option: a value its help must show as the default (None: it has no default)
OPTIONS = {
    "port": "8000",
    "backends": None,
    "strategy": "round-robin",
    "trusted-proxies": None,
    "connect-timeout": "3",
    "backend-timeout": "60",
    "client-timeout": "60",
    "access-log": None,
    "admin": None,
    "admin-token": None,
    "admin-token-file": None,
}


def run_twistd(tmp_path, *args: str) -> str:
    """Run the installed twistd away from the source tree and return its output."""
    if not os.path.exists(TWISTD):
        pytest.fail(f"no twistd next to {sys.executable}: install the project first")
    env = {k: v for (k, v) in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [TWISTD, *args],
        check=False,
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def option_blocks(help_text: str) -> dict[str, str]:
    """Each --option of a usage.Options help text with the lines of its description."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        m = re.match(r"\s+(?:-\w, )?--([\w-]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith(" "):
            blocks[current] += "\n" + line
        else:
            current = None
    return blocks


def test_twistd_lists_balancer(tmp_path):
    """`twistd --help` from the installed copy lists the balancer plugin."""
    output = run_twistd(tmp_path, "--help")
    assert re.search(r"^\s+balancer\s", output, re.MULTILINE), output


def test_balancer_help_shows_options_and_defaults(tmp_path):
    """`twistd balancer --help` shows every option, each with its default."""
    blocks = option_blocks(run_twistd(tmp_path, "balancer", "--help"))
    for name, default in OPTIONS.items():
        assert name in blocks, f"--{name} missing from the help: {sorted(blocks)}"
        if default is not None:
            assert re.search(rf"\b{re.escape(default)}\b", blocks[name]), (
                f"--{name} does not show its default {default}:\n{blocks[name]}"
            )


def test_no_init_under_twisted():
    """No __init__.py exists under twisted/, so the project never shadows Twisted's package."""
    found = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "twisted").rglob("__init__.py")
    )
    assert found == []
    assert (ROOT / "twisted" / "plugins" / "txbalancer_plugin.py").exists()


def run_python(tmp_path, code: str) -> str:
    """Run the installed Python away from the source tree and return its output."""
    env = {k: v for (k, v) in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_txbtls_endpoint_plugin_discoverable(tmp_path):
    """After an install, Twisted's plugin system offers the txbtls: endpoint
    prefix, and listing plugins imports neither txbalancer nor the reactor."""
    output = run_python(
        tmp_path,
        "import sys\n"
        "from twisted.plugin import getPlugins\n"
        "from twisted.internet.interfaces import IStreamServerEndpointStringParser\n"
        "prefixes = [p.prefix for p in getPlugins(IStreamServerEndpointStringParser)]\n"
        "print('prefixes', prefixes)\n"
        "print('reactor imported', 'twisted.internet.reactor' in sys.modules)\n"
        "print('txbalancer imported', 'txbalancer' in sys.modules)\n"
        "import twisted.plugins.txbalancer_endpoints as plugin\n"
        "print('from', plugin.__file__)\n"
        "from twisted.internet.endpoints import serverFromString\n"
        "from twisted.internet.testing import MemoryReactor\n"
        "try:\n"
        "    serverFromString(MemoryReactor(), 'txbtls:8443:cert=missing.pem:key=missing.pem')\n"
        "except Exception as e:\n"
        "    print('error', type(e).__name__, e)\n",
    )
    assert "'txbtls'" in output.split("prefixes", 1)[1].splitlines()[0], output
    assert "reactor imported False" in output, output
    assert "txbalancer imported False" in output, output
    source = str(ROOT / "twisted" / "plugins")
    assert not output.split("from ", 1)[1].startswith(source), output
    assert re.search(r"error TLSConfigError \S*missing\.pem: cannot read", output), output


@pytest.mark.parametrize("name", ["README.rst", "CHANGELOG.rst"])
def test_rst_is_valid(name):
    """README.rst (the package's long description) and CHANGELOG.rst parse as reStructuredText without errors."""
    import docutils.core
    import docutils.utils

    try:
        docutils.core.publish_doctree(
            (ROOT / name).read_text(),
            source_path=name,
            settings_overrides={"report_level": 5, "halt_level": 2},
        )
    except docutils.utils.SystemMessage as e:
        pytest.fail(f"{name}: {str(e).splitlines()[0]}")


def test_dashboard_page_installed(tmp_path):
    """The installed package ships the dashboard page (package data)."""
    env = {k: v for (k, v) in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c",
         "import txbalancer.admin.dashboard as d; print(d.__file__); print(len(d.page()))"],
        check=False, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    where, size = done.stdout.split()
    assert not where.startswith(str(ROOT) + os.sep + "txbalancer"), where
    assert int(size) > 5000
