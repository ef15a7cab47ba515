"""A Hugging Face Hub-compatible HTTP server on loopback, for the real huggingface_hub client.

This machine has no route to the hub, so the reranker's hub path is tested against this: the endpoints
``snapshot_download`` and ``model_info`` use (repo info by revision, recursive tree, resolve with HEAD,
GET and Range), the hub's error codes (``X-Error-Code: RepoNotFound`` / ``RevisionNotFound``), and two
failure modes for one file: ``flaky`` (the first response is cut off halfway, later ranges are served:
huggingface_hub resumes) and ``broken`` (every response after the first bytes is cut: it gives up).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""
    branches: tuple[str, ...] = ("main",)

    def __post_init__(self) -> None:
        digest = hashlib.sha1(b"".join(hashlib.sha1(v).digest() for _, v in sorted(self.files.items())))
        self.commit = self.commit or digest.hexdigest()

    @classmethod
    def from_folder(cls, folder: Path) -> Repo:
        return cls({p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()})


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)  # file path -> "flaky" | "broken"
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    url: str = ""

    def __enter__(self) -> Hub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet test output
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, body=False)

            def do_GET(self) -> None:
                hub._serve(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _error(self, h: BaseHTTPRequestHandler, code: str, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        h.send_response(404)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _json(self, h: BaseHTTPRequestHandler, doc: object, body: bool) -> None:
        data = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/.*)?)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not (api or resolve):
            return self._error(h, "EntryNotFound", f"no route {path}")
        name, revision = (api[1], api[3] or "main") if api else resolve.group(1, 2)
        repo = self.repos.get(name)
        if repo is None:
            return self._error(h, "RepoNotFound", f"Repository Not Found for url: {path}.")
        if revision not in (repo.commit, *repo.branches):
            return self._error(h, "RevisionNotFound", f"Invalid rev id: {revision}")
        if api and api[2] != "tree":
            siblings = [{"rfilename": f} for f in repo.files]
            return self._json(
                h,
                {"id": name, "modelId": name, "sha": repo.commit, "siblings": siblings, "private": False, "tags": []},
                body,
            )
        if api:
            return self._json(
                h,
                [
                    {"type": "file", "path": f, "size": len(v), "oid": hashlib.sha1(v).hexdigest()}
                    for f, v in repo.files.items()
                ],
                body,
            )
        filename = resolve.group(3)
        if filename not in repo.files:
            return self._error(h, "EntryNotFound", f"{filename} does not exist")
        data = repo.files[filename]
        start = int(re.match(r"bytes=(\d+)-", h.headers.get("Range", "bytes=0-"))[1])
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", repo.commit)
        h.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return None
        fault = self.faults.get(filename)
        gets = sum(1 for m, p, _ in self.requests if m == "GET" and p == path)
        if fault == "broken" or (fault == "flaky" and gets == 1):
            # Half of what was promised (nothing after the first response when broken), then drop the line.
            h.wfile.write(data[start : start + (len(data) - start) // 2] if gets == 1 else b"")
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return None
        h.wfile.write(data[start:])
        return None
