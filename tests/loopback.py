"""A package index on 127.0.0.1 for the tests: PEP 691 JSON pages, byte ranges, and on request a
connection cut in the middle of a body. Serves files from local paths; reaches nothing else."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Served:
    files: dict[str, Path]                              # file name -> local file
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256 the page lists
    cut_after: int | None = None                        # close the connection after this many body bytes
    page: bytes | None = None                           # serve this as the project page instead
    requests: list[str] = field(default_factory=list)
    content_range: str | None = None                    # answer range requests with this Content-Range


@contextmanager
def loopback_index(served: Served, project: str = "vllm") -> Iterator[str]:
    """Yields the simple-API URL (http://127.0.0.1:<port>/simple/)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            served.requests.append(self.path)
            if self.path == f"/simple/{project}/":
                page = {"meta": {"api-version": "1.1"}, "name": project, "files": [
                    {"filename": n, "url": f"/files/{n}",
                     "hashes": {"sha256": served.sha256.get(n) or hashlib.sha256(p.read_bytes()).hexdigest()}}
                    for n, p in served.files.items()]}
                body = json.dumps(page).encode() if served.page is None else served.page
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            name = self.path.removeprefix("/files/")
            if name not in served.files:
                self.send_error(404)
                return
            path = served.files[name]
            size = path.stat().st_size
            start, end = 0, size - 1
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, b = rng[6:].split("-")
                start, end = (size - int(b), size - 1) if a == "" else (int(a), min(int(b or size - 1), size - 1))
                self.send_response(206)
                self.send_header("Content-Range", served.content_range or f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            limit = end - start + 1 if served.cut_after is None else min(served.cut_after, end - start + 1)
            with open(path, "rb") as f:
                f.seek(start)
                while limit > 0:
                    chunk = f.read(min(1 << 20, limit))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    limit -= len(chunk)
            if served.cut_after is not None:
                self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()
