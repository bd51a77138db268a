"""
Tests for the files in etc/: the systemd units start the balancer with a
command line it accepts, and logrotate makes it reopen its access log.
"""

from __future__ import annotations

import os
import shlex

from twisted.trial.unittest import SynchronousTestCase

from txbalancer.tap import Options

ETC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc")


def _unit(name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    with open(os.path.join(ETC, name)) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", "[")) and "=" in line:
                key, _, value = line.partition("=")
                values.setdefault(key, []).append(value)
    return values


def _balancerArgs(unit: dict[str, list[str]]) -> list[str]:
    (command,) = unit["ExecStart"]
    words = shlex.split(command)
    args = words[words.index("balancer") + 1 :]
    # The unit's /etc/txbalancer/balancer.toml is the shipped example.
    return [os.path.join(ETC, "balancer.toml") if a == "/etc/txbalancer/balancer.toml" else a
            for a in args]


class SystemdTests(SynchronousTestCase):
    def test_service_command_line(self) -> None:
        """txbalancer.service runs twistd in the foreground without a pid file, as a user, with --config, reloading on SIGHUP."""
        unit = _unit("txbalancer.service")
        (command,) = unit["ExecStart"]
        self.assertIn("--nodaemon --pidfile= balancer --config", command)
        self.assertEqual(unit["User"], ["txbalancer"])
        self.assertEqual(unit["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        options = Options()
        options.parseOptions(_balancerArgs(unit))
        self.assertGreater(len(options["config"].pools), 1)

    def test_socket_activated_service(self) -> None:
        """The socket-activated unit listens on systemd's first socket and is started by txbalancer.socket."""
        unit = _unit("txbalancer-activated.service")
        options = Options()
        options.parseOptions(_balancerArgs(unit))
        self.assertEqual([l.endpoint for l in options["config"].listeners],
                         ["systemd:domain=INET:index=0"])
        self.assertIn("txbalancer.socket", unit["Requires"])
        socket = _unit("txbalancer.socket")
        self.assertEqual(socket["Service"], ["txbalancer-activated.service"])
        self.assertEqual(socket["ListenStream"], ["80"])

    def test_logrotate_reopens_with_sigusr1(self) -> None:
        """logrotate sends SIGUSR1 after rotating instead of truncating the file under the balancer."""
        with open(os.path.join(ETC, "txbalancer.logrotate")) as f:
            text = f.read()
        self.assertIn("--signal=USR1", text)
        self.assertNotIn("\n    copytruncate", text)
