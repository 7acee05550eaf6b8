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


def load_summary(run: str | Path) -> tuple[dict, Path]:
    """A run's summary from its folder or its ``summary.json``; returns (summary, run folder)."""
    path = Path(run)
    if path.is_dir():
        path = path / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"no summary at {path}: give a run folder (runs/<run_id>) or its summary.json")
    return json.loads(path.read_text()), path.parent


def kernels_table(run: str | Path):
    """One row per kernel of a run (every shape group), as a pandas DataFrame."""
    import pandas as pd

    summary, _ = load_summary(run)
    store = KernelStore(summary["store"], create=False)
    frames = [kernel_frame(store, summary["run_id"], shape, s) for shape, s in summary["shapes"].items()]
    df = pd.concat(frames, ignore_index=True)
    df["dead"] = df["status"] == "dead"
    df["checkpoint"] = df["checkpoint"].astype(str)
    df["status"] = df["status"].astype(str)
    return df[COLUMNS]


def export_run(run: str | Path, output: str | Path | None = None, fmt: str = "parquet") -> Path:
    """Write the per-kernel table of a run to Parquet (default) or CSV; returns the file written."""
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"export format must be 'parquet' or 'csv', not {fmt!r}")
    df = kernels_table(run)
    _, folder = load_summary(run)
    out = Path(output) if output else folder / f"kernels.{fmt}"
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "parquet":
        df.to_parquet(tmp, index=False)
    else:
        df.to_csv(tmp, index=False)
    tmp.replace(out)
    logger.info("exported %d kernels to %s", len(df), out)
    return out
