"""A raw-JSON call over the kubernetes client: the dev cluster and its tests take objects as plain dicts
straight from the wire (no model deserialisation that could choke on a new field)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]
ListFn = Callable[..., Any]


def call_json(fn: ListFn, *args: Any, **kwargs: Any) -> Obj:
    """Call a generated client method without model deserialisation and return the decoded JSON body."""
    resp = fn(*args, _preload_content=False, **kwargs)
    data = resp.data
    return json.loads(data) if data else {}
