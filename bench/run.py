"""
Benchmark txbalancer beside the alternatives, in one run, on 127.0.0.1.

    python bench/run.py                      # every case that can run here
    python bench/run.py --quick              # 3 s per target, 1 s warm-up
    python bench/run.py --only direct,txbalancer,nginx
    python bench/run.py --case 64k
    python bench/run.py --case slow-backend --strategies round-robin,least-conn
    python bench/run.py --case all           # every case but slow-backend, one run

Starts three Node backends (bench/backend.js), then, one target at a time:
starts the proxy, checks that it answers, warms it up with wrk, measures it
with wrk, stops it.  Prints a markdown table and an RST table (requests/s and
p99 latency, each also as a ratio to txbalancer) and saves the results as JSON
under bench/results/.  Every process it starts is stopped, by process group,
in a finally block.  Run it with the Python that has txbalancer installed: the
balancer is started with the twistd next to sys.executable.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
SMALL_BODY = b"hello world!\n"

ALL_TARGETS = [
    "direct",
    "txbalancer",
    "txbalancer-pypy",
    "reverseproxy",
    "node",
    "node-keepalive",
    "nginx",
    "haproxy",
]
ALL_STRATEGIES = ["round-robin", "least-conn", "p2c", "least-time"]


@dataclass(frozen=True)
class Case:
    size: int = 0  # response size in bytes, 0 = the small body
    slow_ms: int = 0  # delay of the last backend
    close: bool = False  # wrk sends Connection: close (a new connection per request)
    tls: bool = False  # the proxy terminates TLS; wrk speaks https
    connections: int | None = None  # wrk -c, instead of --connections
    targets: tuple[str, ...] | None = None  # the targets that run, None = all
    about: str = ""


_PROXIES = ("txbalancer", "txbalancer-pypy", "node-keepalive", "nginx", "haproxy")
_TLS = ("txbalancer", "txbalancer-pypy", "nginx", "haproxy")
CASES = {
    "small": Case(about="13-byte responses, keep-alive"),
    "close": Case(close=True, about="13-byte responses, Connection: close"),
    "64k": Case(size=65536, about="64 KiB responses, keep-alive"),
    "1m": Case(size=1024 * 1024, about="1 MiB responses, keep-alive"),
    "c1000": Case(connections=1000, targets=_PROXIES,
                  about="13-byte responses, 1,000 keep-alive clients"),
    "c10000": Case(connections=10000, targets=_PROXIES,
                   about="13-byte responses, 10,000 keep-alive clients"),
    "tls-handshake": Case(tls=True, close=True, targets=_TLS,
                          about="TLS, a new connection (full handshake) per request"),
    "tls-keepalive": Case(tls=True, targets=_TLS,
                          about="TLS, 13-byte responses, keep-alive"),
    "slow-backend": Case(slow_ms=50, about="one backend adds 50 ms"),
}
ALL_CASES = ["small", "close", "64k", "1m", "c1000", "c10000",
             "tls-handshake", "tls-keepalive"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Failed(Exception):
    """A target could not be started or measured; the message says why."""


# ---------------------------------------------------------------- processes


class Proc:
    """A process we started, in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], workdir: str, env=None) -> None:
        self.name = name
        self.argv = argv
        self.logpath = os.path.join(workdir, f"{name}.log")
        self._logfile = open(self.logpath, "wb")  # noqa: SIM115 (closed in stop())
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._logfile,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.logpath, "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(data.rstrip().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        try:
            if self.popen.poll() is None:
                try:
                    os.killpg(self.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    log(f"  {self.name} ignored SIGTERM for {timeout}s, killing it")
            # The leader may be gone while its children (nginx workers) are not.
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._logfile.close()

    def rss_kib(self) -> int:
        """Resident memory of every live process in our process group, KiB."""
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                if int(stat[stat.rindex(")") + 2 :].split()[2]) != self.popen.pid:
                    continue
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
            except (OSError, ValueError):
                continue
        return total

    def cpu_seconds(self) -> float:
        """user+system CPU time of every live process in our process group."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            # fields[0] is field 3 (state); pgrp is field 5, utime 14, stime 15
            if int(fields[2]) == self.popen.pid:
                total += int(fields[11]) + int(fields[12])
        return total / ticks


# ---------------------------------------------------------------- HTTP checks


def _connection(port: int, timeout: float, tls: bool) -> http.client.HTTPConnection:
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(HOST, port, timeout=timeout, context=ctx)
    return http.client.HTTPConnection(HOST, port, timeout=timeout)


def http_get(
    port: int, path: str = "/", timeout: float = 5.0, tls: bool = False
) -> tuple[int, bytes, dict]:
    conn = _connection(port, timeout, tls)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, body, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def wait_ready(
    proc: Proc | None, port: int, expect_len: int, timeout: float, tls: bool = False
) -> None:
    """Wait until GET / answers 200 with the expected body length."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            tail = proc.log_tail()
            last = tail.splitlines()[-1].strip() if tail else "no output"
            raise Failed(
                f"exited ({proc.popen.returncode}) before answering: {last}\n"
                + textwrap.indent(tail, "    ")
            )
        try:
            status, body, _ = http_get(port, timeout=2.0, tls=tls)
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        else:
            if status == 200 and len(body) == expect_len:
                return
            last = f"status {status}, {len(body)} bytes: {body[:100]!r}"
        time.sleep(0.1)
    tail = ("\n" + textwrap.indent(proc.log_tail(), "    ")) if proc else ""
    raise Failed(f"not ready after {timeout:.0f}s (last: {last}){tail}")


def probe_keepalive(port: int, tls: bool = False) -> dict:
    """
    Two requests on one HTTP/1.1 connection, as wrk sends them: does the
    proxy keep the client connection open, and what Connection header does it
    send back?
    """
    result = {"client_keepalive": None, "connection_header": None}
    conn = _connection(port, 5, tls)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        result["connection_header"] = resp.getheader("Connection")
        if resp.will_close:
            result["client_keepalive"] = False
            return result
        sock = conn.sock
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        result["client_keepalive"] = conn.sock is sock and not resp.will_close
    except (OSError, http.client.HTTPException) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return result


# ---------------------------------------------------------------- wrk

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"cannot parse latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(output: str) -> dict:
    result: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if m:
        result["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", output, re.MULTILINE)
        if m:
            result[f"p{pct}_ms"] = _ms(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", output)
    if m:
        result["requests"] = int(m.group(1))
    m = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if m:
        result["socket_errors"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()))
        )
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result["non_2xx"] = int(m.group(1)) if m else 0
    return result


