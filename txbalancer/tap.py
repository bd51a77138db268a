"""
C{twistd balancer}: the command line, turned into a configuration value, a
L{txbalancer.Balancer} and its listeners.

Every option but the few that say where things are (C{--config},
C{--backends}, C{--port}, C{--tls}) comes from the one table of settings in
L{txbalancer.settings}, so the command line, the TOML file and the Python
API accept the same names and values.

With C{--config FILE}, the file is read first and the command line wins:
a setting given on the command line overrides both the file's
C{[balancer]} table and every pool's own table; C{--port}/C{--tls} replace
the file's C{[[listen]]} tables; C{--backends} gives the pool named
C{default} its backends.
"""

from __future__ import annotations

from typing import Any, Optional

import sys

from twisted import version as _twistedVersion
from twisted.python import usage

from txbalancer import __version__
from txbalancer.config import ConfigError, check_endpoint, load_backends, load_config
from txbalancer.settings import (
    ListenerConfig,
    PoolConfig,
    Setting,
    build,
    coerce,
    commandLineSettings,
)


def _showDefault(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}-{value[1]}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _helpText(s: Setting) -> str:
    if s.isFlag or s.default is None or "[default:" in s.help:
        return s.help
    return f"{s.help} [default: {_showDefault(s.default)}]"


