"""Side-by-side benchmark of Plinth and LiteLLM proxy in front of the same fast mock upstream.

Why one script: absolute figures move from run to run on shared machines, so the only honest
comparison is the same machine, the same mock, the same load and the same worker count, in one run,
reported as ratios. This script starts everything, measures, prints a table with the targets of
issue 2, writes JSON into ``bench/results/`` and stops every process it started (also on Ctrl-C).

    .venv/bin/python bench/run.py                 # 1 worker each, 10 s per load step
    .venv/bin/python bench/run.py --workers 1 2   # both worker counts
    .venv/bin/python bench/run.py --quick         # a smoke run (~1-2 minutes)

See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import ttft  # noqa: E402  (sibling module, importable once BENCH is on the path)

RESULTS = BENCH / "results"
LUA = BENCH / "chat.lua"
MOCK_PORT = 18000  # fixed by ../shared/bench/litellm_config.yaml
PLINTH_PORT = 4100
LITELLM_PORT = 4200  # not LiteLLM's default 4000: that is Plinth's default port too (dev servers)
LITELLM_CONFIG = (ROOT / ".." / "shared" / "bench" / "litellm_config.yaml").resolve()
PLINTH_CONFIG = BENCH / "plinth.bench.yaml"
PLINTH_BIN = ROOT / ".venv" / "bin" / "plinth"
LITELLM_BIN = ROOT / ".llvenv" / "bin" / "litellm"
CHAT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 16,
}

# Targets from issue 2 ("Performance").
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 3.0
TARGET_THROUGHPUT_RATIO = 10.0
TARGET_TTFT_ADDED_P50_MS = 2.0
# "Steady" memory: the second half of the memory run grows RSS by at most this much.
STEADY_MIN_BYTES = 2 * 1024 * 1024
STEADY_FRACTION = 0.02


ALL_CPUS = sorted(os.sched_getaffinity(0))  # before this process pins itself to the load CPU


class BenchError(Exception):
    """A step could not run (a server did not start, wrk failed...)."""


# --------------------------------------------------------------------------------------------------
# Processes


@dataclass
class Server:
    """A server process we started, in its own session so that we can kill its whole group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after `timeout_s`."""
        if self.proc.poll() is not None and not _group_alive(self.proc.pid):
            return
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not any(_pid_alive(p) for p in pids):
                break
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in pids:  # children that left the group (none expected), by their own id
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Processes:
    """Every server started in this run; `stop_all` is called from `finally` and on signals."""

    def __init__(self, log_dir: Path) -> None:
        self.servers: list[Server] = []
        self.log_dir = log_dir

    def start(self, name: str, argv: list[str], env: dict[str, str], cpus: list[int] | None) -> Server:
        if cpus:
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(name, proc, log_path)
        self.servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.servers:
            self.servers.remove(server)

    def stop_all(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()


def descendants(pid: int) -> list[int]:
    """All descendants of `pid`, found through /proc/*/stat parent ids."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root_pid: int) -> dict[str, Any]:
    """RSS summed over the server's process tree (supervisor + workers), and per process."""
    pids = [root_pid, *descendants(root_pid)]
    per = {}
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "taskset":
            continue
        per[str(pid)] = rss_bytes(pid)
    return {"total": sum(per.values()), "per_process": per}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def pick_port(preferred: int, name: str) -> int:
    """The preferred port, or a free one when it is taken (other people's dev servers on a shared box)."""
    if port_free(preferred):
        return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    print(f"port {preferred} is in use; {name} will listen on {port}", flush=True)
    return port


def load_average() -> float:
    """1-minute load average: the run's own load plus whatever else runs on the machine."""
    return os.getloadavg()[0]


_TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds spent busy on the whole machine since boot (all CPUs)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def _proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


class ForeignCpu:
    """CPU time used by processes *not* started by this run, during a stage.

    This machine is shared: other processes running during a stage are the main source of noise
    (at the p99 first), so each stage records how much CPU they took. Ours = this process and its
    reaped children (wrk, stopped servers) + the mock, which lives for the whole run.
    """

    def __init__(self, mock_pid: int) -> None:
        self.mock_pid = mock_pid
        self.start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system + _proc_cpu_seconds(self.mock_pid)
        return time.monotonic(), _busy_seconds(), ours

    def cores(self) -> float:
        """Average number of cores the rest of the machine kept busy since the start."""
        t0, busy0, ours0 = self.start
        t1, busy1, ours1 = self._snapshot()
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(t1 - t0, 1e-9)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http(
    method: str, url: str, key: str | None = None, body: dict[str, Any] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(server: Server, base_url: str, key: str | None, timeout_s: float) -> None:
    """Ready means a real chat completion through the server succeeds (not only a health route)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not server.alive():
            raise BenchError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            status, body = http("POST", f"{base_url}/v1/chat/completions", key, CHAT_BODY, timeout=5)
            if status == 200 and b"Hello" in body:
                return
            last = f"HTTP {status}: {body[:300]!r}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise BenchError(f"{server.name} not ready after {timeout_s:.0f}s ({last}):\n{server.log_tail()}")


# --------------------------------------------------------------------------------------------------
# wrk


@dataclass
class WrkResult:
    connections: int
    duration_s: float
    requests: int
    rps: float
    latency_ms: dict[str, float]  # "50", "75", "90", "99"
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(text: str, connections: int) -> WrkResult:
    """Parse `wrk --latency` output: percentiles, Requests/sec, totals and errors."""
    latency = {
        m.group(1): float(m.group(2)) * _UNIT_MS[m.group(3)]
        for m in re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if not rps or not total:
        raise BenchError(f"could not parse wrk output:\n{text}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {}
    )
    return WrkResult(
        connections=connections,
        duration_s=float(total.group(2)) * _UNIT_MS[total.group(3)] / 1000,
        requests=int(total.group(1)),
        rps=float(rps.group(1)),
        latency_ms=latency,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
    )


def wrk_env(key: str | None) -> dict[str, str]:
    return {**os.environ, "BENCH_KEY": key or "", "BENCH_BODY": json.dumps(CHAT_BODY, separators=(",", ":"))}


def run_wrk(
    base_url: str, key: str | None, connections: int, duration_s: float, *, latency: bool = True
) -> WrkResult:
    """One wrk thread (one core is all the load generator gets here), `connections` keep-alive sockets."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        *(["--latency"] if latency else []),
        "-s",
        str(LUA),
        base_url,
    ]
    try:
        out = subprocess.run(
            argv, env=wrk_env(key), capture_output=True, text=True, timeout=duration_s + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from exc
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr or out.stdout}")
    return parse_wrk(out.stdout, connections)


def run_wrk_requests(
    base_url: str, key: str | None, connections: int, requests: int, rps_hint: float, timeout_s: float
) -> WrkResult:
    """Send at least `requests` requests, as wrk runs sized from the measured rate, within `timeout_s`.

    wrk only knows durations (a Lua counter in its `response` hook would halve its rate here), so
    we chain runs of ``remaining / rate`` seconds until enough requests are answered.
    """
    total = WrkResult(connections=connections, duration_s=0.0, requests=0, rps=0.0, latency_ms={})
    rate = max(rps_hint, 1.0)
    deadline = time.monotonic() + timeout_s
    while total.requests < requests:
        left = deadline - time.monotonic()
        if left < 1:
            raise BenchError(f"only {total.requests} of {requests} requests within {timeout_s:.0f}s")
        seconds = min(left, max(1.0, round((requests - total.requests) / rate)))
        step = run_wrk(base_url, key, connections, seconds, latency=False)
        total.requests += step.requests
        total.duration_s += step.duration_s
        total.non_2xx += step.non_2xx
        for k, v in step.socket_errors.items():
            total.socket_errors[k] = total.socket_errors.get(k, 0) + v
        rate = max(step.rps, 1.0)
    total.rps = total.requests / max(total.duration_s, 1e-9)
    return total


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    print("wrk not found; installing the Debian package (apt-get install -y wrk)...", flush=True)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        subprocess.run(cmd, check=False, timeout=600, stdout=subprocess.DEVNULL)
    if not shutil.which("wrk"):
        raise BenchError("wrk is required: apt-get install -y wrk")


# --------------------------------------------------------------------------------------------------
# Measurements


@dataclass
class Target:
    """One line of the gateway's measurement: raw wrk/TTFT figures and, for Plinth, memory."""

    name: str
    workers: int
    latency_1c: WrkResult | None = None
    load_32c: WrkResult | None = None
    ttft_ms: dict[str, float] = field(default_factory=dict)
    ttft_errors: int = 0
    memory: dict[str, Any] | None = None
    error: str | None = None
    foreign_cpu_cores: float | None = None  # see ForeignCpu
    usage_records: dict[str, Any] | None = None  # Plinth: answered requests vs usage records


def ttft_summary(res: ttft.TtftResult) -> dict[str, float]:
    return {
        "n": float(len(res.samples_ms)),
        "p50": res.percentile(50),
        "p90": res.percentile(90),
        "p99": res.percentile(99),
    }


def measure_direct(args: argparse.Namespace) -> dict[str, Any]:
    base = f"http://127.0.0.1:{MOCK_PORT}"
    print("[mock] direct: 1 connection...", flush=True)
    run_wrk(base, None, 1, min(2.0, args.warmup))
    c1 = run_wrk(base, None, 1, args.duration)
    print("[mock] direct: 32 connections...", flush=True)
    c32 = run_wrk(base, None, 32, args.duration)
    print("[mock] direct: streaming TTFT...", flush=True)
    tt = ttft.measure(base, None, args.ttft_requests, max_seconds=args.ttft_seconds)
    return {"latency_1c": c1, "load_32c": c32, "ttft_ms": ttft_summary(tt), "ttft_errors": tt.errors}


def measure_gateway(
    t: Target, base: str, key: str, args: argparse.Namespace, server: Server, memory: bool
) -> None:
    print(f"[{t.name} w={t.workers}] warm-up {args.warmup:.0f}s...", flush=True)
    run_wrk(base, key, 4, args.warmup)
    print(f"[{t.name} w={t.workers}] 1 connection, {args.duration:.0f}s...", flush=True)
    t.latency_1c = run_wrk(base, key, 1, args.duration)
    print(f"[{t.name} w={t.workers}] 32 connections, {args.duration:.0f}s...", flush=True)
    t.load_32c = run_wrk(base, key, 32, args.duration)
    print(f"[{t.name} w={t.workers}] streaming TTFT ({args.ttft_requests} requests)...", flush=True)
    tt = ttft.measure(base, key, args.ttft_requests, max_seconds=args.ttft_seconds)
    t.ttft_ms, t.ttft_errors = ttft_summary(tt), tt.errors
    if tt.errors:
        print(f"  TTFT errors: {tt.errors} (first: {tt.first_error})", flush=True)
    if memory and args.memory_requests > 0:
        half = args.memory_requests // 2
        before = tree_rss(server.proc.pid)
        print(
            f"[{t.name} w={t.workers}] memory: {args.memory_requests} requests at 32 connections "
            f"(RSS before {before['total'] / 2**20:.1f} MiB)...",
            flush=True,
        )
        rate = t.load_32c.rps if t.load_32c else 100.0
        first = run_wrk_requests(base, key, 32, half, rate, args.memory_timeout / 2)
        mid = tree_rss(server.proc.pid)
        second = run_wrk_requests(
            base, key, 32, args.memory_requests - half, first.rps, args.memory_timeout / 2
        )
        after = tree_rss(server.proc.pid)
        growth_2nd = after["total"] - mid["total"]
        t.memory = {
            "requests_sent": first.requests + second.requests,
            "requests_first_half": first.requests,
            "errors": first.errors + second.errors,
            "rss_before": before,
            "rss_mid": mid,
            "rss_after": after,
            "growth_total_bytes": after["total"] - before["total"],
            "growth_second_half_bytes": growth_2nd,
            "steady": growth_2nd <= max(STEADY_MIN_BYTES, STEADY_FRACTION * mid["total"]),
            "rps": (first.requests + second.requests) / max(1e-9, first.duration_s + second.duration_s),
        }


def run_gateway(
    procs: Processes,
    name: str,
    workers: int,
    args: argparse.Namespace,
    cpus: list[int] | None,
) -> Target:
    t = Target(name=name, workers=workers)
    state: PlinthState | None = None
    if name == "plinth":
        port = pick_port(args.plinth_port, name)
        state = PlinthState.prepare(procs, workers)
        key = state.key
        argv = [
            str(PLINTH_BIN),
            "serve",
            "--config",
            str(args.plinth_config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
        env = {"PLINTH_ADMIN_KEY": secrets.token_hex(32), **state.env}
    else:
        port, key = pick_port(args.litellm_port, name), "sk-" + secrets.token_hex(16)
        argv = [
            str(LITELLM_BIN),
            "--config",
            str(LITELLM_CONFIG),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(workers),
        ]
        env = {"LITELLM_MASTER_KEY": key}
    base = f"http://127.0.0.1:{port}"
    print(f"[{name} w={workers}] starting: {' '.join(argv)}", flush=True)
    server = procs.start(f"{name}-w{workers}", argv, env, cpus)
    try:
        wait_ready(server, base, key, args.start_timeout)
        measure_gateway(t, base, key, args, server, memory=name == "plinth")
        if state is not None:
            time.sleep(1.0)  # let the last in-flight requests finish before counting
            state.answered = answered_chat_requests(base)
    except BenchError as exc:
        t.error = str(exc)
        print(f"[{name} w={workers}] FAILED: {exc}", flush=True)
    finally:
        procs.stop(server)  # graceful: the usage recorder flushes on shutdown
        if state is not None:
            t.usage_records = state.check_usage_records()
            state.close(procs)
    return t


@dataclass
class PlinthState:
    """Plinth's database (with the benchmark's key in it) and, for several workers, a Redis."""

    directory: Path
    db_url: str
    key: str
    env: dict[str, str]
    redis: Server | None = None
    answered: int | None = None

    @classmethod
    def prepare(cls, procs: Processes, workers: int) -> PlinthState:
        from plinth.storage import Database
        from plinth.tenancy.service import TenancyService

        directory = Path(tempfile.mkdtemp(prefix="plinth-bench-"))
        db_url = f"sqlite:///{directory}/plinth.db"
        database = Database(db_url)
        database.migrate()
        service = TenancyService(database)
        team = service.create_team(service.create_org("bench").id, "bench")
        # Limits far above what the load reaches: every request pays for the check, none is refused.
        key = service.create_key(team.id, "bench", rpm_limit=1_000_000_000, tpm_limit=1_000_000_000_000)
        database.dispose()
        env = {"PLINTH_BENCH_DB": db_url}
        redis = None
        if workers > 1:  # exact limits across workers need shared counters
            port = free_port()
            redis = procs.start(
                f"redis-w{workers}",
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                {},
                None,
            )
            env["PLINTH_BENCH_REDIS"] = f"redis://127.0.0.1:{port}/0"
        return cls(directory, db_url, key.secret, env, redis)

    def check_usage_records(self) -> dict[str, Any]:
        """Every answered chat request must have exactly one usage record."""
        from sqlalchemy import func, select

        from plinth.governance.models import AuditRecord
        from plinth.metering.models import UsageRecord
        from plinth.storage import Database

        database = Database(self.db_url)
        with database.session() as session:
            records = session.scalar(
                select(func.count()).select_from(UsageRecord).where(UsageRecord.route == "chat_completions")
            )
            # Every request is decided by the policy step and the decision audited (hash chain).
            decisions = session.scalar(
                select(func.count()).select_from(AuditRecord).where(AuditRecord.kind == "decision")
            )
        database.dispose()
        return {
            "answered": self.answered,
            "records": records,
            "equal": records == self.answered,
            "decisions": decisions,
        }

    def close(self, procs: Processes) -> None:
        if self.redis is not None:
            procs.stop(self.redis)
        shutil.rmtree(self.directory, ignore_errors=True)


def answered_chat_requests(base: str) -> int:
    """Chat requests the server answered, from its own metrics (summed over workers)."""
    status, body = http("GET", f"{base}/metrics")
    if status != 200:
        raise BenchError(f"/metrics answered HTTP {status}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("plinth_requests_total{") and 'route="chat_completions"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# --------------------------------------------------------------------------------------------------
# Report


def _fmt(v: float | None, unit: str = "", digits: int = 3) -> str:
    if v is None or v != v:  # None or NaN
        return "n/a"
    return f"{v:.{digits}f}{unit}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or a != a or b != b:
        return None
    return a / b


def summarize(direct: dict[str, Any], targets: list[Target]) -> dict[str, Any]:
    """Added figures (gateway minus direct), ratios against LiteLLM and pass/fail per target."""
    d1: WrkResult = direct["latency_1c"]
    dt: dict[str, float] = direct["ttft_ms"]
    rows: dict[str, dict[str, Any]] = {}
    for t in targets:
        row: dict[str, Any] = {
            "name": t.name,
            "workers": t.workers,
            "error": t.error,
            "foreign_cpu_cores": t.foreign_cpu_cores,
        }
        if t.latency_1c:
            row["p50_ms"] = t.latency_1c.latency_ms.get("50")
            row["p99_ms"] = t.latency_1c.latency_ms.get("99")
            row["added_p50_ms"] = row["p50_ms"] - d1.latency_ms["50"]
            row["added_p99_ms"] = row["p99_ms"] - d1.latency_ms["99"]
            row["errors_1c"] = t.latency_1c.errors
        if t.load_32c:
            row["rps_32c"] = t.load_32c.rps
            row["p50_32c_ms"] = t.load_32c.latency_ms.get("50")
            row["p99_32c_ms"] = t.load_32c.latency_ms.get("99")
            row["errors_32c"] = t.load_32c.errors
        if t.ttft_ms:
            row["ttft_p50_ms"] = t.ttft_ms["p50"]
            row["ttft_p99_ms"] = t.ttft_ms["p99"]
            row["ttft_added_p50_ms"] = t.ttft_ms["p50"] - dt["p50"]
            row["ttft_added_p99_ms"] = t.ttft_ms["p99"] - dt["p99"]
            row["ttft_errors"] = t.ttft_errors
        if t.memory:
            row["memory"] = t.memory
        if t.usage_records:
            row["usage_records"] = t.usage_records
        rows[f"{t.name}-w{t.workers}"] = row

    comparisons: dict[str, Any] = {}
    for key, row in rows.items():
        if not key.startswith("plinth-"):
            continue
        w = row["workers"]
        ll = rows.get(f"litellm-w{w}", {})
        cmp = {
            "added_p50_ratio_litellm_over_plinth": _ratio(ll.get("added_p50_ms"), row.get("added_p50_ms")),
            "added_p99_ratio_litellm_over_plinth": _ratio(ll.get("added_p99_ms"), row.get("added_p99_ms")),
            "throughput_ratio_plinth_over_litellm": _ratio(row.get("rps_32c"), ll.get("rps_32c")),
            "ttft_added_ratio_litellm_over_plinth": _ratio(
                ll.get("ttft_added_p50_ms"), row.get("ttft_added_p50_ms")
            ),
        }
        mem = row.get("memory")
        clean = not row.get("error") and not row.get("errors_1c") and not row.get("errors_32c")
        checks = {
            "added_p50_le_1ms": _check(row.get("added_p50_ms"), lambda v: v <= TARGET_ADDED_P50_MS, clean),
            # Conservative: the mock's own tail is machine noise, so the p99 check subtracts only the
            # direct p50 (a noisy direct p99 must not turn a slow gateway tail into a pass).
            "added_p99_le_3ms": _check(
                _sub(row.get("p99_ms"), d1.latency_ms.get("50")), lambda v: v <= TARGET_ADDED_P99_MS, clean
            ),
            "throughput_ge_10x_litellm": _check(
                cmp["throughput_ratio_plinth_over_litellm"], lambda v: v >= TARGET_THROUGHPUT_RATIO, clean
            ),
            "ttft_added_p50_le_2ms": _check(
                row.get("ttft_added_p50_ms"),
                lambda v: v <= TARGET_TTFT_ADDED_P50_MS,
                not row.get("ttft_errors"),
            ),
            "memory_steady": None if not mem else bool(mem["steady"] and not mem["errors"]),
            "one_usage_record_each": None if not row.get("usage_records") else row["usage_records"]["equal"],
        }
        comparisons[f"w{w}"] = {**cmp, "checks": checks}
    return {"rows": rows, "comparisons": comparisons}


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _check(value: float | None, ok: Any, clean: bool) -> bool | None:
    if value is None or value != value:
        return None
    return bool(ok(value)) and clean


def print_report(direct: dict[str, Any], summary: dict[str, Any], meta: dict[str, Any]) -> None:
    d1: WrkResult = direct["latency_1c"]
    d32: WrkResult = direct["load_32c"]
    dt = direct["ttft_ms"]
    print()
    print(f"Machine: {meta['cpu']} x{meta['cpus']}, pinning: {meta['pinning']}")
    print(
        f"Mock upstream direct: 1 conn p50 {d1.latency_ms['50']:.3f} ms, p99 {d1.latency_ms['99']:.3f} ms; "
        f"32 conns {d32.rps:,.0f} req/s; TTFT p50 {dt['p50']:.3f} ms, p99 {dt['p99']:.3f} ms "
        f"(other: {direct.get('foreign_cpu_cores', float('nan')):.2f} cores)"
    )
    head = (
        f"{'gateway':<12}{'w':>2}  {'p50 1c':>9}{'p99 1c':>9}{'+p50':>9}{'+p99':>9}"
        f"{'req/s 32c':>11}{'p99 32c':>10}{'TTFT p50':>10}{'+TTFT50':>9}{'+TTFT99':>9}{'other':>7}  errors"
    )
    print()
    print(
        "All times in ms; '+' = added over the mock alone (gateway minus direct); "
        "'other' = cores kept busy by processes not of this run."
    )
    print(head)
    print("-" * len(head))
    for row in summary["rows"].values():
        errs = sum(int(row.get(k) or 0) for k in ("errors_1c", "errors_32c", "ttft_errors"))
        print(
            f"{row['name']:<12}{row['workers']:>2}  {_fmt(row.get('p50_ms')):>9}{_fmt(row.get('p99_ms')):>9}"
            f"{_fmt(row.get('added_p50_ms')):>9}{_fmt(row.get('added_p99_ms')):>9}"
            f"{_fmt(row.get('rps_32c'), digits=0):>11}{_fmt(row.get('p99_32c_ms'), digits=2):>10}"
            f"{_fmt(row.get('ttft_p50_ms')):>10}{_fmt(row.get('ttft_added_p50_ms')):>9}"
            f"{_fmt(row.get('ttft_added_p99_ms')):>9}{_fmt(row.get('foreign_cpu_cores'), digits=2):>7}  {errs}{'  FAILED: ' + row['error'][:60] if row.get('error') else ''}"
        )
        mem = row.get("memory")
        if mem:
            mib = 2**20
            print(
                f"{'':14}memory: RSS {mem['rss_before']['total'] / mib:.1f} MiB before, "
                f"{mem['rss_mid']['total'] / mib:.1f} after {mem['requests_first_half']:,}, "
                f"{mem['rss_after']['total'] / mib:.1f} after {mem['requests_sent']:,} requests "
                f"({mem['rps']:,.0f} req/s, {mem['errors']} errors)"
            )
        usage = row.get("usage_records")
        if usage:
            verdict = "one each" if usage["equal"] else "MISMATCH"
            print(
                f"{'':14}usage records: {usage['records']:,} for {usage['answered']:,} answered requests ({verdict}); "
                f"audited policy decisions: {usage.get('decisions', 0):,}"
            )
    for w, cmp in summary["comparisons"].items():
        print()
        print(f"Plinth vs LiteLLM at {w[1:]} worker(s):")
        print(
            f"  added latency p50: LiteLLM/Plinth = {_fmt(cmp['added_p50_ratio_litellm_over_plinth'], 'x', 1)}; "
            f"p99: {_fmt(cmp['added_p99_ratio_litellm_over_plinth'], 'x', 1)}"
        )
        print(
            f"  throughput at 32 connections: Plinth/LiteLLM = {_fmt(cmp['throughput_ratio_plinth_over_litellm'], 'x', 1)}"
        )
        print(
            f"  added TTFT p50: LiteLLM/Plinth = {_fmt(cmp['ttft_added_ratio_litellm_over_plinth'], 'x', 1)}"
        )
        labels = {
            "added_p50_le_1ms": "added latency p50 <= 1 ms (1 connection)",
            "added_p99_le_3ms": "added latency p99 <= 3 ms (1 connection; gateway p99 - direct p50)",
            "throughput_ge_10x_litellm": "throughput >= 10x LiteLLM (32 connections)",
            "ttft_added_p50_le_2ms": "added TTFT p50 <= 2 ms (streaming)",
            "memory_steady": "memory steady over the memory run",
            "one_usage_record_each": "exactly one usage record per answered request",
        }
        for k, label in labels.items():
            v = cmp["checks"][k]
            print(f"  [{'PASS' if v else 'n/a ' if v is None else 'FAIL'}] {label}")


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, WrkResult):
        return {**asdict(obj), "errors": obj.errors}
    if isinstance(obj, Target):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def machine_meta(pinning: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for name, cmd in {
        "wrk": ["wrk", "--version"],
        "plinth": [str(ROOT / ".venv/bin/python"), "-c", "import plinth; print(plinth.__version__)"],
        "litellm": [
            str(ROOT / ".llvenv/bin/python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
    }.items():
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
            versions[name] = (
                (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""
            )
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "pinning": pinning,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --------------------------------------------------------------------------------------------------
# Main


def plan_cpus(workers: int, pin: str) -> tuple[list[int] | None, list[int] | None, str]:
    """Load generator + mock on the first CPU; gateway workers on the others when there are enough.

    With 2 cores and 1 worker each side gets its own core, which keeps the scheduler from putting
    the gateway and wrk on one core for a while (a source of run-to-run noise). With more workers
    than spare cores the gateway is left unpinned (all CPUs), but the load generator and the mock
    stay on the first CPU, so that the direct baseline is measured the same way in every run.
    """
    cpus = ALL_CPUS
    if pin == "off" or len(cpus) < 2:
        return None, None, "none"
    load = cpus[:1]
    if len(cpus) < workers + 1:
        return load, None, f"load generator + mock on CPU {load}, gateway unpinned"
    gateway = cpus[1 : 1 + workers]
    return load, gateway, f"load generator + mock on CPU {load}, gateway on CPU {gateway}"


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into KeyboardInterrupt so that `finally` blocks clean up.

    SIGINT too: a shell without job control starts background commands with SIGINT ignored, and
    Python then installs no handler of its own.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ensure_litellm() -> None:
    if LITELLM_BIN.exists():
        return
    print("LiteLLM not installed; running bench/setup_litellm.sh (one-off, large download)...", flush=True)
    subprocess.run(["bash", str(BENCH / "setup_litellm.sh")], cwd=ROOT, check=True, timeout=1800)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark Plinth against LiteLLM proxy side by side.")
    p.add_argument("--workers", type=int, nargs="+", default=[1], help="worker counts to run (e.g. 1 2)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk load step")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up load per gateway")
    p.add_argument("--ttft-requests", type=int, default=500, help="streamed requests per TTFT measurement")
    p.add_argument("--ttft-seconds", type=float, default=60.0, help="time bound per TTFT measurement")
    p.add_argument("--memory-requests", type=int, default=100_000, help="requests for Plinth's memory run")
    p.add_argument("--memory-timeout", type=float, default=300.0, help="time bound for the memory run")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for a gateway")
    p.add_argument(
        "--plinth-config",
        type=Path,
        default=PLINTH_CONFIG,
        help="Plinth's configuration (bench/plinth.*.yaml)",
    )
    p.add_argument("--skip-litellm", action="store_true", help="measure Plinth (and the mock) only")
    p.add_argument("--skip-plinth", action="store_true", help="measure LiteLLM (and the mock) only")
    p.add_argument("--plinth-port", type=int, default=PLINTH_PORT, help="(a free one if taken)")
    p.add_argument("--litellm-port", type=int, default=LITELLM_PORT, help="(a free one if taken)")
    p.add_argument("--pin", choices=["auto", "off"], default="auto", help="CPU pinning (see plan_cpus)")
    p.add_argument("--nice", type=int, default=0, help="niceness for every process of the run (root: < 0)")
    p.add_argument("--quick", action="store_true", help="short smoke run: 3 s steps, 10k memory requests")
    p.add_argument("--out", type=Path, default=None, help="JSON result path (default bench/results/...)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 3.0)
        args.warmup = min(args.warmup, 1.0)
        args.ttft_requests = min(args.ttft_requests, 150)
        args.memory_requests = min(args.memory_requests, 10_000)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    procs = Processes(RESULTS / "logs" / stamp)
    targets: list[Target] = []
    loadavg: dict[str, float] = {}
    load_cpus, _, _ = plan_cpus(1, args.pin)
    try:
        with signals_raise():
            if args.nice:
                os.nice(args.nice)  # inherited by the mock, the gateways, wrk and the TTFT client
            ensure_wrk()
            loadavg["start"] = load_average()
            if loadavg["start"] > 0.5:
                print(
                    f"warning: load average {loadavg['start']:.2f} before the run; other processes on this "
                    "machine will add noise (the p99 figures first).",
                    flush=True,
                )
            if not args.skip_litellm:
                ensure_litellm()
            if not args.skip_plinth and not PLINTH_BIN.exists():
                raise BenchError(f"{PLINTH_BIN} not found: install Plinth in .venv first")
            if not port_free(MOCK_PORT):
                raise BenchError(f"port {MOCK_PORT} (mock upstream) is in use")
            if load_cpus:
                os.sched_setaffinity(0, load_cpus)  # this process, wrk and the TTFT client
            mock = procs.start(
                "mock", [sys.executable, str(BENCH / "mock_upstream.py"), str(MOCK_PORT)], {}, load_cpus
            )
            deadline = time.monotonic() + 15
            while True:
                try:
                    if http("GET", f"http://127.0.0.1:{MOCK_PORT}/v1/models")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or not mock.alive():
                    raise BenchError(f"mock upstream did not start:\n{mock.log_tail()}")
                time.sleep(0.1)
            foreign = ForeignCpu(mock.proc.pid)
            direct = measure_direct(args)
            direct["foreign_cpu_cores"] = round(foreign.cores(), 3)
            pinnings: dict[int, str] = {}
            for workers in args.workers:
                _, gw_cpus, desc = plan_cpus(workers, args.pin)
                pinnings[workers] = desc
                names = [
                    n
                    for n, skip in (("plinth", args.skip_plinth), ("litellm", args.skip_litellm))
                    if not skip
                ]
                for name in names:
                    foreign = ForeignCpu(mock.proc.pid)
                    targets.append(run_gateway(procs, name, workers, args, gw_cpus))
                    targets[-1].foreign_cpu_cores = round(foreign.cores(), 3)
                    loadavg[f"after-{name}-w{workers}"] = load_average()
            pin_desc = "; ".join(f"w={w}: {d}" for w, d in pinnings.items())
            meta = machine_meta(pin_desc)
            meta["loadavg_1min"] = loadavg
            summary = summarize(direct, targets)
            print_report(direct, summary, meta)
            result = {
                "meta": meta,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "direct": to_jsonable(direct),
                "targets": [to_jsonable(t) for t in targets],
                "summary": to_jsonable(summary),
            }
            out = args.out or RESULTS / f"bench-{stamp}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
            (RESULTS / "latest.json").write_text(json.dumps(result, indent=2))
            print(f"\nResults: {out}  (server logs: {procs.log_dir})")
            return 0 if all(t.error is None for t in targets) else 1
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; stopping servers...", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