def run_wrk(args, port: int, seconds: float) -> tuple[dict, str]:
    argv = [
        args.wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={args.wrk_timeout}s",
        "--latency",
    ]
    if args.close:
        argv += ["-H", "Connection: close"]
    argv.append(f"{'https' if args.tls else 'http'}://{HOST}:{port}/")
    try:
        out = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=seconds + args.wrk_timeout + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Failed("wrk did not finish in time") from None
    if out.returncode != 0:
        raise Failed(
            f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}"
        )
    parsed = parse_wrk(out.stdout)
    if "rps" not in parsed:
        raise Failed(f"could not parse wrk output:\n{out.stdout}")
    return parsed, out.stdout


# ---------------------------------------------------------------- backends


@dataclass
class Backends:
    ports: list[int]
    procs: list[Proc]

    def addresses(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.ports]

    def stats(self) -> list[dict]:
        out = []
        for port in self.ports:
            _, body, _ = http_get(port, "/__stats")
            out.append(json.loads(body))
        return out


def start_backends(args, workdir: str, size: int, slow_ms: int) -> Backends:
    ports, procs = [], []
    for i in range(args.backends):
        port = free_port()
        argv = [
            args.node,
            os.path.join(HERE, "backend.js"),
            "--port",
            str(port),
            "--name",
            f"b{i + 1}",
            "--size",
            str(size),
        ]
        # In the slow-backend case, the last backend adds the delay.
        if slow_ms and i == args.backends - 1:
            argv += ["--delay-ms", str(slow_ms)]
        procs.append(Proc(f"backend{i + 1}", argv, workdir))
        ports.append(port)
    backends = Backends(ports, procs)
    try:
        for proc, port in zip(procs, ports):
            wait_ready(proc, port, size or len(SMALL_BODY), timeout=10)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return backends


# ---------------------------------------------------------------- targets


@dataclass
class Target:
    name: str  # as shown in the table
    key: str  # as used by --only
    start: Callable[[str, int], list[Proc]]  # (workdir, port) -> processes
    note: str = ""
    upstream_port: int | None = None  # for "direct": measure this port


