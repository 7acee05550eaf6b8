"""timm's pretrained checkpoints: selection by pattern, their metadata, and downloads from the Hub.

**Selection.** A config entry ``{pattern: "convnextv2_*.fcmae_ft_*"}`` (or ``{module: convnext}``
for a whole timm module) expands, through timm's own registry (``timm.list_models(pretrained=True)``),
into one ``{id: arch.tag}`` entry per matching pretrained checkpoint. Expansion happens in
``load_config``, before any flow sees the config, so each concrete checkpoint is one mapped task.
``dwk sources PATTERN`` previews it.

**Metadata.** :func:`checkpoint_info` reads timm's pretrained config (license, input size, classes,
where the weights come from) and parses the tag: ``fb_in22k_ft_in1k_384`` means pre-trained on
ImageNet-22k, fine-tuned on ImageNet-1k, at 384 px. It goes into the store's per-checkpoint record.

**Downloads** go through the Hugging Face Hub client and its cache (``HF_HOME`` / ``HF_HUB_CACHE``):
a file downloaded once is never fetched again, and an interrupted download resumes from its
``.incomplete`` blob on the next attempt. dwk adds

- a process-wide bound on parallel downloads (``DWK_HUB_MAX_PARALLEL``, default 2), so many mapped
  extraction tasks do not open dozens of multi-GB transfers at once;
- retries with exponential backoff and jitter on transient failures (connection errors, HTTP 408,
  429, 5xx; ``DWK_HUB_RETRIES``, default 3; ``DWK_HUB_BACKOFF`` seconds, default 2). Missing repos,
  files or gated access are not retried. Once a checkpoint gave up on an unreachable Hub, the next
  ones (for ``DWK_HUB_UNREACHABLE_TTL`` seconds, default 300) try once: the Hub client itself
  already retries a failed request for about 30 s;
- offline mode: with ``HF_HUB_OFFLINE=1`` only the cache is used; a checkpoint that is not cached
  fails alone with a :class:`~dwk.sources.CheckpointError` that says how to fill the cache or use
  a local file, and the others go on.
"""
from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dwk.config import CheckpointPattern
from dwk.sources import CheckpointError

logger = logging.getLogger(__name__)

# Dataset names that appear in timm pretrained tags (anything else in a tag is a recipe or source name).
DATASETS = frozenset({
    "in1k", "in12k", "in21k", "in22k", "inw21k", "jft", "jft300m", "ig1b", "yfcc15m", "yfcc100m", "cc12m",
    "laion2b", "laion400m", "laiona", "openai", "datacomp1b", "datacompxl", "dfn2b", "dfn5b", "webli", "lvd142m",
    "lvd1689m", "merged2b", "m30m", "m38m", "sa1b", "sat493m",
})
# Weight files timm looks for in a Hub repo, in order (``timm.models._hub``): safetensors first.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


# ----------------------------------------------------------------------------- selection
def expand(pattern: CheckpointPattern) -> list[str]:
    """The ``arch.tag`` names of timm's pretrained checkpoints that a pattern entry selects, sorted naturally.

    A filter without a tag part (``convnext_atto``) matches every tag of that architecture, as in
    ``timm.list_models``.
    """
    import timm

    names = timm.list_models(filter=list(pattern.patterns), module=list(pattern.modules), pretrained=True,
                             exclude_filters=list(pattern.exclude))
    if not names:
        where = f" in timm module(s) {list(pattern.modules)}" if pattern.modules else ""
        raise ValueError(f"pattern {list(pattern.patterns)}{where} matches no pretrained timm checkpoint "
                         f"(timm {timm.__version__}); try `dwk sources PATTERN` to preview")
    if len(names) > pattern.max_checkpoints:
        raise ValueError(f"pattern {list(pattern.patterns)} matches {len(names)} pretrained checkpoints, more than "
                         f"max_checkpoints={pattern.max_checkpoints}: narrow it (or raise max_checkpoints)")
    return names


