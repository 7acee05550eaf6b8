"""Seeded torch initialisation that holds under threads.

Prefect's thread-pool task runner extracts several checkpoints at once, and torch's global RNG is
shared by all threads of a process: two seeded model constructions running together would draw
from each other's stream and give different weights on each run. ``torch_seeded`` serialises the
seeded block and restores the global RNG state afterwards. Serialising the seeded blocks is not
enough: every other draw from the global RNG while one runs (an unseeded model construction, say)
shifts its stream too, so dwk builds every model inside this block (``dwk.sources._torch.build_model``).
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_LOCK = threading.RLock()  # re-entrant: a seeded block may build a model that seeds again


@contextlib.contextmanager
def torch_seeded(seed: int) -> Iterator[None]:
    import torch

    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
