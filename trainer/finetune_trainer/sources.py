"""Model sources: turn spec.model.uri (hf://, s3://, file://, pvc://, local path) into a local directory.

Why one resolver: every strategy and both tasks load the model and its tokenizer with `from_pretrained(<dir>)`;
only where the directory comes from differs. Each Ray worker resolves the model itself (workers are other pods),
so resolution must be deterministic, offline-capable (HF_HUB_OFFLINE + the HF cache) and fail with ModelNotFound
naming the URI and what to do, rather than a deep transformers traceback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from finetune_trainer import storage
from finetune_trainer.errors import ModelNotFoundError, StorageError
from finetune_trainer.hfcache import default_hub_cache

if TYPE_CHECKING:
    from finetune_trainer.spec import ModelSource, StorageSpec

# Files a from_pretrained directory needs; anything else in a hub repo (onnx, openvino, ...) is skipped.
log = logging.getLogger(__name__)
T = TypeVar("T")
_HF_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py"]
MODEL_CACHE_ENV = "FINETUNE_MODEL_CACHE"


def model_cache_dir() -> Path:
    """Where s3:// models are downloaded (env FINETUNE_MODEL_CACHE, default a per-user temp directory)."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path(tempfile.gettempdir()) / "finetune-models")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_status(error: BaseException) -> str | None:
    """'HTTP 503' / 'HTTP 429' / 'unreachable' when the hub had a transient problem anywhere in the error chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, HfHubHTTPError) and current.response is not None:
            status = int(current.response.status_code)
            if status == 429 or status >= 500:
                return f"HTTP {status}"
        if _is_transport_error(current):
            return f"unreachable ({type(current).__name__})"
        current = current.__cause__ or current.__context__
    return None


def _is_transport_error(error: BaseException) -> bool:
    # The hub client's HTTP library (httpx or its fork httpx2, by version) raises TransportError subclasses for
    # refused/reset connections and timeouts; match by class name so no particular library is imported here.
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    return any(cls.__name__ == "TransportError" for cls in type(error).__mro__)


def _from_hub(uri: str, call: Callable[[], T], *, policy: storage.RetryPolicy = storage.RETRY) -> T:
    """Run a hub call; rate limits (429), server errors (5xx) and network failures are retried with back-off
    and then fail as StorageError (retryable); anything else is ModelNotFound (with the offline hint)."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
            status = _hub_status(e)
            if status is None:
                hint = (
                    " HF_HUB_OFFLINE is set and the model is not in the HF cache ($HF_HOME/hub): pre-populate the "
                    "cache (for all-MiniLM-L6-v2: python -m finetune_trainer.hfcache seed) or use an s3:// / "
                    "file:// model."
                    if _offline()
                    else ""
                )
                raise ModelNotFoundError(f"model {uri} cannot be loaded: {e}.{hint}") from e
            if attempt == policy.attempts:
                raise StorageError(
                    f"model {uri}: the Hugging Face Hub is {status} after {attempt} attempts (a transient hub "
                    "problem: a retry of the job may succeed; or mirror the model to s3:// or a PVC)"
                ) from e
            log.warning(
                "model %s: hub %s (attempt %d/%d), retrying in %.0fs",
                uri, status, attempt, policy.attempts, policy.delay(attempt),
            )  # fmt: skip
            time.sleep(policy.delay(attempt))
    raise AssertionError("unreachable")


def _hf(repo_id: str, revision: str | None) -> Path:
    uri = f"hf://{repo_id}@{revision or 'main'}"
    path = _from_hub(
        uri,
        lambda: snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=_HF_ALLOW,
            local_files_only=_offline(),
            cache_dir=default_hub_cache(),
        ),
    )
    return Path(path)


def _s3(uri: str, storage_spec: StorageSpec | None) -> Path:
    loc = storage.resolve(uri, storage=storage_spec)
    target = model_cache_dir() / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    if (target / ".complete").is_file():
        return target
    if not storage.is_file(loc.child("config.json")):
        raise ModelNotFoundError(f"model {uri} has no config.json (expected a save_pretrained layout under it)")
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=_mkdir(target.parent)))
    try:
        storage.download_dir(loc, tmp)
        (tmp / ".complete").write_text(uri)
        if target.exists():  # another worker on this node won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(target)
    except StorageError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model(source: ModelSource, *, storage_spec: StorageSpec | None, base_dir: Path | None = None) -> Path:
    """A local from_pretrained directory for the model (downloading it when needed)."""
    uri = source.uri
    if uri.startswith("hf://"):
        return _hf(uri.removeprefix("hf://").strip("/"), source.revision)
    if uri.startswith("s3://"):
        return _s3(uri, storage_spec)
    path = storage.local_path(uri, base_dir=base_dir)
    if not (path / "config.json").is_file():
        where = f" (pvc:// maps to ${storage.PVC_ROOT_ENV}={storage.pvc_root()})" if uri.startswith("pvc://") else ""
        raise ModelNotFoundError(f"model {uri} -> {path} has no config.json (expected a save_pretrained dir){where}")
    return path


def check_model(source: ModelSource, *, storage_spec: StorageSpec | None, base_dir: Path | None = None) -> None:
    """Cheap pre-flight existence check (the driver runs it before starting workers): fetches config.json only."""
    uri = source.uri
    if uri.startswith("hf://"):
        repo_id = uri.removeprefix("hf://").strip("/")
        _from_hub(
            f"hf://{repo_id}@{source.revision or 'main'}",
            lambda: hf_hub_download(
                repo_id,
                "config.json",
                revision=source.revision,
                local_files_only=_offline(),
                cache_dir=default_hub_cache(),
            ),
        )
        return
    if uri.startswith("s3://"):
        if not storage.is_file(storage.resolve(uri, storage=storage_spec).child("config.json")):
            raise ModelNotFoundError(f"model {uri} has no config.json (expected a save_pretrained layout under it)")
        return
    resolve_model(source, storage_spec=storage_spec, base_dir=base_dir)
