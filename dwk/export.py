"""Per-kernel export of a finished run, for pandas and friends."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dwk.analysis import kernel_frame
from dwk.store import KernelStore

logger = logging.getLogger(__name__)

COLUMNS = ["checkpoint", "source", "control", "layer", "module", "depth", "channel", "shape", "cluster",
           "cluster_name", "cosine", "classified", "classified_tau", "dead", "status"]


def load_summary(run: str | Path, store: str | Path | None = None) -> tuple[dict, Path]:
    """A run's summary; returns (summary, run folder).

    ``run`` is a run folder (``runs/<run_id>``), its ``summary.json``, or a run id of ``store``: the
    summary is then built from the store alone (``dwk.pipeline.summary_from_store``), also for a
    run that has not finished (its finished groups).
    """
    path = Path(run)
    if path.is_dir():
        path = path / "summary.json"
    if path.is_file():
        return json.loads(path.read_text()), path.parent
    if store is not None and Path(store).exists():
        from dwk.pipeline import summary_from_store

        ks = KernelStore(store, create=False)
        if str(run) in ks.run_ids():
            summary = summary_from_store(ks, str(run))
            return summary, Path(summary["out"])
    raise FileNotFoundError(f"no run folder or summary.json at {run}" + (f", and no run {str(run)!r} in {store}" if store
                            else "") + ": give a run folder (runs/<run_id>), its summary.json, or a run id with --store")


def kernels_table(run: str | Path, store: str | Path | None = None):
    """One row per kernel of a run (every shape group), as a pandas DataFrame."""
    return _kernels_frame(load_summary(run, store)[0])


def _kernels_frame(summary: dict):
    import pandas as pd

    store = KernelStore(summary["store"], create=False)
    frames = [kernel_frame(store, summary["run_id"], shape, s) for shape, s in summary["shapes"].items()]
    df = pd.concat(frames, ignore_index=True)
    df["dead"] = df["status"] == "dead"
    df["checkpoint"] = df["checkpoint"].astype(str)
    df["status"] = df["status"].astype(str)
    return df[COLUMNS]


def export_run(run: str | Path, output: str | Path | None = None, fmt: str = "parquet",
               store: str | Path | None = None) -> Path:
    """Write the per-kernel table of a run to Parquet (default) or CSV; returns the file written."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"export format must be 'parquet' or 'csv', not {fmt!r}")
    summary, folder = load_summary(run, store)
    df = _kernels_frame(summary)
    out = Path(output) if output else folder / f"kernels.{fmt}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    tmp.replace(out)
    logger.info("exported %d kernels to %s", len(df), out)
    return out
