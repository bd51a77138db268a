"""
TCP mode beside HAProxy (``mode tcp``) and nginx (``stream``), in one run,
on 127.0.0.1.

    python bench/tcp.py                     # 3 s per measurement, 1 s warm-up
    python bench/tcp.py --duration 5 --only txbalancer,haproxy

Starts two echo backends (tests/integration/tcpbackend.py), then, one
target at a time (``direct`` to one backend, ``txbalancer --mode tcp``,
``haproxy``, ``nginx``; the last two when installed): starts it on a free
port, checks that 1 MiB comes back intact, then measures

- connections/s: C{--concurrency} clients each opening a connection,
  sending 5 bytes, reading them back and closing, over and over;
- MB/s: C{--streams} clients each opening a connection, sending 1 MiB and
  reading it back, over and over; MB/s counts the payload once (1 MiB per
  echo, MB = 10^6 bytes).

and stops it.  The clients are one asyncio process; the same clients and
backends serve every target, so the ratios compare the proxies, though a
faster client would spread them further.  Prints a markdown and an RST
table with each number also as a ratio to txbalancer's.  Every process it
starts is stopped by its PID in a finally block.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
BACKEND = os.path.join(ROOT, "tests", "integration", "tcpbackend.py")
MIB = 1024 * 1024
TARGETS = ["direct", "txbalancer", "haproxy", "nginx"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(
    port: int, proc: subprocess.Popen, what: str, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} not listening on {port}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def start(args: list[str], logPath: str, cwd: str) -> subprocess.Popen:
    with open(logPath, "wb") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def startBackend(tmp: str, n: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, BACKEND, "0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    line = proc.stdout.readline()
    if not line.startswith(b"listening "):
        stop(proc)
        raise RuntimeError("echo backend did not start")
    return proc, int(line.split()[1])


# ---------------------------------------------------------------- targets


def txbalancer(port: int, backends: list[int], tmp: str, twistd: str) -> list[str]:
    path = os.path.join(tmp, "backends.txt")
    with open(path, "w") as f:
        f.write("".join(f"{HOST}:{b}\n" for b in backends))
    return [
        twistd,
        "-n",
        "--pidfile=",
        "balancer",
        "--mode",
        "tcp",
        "--port",
        f"tcp:{port}:interface={HOST}",
        "--backends",
        path,
    ]


def haproxy(port: int, backends: list[int], tmp: str, twistd: str) -> list[str]:
    servers = "\n".join(f"    server b{i} {HOST}:{b}" for i, b in enumerate(backends))
    path = os.path.join(tmp, "haproxy.cfg")
    with open(path, "w") as f:
        f.write(
            textwrap.dedent(f"""\
            global
                maxconn 4096
                nbthread 1
            defaults
                mode tcp
                timeout connect 3s
                timeout client 60s
                timeout server 60s
            frontend front
                bind {HOST}:{port}
                default_backend back
            backend back
                balance roundrobin
            """)
            + servers
            + "\n"
        )
    return [shutil.which("haproxy"), "-db", "-f", path]


def nginx(port: int, backends: list[int], tmp: str, twistd: str) -> list[str]:
    servers = "\n".join(f"        server {HOST}:{b};" for b in backends)
    module = "/usr/lib/nginx/modules/ngx_stream_module.so"
    load = f"load_module {module};\n" if os.path.exists(module) else ""
    path = os.path.join(tmp, "nginx.conf")
    with open(path, "w") as f:
        f.write(
            load
            + textwrap.dedent(f"""\
            worker_processes 1;
            daemon off;
            pid {tmp}/nginx.pid;
            error_log {tmp}/nginx-error.log;
            events {{ worker_connections 4096; }}
            stream {{
                upstream back {{
            """)
            + servers
            + textwrap.dedent(f"""
                }}
                server {{
                    listen {HOST}:{port};
                    proxy_pass back;
                    proxy_half_close on;
                }}
            }}
            """)
        )
    return [
        shutil.which("nginx"),
        "-c",
        path,
        "-p",
        tmp,
        "-e",
        f"{tmp}/nginx-error.log",
    ]


BUILDERS = {"txbalancer": txbalancer, "haproxy": haproxy, "nginx": nginx}


def available(target: str) -> bool:
    if target == "haproxy":
        return shutil.which("haproxy") is not None
    if target == "nginx":
        return shutil.which("nginx") is not None
    return True


# ---------------------------------------------------------------- clients


async def _echo(port: int, payload: bytes) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(payload)
    await writer.drain()
    got = 0
    while got < len(payload):
        data = await reader.read(262144)
        if not data:
            raise RuntimeError("connection closed early")
        got += len(data)
    writer.close()
    await writer.wait_closed()


async def _loop(port: int, payload: bytes, concurrency: int, seconds: float) -> int:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await _echo(port, payload)
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def measure(
    port: int, payload: bytes, concurrency: int, seconds: float, warmup: float
) -> float:
    asyncio.run(_loop(port, payload, concurrency, warmup))
    started = time.monotonic()
    done = asyncio.run(_loop(port, payload, concurrency, seconds))
    return done / (time.monotonic() - started)


def intact(port: int) -> bool:
    payload = os.urandom(MIB)
    with socket.create_connection((HOST, port), timeout=15) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        back = bytearray()
        while True:
            data = s.recv(262144)
            if not data:
                break
            back += data
    return bytes(back) == payload


# ---------------------------------------------------------------- report


def table(results: dict[str, tuple[float, float]]) -> tuple[str, str]:
    base = results.get("txbalancer")
    rows = []
    for name, (cps, mbps) in results.items():
        if base:
            rows.append(
                (
                    name,
                    f"{cps:,.0f}",
                    f"{cps / base[0]:.2f}",
                    f"{mbps:,.0f}",
                    f"{mbps / base[1]:.2f}",
                )
            )
        else:
            rows.append((name, f"{cps:,.0f}", "-", f"{mbps:,.0f}", "-"))
    head = ("target", "connections/s", "ratio", "MB/s (1 MiB echo)", "ratio")
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    rule = "  ".join("=" * w for w in widths)
    rst = [rule, "  ".join(h.ljust(w) for h, w in zip(head, widths)), rule]
    rst += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    rst.append(rule)
    return "\n".join(md), "\n".join(line.rstrip() for line in rst)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--only", default=",".join(TARGETS))
    parser.add_argument(
        "--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd")
    )
    options = parser.parse_args()
    targets = [t for t in options.only.split(",") if t]
    tmp = tempfile.mkdtemp(prefix="txbalancer-tcpbench-")
    backends = []
    results: dict[str, tuple[float, float]] = {}
    try:
        for n in range(2):
            backends.append(startBackend(tmp, n))
        ports = [p for _, p in backends]
        for target in targets:
            if not available(target):
                log(f"{target}: not installed, skipped")
                continue
            proc = None
            try:
                if target == "direct":
                    port = ports[0]
                else:
                    port = free_port()
                    args = BUILDERS[target](port, ports, tmp, options.twistd)
                    proc = start(args, os.path.join(tmp, f"{target}.log"), tmp)
                    wait_listening(port, proc, target)
                if not intact(port):
                    log(f"{target}: 1 MiB did not come back intact, skipped")
                    continue
                cps = measure(
                    port,
                    b"ping\n",
                    options.concurrency,
                    options.duration,
                    options.warmup,
                )
                echoes = measure(
                    port,
                    os.urandom(MIB),
                    options.streams,
                    options.duration,
                    options.warmup,
                )
                results[target] = (cps, echoes * MIB / 1e6)
                log(
                    f"{target}: {cps:,.0f} connections/s, {echoes * MIB / 1e6:,.0f} MB/s"
                )
            except Exception as e:
                log(f"{target}: failed: {e}")
            finally:
                if proc is not None:
                    stop(proc)
    finally:
        for proc, _ in backends:
            stop(proc)
    md, rst = table(results)
    print(
        f"{datetime.date.today()} {platform.node()} {platform.machine()} "
        f"{os.cpu_count()} cores, Python {platform.python_version()} "
        f"({platform.python_implementation()})"
    )
    print(
        f"python bench/tcp.py --duration {options.duration:g} --warmup {options.warmup:g} "
        f"--concurrency {options.concurrency} --streams {options.streams}"
    )
    print()
    print(md)
    print()
    print(rst)
    return 0 if "txbalancer" in results or "txbalancer" not in targets else 1


if __name__ == "__main__":
    sys.exit(main())
