"""A thin raw-JSON layer over the kubernetes client: list/watch informers and a few typed-free calls.

The process node handles whatever pods tests throw at it, so it works on plain dicts straight from the wire
(no model deserialisation that could choke on a new field) and keeps its caches current with the standard
list-then-watch loop: resume from the last resourceVersion, relist on 410 Gone, back off on errors.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client as k8s

log = logging.getLogger("devcluster.kube")

Obj = dict[str, Any]
ListFn = Callable[..., Any]


def call_json(fn: ListFn, *args: Any, **kwargs: Any) -> Obj:
    """Call a generated client method without model deserialisation and return the decoded JSON body."""
    resp = fn(*args, _preload_content=False, **kwargs)
    data = resp.data
    return json.loads(data) if data else {}


def key(obj: Obj) -> str:
    """namespace/name (or name for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


def _lines(resp: Any) -> Iterator[bytes]:
    buf = b""
    for chunk in resp.stream(16 * 1024, decode_content=False):
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                yield line


class Informer(threading.Thread):
    """Keeps `store` equal to the server's view of one resource; calls `on_change(type, obj)` per event."""

    def __init__(
        self,
        *,
        name: str,
        list_fn: ListFn,
        on_change: Callable[[str, Obj], None],
        stop: threading.Event,
        label_selector: str | None = None,
    ) -> None:
        super().__init__(name=f"informer-{name}", daemon=True)
        self.list_fn = list_fn
        self.on_change = on_change
        self.stop_event = stop
        self.label_selector = label_selector
        self.store: dict[str, Obj] = {}
        self.lock = threading.Lock()
        self.synced = threading.Event()

    def snapshot(self) -> list[Obj]:
        """A consistent copy of the cached objects (the dicts are shared; treat them as read-only)."""
        with self.lock:
            return list(self.store.values())

    def get(self, k: str) -> Obj | None:
        """Cached object by namespace/name."""
        with self.lock:
            return self.store.get(k)

    def _kw(self) -> dict[str, Any]:
        return {"label_selector": self.label_selector} if self.label_selector else {}

    def _relist(self) -> str:
        body = call_json(self.list_fn, **self._kw())
        items = body.get("items") or []
        fresh = {key(o): o for o in items}
        with self.lock:
            gone = [o for k, o in self.store.items() if k not in fresh]
            self.store = fresh
        for o in gone:
            self.on_change("DELETED", o)
        for o in items:
            self.on_change("MODIFIED", o)
        self.synced.set()
        return str((body.get("metadata") or {}).get("resourceVersion") or "")

    def run(self) -> None:
        rv = ""
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                if not rv:
                    rv = self._relist()
                resp = self.list_fn(
                    watch=True,
                    resource_version=rv,
                    allow_watch_bookmarks=True,
                    timeout_seconds=60,
                    _preload_content=False,
                    **self._kw(),
                )
                try:
                    for line in _lines(resp):
                        if self.stop_event.is_set():
                            return
                        ev = json.loads(line)
                        typ, obj = ev.get("type"), ev.get("object") or {}
                        if typ == "ERROR":
                            if obj.get("code") == 410:
                                rv = ""  # resourceVersion too old: relist
                            break
                        new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                        if new_rv:
                            rv = new_rv
                        if typ == "BOOKMARK":
                            continue
                        k = key(obj)
                        with self.lock:
                            if typ == "DELETED":
                                self.store.pop(k, None)
                            else:
                                self.store[k] = obj
                        self.on_change(str(typ), obj)
                finally:
                    resp.release_conn()
                backoff = 0.5
            except k8s.ApiException as e:
                if e.status == 410:
                    rv = ""
                    continue
                log.warning("watch %s: %s", self.name, e)
                time.sleep(backoff)
                backoff = min(backoff * 2, 10)
            except Exception as e:  # never let a watch thread die: log, back off, relist
                log.warning("watch %s failed: %r", self.name, e)
                rv = ""
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, 10)
