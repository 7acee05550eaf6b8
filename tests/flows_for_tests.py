"""Flows that tests run the way Prefect runs them: by a worker (entrypoint ``tests/flows_for_tests.py:NAME``)
or as a script in a fresh process (``python tests/flows_for_tests.py TOKEN``), so Prefect's logging
configuration is the one a worker's flow-run process has, not the test process's."""
from __future__ import annotations

import sys

from prefect import flow
from prefect.context import get_run_context


@flow(name="dwk-logging-check")
def dwk_logging_flow(token: str) -> str:
    """Run dwk code that logs at INFO (a one-epoch autoencoder fit; its lines carry ``token`` in the
    kernel count) and return the flow run's id."""
    import numpy as np

    from dwk import autoencoder
    from dwk.config import AutoencoderConfig

    n = 100 + int(token)  # "training autoencoder on <n> kernels ...": a line only this run writes
    x = np.random.default_rng(0).normal(size=(n, 9)).astype(np.float32)
    autoencoder.train(x, AutoencoderConfig(epochs=1, batch_size=64, device="cpu"))
    return str(get_run_context().flow_run.id)


if __name__ == "__main__":
    print(dwk_logging_flow(sys.argv[1]))
