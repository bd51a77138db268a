"""
A soak of txbalancer under chaos, on 127.0.0.1 only; run on demand, never in CI.

    python bench/soak.py                              # 1,000,000 requests (or --duration)
    python bench/soak.py --requests 100000 --duration 120

Starts --backends Node backends (bench/backend.js) and the real
``twistd -n balancer`` in front of them, then sends GET requests from
--concurrency keep-alive connections (an asyncio client of its own: wrk
cannot tell which requests failed) while, at random:

    - a backend is killed (SIGKILL) and started again on its port a little
      later, frozen (SIGSTOP, then SIGCONT a few seconds later), or
      restarted (SIGKILL and started again at once); never more than one
      backend is out at a time, so there is always one to answer;
    - every --reload-every seconds the backends file is rewritten (same
      backends, shuffled) and the balancer gets SIGHUP (--no-reload turns
      this off; a balancer without backend reload just re-reads its
      certificates, which is harmless);
    - a client sends a request and disconnects without reading the answer
      (--disconnect-rate of the requests; not counted as failures).

It stops after --requests answers or --duration seconds, whichever comes
first, and reports: requests answered, failed idempotent requests (a GET
whose answer was not 200 with the backend's body, or whose connection
broke, or that took longer than --request-timeout), the balancer's open
file descriptors and RSS after the warm-up (--warmup seconds) and at the
end, the same again once the load has stopped and idle connections have
been closed, and the lines of the balancer's log with ``Unhandled error``
or ``Traceback``.  The exit status is 1 when anything failed or was found.

Every process it starts is stopped by its PID in a finally block.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HOST = "127.0.0.1"
BODY = b"hello world!\n"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Backend:
    """One bench/backend.js on a fixed port; killed, frozen, started again."""

    def __init__(self, node: str, port: int, name: str, workdir: str) -> None:
        self.node = node
        self.port = port
        self.name = name
        self.logpath = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self.frozen = False

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        with open(self.logpath, "ab") as out:
            self.proc = subprocess.Popen(
                [self.node, os.path.join(HERE, "backend.js"), "--port", str(self.port),
                 "--name", self.name],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_listening(self.port, self.proc)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self.frozen = False

    def freeze(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False


class Stats:
    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.failures: dict[str, int] = {}
        self.disconnects = 0
        self.latencies: list[float] = []

    def fail(self, why: str) -> None:
        self.failed += 1
        self.failures[why] = self.failures.get(why, 0) + 1


REQUEST = b"GET /soak HTTP/1.1\r\nHost: soak.test\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    m = _LENGTH.search(head)
    if m is None:
        raise ValueError("no Content-Length in the response")
    body = await reader.readexactly(int(m.group(1)))
    return status, head, body


async def client(port: int, args, stats: Stats, stop: asyncio.Event, rng: random.Random) -> None:
    """One keep-alive connection at a time, sending GETs until told to stop."""
    reader = writer = None
    while not stop.is_set():
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, port), args.request_timeout
                )
            if rng.random() < args.disconnect_rate:
                # A client that leaves before its answer.
                writer.write(REQUEST)
                writer.close()
                writer = None
                stats.disconnects += 1
                continue
            started = time.monotonic()
            writer.write(REQUEST)
            status, head, body = await asyncio.wait_for(
                read_response(reader), args.request_timeout
            )
            stats.latencies.append(time.monotonic() - started)
            if status != b"200" or body != BODY:
                stats.fail(f"status {status.decode()}")
            else:
                stats.ok += 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except asyncio.TimeoutError:
            stats.fail("timed out")
            if writer is not None:
                writer.close()
            writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, IndexError) as e:
            stats.fail(type(e).__name__)
            if writer is not None:
                writer.close()
            writer = None
        if stats.ok + stats.failed >= args.requests:
            stop.set()
    if writer is not None:
        writer.close()


async def chaos(backends: list[Backend], args, stop: asyncio.Event, rng: random.Random,
                events: dict[str, int]) -> None:
    """One fault at a time, at random, until stopped."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(*args.chaos_every))
            return
        except asyncio.TimeoutError:
            pass
        victim = rng.choice(backends)
        action = rng.choice(["kill", "freeze", "restart"])
        events[action] = events.get(action, 0) + 1
        if action == "freeze":
            victim.freeze()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            victim.thaw()
        elif action == "kill":
            victim.kill()
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            await asyncio.get_running_loop().run_in_executor(None, victim.start)
        else:
            victim.kill()
            await asyncio.get_running_loop().run_in_executor(None, victim.start)


async def reloader(balancer: subprocess.Popen, path: str, backends: list[Backend], args,
                   stop: asyncio.Event, rng: random.Random, events: dict[str, int]) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), args.reload_every)
            return
        except asyncio.TimeoutError:
            pass
        write_backends(path, backends, rng)
        os.kill(balancer.pid, signal.SIGHUP)
        events["reload"] = events.get("reload", 0) + 1


