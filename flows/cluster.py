"""dwk on a Prefect server: the cluster's global concurrency limits and work pools, and the slots code takes.

``dwk cluster init`` (:func:`init`) creates or updates, through the Prefect client API,

- the global concurrency limit ``dwk-hub-downloads``: Hugging Face Hub downloads at once, cluster-wide
  (``dwk.sources.hub`` takes one slot around each download: the guard this module installs);
- the global concurrency limit ``dwk-gpu``: trainings on a GPU at once, cluster-wide (``flows/train.py``
  takes one slot while an autoencoder trains on a CUDA device);
- the work pools ``dwk-cpu`` and ``dwk-gpu`` (type ``process``), when missing.

It is idempotent: run it again to change a limit (``--gpus 4``). The same with Prefect's own CLI:
``prefect gcl create dwk-gpu --limit 1``, ``prefect work-pool create dwk-gpu --type process``.

:func:`slot` is how code takes a slot: only when a Prefect API server is configured
(``PREFECT_API_URL``) and the limit exists there; otherwise it does nothing (a missing limit says so
once per process, at INFO). :func:`resolve_run_config` is the flows' ``config`` / ``config_path`` rule.

It lives beside the flows, not in ``dwk``: the library stays plain (no Prefect); importing this
module installs the Hub download guard (``dwk.sources.hub.set_download_guard``).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dwk.errors import ConfigError, DwkError
from dwk.sources import hub

if TYPE_CHECKING:
    from dwk.config import RunConfig

logger = logging.getLogger("dwk.cluster")  # under "dwk": in the flow-run logs with dwk's own lines

HUB_DOWNLOADS = "dwk-hub-downloads"
GPU = "dwk-gpu"
POOLS = ("dwk-cpu", "dwk-gpu")
POOL_TYPE = "process"
DEFAULT_GPUS = 1
DEFAULT_DOWNLOADS = 2  # as DWK_HUB_MAX_PARALLEL's default, per process
LIMITED = {HUB_DOWNLOADS: "Hugging Face Hub downloads are", GPU: "trainings on GPUs are"}  # for the log


class ClusterSetupError(DwkError, RuntimeError):
    """The Prefect server cannot be set up as asked (none configured, unreachable, a pool of another type)."""


# ----------------------------------------------------------------------------- config or config_path
def resolve_run_config(config: "RunConfig | None", config_path: str | os.PathLike | None) -> "RunConfig":
    """The run config of a flow run: ``config`` (the object, or its JSON from a deployment parameter) or
    ``config_path`` (a YAML file, read with :func:`dwk.config.load_config`; a relative path is taken from
    the working directory: on a worker, its checkout ``DWK_HOME``). Exactly one of the two."""
    from dwk.config import RunConfig, load_config

    if (config is None) == (config_path is None):
        given = "both" if config is not None else "neither"
        raise ConfigError(
            f"give the run config as an object (config=...) or as a YAML file (config_path=...), exactly one of the "
            f"two; {given} given. A deployment's default is config_path: with an inline config, also pass "
            "--param config_path=null")
    if config is not None:
        return config if isinstance(config, RunConfig) else RunConfig.model_validate(config)
    path = Path(config_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config_path {str(config_path)!r} is not a file (looked for {path.resolve()}, from "
                          f"the working directory {Path.cwd()}: a deployment's worker runs in its checkout, DWK_HOME)")
    return load_config(path)


# ----------------------------------------------------------------------------- slots
def server_url(import_prefect: bool = False) -> str | None:
    """The configured Prefect API URL (environment or Prefect profile), or None (Prefect's ephemeral mode).

    Unless ``import_prefect``, Prefect is imported only when it is imported already or ``PREFECT_API_URL``
    is in the environment, so code that never touches Prefect (``--no-prefect``, the notebook API) does
    not pay for the import.
    """
    if not import_prefect and "prefect" not in sys.modules and not os.environ.get("PREFECT_API_URL"):
        return None
    try:
        from prefect.settings import get_current_settings

        return get_current_settings().api.url or None
    except Exception:  # noqa: BLE001 - a broken Prefect profile must not break a download or a training
        return None


_said: set[str] = set()
_said_lock = threading.Lock()


def _say_once(key: str, level: int, msg: str, *args) -> None:
    with _said_lock:
        if key in _said:
            return
        _said.add(key)
    logger.log(level, msg, *args)


def limit_state(name: str):
    """The global concurrency limit ``name`` on the configured server (None when there is none)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None


def _usable_limit(name: str, what: str):
    """The active limit ``name`` on the configured server; None (and why, once) when there is none to take."""
    url = server_url()
    if url is None:
        return None
    try:
        limit = limit_state(name)
    except Exception as e:  # noqa: BLE001 - the server away must not fail a download or a training
        _say_once(f"unreachable:{name}", logging.WARNING,
                  "cannot read the global concurrency limit %s from the Prefect server %s (%s: %s): %s not "
                  "limited cluster-wide", name, url, type(e).__name__, str(e)[:200], LIMITED.get(name, what + " is"))
        return None
    if limit is None or not limit.active:
        _say_once(f"missing:{name}", logging.INFO,
                  "no%s global concurrency limit %s on the Prefect server %s: %s not limited cluster-wide "
                  "(`dwk cluster init` creates the limits)", " active" if limit else "", name, url,
                  LIMITED.get(name, what + " is"))
        return None
    return limit


@contextmanager
def slot(name: str, what: str) -> Iterator[bool]:
    """Hold one slot of the global concurrency limit ``name`` while the block runs (``what``: for the log).

    Waits for a free slot, and yields True while it holds it. Does nothing (yields False) without a
    Prefect API server, when the server has no such limit or an inactive one (said once per process, at
    INFO), or when it cannot be reached (a WARNING, once): a missing limit is never an error.
    """
    limit = _usable_limit(name, what)
    if limit is None:
        yield False
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=1, strict=False):
        logger.debug("holding a slot of %s (%d slots) for %s", name, limit.limit, what)
        yield True