def expand_checkpoints(entries: list[Any]) -> list[Any]:
    """Replace the pattern entries of a raw ``checkpoints:`` list by concrete ``{id: arch.tag}`` entries.

    Explicit entries win: a name already listed (or selected by an earlier pattern) is not repeated.
    """
    explicit = {e.get("id") for e in entries if isinstance(e, dict) and not CheckpointPattern.is_pattern(e)}
    out: list[Any] = []
    seen = set(explicit)
    for e in entries:
        if not (isinstance(e, dict) and CheckpointPattern.is_pattern(e)):
            out.append(e)
            continue
        pat = CheckpointPattern.model_validate(e)
        names = expand(pat)
        new = [n for n in names if n not in seen]
        seen.update(new)
        extra = {} if pat.reparameterize else {"reparameterize": False}
        out.extend({"id": n, **extra} for n in new)
        logger.info("pattern %s: %d pretrained checkpoints (%d new)", list(pat.patterns), len(names), len(new))
    return out


# ----------------------------------------------------------------------------- metadata
def parse_tag(tag: str | None) -> dict[str, Any]:
    """What a timm pretrained tag says about training data and resolution.

    ``fb_in22k_ft_in1k_384`` -> pretrain ``[in22k]``, finetune ``[in1k]``, resolution 384, recipe
    ``[fb]``. Datasets before ``ft`` are pre-training data, after it fine-tuning data; without
    ``ft`` the first dataset is the training data and later ones fine-tuning stages. Self-supervised
    recipes (``fcmae``, ``mae``, ``clip``) name no dataset: their pre-training data stays unknown.
    """
    toks = (tag or "").split("_") if tag else []
    resolution = None
    if toks and toks[-1].isdigit():
        resolution = int(toks.pop())
    for t in toks:
        if resolution is None and re.fullmatch(r"r\d{3,4}", t):
            resolution = int(t[1:])
    if "ft" in toks:
        i = toks.index("ft")
        pre, post = toks[:i], toks[i + 1:]
        pretrain = [t for t in pre if t in DATASETS]
        finetune = [t for t in post if t in DATASETS]
    else:
        data = [t for t in toks if t in DATASETS]
        pretrain, finetune = data[:1], data[1:]
    recipe = [t for t in toks if t not in DATASETS and t != "ft" and not re.fullmatch(r"[re]\d+", t)]
    return dict(pretrain_data=pretrain, finetune_data=finetune, data=">".join(pretrain + finetune) or None,
                resolution=resolution, recipe=recipe)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def pretrained_cfg(name: str, ckpt_id: str | None = None):
    """timm's PretrainedCfg of ``arch.tag``; a CheckpointError when timm has no such model or tag."""
    import timm
    from timm.models import get_pretrained_cfg

    ckpt_id = ckpt_id or name
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch[:8]}*")[:5]
        raise CheckpointError(ckpt_id, f"timm has no model {arch!r}" + (f"; similar names: {close}" if close else ""))
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:
        tags = [n.split(".", 1)[1] for n in timm.list_models(arch, pretrained=True)]
        raise CheckpointError(ckpt_id, f"timm has no pretrained tag {name!r}; tags of {arch}: {tags[:12]}") from None
    if cfg is None:
        raise CheckpointError(ckpt_id, f"timm has no pretrained weights for {name!r}")
    return cfg


def checkpoint_info(name: str, cfg=None) -> dict[str, Any]:
    """Per-checkpoint metadata from timm's pretrained config and the tag (JSON-ready)."""
    cfg = cfg if cfg is not None else pretrained_cfg(name)
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    tag = d.get("tag") or (name.split(".", 1)[1] if "." in name else None)
    info = dict(name=name, architecture=d.get("architecture") or name.split(".", 1)[0], tag=tag, **parse_tag(tag))
    if info["resolution"] is None and d.get("input_size"):
        info["resolution"] = int(d["input_size"][-1])
    for k in ("license", "num_classes", "input_size", "test_input_size", "crop_pct", "hf_hub_id", "url",
              "origin_url", "paper_ids", "paper_name"):
        if d.get(k) is not None:
            info[k] = _jsonable(d[k])
    return info


def describe(names: list[str]) -> tuple[list[dict], dict[str, Any]]:
    """Rows of :func:`checkpoint_info` for a list of names, and counts by architecture and training data."""
    rows = [checkpoint_info(n) for n in names]
    summary = dict(
        n_checkpoints=len(rows), n_architectures=len({r["architecture"] for r in rows}),
        data=dict(Counter(r["data"] or "unknown" for r in rows).most_common()),
        licenses=dict(Counter(r.get("license") or "unknown" for r in rows).most_common()),
    )
    return rows, summary


