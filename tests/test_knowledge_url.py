"""URL ingestion: non-global addresses refused by default (also after a redirect), the size and time
limits, and a URL job against a loopback server that the configuration allows."""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, GatewayServer
from plinth.config.schema import KnowledgeConfig
from plinth.knowledge.embedders import HashingEmbedder
from plinth.knowledge.fetch import FetchError, FetchPolicy, fetch, resolve, validate_url
from plinth.knowledge.jobs import IngestJobs, StoreProvider
from plinth.knowledge.store import KnowledgeStore
from plinth.storage import Database
from plinth.tenancy.service import TenancyService

DOC = b"# Leave\n\nEveryone gets 25 days of paid leave a year.\n"
HTML = b"<html><body><h1>Laptops</h1><p>Laptops are replaced every three years.</p></body></html>"


class Site:
    """A loopback web server: documents, redirects, a large body, a slow one."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.paths: list[str] = []  # as requested, with the query string
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                site.hosts.append(self.headers.get("host", ""))
                site.paths.append(self.path)
                routes: dict[str, Callable[[], None]] = {
                    "/leave.md": lambda: self.send(200, DOC, "text/markdown"),
                    "/page": lambda: self.send(200, HTML, "text/html; charset=utf-8"),
                    "/to-leave": lambda: self.redirect(f"http://127.0.0.1:{site.port}/leave.md"),
                    "/to-metadata": lambda: self.redirect("http://169.254.169.254/latest/meta-data/"),
                    "/to-private": lambda: self.redirect("http://10.0.0.1/internal"),
                    "/loop": lambda: self.redirect("/loop"),
                    "/big": lambda: self.send(200, b"x" * 50_000, "text/plain"),
                    "/big-chunked": self.chunked,
                    "/slow": self.slow,
                    "/binary": lambda: self.send(200, b"\x00\x01", "application/octet-stream"),
                }
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send(404, b"not here", "text/plain")
                else:
                    route()

            def send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("location", location)
                self.send_header("content-length", "0")
                self.end_headers()

            def chunked(self) -> None:  # no Content-Length: the limit must hold while streaming
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                for _ in range(20):
                    piece = b"y" * 4096
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")

            def slow(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()
                try:
                    for _ in range(30):
                        self.wfile.write(b"1\r\na\r\n")
                        self.wfile.flush()
                        time.sleep(0.1)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    server = Site()
    yield server
    server.close()


LOOPBACK_ONLY = FetchPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://localhost/x",
        "http://10.1.2.3/x",
        "http://192.168.0.1/x",
        "http://172.16.0.1/x",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata, link-local
        "http://100.64.0.1/x",  # carrier-grade NAT
        "http://0.0.0.0/x",
        "http://[::1]/x",
        "http://[fe80::1]/x",
        "http://[::ffff:127.0.0.1]/x",  # IPv4-mapped loopback
        "http://[fd00::1]/x",  # unique local
        "http://224.0.0.1/x",  # multicast
    ],
)
def test_non_global_addresses_are_refused_by_default(url: str) -> None:
    with pytest.raises(FetchError, match="not a public address"):
        resolve(validate_url(url), FetchPolicy())


def test_public_addresses_pass_the_check_and_bad_urls_are_refused() -> None:
    assert str(resolve(validate_url("http://93.184.216.34/"), FetchPolicy())) == "93.184.216.34"
    for bad, why in [
        ("ftp://example.com/a", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("http://user:secret@example.com/", "credentials"),
        ("", "non-empty"),
        ("http:///nohost", "no host"),
    ]:
        with pytest.raises(FetchError, match=why) as caught:
            validate_url(bad)
        assert "secret" not in str(caught.value)


def test_allowed_hosts_and_networks_from_config() -> None:
    policy = FetchPolicy.from_config(
        KnowledgeConfig(allowed_url_hosts=["wiki.internal", "10.1.0.0/16"], url_max_bytes=10)
    )
    assert policy.permits("wiki.internal", ipaddress.ip_address("10.9.9.9"))
    assert policy.permits("other", ipaddress.ip_address("10.1.2.3"))
    assert not policy.permits("other", ipaddress.ip_address("10.2.0.1"))
    assert policy.max_bytes == 10
    assert FetchPolicy.from_config(KnowledgeConfig(allow_private_urls=True)).permits(
        "x", ipaddress.ip_address("127.0.0.1")
    )


def test_fetch_from_an_allowed_loopback_server(site: Site) -> None:
    with pytest.raises(FetchError, match="not a public address"):
        fetch(site.url("/leave.md"), FetchPolicy())  # the default refuses loopback
    got = fetch(site.url("/leave.md"), LOOPBACK_ONLY)
    assert got.data == DOC and got.suffix == ".md"
    page = fetch(site.url("/page"), LOOPBACK_ONLY)
    assert page.suffix == ".html" and b"Laptops" in page.data
    # the connection goes to the checked address, with the name the URL gave in the Host header
    fetch(f"http://localhost:{site.port}/leave.md", FetchPolicy(allow_private=True))
    assert site.hosts[-1] == f"localhost:{site.port}"
    followed = fetch(site.url("/to-leave"), LOOPBACK_ONLY)
    assert followed.data == DOC and followed.redirects == [site.url("/leave.md")]


def test_redirects_to_private_addresses_are_refused(site: Site) -> None:
    for path in ("/to-metadata", "/to-private"):
        with pytest.raises(FetchError, match="not a public address"):
            fetch(site.url(path), LOOPBACK_ONLY)
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch(site.url("/loop"), LOOPBACK_ONLY)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(site.url("/nothing"), LOOPBACK_ONLY)
    with pytest.raises(FetchError, match=r"cannot connect to 127\.0\.0\.1"):
        fetch("http://127.0.0.1:9/closed", LOOPBACK_ONLY)


def test_size_and_time_limits(site: Site) -> None:
    small = FetchPolicy(allow_private=True, max_bytes=10_000)
    with pytest.raises(FetchError, match="larger than the limit of 10000 bytes"):
        fetch(site.url("/big"), small)  # declared Content-Length
    with pytest.raises(FetchError, match="larger than the limit of 10000 bytes"):
        fetch(site.url("/big-chunked"), small)  # counted while streaming
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"longer than 0\.5 s"):
        fetch(site.url("/slow"), FetchPolicy(allow_private=True, timeout_s=0.5))
    assert time.monotonic() - started < 2.0


def test_url_job_ingests_then_skips_unchanged(site: Site, tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/kb.db")
    db.migrate()
    base = KnowledgeStore(db, HashingEmbedder()).create_base("team_a", "wiki")
    jobs = IngestJobs(db, StoreProvider(db, None), LOOPBACK_ONLY)
    first = jobs.run(jobs.create(base, "url", site.url("/to-leave"), actor="t").id)
    assert (first.status, first.added, first.files_total, first.chunks > 0) == ("succeeded", 1, 1, True)
    docs = KnowledgeStore(db, HashingEmbedder()).documents(base.id)
    assert [d.source for d in docs] == [site.url("/to-leave")]  # the URL asked for, stable across runs
    again = jobs.run(jobs.create(base, "url", site.url("/to-leave"), actor="t").id)
    assert (again.status, again.unchanged, again.chunks) == ("succeeded", 1, 0)
    for path, why in [
        ("/nothing", "HTTP 404"),
        ("/binary", "unsupported file type"),
        ("/to-private", "10.0.0.1"),
    ]:
        failed = jobs.run(jobs.create(base, "url", site.url(path), actor="t").id)
        assert failed.status == "failed" and failed.failed == 1 and why in failed.errors[0]["reason"]
    db.dispose()


def test_url_ingest_over_http(
    gateway_factory: Callable[..., GatewayServer], basic_config: dict[str, Any], site: Site, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/plinth.db"
    db = Database(url)
    db.migrate()
    tenancy = TenancyService(db)
    team = tenancy.create_team(tenancy.create_org("acme").id, "a")
    key = tenancy.create_key(team.id, "a").secret
    KnowledgeStore(db, HashingEmbedder()).create_base(team.id, "wiki")
    db.dispose()
    server = gateway_factory({**basic_config, "storage": {"url": url}})
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        refused = client.post("/v1/knowledge/wiki/documents", json={"url": site.url("/leave.md")})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "url"
        assert "not a public address" in refused.json()["error"]["message"]
        assert client.post("/v1/knowledge/wiki/documents", json={"url": "ftp://x/y"}).status_code == 400
        assert client.post("/v1/knowledge/wiki/documents", json={}).json()["error"]["param"] == "url"
        admin = httpx.post(
            f"{server.url}/api/knowledge-bases/wiki/ingest",
            json={"url": site.url("/leave.md")},
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert admin.status_code == 400 and admin.json()["error"]["param"] == "url"

        configure(server, KnowledgeConfig(allowed_url_hosts=["127.0.0.1"]))
        started = client.post("/v1/knowledge/wiki/documents", json={"url": site.url("/leave.md")})
        assert started.status_code == 202, started.text
        job = wait_done(client, started.headers["location"])
        assert job["status"] == "succeeded" and job["kind"] == "url" and job["added"] == 1
        found = client.post("/v1/knowledge/wiki/query", json={"query": "paid leave days", "top_k": 1})
        assert found.json()["data"][0]["source"] == site.url("/leave.md")


def configure(server: GatewayServer, knowledge: KnowledgeConfig) -> None:
    """Give the running gateway's ingestion API this `knowledge:` configuration. (app.py passes
    `config.knowledge` once wired; this works either way.)"""
    for route in server.app.routes:
        if getattr(route, "path", "") == "/v1/knowledge/{kb}/documents":
            api = route.endpoint.__self__  # type: ignore[attr-defined]
            api.knowledge, api._jobs = knowledge, None


def wait_done(client: httpx.Client, location: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(location).json()
        if job["status"] in ("succeeded", "failed", "partial") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)
