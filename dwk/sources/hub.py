"""Hub source: timm pretrained weights ``arch.tag``, downloaded through the Hugging Face Hub cache.

Downloads go through the Hugging Face Hub client and its cache (``HF_HOME`` / ``HF_HUB_CACHE``):
a file downloaded once is never fetched again, and an interrupted download resumes from its
``.incomplete`` blob on the next attempt. dwk adds

- a process-wide bound on parallel downloads (``DWK_HUB_MAX_PARALLEL``, default 2), so many mapped
  extraction tasks do not open dozens of multi-GB transfers at once, and a cluster-wide one: with a
  Prefect server that has the global concurrency limit ``dwk-hub-downloads`` (``dwk cluster init``),
  each download holds one of its slots (the guard ``flows/cluster.py`` installs; nothing without a server or limit);
- one attempt per call: a transient failure (connection errors, HTTP 408, 429, 5xx) raises
  :class:`~dwk.errors.TransientError`, which the one retry layer retries (``dwk.retry``: Prefect's
  task retries, or ``dwk.retry.call``); missing repos, files or gated access are final;
- a circuit breaker: after ``DWK_HUB_BREAKER_FAILURES`` (3) transient failures in a row, from any
  checkpoints of this process, downloads are not tried for ``DWK_HUB_UNREACHABLE_TTL`` seconds (300)
  and fail at once, saying so (each attempt on an unreachable Hub costs about half a minute of the Hub
  client's own retries: a config of many checkpoints fails in minutes, not hours);
- offline mode: with ``HF_HUB_OFFLINE=1`` only the cache is used; a checkpoint that is not cached
  fails alone with a :class:`~dwk.errors.CheckpointError` that says how to fill the cache or use
  a local file, and the others go on.

Which checkpoints a pattern selects, and their metadata, is :mod:`dwk.timm_registry`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwk.errors import CheckpointError, TransientError
from dwk.sources._base import Loaded, Source, sha256_file, versions_hash
from dwk.sources._torch import build_model, is_torchvision, load_weights_into, read_state_dict
from dwk.timm_registry import checkpoint_info, pretrained_cfg

logger = logging.getLogger(__name__)

# Weight files timm looks for in a Hub repo, in order (``timm.models._hub``): safetensors first.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class HubFile:
    """A weights file in the local Hub cache."""

    path: Path
    repo_id: str
    filename: str
    revision: str | None  # the snapshot (commit) it belongs to, when the cache layout tells

    def to_dict(self) -> dict[str, Any]:
        return dict(repo_id=self.repo_id, filename=self.filename, revision=self.revision, path=str(self.path))


def _env_int(name: str, default: int) -> int:
    try:
        return max(0, int(os.environ.get(name, default)))
    except ValueError:
        logger.warning("%s=%r is not an integer; using %d", name, os.environ.get(name), default)
        return default


_slots_lock = threading.Lock()
_slots = threading.BoundedSemaphore(max(1, _env_int("DWK_HUB_MAX_PARALLEL", 2)))


def set_max_parallel(n: int) -> None:
    """Bound the number of downloads that run at once in this process (``DWK_HUB_MAX_PARALLEL``)."""
    global _slots
    if n < 1:
        raise ValueError(f"max parallel downloads must be >= 1, got {n}")
    with _slots_lock:
        _slots = threading.BoundedSemaphore(n)


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as the Hub client read it at import, or as the environment says now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE or env)


def _hf_hub_download(**kwargs) -> str:
    """The one network call (a seam for tests)."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(**kwargs)


def is_transient(e: BaseException) -> bool:
    """Would retrying help? Connection trouble and overload yes; a missing repo, file or access no."""
    from huggingface_hub import errors as hf

    permanent = (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.RemoteEntryNotFoundError,
                 hf.DisabledRepoError, hf.HFValidationError, hf.OfflineModeIsEnabled)
    if isinstance(e, permanent):
        return False
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        return status is None or status in _TRANSIENT_STATUS
    if isinstance(e, hf.LocalEntryNotFoundError):
        return not is_offline()  # online, it means the Hub could not be reached
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return True
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")


def _no_guard(what: str):
    return nullcontext(False)


# What a download runs inside (one attempt): nothing here; under Prefect, flows/cluster.py installs
# one slot of the cluster-wide limit ``dwk-hub-downloads`` (the library itself never imports Prefect).
_download_guard: Callable[[str], AbstractContextManager] = _no_guard