# ----------------------------------------------------------------------------- downloads
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


def _sleep(seconds: float) -> None:  # a seam for tests
    time.sleep(seconds)


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


class _NotThere(Exception):
    """The file is not in the repo (online) or not in the cache (offline): try the next name."""


def _fetch(repo_id: str, filename: str, revision: str | None, ckpt_id: str, *, offline: bool,
           cache_dir: str | Path | None, retries: int, backoff: float) -> Path:
    from huggingface_hub import errors as hf

    for attempt in range(retries + 1):
        try:
            with _slots:
                return Path(_hf_hub_download(repo_id=repo_id, filename=filename, revision=revision,
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
            if attempt == retries:
                _mark_unreachable()
                raise CheckpointError(
                    ckpt_id,
                    f"pretrained weights could not be downloaded: the Hugging Face Hub is unreachable from here "
                    f"after {retries + 1} attempts ({type(e).__name__}: {str(e)[:200]}). Download them where the "
                    f"Hub is reachable (`dwk sources {ckpt_id} --download` fills the cache in HF_HOME) or use a "
                    f"local file: {_local_file_hint(ckpt_id)}",
                ) from e
            delay = backoff * 2 ** attempt * (0.5 + random.random() / 2)
            logger.warning("%s: %s/%s: %s; retry %d/%d in %.1fs", ckpt_id, repo_id, filename, type(e).__name__,
                           attempt + 1, retries, delay)
            _sleep(delay)
    raise AssertionError("unreachable")


_unreachable_at: float | None = None  # when a download last gave up on an unreachable Hub (monotonic clock)


def _mark_unreachable() -> None:
    global _unreachable_at
    _unreachable_at = time.monotonic()


def _recently_unreachable() -> bool:
    """Did a download give up on an unreachable Hub in the last ``DWK_HUB_UNREACHABLE_TTL`` seconds (300)?

    Then later checkpoints try once instead of retrying: the Hub client already retries a failed
    request for about half a minute, and a config of many checkpoints should fail in minutes, not hours.
    """
    return _unreachable_at is not None and time.monotonic() - _unreachable_at < _env_int("DWK_HUB_UNREACHABLE_TTL", 300)


def _local_file_hint(ckpt_id: str) -> str:
    arch = ckpt_id.split(".", 1)[0]
    return f"`- id: {ckpt_id}` -> `- {{id: {ckpt_id}, arch: {arch}, file: PATH.safetensors}}`"


def _revision_of(path: Path) -> str | None:
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def download(name: str, ckpt_id: str | None = None, *, cfg=None, cache_dir: str | Path | None = None,
             retries: int | None = None, backoff: float | None = None) -> HubFile:
    """The weights file of timm checkpoint ``arch.tag``, from the Hub cache or downloaded into it.

    Raises ``CheckpointError`` (naming ``ckpt_id``) when timm has no Hub location for it, when
    offline and not cached, when the Hub refuses, or when it stays unreachable after the retries.
    """
    ckpt_id = ckpt_id or name
    cfg = cfg if cfg is not None else pretrained_cfg(name, ckpt_id)
    if not cfg.hf_hub_id:
        raise CheckpointError(ckpt_id, f"timm has no Hugging Face Hub location for {name!r} (only {cfg.url!r})")
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else list(HUB_FILES)
    offline = is_offline()
    retries = _env_int("DWK_HUB_RETRIES", 3) if retries is None else retries
    if _recently_unreachable():
        retries = 0
    if backoff is None:
        try:
            backoff = float(os.environ.get("DWK_HUB_BACKOFF", 2.0))
        except ValueError:
            backoff = 2.0
    missing = []
    for filename in filenames:
        try:
            path = _fetch(repo_id, filename, revision or None, ckpt_id, offline=offline, cache_dir=cache_dir,
                          retries=retries, backoff=backoff)
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


def prefetch(names: list[str], max_workers: int = 2) -> dict[str, HubFile | CheckpointError]:
    """Download many checkpoints into the cache, ``max_workers`` at a time; failures are returned, not raised."""
    from concurrent.futures import ThreadPoolExecutor

    set_max_parallel(max_workers)

    def one(n: str) -> HubFile | CheckpointError:
        try:
            return download(n)
        except CheckpointError as e:
            return e

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return dict(zip(names, pool.map(one, names)))
