"""`plinth serve` as a real process: several workers, metrics across workers, graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from mocks.openai_upstream import OpenAIUpstream, Reply, completion

ADMIN = "c0ffee" + "1b2d3f4a5e6c7b8a9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a"


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


class ServeProcess:
    def __init__(self, config: Path, workers: int) -> None:
        self.port = free_port()
        env = {**os.environ, "PLINTH_ADMIN_KEY": ADMIN}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "plinth", "serve", "--config", str(config), "--port", str(self.port),
             "--workers", str(workers), "--log-level", "warning"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_ready(self) -> None:
        async with httpx.AsyncClient() as http:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"plinth serve exited: {self.proc.stdout.read() if self.proc.stdout else ''}"
                    )
                try:
                    if (await http.get(self.url + "/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError("plinth serve did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for proc in started:
        proc.stop()


def config_file(tmp_path: Path, upstream: OpenAIUpstream) -> Path:
    path = tmp_path / "plinth.yaml"
    path.write_text(
        f"storage: {{url: 'sqlite:///{tmp_path}/plinth.db'}}\n"
        f"models:\n  - name: gpt-4o-mini\n    deployments:\n"
        f"      - {{provider: openai_compatible, model: m, base_url: '{upstream.url}', api_key: '${{UPSTREAM_KEY:-x}}'}}\n"
    )
    return path


async def test_workers_share_the_port_and_metrics_add_up(
    tmp_path: Path, openai_upstream: OpenAIUpstream, serve: list[ServeProcess]
) -> None:
    proc = ServeProcess(config_file(tmp_path, openai_upstream), workers=2)
    serve.append(proc)
    await proc.wait_ready()
    client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=ADMIN, max_retries=0)
    replies = await asyncio.gather(
        *(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": str(i)}]
            )
            for i in range(40)
        )
    )
    assert sorted(r.choices[0].message.content or "" for r in replies) == sorted(
        f"echo: {i}" for i in range(40)
    )
    async with httpx.AsyncClient() as http:
        text = (await http.get(proc.url + "/metrics")).text
    line = next(
        x for x in text.splitlines() if x.startswith("plinth_requests_total{") and 'status="200"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) == 40.0  # summed over both workers


async def test_sigterm_lets_in_flight_requests_finish(
    tmp_path: Path, openai_upstream: OpenAIUpstream, serve: list[ServeProcess]
) -> None:
    proc = ServeProcess(config_file(tmp_path, openai_upstream), workers=1)
    serve.append(proc)
    await proc.wait_ready()
    openai_upstream.queue(Reply(body=completion("finished"), delay_s=1.0))
    client = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key=ADMIN, max_retries=0)
    pending = asyncio.ensure_future(
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "slow"}])
    )
    await asyncio.sleep(0.3)
    proc.proc.send_signal(signal.SIGTERM)
    answer = await pending
    assert answer.choices[0].message.content == "finished"
    # uvicorn re-raises the caught SIGTERM after its graceful shutdown, so -15 is a clean exit.
    assert await asyncio.to_thread(proc.proc.wait, 20) in (0, -signal.SIGTERM)