def twistd_command(args, pypy: bool = False) -> list[str]:
    if pypy:
        return [args.pypy_twistd]
    if args.twistd:
        return [args.twistd]
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(beside):
        return [beside]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def balancer_target(
    args, backends: Backends, strategy: str | None, pypy: bool = False
) -> Target:
    def start(workdir: str, port: int) -> list[Proc]:
        path = os.path.join(workdir, "backends.txt")
        with open(path, "w") as f:
            f.write("# generated by bench/run.py\n")
            f.writelines(address + "\n" for address in backends.addresses())
        if args.tls:
            listen = ["--tls", f"{port}:cert={args.cert}:key={args.key}:interface={HOST}"]
        else:
            # Twisted's default listen backlog (50) drops SYNs under 10,000
            # clients connecting at once; nginx's default is 511.
            listen = ["--port", f"tcp:{port}:interface={HOST}:backlog=4096"]
        argv = twistd_command(args, pypy) + [
            "-n",
            "--pidfile",
            os.path.join(workdir, "twistd.pid"),
            "balancer",
            *listen,
            "--backends",
            path,
        ]
        if strategy is not None:
            argv += ["--strategy", strategy]
        if args.workers != 1:
            argv += ["--workers", str(args.workers)]
        name = "txbalancer" if strategy is None else f"txbalancer-{strategy}"
        if pypy:
            name += "-pypy"
        return [Proc(name, argv, workdir)]

    name = "txbalancer" if strategy is None else f"txbalancer ({strategy})"
    if pypy:
        return Target(name + " on PyPy", "txbalancer-pypy", start)
    return Target(name, "txbalancer", start)


def reverseproxy_target(args, backends: Backends) -> Target:
    def start(workdir: str, port: int) -> list[Proc]:
        argv = [
            sys.executable,
            os.path.join(HERE, "alt_reverseproxy.py"),
            "--port",
            str(port),
            "--backends",
            ",".join(backends.addresses()),
        ]
        return [Proc("reverseproxy", argv, workdir)]

    return Target("twisted.web ReverseProxyResource", "reverseproxy", start)


def node_target(args, backends: Backends, keepalive: bool) -> Target:
    def start(workdir: str, port: int) -> list[Proc]:
        argv = [
            args.node,
            os.path.join(HERE, "alt_node_proxy.js"),
            "--port",
            str(port),
            "--backends",
            ",".join(backends.addresses()),
            "--max-sockets",
            str(args.upstream_keepalive),
        ]
        if keepalive:
            argv.append("--keepalive")
        return [Proc("node-keepalive" if keepalive else "node", argv, workdir)]

    if keepalive:
        return Target("node http-proxy (keep-alive agent)", "node-keepalive", start)
    return Target("node http-proxy (no agent)", "node", start)


def nginx_target(args, backends: Backends, least_conn: bool = False) -> Target:
    def start(workdir: str, port: int) -> list[Proc]:
        servers = "\n".join(f"        server {a};" for a in backends.addresses())
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(
                textwrap.dedent(f"""\
                # generated by bench/run.py
                daemon off;
                worker_processes 1;
                pid {workdir}/nginx.pid;
                error_log {workdir}/nginx-error.log warn;
                worker_rlimit_nofile {args.nofile};
                events {{
                    worker_connections {args.nofile - 100};
                }}
                http {{
                    access_log off;
                    client_body_temp_path {workdir}/client_body;
                    proxy_temp_path {workdir}/proxy;
                    fastcgi_temp_path {workdir}/fastcgi;
                    uwsgi_temp_path {workdir}/uwsgi;
                    scgi_temp_path {workdir}/scgi;
                    keepalive_requests 1000000;
                    upstream backends {{
                        {"least_conn;" if least_conn else "# round robin"}
                __SERVERS__
                        keepalive {args.upstream_keepalive * len(backends.ports)};
                        keepalive_requests 1000000;
                    }}
                    server {{
                        listen {HOST}:{port} backlog=4096{" ssl" if args.tls else ""};
                        {f"ssl_certificate {args.cert};" if args.tls else ""}
                        {f"ssl_certificate_key {args.key};" if args.tls else ""}
                        ssl_protocols TLSv1.2 TLSv1.3;
                        location / {{
                            proxy_pass http://backends;
                            proxy_http_version 1.1;
                            proxy_set_header Connection "";
                        }}
                    }}
                }}
                """).replace("__SERVERS__", servers)
            )
        argv = [
            args.nginx,
            "-p",
            workdir,
            "-e",
            os.path.join(workdir, "nginx-error.log"),
            "-c",
            conf,
        ]
        return [Proc("nginx", argv, workdir)]

    name = "nginx" + (" (least_conn)" if least_conn else "")
    return Target(name, "nginx", start)


