"""Upstream client cost: Plinth's HttpClient against aiohttp's ClientSession, same request, same mock.

    .venv/bin/python bench/upstream_client.py                 # starts bench/mock_upstream.py itself
    .venv/bin/python bench/upstream_client.py --requests 20000

Sends the gateway benchmark's upstream call (a short chat completion POST, keep-alive, one request
at a time) with each client in turn and prints CPU time and wall time per request of this process.
The mock runs on CPU 0 and the client on CPU 1 where there are two (as in bench/run.sh), so the
client's CPU time is its own. aiohttp is what Plinth used before `plinth.providers.http1`; it is
installed with the `dev` extra (the tests' mock upstreams use it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from plinth.providers.http import HttpClient  # noqa: E402

PORT = 18011
URL = f"http://127.0.0.1:{PORT}/v1/chat/completions"
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in five words."}]}'
HEADERS = {"Authorization": "Bearer sk-upstream", "Content-Type": "application/json"}


async def measure(label: str, one: Callable[[], Awaitable[int]], requests: int) -> None:
    for _ in range(min(1000, requests // 5)):  # warm-up: connection open, code paths hot
        await one()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(requests):
        status = await one()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert status == 200
    print(
        f"  {label:<34} CPU {cpu / requests * 1e6:6.1f} us/request   wall {wall / requests * 1e6:6.1f} us/request"
    )


async def run(requests: int, rounds: int) -> None:
    plinth = HttpClient()

    async def plinth_one() -> int:
        resp = await plinth.post(URL, BODY, HEADERS, timeout_s=60, connect_timeout_s=10)
        return resp.status

    try:
        import aiohttp
    except ImportError:
        aiohttp = None  # type: ignore[assignment]
        print("  (aiohttp is not installed: only Plinth's client is measured)")
    session = None
    if aiohttp is not None:
        # As Plinth configured it before: no connection limit, keep-alive, DNS cache.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
            skip_auto_headers=("User-Agent",),
        )
        timeout = aiohttp.ClientTimeout(total=60, sock_connect=10)

        async def aiohttp_one() -> int:
            async with session.post(URL, data=BODY, headers=HEADERS, timeout=timeout) as resp:
                await resp.read()
                return resp.status

    try:
        for _ in range(rounds):  # alternated: the machine's speed drifts
            await measure("plinth.providers.http.HttpClient", plinth_one, requests)
            if session is not None:
                await measure(f"aiohttp {aiohttp.__version__} ClientSession", aiohttp_one, requests)
    finally:
        await plinth.aclose()
        if session is not None:
            await session.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    two_cpus = (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    mock = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "mock_upstream.py"), str(PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if two_cpus:
            os.sched_setaffinity(mock.pid, {0})
            os.sched_setaffinity(0, {1})
        time.sleep(1.0)
        print(f"{args.requests} sequential POSTs per client and round, keep-alive; "
              f"client on CPU {'1, mock on CPU 0' if two_cpus else 'shared with the mock'}")  # fmt: skip
        try:
            import uvloop  # what `plinth serve` runs on
        except ImportError:
            asyncio.run(run(args.requests, args.rounds))
        else:
            uvloop.run(run(args.requests, args.rounds))
    finally:
        mock.terminate()
        mock.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
