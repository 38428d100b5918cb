"""A minimal Hugging Face Hub endpoint serving one local model directory (HF_ENDPOINT points at it).

Why: this machine has no network, yet the trainer's handling of hub rate limits and outages (429/5xx) must be
tested against the real huggingface_hub client, not a mock of it. Only what `snapshot_download` and
`hf_hub_download` ask for is served: the revision info and each file's metadata and bytes. Put a `FaultProxy` in
front of it to inject 429/503 responses.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlparse


class FakeHub:
    """`with FakeHub(repo_id, directory) as hub:` serves repo_id@main from the directory at hub.endpoint."""

    def __init__(self, repo_id: str, directory: Path) -> None:
        self.repo_id, self.directory = repo_id, directory
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        self.files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in files}
        self.commit = hashlib.sha1(b"".join(hashlib.sha256(b).digest() for b in self.files.values())).hexdigest()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                path = unquote(urlparse(self.path).path)
                info = f"/api/models/{hub.repo_id}/revision/"
                tree = f"/api/models/{hub.repo_id}/tree/"
                resolve = f"/{hub.repo_id}/resolve/"
                if path.startswith(tree):
                    entries = [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in hub.files.items()
                    ]
                    self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})
                elif path.startswith(info):
                    body = json.dumps(
                        {
                            "id": hub.repo_id,
                            "sha": hub.commit,
                            "siblings": [{"rfilename": name} for name in hub.files],
                        }
                    ).encode()
                    self._send(200, body, {"Content-Type": "application/json"})
                elif path.startswith(resolve):
                    name = path.removeprefix(resolve).split("/", 1)[1]
                    if name not in hub.files:
                        self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "not found"})
                        return
                    data = hub.files[name]
                    headers = {
                        "X-Repo-Commit": hub.commit,
                        "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                        "Content-Type": "application/octet-stream",
                    }
                    self._send(200, data, headers)
                else:
                    self._send(404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "no such repo"})

            do_HEAD = do_GET  # noqa: N815

        return Handler