def haproxy_target(args, backends: Backends, leastconn: bool = False) -> Target:
    def start(workdir: str, port: int) -> list[Proc]:
        servers = "\n".join(
            f"    server b{i + 1} {a}" for i, a in enumerate(backends.addresses())
        )
        conf = os.path.join(workdir, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(
                textwrap.dedent(f"""\
                # generated by bench/run.py
                global
                    nbthread 1
                    maxconn {max(1000, (args.nofile - 100) // 2)}
                defaults
                    mode http
                    timeout connect 3s
                    timeout client 60s
                    timeout server 60s
                    option http-keep-alive
                    http-reuse always
                frontend fe
                    bind {HOST}:{port}{f" ssl crt {args.pem}" if args.tls else ""}
                    default_backend be
                backend be
                    balance {"leastconn" if leastconn else "roundrobin"}
                """)
                + servers
                + "\n"
            )
        argv = [args.haproxy, "-db", "-f", conf]
        return [Proc("haproxy", argv, workdir)]

    name = "haproxy" + (" (leastconn)" if leastconn else "")
    return Target(name, "haproxy", start)


def direct_target(backends: Backends) -> Target:
    return Target(
        "direct (one backend)",
        "direct",
        lambda workdir, port: [],
        note="the limit",
        upstream_port=backends.ports[0],
    )


# ---------------------------------------------------------------- measuring


@dataclass
class Result:
    name: str
    key: str
    ok: bool = False
    error: str = ""
    skipped: bool = False
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    requests: int | None = None
    non_2xx: int = 0
    socket_errors: dict = field(default_factory=dict)
    cpu_percent: float | None = None
    client_keepalive: bool | None = None
    connection_header: str | None = None
    upstream_connections: int | None = None
    upstream_requests: list | None = None
    rss_start_kib: int | None = None
    rss_peak_kib: int | None = None
    connections: int | None = None
    note: str = ""
    wrk_output: str = ""


def measure(
    args, target: Target, backends: Backends, expect_len: int, root: str
) -> Result:
    result = Result(target.name, target.key, note=target.note)
    workdir = tempfile.mkdtemp(prefix=f"{target.key}-", dir=root)
    procs: list[Proc] = []
    try:
        if target.upstream_port is not None:
            port = target.upstream_port
        else:
            port = free_port()
            procs = target.start(workdir, port)
        wait_ready(
            procs[0] if procs else None,
            port,
            expect_len,
            timeout=args.start_timeout,
            tls=args.tls,
        )
        result.connections = args.connections
        rss_start = sum(p.rss_kib() for p in procs)
        probe = probe_keepalive(port, tls=args.tls)
        result.client_keepalive = probe.get("client_keepalive")
        result.connection_header = probe.get("connection_header")
        if args.warmup > 0:
            run_wrk(args, port, args.warmup)
        before = backends.stats()
        cpu_before = sum(p.cpu_seconds() for p in procs)
        t0 = time.monotonic()
        # wrk runs in a thread while the proxy's RSS is sampled.
        done: dict = {}

        def wrk() -> None:
            try:
                done["out"] = run_wrk(args, port, args.duration)
            except Failed as e:
                done["error"] = e

        thread = threading.Thread(target=wrk, daemon=True)
        thread.start()
        peak = 0
        while thread.is_alive():
            if procs:
                peak = max(peak, sum(p.rss_kib() for p in procs))
            thread.join(0.5)
        if "error" in done:
            raise done["error"]
        parsed, output = done["out"]
        elapsed = time.monotonic() - t0
        if procs:
            result.rss_start_kib, result.rss_peak_kib = rss_start, peak
        cpu_after = sum(p.cpu_seconds() for p in procs)
        after = backends.stats()
        for p in procs:
            if not p.alive():
                raise Failed(
                    f"{p.name} died during the run:\n"
                    + textwrap.indent(p.log_tail(), "    ")
                )
        result.wrk_output = output
        result.rps = parsed["rps"]
        result.p50_ms = parsed.get("p50_ms")
        result.p99_ms = parsed.get("p99_ms")
        result.requests = parsed.get("requests")
        result.non_2xx = parsed.get("non_2xx", 0)
        result.socket_errors = parsed.get("socket_errors", {})
        if procs:
            result.cpu_percent = 100.0 * (cpu_after - cpu_before) / elapsed
            # Each /__stats query is itself one connection to each backend.
            result.upstream_connections = sum(
                a["connections"] - b["connections"] - 1 for a, b in zip(after, before)
            )
        result.upstream_requests = [
            a["requests"] - b["requests"] for a, b in zip(after, before)
        ]
        result.ok = True
    except Failed as e:
        result.error = str(e)
    finally:
        for p in procs:
            p.stop()
    return result


# ---------------------------------------------------------------- tables


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def _perConn(r: Result) -> str:
    """(peak RSS under load - RSS before the warm-up) / connections."""
    if r.rss_peak_kib is None or r.rss_start_kib is None or not r.connections:
        return "-"
    return f"{max(0, r.rss_peak_kib - r.rss_start_kib) / r.connections:.1f}"


def table_rows(
    results: list[Result], base: Result | None, slow: bool = False
) -> tuple[list[str], list[list[str]]]:
    base_rps = base.rps if base is not None and base.ok else None
    base_p99 = base.p99_ms if base is not None and base.ok else None
    header = [
        "target",
        "req/s",
        "vs txb",
        "p50 ms",
        "p99 ms",
        "vs txb",
        "proxy CPU",
        "proxy RSS MiB",
        "KiB per conn",
        "client keep-alive",
        "req per upstream conn",
        "errors",
    ]
    if slow:
        header.insert(5, "to slow backend")
    rows = []
    for r in results:
        if not r.ok:
            status = "skipped" if r.skipped else "FAILED"
            reason = r.error.splitlines()[0] if r.error else ""
            rows.append([r.name, status] + [""] * (len(header) - 3) + [reason[:100]])
            continue
        errors = []
        if r.non_2xx:
            errors.append(f"{r.non_2xx} non-2xx")
        se = {k: v for k, v in (r.socket_errors or {}).items() if v}
        if se:
            errors.append("socket " + " ".join(f"{k}={v}" for k, v in se.items()))
        per_conn = "-"
        if r.upstream_connections is not None:
            total = sum(r.upstream_requests or [])
            per_conn = (
                f"{total / r.upstream_connections:.0f}"
                if r.upstream_connections > 0
                else "all reused"
            )
        name = r.name + (f" [{r.note}]" if r.note else "")
        ka = {True: "yes", False: "no", None: "?"}[r.client_keepalive]
        if r.client_keepalive is False and r.connection_header:
            ka += f" (Connection: {r.connection_header})"
        row = [
            name,
            _fmt(r.rps, ".0f"),
            _ratio(r.rps, base_rps),
            _fmt(r.p50_ms, ".2f"),
            _fmt(r.p99_ms, ".2f"),
            _ratio(r.p99_ms, base_p99),
            "-" if r.cpu_percent is None else f"{r.cpu_percent:.0f}%",
            "-" if r.rss_peak_kib is None else f"{r.rss_peak_kib / 1024:.0f}",
            _perConn(r),
            ka,
            per_conn,
            ", ".join(errors) or "none",
        ]
        if slow:
            share = "-"
            if r.upstream_connections is not None and sum(r.upstream_requests or []):
                share = (
                    f"{100.0 * r.upstream_requests[-1] / sum(r.upstream_requests):.1f}%"
                )
            row.insert(5, share)
        rows.append(row)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    line = lambda cells: (
        "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    )
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def rst_table(header: list[str], rows: list[list[str]]) -> str:
    rows = [[c if c else ".." if i == 0 else "" for i, c in enumerate(r)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    border = "  ".join("=" * w for w in widths)
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join(
        [border, line(header), border] + [line(r) for r in rows] + [border]
    )


# ---------------------------------------------------------------- setup


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def ensure_node_modules(args) -> str | None:
    """Install http-proxy into bench/node_modules; return why not, or None."""
    if os.path.isdir(os.path.join(HERE, "node_modules", "http-proxy")):
        return None
    if not args.npm:
        return "npm not found"
    cmd = [
        args.npm,
        "ci" if os.path.exists(os.path.join(HERE, "package-lock.json")) else "install",
        "--no-audit",
        "--no-fund",
    ]
    log(f"installing http-proxy: {' '.join(cmd)} (in bench/)")
    try:
        out = subprocess.run(
            cmd, cwd=HERE, capture_output=True, text=True, timeout=300, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{' '.join(cmd)} failed: {e}"
    if out.returncode != 0 or not os.path.isdir(
        os.path.join(HERE, "node_modules", "http-proxy")
    ):
        return f"{' '.join(cmd)} failed: {(out.stderr or out.stdout).strip()[-300:]}"
    return None


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(
        description="Benchmark txbalancer beside the alternatives on 127.0.0.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--case",
        default="small",
        help="comma-separated cases, or 'all' (" + ",".join(ALL_CASES) + "): "
        + "; ".join(f"{name}: {c.about}" for name, c in CASES.items()),
    )
    p.add_argument(
        "--duration", type=float, default=10, help="seconds measured per target"
    )
    p.add_argument(
        "--warmup", type=float, default=2, help="seconds of wrk before measuring"
    )
    p.add_argument("--connections", type=int, default=50, help="wrk -c")
    p.add_argument("--threads", type=int, default=1, help="wrk -t")
    p.add_argument("--quick", action="store_true", help="--duration 3 --warmup 1")
    p.add_argument(
        "--only", default="", help="comma-separated subset of: " + ",".join(ALL_TARGETS)
    )
    p.add_argument("--skip", default="", help="comma-separated targets to leave out")
    p.add_argument(
        "--strategies",
        default=",".join(ALL_STRATEGIES),
        help="balancer strategies for --case slow-backend",
    )
    p.add_argument("--backends", type=int, default=3, help="number of Node backends")
    p.add_argument("--workers", type=int, default=1,
                   help="txbalancer --workers N (the master and N worker processes)")
    p.add_argument(
        "--upstream-keepalive",
        type=int,
        default=64,
        help="idle upstream connections kept per backend by nginx (keepalive N*backends) "
        "and the node agent (maxSockets); txbalancer's default",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=20,
        help="seconds a target gets to answer its first request",
    )
    p.add_argument("--wrk-timeout", type=float, default=5, help="wrk --timeout seconds")
    p.add_argument(
        "--twistd",
        default=None,
        help="twistd to run the balancer with (default: the one next to this Python)",
    )
    p.add_argument(
        "--pypy-twistd",
        default=os.path.join(ROOT, ".pypyvenv", "bin", "twistd"),
        help="twistd of a PyPy venv with txbalancer installed, for txbalancer-pypy",
    )
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--no-json", action="store_true", help="do not save results JSON")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.duration, args.warmup = 3, 1
    args.cases = ALL_CASES if args.case == "all" else [
        x for x in args.case.split(",") if x
    ]
    for name in args.cases:
        if name not in CASES:
            p.error(f"unknown case {name!r}; known: {', '.join(CASES)}, all")
    args.only = [x for x in args.only.split(",") if x]
    args.skip = [x for x in args.skip.split(",") if x]
    for name in args.only + args.skip:
        if name not in ALL_TARGETS:
            p.error(f"unknown target {name!r}; known: {', '.join(ALL_TARGETS)}")
    args.strategies = [x for x in args.strategies.split(",") if x]
    if args.backends < 1:
        p.error("--backends must be at least 1")
    args.node = shutil.which("node")
    args.npm = shutil.which("npm")
    args.wrk = shutil.which("wrk")
    args.nginx = shutil.which("nginx") or next(
        (x for x in ("/usr/sbin/nginx",) if os.path.exists(x)), None
    )
    args.haproxy = shutil.which("haproxy") or next(
        (x for x in ("/usr/sbin/haproxy",) if os.path.exists(x)), None
    )
    return args


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (inherited by every process we start) for 10,000 clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def make_certificate(root: str) -> tuple[str, str, str]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1: cert, key, cert+key."""
    cert, key, pem = (os.path.join(root, n) for n in ("cert.pem", "key.pem", "both.pem"))
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
         "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    with open(pem, "wb") as out:
        for path in (cert, key):
            with open(path, "rb") as f:
                out.write(f.read())
    return cert, key, pem


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.wrk:
        log("wrk is not installed (apt-get install wrk); cannot measure anything")
        return 2
    if not args.node:
        log("node is not installed; the backends are Node servers, cannot run")
        return 2
    limit = args.nofile = raise_fd_limit()
    if any(CASES[c].connections for c in args.cases):
        log(f"open files limit (ulimit -n) for this run: {limit}")
    certroot = tempfile.mkdtemp(prefix="txbalancer-bench-tls-")
    try:
        if any(CASES[c].tls for c in args.cases):
            args.cert, args.key, args.pem = make_certificate(certroot)
        status = 0
        summary = []
        for name in args.cases:
            a = copy.copy(args)
            case = CASES[name]
            a.case = name
            a.close, a.tls = case.close, case.tls
            a.connections = case.connections or args.connections
            results, code = run_case(a, case)
            summary.append((name, a, results))
            status = max(status, code)
        if len(summary) > 1:
            print_summary(args, summary)
        return status
    finally:
        shutil.rmtree(certroot, ignore_errors=True)


SUMMARY_TARGETS = [
    ("txbalancer", "txbalancer (CPython)"),
    ("txbalancer-pypy", "txbalancer (PyPy)"),
    ("node-keepalive", "Node http-proxy, keep-alive agent"),
    ("reverseproxy", "ReverseProxyResource"),
    ("haproxy", "HAProxy"),
    ("nginx", "nginx"),
]


def print_summary(args, summary) -> None:
    """One table over every case: req/s with the ratio to nginx, then p50/p99."""
    header = ["case"] + [label for _, label in SUMMARY_TARGETS]
    rps_rows, lat_rows, mem_rows = [], [], []
    for name, a, results in summary:
        by = {r.key: r for r in results if r.ok}
        nginx = by.get("nginx")
        label = f"{name} (-c{a.connections})"
        rps, lat, mem = [label], [label], [label]
        for key, _ in SUMMARY_TARGETS:
            r = by.get(key)
            if r is None:
                rps.append("-")
                lat.append("-")
                mem.append("-")
                continue
            ratio = f" ({r.rps / nginx.rps:.2f}x)" if nginx and nginx.rps else ""
            errors = r.non_2xx + sum((r.socket_errors or {}).values())
            rps.append(f"{r.rps:.0f}{ratio}" + ("*" if errors else ""))
            lat.append(f"{_fmt(r.p50_ms, '.1f')} / {_fmt(r.p99_ms, '.1f')}")
            mem.append(
                "-" if r.rss_peak_kib is None
                else f"{r.rss_peak_kib / 1024:.0f} MiB, {_perConn(r)} KiB/conn"
            )
        rps_rows.append(rps)
        lat_rows.append(lat)
        mem_rows.append(mem)
    print()
    print(f"SUMMARY: wrk -t{args.threads}, -d{args.duration:g}s after {args.warmup:g}s "
          f"of warm-up, {args.backends} Node backends, {os.cpu_count()} CPUs")
    for title, rows in (
        ("requests/s (ratio to nginx; * = wrk saw errors)", rps_rows),
        ("latency p50 / p99, ms", lat_rows),
        ("proxy peak RSS; (peak - RSS before warm-up) / connections", mem_rows),
    ):
        print()
        print(title)
        print()
        print(rst_table(header, rows))
    print()


def run_case(args, case: Case) -> tuple[list[Result], int]:
    wanted = lambda key: (
        (not args.only or key in args.only)
        and key not in args.skip
        and (case.targets is None or key in case.targets)
    )
    size, slow_ms = case.size, case.slow_ms
    expect_len = size or len(SMALL_BODY)

    node_problem = None
    if wanted("node") or wanted("node-keepalive"):
        node_problem = ensure_node_modules(args)
        if node_problem:
            log(f"skipping the node http-proxy cases: {node_problem}")

    root = tempfile.mkdtemp(prefix="txbalancer-bench-")
    results: list[Result] = []
    backends = None
    started = datetime.datetime.now()
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        log(
            f"warning: load average is {load_before:.2f} before the run; other work on "
            "this machine will skew the numbers"
        )
    log(
        f"case {args.case} ({case.about}): wrk -t{args.threads} -c{args.connections} "
        f"-d{args.duration:g}s (warm-up {args.warmup:g}s), {args.backends} Node "
        f"backends, work dir {root}"
    )
    try:
        backends = start_backends(args, root, size, slow_ms)
        log(
            "backends: "
            + ", ".join(backends.addresses())
            + (f" (the last one adds {slow_ms} ms)" if slow_ms else "")
        )

        targets: list[tuple[Target | None, Result]] = []

        def add(
            key: str,
            make: Callable[[], Target],
            missing: str | None = None,
            name: str | None = None,
        ) -> None:
            if not wanted(key):
                return
            if missing:
                targets.append(
                    (None, Result(name or key, key, skipped=True, error=missing))
                )
            else:
                targets.append((make(), Result("", key)))

        add("direct", lambda: direct_target(backends))
        if args.case == "slow-backend":
            for strategy in args.strategies:
                add("txbalancer", lambda s=strategy: balancer_target(args, backends, s))
        else:
            add("txbalancer", lambda: balancer_target(args, backends, None))
            pypy_missing = (
                None if os.path.exists(args.pypy_twistd)
                else f"no PyPy twistd at {args.pypy_twistd} (--pypy-twistd)"
            )
            add(
                "txbalancer-pypy",
                lambda: balancer_target(args, backends, None, pypy=True),
                pypy_missing,
                "txbalancer on PyPy",
            )
        add("reverseproxy", lambda: reverseproxy_target(args, backends))
        add(
            "node",
            lambda: node_target(args, backends, False),
            node_problem,
            "node http-proxy (no agent)",
        )
        add(
            "node-keepalive",
            lambda: node_target(args, backends, True),
            node_problem,
            "node http-proxy (keep-alive agent)",
        )
        nginx_missing = None if args.nginx else "nginx not installed"
        haproxy_missing = None if args.haproxy else "haproxy not installed"
        add("nginx", lambda: nginx_target(args, backends), nginx_missing, "nginx")
        add(
            "haproxy",
            lambda: haproxy_target(args, backends),
            haproxy_missing,
            "haproxy",
        )
        if args.case == "slow-backend":
            add(
                "nginx",
                lambda: nginx_target(args, backends, True),
                nginx_missing,
                "nginx (least_conn)",
            )
            add(
                "haproxy",
                lambda: haproxy_target(args, backends, True),
                haproxy_missing,
                "haproxy (leastconn)",
            )

        for target, placeholder in targets:
            if target is None:
                log(f"- {placeholder.name}: skipped, {placeholder.error}")
                results.append(placeholder)
                continue
            log(f"- {target.name} ...")
            r = measure(args, target, backends, expect_len, root)
            if r.ok:
                log(
                    f"  {r.rps:.0f} req/s, p99 {r.p99_ms:.2f} ms"
                    + (
                        f", proxy CPU {r.cpu_percent:.0f}%"
                        if r.cpu_percent is not None
                        else ""
                    )
                )
            else:
                log(f"  FAILED: {r.error.splitlines()[0]}")
            results.append(r)
    finally:
        if backends is not None:
            for p in backends.procs:
                p.stop()
        if results and all(r.ok or r.skipped for r in results):
            shutil.rmtree(root, ignore_errors=True)
        elif results:
            log(f"logs of failed targets are kept in {root}")

    base = next((r for r in results if r.key == "txbalancer"), None)
    header, rows = table_rows(results, base, slow=args.case == "slow-backend")
    base_name = base.name if base else "txbalancer"
    title = (
        f"case {args.case}: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
        f"{args.backends} Node backends on 127.0.0.1, {os.cpu_count()} CPUs"
    )
    notes = [
        f"'vs txb' is the ratio to {base_name}"
        + (
            ""
            if base is not None and base.ok
            else " (txbalancer did not run: no ratios)"
        )
        + "; for req/s higher is better, for p99 lower is better.",
        "'direct (one backend)' is wrk against one backend with no proxy: the limit of this machine.",
        "'proxy CPU' is the proxy's CPU time during the run (100% = one core).",
        (
            "'req per upstream conn' is requests the backends saw per new upstream connection "
            "(1 = no upstream keep-alive)."
        ),
    ]
    if args.case == "slow-backend":
        notes.append(
            f"one of the {args.backends} backends adds {slow_ms} ms to every response; "
            "'to slow backend' is the share of requests it got."
        )
    if load_before > 0.5:
        notes.append(
            f"the load average was {load_before:.2f} before the run: other work on "
            "this machine skews these numbers."
        )
    print()
    print(title)
    print()
    print(markdown_table(header, rows))
    print()
    for n in notes:
        print("- " + n)
    print()
    print("RST (for README.rst):")
    print()
    print(rst_table(header, rows))
    print()
    for r in results:
        if not r.ok and not r.skipped and "\n" in r.error:
            print(f"{r.name} failed:\n{textwrap.indent(r.error, '    ')}\n")

    if not args.no_json:
        os.makedirs(args.results_dir, exist_ok=True)
        path = os.path.join(
            args.results_dir, f"{started:%Y%m%d-%H%M%S}-{args.case}.json"
        )
        meta = {
            "started": started.isoformat(timespec="seconds"),
            "case": args.case,
            "argv": args.argv,
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "backends": args.backends,
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "platform": platform.platform(),
            "python": sys.version.split()[0] + " " + platform.python_implementation(),
            "twistd": " ".join(twistd_command(args)),
            "pypy_twistd": args.pypy_twistd,
            "close": args.close,
            "tls": args.tls,
            "versions": {
                "node": version_of([args.node, "--version"]),
                "wrk": version_of([args.wrk, "--version"]),
                "nginx": version_of([args.nginx, "-v"]) if args.nginx else None,
                "haproxy": version_of([args.haproxy, "-v"]) if args.haproxy else None,
                "txbalancer_git": version_of(
                    ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]
                ),
            },
        }
        with open(path, "w") as f:
            json.dump(
                {
                    "meta": meta,
                    "results": [asdict(r) for r in results],
                    "table": {"header": header, "rows": rows},
                },
                f,
                indent=2,
            )
        print(f"results saved to {os.path.relpath(path)}")
    base_failed = base is not None and not base.ok
    return results, 1 if base_failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
