"""An OCI image layout on disk, served read-only as a registry to containerd for the length of a pull.

Why: `ctr images import` reads a whole archive, so every import of the trainer image would stream its gigabytes
of dependencies even when only its top layer changed. Instead images are saved into one shared OCI layout
(`podman save --format oci-dir --uncompressed` writes only the blobs the layout lacks: layers keep their
uncompressed digests, so nothing is compressed or rewritten) and containerd pulls from this server, fetching only
the blobs its content store lacks. Five read-only endpoints of the distribution API on loopback, alive for one
load: nothing to build, start, keep running or clean up.

A pull of `<registry>/<repository>:<tag>` returns the layout entry whose ref name is `localhost/<repository>:<tag>`
(the name podman saved it under). Writers (save, prune) hold the layout's lock exclusively, readers shared.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator, Set
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REF_NAME = "org.opencontainers.image.ref.name"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_ROUTE = re.compile(
    r"^/v2/(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*)/(?P<kind>manifests|blobs)/(?P<ref>[A-Za-z0-9_.:-]+)$"
)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NOT_FOUND = b'{"errors":[{"code":"NOT_FOUND","message":"not in the layout"}]}'


@dataclass(frozen=True)
class Layout:
    """An OCI image layout directory (index.json, blobs/sha256/...)."""

    root: Path

    def blob(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def entries(self) -> list[dict[str, Any]]:
        """The index's manifest descriptors, oldest first (empty when nothing was saved yet)."""
        index = self.root / "index.json"
        if not index.is_file():
            return []
        manifests: list[dict[str, Any]] = json.loads(index.read_text()).get("manifests", [])
        return manifests

    def names(self) -> set[str]:
        return {str(e.get("annotations", {}).get(REF_NAME, "")) for e in self.entries()}

    def manifest(self, ref: str) -> tuple[Path, str] | None:
        """Path and media type of the manifest named `ref` (an image reference) or with digest `ref`."""
        for entry in reversed(self.entries()):
            if ref in (entry["digest"], entry.get("annotations", {}).get(REF_NAME)):
                return self.blob(entry["digest"]), str(entry.get("mediaType", OCI_MANIFEST))
        return None

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[LayoutLock]:
        """Writers (save, prune) hold the lock exclusively, readers (a pull) shared; a writer may then share."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with (self.root.parent / f".{self.root.name}.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield LayoutLock(f.fileno())


@dataclass(frozen=True)
class LayoutLock:
    fd: int

    def share(self) -> None:
        """Downgrade to a shared lock: other readers may proceed, writers keep waiting."""
        fcntl.flock(self.fd, fcntl.LOCK_SH)


def keep_newest(
    entries: list[dict[str, Any]], *, per_repository: int, keep: Set[str] = frozenset()
) -> list[dict[str, Any]]:
    """The entries to keep: those named in `keep` and the newest `per_repository` of each repository (index order
    is save order)."""
    kept: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for entry in reversed(entries):
        name = str(entry.get("annotations", {}).get(REF_NAME, ""))
        repository = name.rsplit(":", 1)[0]
        seen[repository] = seen.get(repository, 0) + 1
        if seen[repository] <= per_repository or name in keep:
            kept.append(entry)
    return kept[::-1]


def prune(layout: Layout, *, per_repository: int, keep: Set[str] = frozenset()) -> int:
    """Keep the entries `keep_newest` keeps, delete every blob they do not reach; returns the bytes freed.

    The caller holds the layout's exclusive lock.
    """
    if not (layout.root / "index.json").is_file():
        return 0
    index = json.loads((layout.root / "index.json").read_text())
    index["manifests"] = keep_newest(index.get("manifests", []), per_repository=per_repository, keep=keep)
    tmp = layout.root / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    tmp.replace(layout.root / "index.json")
    live: set[str] = set()
    for entry in index["manifests"]:
        manifest = json.loads(layout.blob(entry["digest"]).read_bytes())
        live |= {entry["digest"], manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}
    freed = 0
    for blob in (layout.root / "blobs" / "sha256").iterdir():
        if f"sha256:{blob.name}" not in live:
            freed += blob.stat().st_size
            blob.unlink()
    return freed


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return  # one line per blob is noise; a failed pull says what it missed in ctr's own output

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = urllib.parse.urlsplit(self.path).path  # containerd adds ?ns=<registry host>
        if path in ("/v2", "/v2/"):
            self._reply(200, "application/json", b"{}" if body else b"", length=2)
            return
        found = self._resolve(_ROUTE.match(path))
        if found is None or not found[0].is_file():
            self._reply(404, "application/json", _NOT_FOUND if body else b"", length=len(_NOT_FOUND))
            return
        blob, media_type = found
        self._reply(200, media_type, length=blob.stat().st_size, digest=f"sha256:{blob.name}")
        if body:
            with blob.open("rb") as f:
                self.connection.sendfile(f)

    def _resolve(self, route: re.Match[str] | None) -> tuple[Path, str] | None:
        if route is None:
            return None
        layout = self.server.layout
        if route["kind"] == "blobs":
            return (layout.blob(route["ref"]), "application/octet-stream") if _DIGEST.match(route["ref"]) else None
        ref = route["ref"] if _DIGEST.match(route["ref"]) else f"localhost/{route['repo']}:{route['ref']}"
        return layout.manifest(ref)

    def _reply(
        self, code: int, media_type: str, payload: bytes = b"", *, length: int | None = None, digest: str = ""
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(payload) if length is None else length))
        if digest:
            self.send_header("Docker-Content-Digest", digest)
        self.end_headers()
        if payload:
            self.wfile.write(payload)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, layout: Layout, *, host: str) -> None:
        super().__init__((host, 0), _Handler)
        self.layout = layout


@contextlib.contextmanager
def serve(layout: Layout, *, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `layout` read-only on a free port of `host` for the block; yields "<host>:<port>".

    A containerd in another network namespace (a real node) cannot reach the host's loopback: pass an address
    of the host that the node routes to (the cluster bridge's gateway).
    """
    with layout.locked(exclusive=False):
        server = _Server(layout, host=host)
        thread = threading.Thread(target=server.serve_forever, name="devcluster-registry", daemon=True)
        thread.start()
        try:
            yield f"{host}:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)