def write_backends(path: str, backends: list[Backend], rng: random.Random) -> None:
    lines = [b.address for b in backends]
    rng.shuffle(lines)
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write("# written by bench/soak.py\n" + "\n".join(lines) + "\n")
    os.replace(tmp, path)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def soak(args, balancer: subprocess.Popen, port: int, path: str,
               backends: list[Backend]) -> dict:
    rng = random.Random(args.seed)
    stats = Stats()
    stop = asyncio.Event()
    events: dict[str, int] = {}
    clients = [
        asyncio.create_task(client(port, args, stats, stop, random.Random(rng.random())))
        for _ in range(args.concurrency)
    ]
    started = time.monotonic()
    report: dict = {}

    async def sample() -> None:
        await asyncio.sleep(args.warmup)
        report["warm"] = (fds_of(balancer.pid), rss_kib(balancer.pid), stats.ok + stats.failed)
        log(f"after warm-up ({args.warmup:g}s): fds {report['warm'][0]}, "
            f"RSS {report['warm'][1]} KiB, {report['warm'][2]} requests")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 10)
            except asyncio.TimeoutError:
                log(f"  {time.monotonic() - started:6.0f}s: {stats.ok} ok, "
                    f"{stats.failed} failed, fds {fds_of(balancer.pid)}, "
                    f"RSS {rss_kib(balancer.pid)} KiB")
            report["end"] = (fds_of(balancer.pid), rss_kib(balancer.pid))

    helpers = [
        asyncio.create_task(sample()),
        asyncio.create_task(chaos(backends, args, stop, rng, events)),
    ]
    if args.reload:
        helpers.append(asyncio.create_task(
            reloader(balancer, path, backends, args, stop, rng, events)))
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except asyncio.TimeoutError:
        pass
    stop.set()
    report.setdefault("end", (fds_of(balancer.pid), rss_kib(balancer.pid)))
    elapsed = time.monotonic() - started
    await asyncio.gather(*clients, *helpers, return_exceptions=True)
    report.update(stats=stats, events=events, elapsed=elapsed)
    return report


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=1_000_000, help="stop after this many answers")
    p.add_argument("--duration", type=float, default=3600, help="stop after this many seconds")
    p.add_argument("--concurrency", type=int, default=200, help="client connections")
    p.add_argument("--backends", type=int, default=3, help="Node backends")
    p.add_argument("--warmup", type=float, default=15, help="seconds before the first fd/RSS sample")
    p.add_argument("--chaos-every", type=float, nargs=2, default=(2.0, 6.0),
                   metavar=("MIN", "MAX"), help="seconds between two faults")
    p.add_argument("--reload-every", type=float, default=30, help="seconds between two SIGHUPs")
    p.add_argument("--no-reload", dest="reload", action="store_false",
                   help="do not rewrite the backends file and SIGHUP")
    p.add_argument("--disconnect-rate", type=float, default=0.001,
                   help="share of requests whose client leaves before the answer")
    p.add_argument("--request-timeout", type=float, default=30, help="seconds per request")
    p.add_argument("--settle", type=float, default=10,
                   help="seconds after the load before the idle fd/RSS sample")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--node", default="node")
    p.add_argument("--twistd", default=os.path.join(os.path.dirname(sys.executable), "twistd"))
    p.add_argument("--balancer-arg", action="append", default=[],
                   help="an extra option for the balancer (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    workdir = tempfile.mkdtemp(prefix="txbalancer-soak-")
    log(f"soak: logs in {workdir}, seed {args.seed}")
    backends = [Backend(args.node, free_port(), f"b{i + 1}", workdir)
                for i in range(args.backends)]
    balancer = None
    balancerLog = os.path.join(workdir, "balancer.log")
    try:
        for b in backends:
            b.start()
        path = os.path.join(workdir, "backends.txt")
        write_backends(path, backends, random.Random(args.seed))
        port = free_port()
        with open(balancerLog, "wb") as out:
            balancer = subprocess.Popen(
                [args.twistd, "-n", "--pidfile=", "balancer",
                 "--port", f"tcp:{port}:interface={HOST}", "--backends", path,
                 *args.balancer_arg],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        wait_listening(port, balancer)
        report = asyncio.run(soak(args, balancer, port, path, backends))
        for b in backends:
            b.thaw()
        time.sleep(args.settle)
        idle = (fds_of(balancer.pid), rss_kib(balancer.pid))
        alive = balancer.poll() is None
    finally:
        for b in backends:
            b.thaw()
        if balancer is not None and balancer.poll() is None:
            balancer.send_signal(signal.SIGTERM)
            try:
                balancer.wait(40)
            except subprocess.TimeoutExpired:
                balancer.kill()
                balancer.wait(10)
        for b in backends:
            b.kill()
    with open(balancerLog, errors="replace") as f:
        text = f.read()
    bad = [line for line in text.splitlines()
           if "unhandled error" in line.lower() or "traceback" in line.lower()]
    stats = report["stats"]
    total = stats.ok + stats.failed
    warm, end = report["warm"], report["end"]
    lines = [
        f"soak of {datetime.date.today().isoformat()}: "
        f"python bench/soak.py {' '.join(argv)}".rstrip(),
        f"  requests answered:            {total} in {report['elapsed']:.0f}s "
        f"({total / report['elapsed']:.0f}/s), concurrency {args.concurrency}",
        f"  failed idempotent requests:   {stats.failed} {stats.failures or ''}".rstrip(),
        f"  clients that left early:      {stats.disconnects}",
        f"  faults:                       {report['events']}",
        f"  latency p50/p99/max:          {percentile(stats.latencies, .5) * 1000:.1f} / "
        f"{percentile(stats.latencies, .99) * 1000:.1f} / "
        f"{max(stats.latencies, default=0) * 1000:.0f} ms",
        f"  balancer fds:                 {warm[0]} after warm-up, {end[0]} at the end, "
        f"{idle[0]} idle {args.settle:g}s later",
        f"  balancer RSS:                 {warm[1]} KiB after warm-up, {end[1]} KiB at "
        f"the end, {idle[1]} KiB idle",
        f"  'Unhandled error'/'Traceback' in its log: {len(bad)} line(s)",
        f"  balancer still running at the end: {'yes' if alive else 'NO'}",
    ]
    print("\n".join(lines))
    for line in bad[:20]:
        print("    " + line)
    return 1 if stats.failed or bad or not alive else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
