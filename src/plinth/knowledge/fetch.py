"""Fetch one document from a URL for ingestion, refusing addresses the gateway must not reach.

A knowledge-base URL is chosen by a caller, so fetching it is a server-side request forgery risk:
by default every address that is not globally routable (loopback, private, link-local, CGNAT,
multicast, reserved, cloud metadata at 169.254.169.254, ...) is refused. The host is resolved once,
every resolved address is checked, and the connection goes to the checked address (with the
original Host header and TLS server name), so DNS cannot answer differently between the check and
the connection (no rebinding). Redirects are followed by hand and each hop is checked the same way.
The body is read as a stream and cut at `max_bytes`; the whole fetch has a deadline.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import httpx

if TYPE_CHECKING:
    from plinth.config.schema import KnowledgeConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Content types mapped to the parser's file suffix; the URL path's suffix is the fallback.
CONTENT_TYPES = {
    "text/html": ".html",
    "application/xhtml+xml": ".html",
    "text/markdown": ".md",
    "text/x-markdown": ".md",
    "text/plain": ".txt",
    "application/pdf": ".pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/jsonl": ".jsonl",
    "application/x-ndjson": ".jsonl",
    "application/ndjson": ".jsonl",
}
REDIRECTS = {301, 302, 303, 307, 308}


class FetchError(Exception):
    """A URL that is refused or could not be fetched; the message says why (never a credential)."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()  # exact host names (lower case) or IP literals
    allowed_networks: tuple[IPNetwork, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 30.0
    max_redirects: int = 5

    @classmethod
    def from_config(cls, config: KnowledgeConfig | None) -> FetchPolicy:
        if config is None:
            return cls()
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in config.allowed_url_hosts:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                hosts.add(entry.strip().lower().rstrip("."))
        return cls(
            allow_private=config.allow_private_urls,
            allowed_hosts=frozenset(hosts),
            allowed_networks=tuple(networks),
            max_bytes=config.url_max_bytes,
            timeout_s=config.url_timeout_s,
            max_redirects=config.url_max_redirects,
        )

    def permits(self, host: str, address: IPAddress) -> bool:
        """Whether a connection to `address` (resolved from `host`) is allowed."""
        if self.allow_private or host in self.allowed_hosts:
            return True
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        check: IPAddress = mapped or address
        if any(check in network for network in self.allowed_networks):
            return True
        return check.is_global and not check.is_multicast


@dataclass
class Fetched:
    url: str  # after redirects
    data: bytes
    content_type: str
    suffix: str  # the parser's file type: ".html", ".pdf", ... ("" when unknown)
    redirects: list[str] = field(default_factory=list)


def validate_url(url: str) -> httpx.URL:
    """Shape checks only (no DNS): http(s), a host, no credentials. Raises FetchError."""
    if not isinstance(url, str) or not url.strip():
        raise FetchError("the URL must be a non-empty string")
    if len(url) > 2000:
        raise FetchError("the URL is longer than 2000 characters")
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https"):
        raise FetchError(f"only http and https URLs can be ingested, not {parts.scheme or 'no scheme'!r}")
    if parts.username is not None or parts.password is not None:
        raise FetchError(
            "URLs with credentials (user:password@) are refused; they would be stored as the source"
        )
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, ValueError) as exc:
        raise FetchError(f"the URL is not valid: {exc}") from None
    if not parsed.host:
        raise FetchError("the URL has no host")
    return parsed


def resolve(url: httpx.URL, policy: FetchPolicy) -> IPAddress:
    """Resolve the URL's host once and check every address; returns the first to connect to."""
    return resolve_all(url, policy)[0]


def resolve_all(url: httpx.URL, policy: FetchPolicy) -> list[IPAddress]:
    """Resolve the URL's host once and check every address; returns them all (each is allowed)."""
    host = url.host.lower().rstrip(".")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchError(f"cannot resolve host {host!r}: {exc}") from None
        addresses = []
        for info in infos:
            raw = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone id
            address = ipaddress.ip_address(raw)
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise FetchError(f"host {host!r} has no address")
    for address in addresses:  # all must pass: a host cannot smuggle one private address in
        if not policy.permits(host, address):
            raise FetchError(
                f"host {host!r} resolves to {address}, which is not a public address "
                "(private, loopback, link-local and other non-global addresses are refused; "
                "allow them with knowledge.allow_private_urls or knowledge.allowed_url_hosts)"
            )
    return addresses