# ----------------------------------------------------------------------------- dwk cluster init
@dataclass(frozen=True)
class Action:
    verb: str  # created, updated, unchanged, exists
    kind: str  # "global concurrency limit" or "work pool"
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.verb:<9} {self.kind} {self.name}: {self.detail}"


def init(gpus: int = DEFAULT_GPUS, downloads: int = DEFAULT_DOWNLOADS) -> list[Action]:
    """Create or update the limits ``dwk-hub-downloads`` (``downloads`` slots) and ``dwk-gpu`` (``gpus``
    slots), and create the work pools ``dwk-cpu`` and ``dwk-gpu`` (type process) when missing.
    Idempotent. Needs a Prefect API server (``PREFECT_API_URL``)."""
    if gpus < 1 or downloads < 1:
        raise ConfigError(f"--gpus and --downloads must be at least 1 (got --gpus {gpus}, --downloads {downloads}): "
                          "a limit of 0 would hold every training or download forever")
    url = server_url(import_prefect=True)
    if url is None:
        raise ClusterSetupError(
            "no Prefect server configured: dwk cluster init sets up a Prefect server's limits and work pools. "
            "Set PREFECT_API_URL (e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api) and run it again")
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            actions = [_upsert_limit(client, HUB_DOWNLOADS, downloads, "Hub downloads at once, cluster-wide"),
                       _upsert_limit(client, GPU, gpus, "GPU trainings at once, cluster-wide")]
            actions += [_ensure_pool(client, name) for name in POOLS]
    except DwkError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreachable server: say where, not a traceback
        if type(e).__module__.split(".")[0] not in ("httpx", "httpcore", "prefect"):
            raise
        raise ClusterSetupError(f"the Prefect server at {url} did not answer as expected ({type(e).__name__}: "
                                f"{str(e)[:300]}); is it running?") from e
    return actions


def _slots(n: int) -> str:
    return f"{n} slot" + ("" if n == 1 else "s")


def _upsert_limit(client, name: str, limit: int, what: str) -> Action:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        have = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True))
        return Action("created", "global concurrency limit", name, f"{_slots(limit)} ({what})")
    if have.limit == limit and have.active:
        return Action("unchanged", "global concurrency limit", name, f"{_slots(limit)} ({what})")
    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))
    was = _slots(have.limit) + ("" if have.active else ", inactive")
    return Action("updated", "global concurrency limit", name, f"{was} -> {_slots(limit)} ({what})")


def _ensure_pool(client, name: str) -> Action:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE,
                                               base_job_template=ProcessWorker.get_default_base_job_template()))
        return Action("created", "work pool", name, f"type {POOL_TYPE}; start a worker: "
                                                     f"prefect worker start --pool {name} --type {POOL_TYPE}")
    if pool.type != POOL_TYPE:
        raise ClusterSetupError(f"work pool {name} exists with type {pool.type!r}, not {POOL_TYPE!r}: dwk's "
                                f"deployments run on process workers; delete it (prefect work-pool delete {name}) "
                                "and run dwk cluster init again")
    return Action("exists", "work pool", name, f"type {pool.type}" + (", paused" if pool.is_paused else ""))


def _hub_download_slot(what: str):
    return slot(HUB_DOWNLOADS, what)


hub.set_download_guard(_hub_download_slot)  # every Hub download of a process that runs the flows