def _parameters() -> tuple[list[list[Any]], list[list[Any]]]:
    """
    C{optParameters} and C{optFlags} from the table of settings.  Defaults
    are left out (L{None}) so that L{Options.given} knows what the command
    line said; the help text shows the real default.
    """
    parameters: list[list[Any]] = [
        ["backends", "b", None, "The backends file: one host:port per line, "
         "optional flags weight=N, max_conns=N, priority=N, backup; or "
         "srv:NAME for the DNS SRV records of NAME (see --dns-server). SIGHUP "
         "reads it again. (required without --config; with it, the backends "
         "of the pool named default)"],
    ]
    flags: list[list[Any]] = []
    for s in commandLineSettings():
        if s.isFlag:
            flags.append([s.option, s.short, s.help])
        else:
            parameters.append([s.option, s.short, None, _helpText(s)])
    return parameters, flags


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An HTTP(S) load balancer and reverse proxy. Spreads requests over "
        "the backends listed in --backends (or the pools and routes of "
        "--config FILE, which the options given here override), streaming "
        "bodies both ways over kept-alive backend connections. SIGTERM stops "
        "it gracefully."
    )

    optParameters, optFlags = _parameters()

    def parseOptions(self, options: Any = None) -> None:
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if _twistedVersion.major >= 26 or getattr(self, "parent", None) is None:
                raise  # twistd prints it and exits with status 1; or not twistd
            # twistd before Twisted 26 (25.5 is the newest on PyPy's Python
            # 3.9) prints a usage error and exits 0, and a service manager
            # would take a mistyped option for a clean stop: the same
            # message, and status 1.
            print(self)
            print(f"{' '.join(sys.argv[0:2])}: {e}")
            raise SystemExit(1)

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["port"] = []
        self["tls"] = []
        self["configFile"] = None
        # The opt_ methods' docstrings are help texts: one paragraph each,
        # without the indentation of their source lines.
        self.docs = {
            name: " ".join(doc.split()) if isinstance(doc, str) else doc
            for name, doc in self.docs.items()
        }

    def opt_config(self, path: str) -> None:
        """
        A TOML file with listeners, pools, routes and settings (see
        README.rst). Options given on the command line override it: a
        setting overrides [balancer] and every pool's table, --port
        replaces its [[listen]] tables.
        """
        self["configFile"] = path

    def getUsage(self, width: Optional[int] = None) -> str:
        """
        The usual help, then one line per strategy.
        """
        from txbalancer.choosers import STRATEGIES

        lines = ["", "Strategies (--strategy NAME; weights are honoured by every one):"]
        for name, cls in STRATEGIES.items():
            lines.append(f"  {name:<12} {cls.description}")
        return usage.Options.getUsage(self, width) + "\n".join(lines) + "\n"

    def opt_port(self, value: str) -> None:
        """
        Where to listen (repeatable): a TCP port number, or any Twisted
        server endpoint string (tcp:8000:interface=127.0.0.1, unix:PATH,
        systemd:domain=INET:index=0, ...); ssl:8443:privateKey=key.pem:
        certKey=cert.pem terminates TLS with the balancer's own settings.
        [default: 8000]
        """
        stripped = value.strip()
        if stripped.isdigit():
            if int(stripped) > 65535:
                raise usage.UsageError(f"--port: {value!r} is not a port number (0-65535)")
            self["port"].append(ListenerConfig(f"tcp:{int(stripped)}"))
        elif stripped.split(":", 1)[0].lower() in ("ssl", "txbtls"):
            # TLS listeners use the balancer's own context (txbalancer.tls), not
            # Twisted's ssl: endpoint, which cannot set versions, ciphers,
            # curves, SNI or ALPN.
            self.opt_tls(stripped)
        elif not stripped:
            raise usage.UsageError("--port: empty value (give a port number or an endpoint)")
        else:
            try:
                check_endpoint(stripped)
            except ConfigError as e:
                raise usage.UsageError(str(e))
            self["port"].append(ListenerConfig(stripped))

    opt_p = opt_port

    def opt_tls(self, value: str) -> None:
        """
        A TLS listener (repeatable): PORT:cert=FULLCHAIN.pem:key=PRIVKEY.pem
        [:chain=CHAIN.pem][:interface=ADDRESS]. TLS 1.2 and 1.3 only, Mozilla
        intermediate ciphers.
        """
        from txbalancer.tls import parseTLSListener

        try:
            port, interface, spec = parseTLSListener(value)
        except ConfigError as e:
            raise usage.UsageError(str(e))
        endpoint = f"tcp:{port}"
        if interface:
            endpoint += ":interface=" + interface.replace(":", "\\:")
        self["tls"].append(ListenerConfig(endpoint, tls=spec))

    def opt_version(self) -> None:
        """
        Print the txbalancer version and exit.
        """
        print(f"txbalancer {__version__}")
        raise SystemExit(0)

    def given(self) -> dict[str, Any]:
        """
        The settings the command line gave, by option name, as given.
        """
        values = {}
        for s in commandLineSettings():
            value = self.get(s.option)
            if s.isFlag:
                if value:
                    values[s.option] = True
            elif value is not None:
                values[s.option] = value
        return values

    def postOptions(self) -> None:
        configFile = self["configFile"]
        if not self["backends"] and not configFile:
            raise usage.UsageError("--backends FILE (or --config FILE) is required")
        try:
            # Values first: a usage mistake is reported before any file is read.
            coerce(self.given())
        except ConfigError as e:
            raise usage.UsageError(str(e))
        # A broken file is not a usage mistake: say what and where in one
        # line, without twistd's page of help.
        try:
            pool = self._defaultPool()
        except ConfigError as e:
            raise SystemExit(f"txbalancer: {e}")
        try:
            self["config"] = self._readConfig(pool)
        except ConfigError as e:
            if configFile:
                raise SystemExit(f"txbalancer: {e}")
            raise usage.UsageError(str(e))

    def _defaultPool(self) -> Optional[PoolConfig]:
        """
        The pool of C{--backends}: a backends file read now, or C{srv:NAME}
        (its backends come from DNS once running); L{None} without
        C{--backends}.

        @raise ConfigError: for a broken backends file.
        """
        source = self["backends"]
        if not source:
            return None
        if source.startswith("srv:"):
            return PoolConfig(backends=(), source=source)
        return PoolConfig(backends=load_backends(source), source=source)

    def _readConfig(self, pool: Optional[PoolConfig]) -> Any:
        """
        The configuration of the config file (or of C{--backends} alone),
        with the command line's values over it.

        @raise ConfigError: naming the file and line of a mistake.
        """
        given = self.given()
        listeners = self["port"] + self["tls"]
        if self["configFile"]:
            return load_config(
                self["configFile"],
                commandLine=given,
                backends=pool,
                listeners=listeners,
            )
        return build([pool], given, listeners or [ListenerConfig("tcp:8000")])

    def reloadConfig(self) -> Any:
        """
        The configuration read again from its files (the config file, every
        backends file), the command line's values over it as at start-up:
        what SIGHUP applies.

        @raise ConfigError: naming the file and line of a mistake.
        """
        return self._readConfig(self._defaultPool())


def makeService(options: Options, reactor: Optional[Any] = None) -> Any:
    """
    The balancer of the parsed options, listening on their listeners.

    @param reactor: the reactor to use; the global one by default, and then
        SIGHUP reloads.  Tests pass a
        L{twisted.internet.testing.MemoryReactorClock}.
    """
    installSignalHandlers = reactor is None
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor

    from txbalancer.balancer import Balancer
    from txbalancer.workers import MasterBalancer, resolveWorkers

    config = options["config"]
    workers = resolveWorkers(config.workers)
    try:
        if workers > 1:
            # -- workers: this process is the master
            balancer = MasterBalancer(
                config=config,
                reactor=reactor,
                installSignalHandlers=installSignalHandlers,
                reloader=options.reloadConfig,
                workers=workers,
            )
        else:
            balancer = Balancer(
                config=config,
                reactor=reactor,
                installSignalHandlers=installSignalHandlers,
                reloader=options.reloadConfig,
            )
        balancer.listen()
    except ConfigError as e:
        raise SystemExit(f"txbalancer: {e}")
    return balancer
