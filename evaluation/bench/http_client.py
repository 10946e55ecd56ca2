"""The query benchmark's HTTP client: searches posted to the portal's API on loopback.

One keep-alive connection per client; each answer comes back with its wall time
and the server's ``Server-Timing`` figures. ``run_jobs`` spreads a list of
searches over a few concurrent clients.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from django.core.management.base import CommandError

TOP_K = 10


def parse_server_timing(header: str | None) -> dict:
    """``encode;dur=1.2, cache;desc="local"`` -> ``{"encode": 1.2, "cache": "local"}``."""
    out: dict = {}
    for metric in (header or "").split(","):
        name, *params = [p.strip() for p in metric.split(";")]
        if not name:
            continue
        for param in params:
            key, _, value = param.partition("=")
            if key == "dur":
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
            elif key == "desc":
                out[name] = value.strip('"')
    return out


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, content_type) in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SearchClient:
    """Text and image searches over one keep-alive connection to a loopback server."""

    def __init__(self, base_url: str, timeout: float = 120.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not is_loopback(parts.hostname or ""):
            raise CommandError(f"only http:// on a loopback address is benchmarked, not {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, path: str, body: bytes, content_type: str) -> dict:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            started = time.perf_counter()
            try:
                self.conn.request("POST", path, body=body, headers={"Content-Type": content_type,
                                                                    "Accept": "application/json"})
                response = self.conn.getresponse()
                payload = response.read()
            except (http.client.HTTPException, ConnectionError, OSError):
                self.close()
                if attempt:
                    raise
                continue
            wall = (time.perf_counter() - started) * 1000
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            return {"status": response.status, "wall_ms": wall, "bytes": len(payload),
                    "timing": parse_server_timing(response.getheader("Server-Timing")), "body": payload}
        raise RuntimeError("unreachable")

    def text(self, query: str, k: int = TOP_K, cursor: str | None = None) -> dict:
        payload = {"query": query, "k": k, **({"cursor": cursor} if cursor else {})}
        return self.request("/api/search/text/", json.dumps(payload).encode(), "application/json")

    def page(self, query: str, number: int, k: int = TOP_K) -> dict:
        """Page ``number`` of a text search, as measured: the query's embedding cached first
        (a k=1 search) so page 1 and page 10 both skip the tower and both scan the index;
        the pages before walked through, unmeasured."""
        self.text(query, k=1)
        cursor = None
        for _ in range(number - 1):
            cursor = json.loads(self.text(query, k, cursor)["body"])["next"]
            if cursor is None:
                raise RuntimeError(f"{query!r} has fewer than {number} pages: use a larger gallery")
        return self.text(query, k, cursor)

    def image(self, jpeg: bytes, k: int = TOP_K) -> dict:
        body, content_type = multipart({"k": str(k)}, {"image": ("photo.jpg", jpeg, "image/jpeg")})
        return self.request("/api/search/image/", body, content_type)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def run_jobs(base_url, jobs, concurrency, max_seconds, progress) -> list[dict]:
    """Send ``jobs`` (``("text", query)`` or ``("image", jpeg)``) with ``concurrency`` clients,
    until done or ``max_seconds`` passed; the answers' samples, bodies dropped."""
    deadline = time.monotonic() + max_seconds
    lock = threading.Lock()
    position = [0]
    samples: list[dict] = []

    def worker():
        client = SearchClient(base_url)
        try:
            while time.monotonic() < deadline:
                with lock:
                    if position[0] >= len(jobs):
                        return
                    kind, payload = jobs[position[0]]
                    position[0] += 1
                if kind == "text":
                    sample = client.text(payload)
                elif kind == "image":
                    sample = client.image(payload)
                else:  # ("page", (query, number))
                    sample = client.page(*payload)
                sample.pop("body", None)
                with lock:
                    samples.append(sample)
                if progress is not None:
                    progress.update(1)
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        for future in futures:
            future.result()
    return samples