def suffix_for(url: httpx.URL, content_type: str) -> str:
    """The parser file type: from the Content-Type, else from the URL path's extension."""
    mime = content_type.split(";", 1)[0].strip().lower()
    if mime in CONTENT_TYPES:
        return CONTENT_TYPES[mime]
    name = unquote(url.path.rsplit("/", 1)[-1])
    return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""


def source_for(url: httpx.URL) -> str:
    """The document's source name, also what the audit trail and job rows show: the URL without its
    query string and fragment, which may carry a signed token (S3 pre-signed URLs and the like).
    The full URL is kept only while the job needs it (sealed for encrypted bases, see jobs.py)."""
    return str(url.copy_with(query=None, fragment=None))


def url_digest(url: str) -> str:
    """sha256 of the full URL as given: tells two fetches of one source apart without storing it."""
    return hashlib.sha256(url.strip().encode()).hexdigest()


def fetch(url: str, policy: FetchPolicy, client: httpx.Client | None = None) -> Fetched:
    """GET a URL under the policy; raises FetchError with a clear reason on any refusal or failure."""
    current = validate_url(url)
    deadline = time.monotonic() + policy.timeout_s
    redirects: list[str] = []
    own = client is None
    http = client or httpx.Client(follow_redirects=False, trust_env=False)
    try:
        while True:
            response = _connect(http, current, resolve_all(current, policy), policy, deadline)
            try:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(f"redirect {response.status_code} without a Location header")
                    if len(redirects) >= policy.max_redirects:
                        raise FetchError(f"more than {policy.max_redirects} redirects")
                    current = validate_url(str(current.join(location)))
                    redirects.append(source_for(current))
                    continue
                if response.status_code != 200:
                    raise FetchError(f"the server answered HTTP {response.status_code}")
                data = _read(response, policy, deadline)
                content_type = response.headers.get("content-type", "")
            finally:
                response.close()
            return Fetched(
                source_for(current), data, content_type, suffix_for(current, content_type), redirects
            )
    finally:
        if own:
            http.close()


def _connect(
    http: httpx.Client, url: httpx.URL, addresses: list[IPAddress], policy: FetchPolicy, deadline: float
) -> httpx.Response:
    """Send the GET to the checked addresses in turn (the next one only when connecting failed,
    e.g. an IPv6 address without a route), never to a name that could resolve anew."""
    headers = {"host": url.netloc.decode("ascii"), "accept": "*/*", "user-agent": "plinth-kb/1"}
    failure = ""
    for address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        request = http.build_request(
            "GET",
            url.copy_with(host=str(address)),
            headers=headers,
            timeout=httpx.Timeout(remaining),
            extensions={"sni_hostname": url.host} if url.scheme == "https" else {},
        )
        try:
            return http.send(request, stream=True)
        except httpx.ConnectError as exc:
            failure = f"cannot connect to {url.host} ({address}): {exc}"
        except httpx.TimeoutException:
            break
        except httpx.HTTPError as exc:
            raise FetchError(f"cannot fetch {url.host}: {type(exc).__name__}: {exc}") from None
    raise FetchError(failure or f"fetching took longer than {policy.timeout_s:g} s")


def _read(response: httpx.Response, policy: FetchPolicy, deadline: float) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchError(f"the document is larger than the limit of {policy.max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > policy.max_bytes:
                raise FetchError(f"the document is larger than the limit of {policy.max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchError(f"fetching took longer than {policy.timeout_s:g} s")
            chunks.append(chunk)
    except httpx.TimeoutException:
        raise FetchError(f"fetching took longer than {policy.timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"the download failed: {type(exc).__name__}: {exc}") from None
    return b"".join(chunks)