def set_download_guard(guard: Callable[[str], AbstractContextManager] | None) -> None:
    """Run every download (not cache-only reads) inside ``guard(description)``; None: no guard."""
    global _download_guard
    _download_guard = guard or _no_guard


def _cluster_slot(offline: bool, what: str) -> AbstractContextManager:
    return nullcontext(False) if offline else _download_guard(what)


class _NotThere(Exception):
    """The file is not in the repo (online) or not in the cache (offline): try the next name."""


def _fetch(repo_id: str, filename: str, revision: str | None, ckpt_id: str, *, offline: bool,
           cache_dir: str | Path | None) -> Path:
    """One attempt (retries are ``dwk.retry``'s)."""
    from huggingface_hub import errors as hf

    if not offline and _breaker.is_open():
        raise CheckpointError(
            ckpt_id, f"not tried: downloads from the Hugging Face Hub failed {_breaker.threshold} times in a row in "
            f"this process in the last {_breaker.ttl:.0f} s (is the Hub unreachable from here?). Fill the cache where "
            f"the Hub is reachable (`dwk sources {ckpt_id} --download`, same HF_HOME) or use a local file: "
            f"{_local_file_hint(ckpt_id)}")
    try:
        with _slots, _cluster_slot(offline, f"download of {repo_id}/{filename}"):
            path = Path(_hf_hub_download(repo_id=repo_id, filename=filename, revision=revision,
                                         cache_dir=cache_dir, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - classified below; anything else fails this checkpoint alone
        if isinstance(e, hf.RemoteEntryNotFoundError) or (offline and isinstance(e, hf.LocalEntryNotFoundError)):
            raise _NotThere(f"{type(e).__name__}: {e}") from e
        if isinstance(e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError, hf.DisabledRepoError)):
            raise CheckpointError(ckpt_id, f"the Hub refused {repo_id}/{filename} ({type(e).__name__}: "
                                           f"{str(e).splitlines()[0][:200]}); gated or private repos need "
                                           "`hf auth login` (HF_TOKEN)") from e
        if not is_transient(e):
            raise CheckpointError(ckpt_id, f"download of {repo_id}/{filename} failed ({type(e).__name__}: "
                                           f"{str(e)[:300]})") from e
        _breaker.failed()
        raise TransientError(
            ckpt_id,
            f"pretrained weights could not be downloaded: the Hugging Face Hub did not answer "
            f"({type(e).__name__}: {str(e)[:200]}); retried by the run's retries (config `retries`). If the Hub is "
            f"unreachable from here, download them where it is (`dwk sources {ckpt_id} --download` fills the cache in "
            f"HF_HOME) or use a local file: {_local_file_hint(ckpt_id)}",
        ) from e
    _breaker.succeeded()
    return path


class _Breaker:
    """Open after ``threshold`` transient failures in a row; closed again after ``ttl`` seconds or a success.

    Hand-written (15 lines) rather than a circuit-breaker package: dwk needs only this, per process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0

    @property
    def threshold(self) -> int:
        return max(1, _env_int("DWK_HUB_BREAKER_FAILURES", 3))

    @property
    def ttl(self) -> float:
        return float(_env_int("DWK_HUB_UNREACHABLE_TTL", 300))

    def is_open(self) -> bool:
        return time.monotonic() < self._open_until

    def failed(self) -> None:
        with self._lock:
            self._failures += 1
            if self._failures >= self.threshold:
                self._open_until = time.monotonic() + self.ttl

    def succeeded(self) -> None:
        with self._lock:
            self._failures, self._open_until = 0, 0.0

    def reset(self) -> None:
        self.succeeded()


_breaker = _Breaker()


def _local_file_hint(ckpt_id: str) -> str:
    arch = ckpt_id.split(".", 1)[0]
    return f"`- id: {ckpt_id}` -> `- {{id: {ckpt_id}, arch: {arch}, file: PATH.safetensors}}`"


def _revision_of(path: Path) -> str | None:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def download(name: str, ckpt_id: str | None = None, *, cfg=None, cache_dir: str | Path | None = None) -> HubFile:
    """The weights file of timm checkpoint ``arch.tag``, from the Hub cache or downloaded into it (one attempt).

    Raises ``CheckpointError`` (naming ``ckpt_id``) when timm has no Hub location for it, when
    offline and not cached, or when the Hub refuses; ``TransientError`` when the Hub did not answer.
    """
    ckpt_id = ckpt_id or name
    cfg = cfg if cfg is not None else pretrained_cfg(name, ckpt_id)
    if not cfg.hf_hub_id:
        raise CheckpointError(ckpt_id, f"timm has no Hugging Face Hub location for {name!r} (only {cfg.url!r})")
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else list(HUB_FILES)
    offline = is_offline()
    missing = []
    for filename in filenames:
        try:
            path = _fetch(repo_id, filename, revision or None, ckpt_id, offline=offline, cache_dir=cache_dir)
        except _NotThere as e:
            missing.append(f"{filename}: {str(e)[:120]}")
            continue
        logger.info("%s: %s/%s -> %s", ckpt_id, repo_id, filename, path)
        return HubFile(path=path, repo_id=repo_id, filename=filename, revision=_revision_of(path))
    if offline:
        from huggingface_hub import constants

        raise CheckpointError(
            ckpt_id,
            f"pretrained weights are not in the Hub cache ({cache_dir or constants.HF_HUB_CACHE}) and the Hub is "
            f"unreachable (HF_HUB_OFFLINE=1: offline mode uses the cache only; looked for {filenames} of {repo_id}). "
            f"Fill the cache where the Hub is reachable (`dwk sources {name} --download`, same HF_HOME) or use a "
            f"local file: {_local_file_hint(ckpt_id)}",
        )
    raise CheckpointError(ckpt_id, f"the Hub repo {repo_id} has none of the weight files {filenames}: {missing}")


def prefetch(names: list[str], max_workers: int = 2, retries: int = 2,
             backoff_s: float = 2.0) -> dict[str, HubFile | CheckpointError]:
    """Download many checkpoints into the cache, ``max_workers`` at a time, each retried by
    ``dwk.retry.call``; failures are returned, not raised."""
    from concurrent.futures import ThreadPoolExecutor

    from dwk import retry

    set_max_parallel(max_workers)

    def one(n: str) -> HubFile | CheckpointError:
        try:
            return retry.call(download, n, retries=retries, backoff_s=backoff_s, what=n)
        except CheckpointError as e:
            return e

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return dict(zip(names, pool.map(one, names)))


class HubSource(Source):
    """``id: arch.tag`` (no ``arch``, ``file`` or ``onnx``): timm pretrained weights from the Hub cache."""

    kind = "hub"

    @staticmethod
    def claims(spec) -> bool:
        return spec.pretrained and spec.file is None and spec.onnx is None and spec.planted is None \
            and not is_torchvision(spec.arch)

    def fingerprint(self) -> str:
        # The name identifies the weights before they are downloaded; the file's sha256 is recorded
        # beside it once it is there.
        return versions_hash("hub", self.spec.model_name)

    def load(self) -> Loaded:
        spec = self.spec
        name = spec.model_name
        cfg = pretrained_cfg(name, spec.id)
        if cfg.hf_hub_id and not cfg.custom_load:
            f = download(name, spec.id, cfg=cfg)
            meta: dict[str, Any] = {}
            sd = read_state_dict(f.path, spec.id, meta)
            model = load_weights_into(build_model(name, spec.id, pretrained=False), sd, spec.id,
                                      f"{f.repo_id}/{f.filename}", meta)
            meta.update(sha256=sha256_file(f.path), hub=f.to_dict(), timm=checkpoint_info(name, cfg))
            return Loaded(model, None, f.path, meta=meta)
        # No Hub copy (URL-only or custom formats): timm's own loader, torch.hub cache, weights_only=True.
        try:
            model = build_model(name, spec.id, pretrained=True)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - the download stack raises many types for one cause
            text = f"{type(e).__name__}: {e}"
            if any(s in text for s in ("ConnectionError", "ConnectError", "offline", "resolve", "Max retries",
                                       "HTTPSConnection", "Network", "URLError")):
                raise (CheckpointError if is_offline() else TransientError)(
                    spec.id,
                    "pretrained weights could not be downloaded: the Hub is unreachable from here "
                    f"({text[:200]}). Download the weights where it is reachable and use a local file: "
                    f"{_local_file_hint(spec.id)}",
                ) from e
            raise
        return Loaded(model, meta=dict(timm=checkpoint_info(name, cfg)))
