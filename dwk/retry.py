"""The one retry layer of extraction: which failures are retried, how often, how long apart.

Under Prefect the extraction task's own retries do it (``tasks/extract.py`` passes
``should_retry``, ``delays`` and ``JITTER`` to ``@task``); without Prefect (``dwk run
--no-prefect``, ``dwk sources --download``) :func:`call` does the same. Sources never loop
themselves: a download makes one attempt and raises ``TransientError`` when retrying may help
(the Hugging Face Hub client still retries inside one attempt, as it always does).
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from dwk.errors import CheckpointError, NoDepthwiseError, TransientError

logger = logging.getLogger(__name__)

T = TypeVar("T")
JITTER = 0.5  # each delay is drawn from [d * (1 - JITTER), d * (1 + JITTER)] (Prefect's retry_jitter_factor)


def should_retry(exc: BaseException | None) -> bool:
    """Retry anything but bad input: transient faults and dwk's or the environment's own errors.

    A ``CheckpointError`` (a corrupt file, a refused download) or ``NoDepthwiseError`` fails the
    same way every time, unless it is a ``TransientError``.
    """
    if isinstance(exc, TransientError):
        return True
    return not isinstance(exc, (CheckpointError, NoDepthwiseError, KeyboardInterrupt))


def delays(retries: int, backoff_s: float) -> list[float]:
    """Exponential backoff: ``backoff_s``, twice that, four times, ... one per retry."""
    return [backoff_s * 2 ** i for i in range(retries)]


def call(fn: Callable[..., T], *args, retries: int, backoff_s: float, what: str = "",
         sleep: Callable[[float], None] = time.sleep, **kwargs) -> T:
    """``fn(*args, **kwargs)``, retried like the Prefect task would retry it (outside Prefect)."""
    waits = delays(retries, backoff_s)
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == retries or not should_retry(e):
                raise
            wait = waits[attempt] * (1 + JITTER * (2 * random.random() - 1))
            logger.warning("%s: %s: %s; retry %d/%d in %.1fs", what or getattr(fn, "__name__", "call"),
                           type(e).__name__, str(e)[:200], attempt + 1, retries, wait)
            sleep(wait)
    raise AssertionError("unreachable")
