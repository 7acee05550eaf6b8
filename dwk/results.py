"""A shape group's result, the typed and versioned record a run keeps in the store.

``dwk.analysis.cluster_shape`` returns one per analysis group; the pipeline writes it under the run
in the store (``KernelStore.write_result``) before anything else reads it, so ``dwk show``, ``dwk
export`` and a resumed run need the store alone, and ``summary.json`` is a view of these records
(``dwk.pipeline.summary_from_store``). Only the fields every reader relies on are typed; the
controls, the paper mode and the planted checks travel as plain mappings (their own modules own
their layout).

A record of another ``version`` is refused with a message: readers never guess at a layout.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dwk.errors import StoreSchemaError

# 1: first typed record (clusters with prototypes and reference names, tau_null, the selection of
#    the merge threshold and its seed stability, what a rule removed, the controls).
RESULT_VERSION = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class ClusterResult(_Record):
    """One cluster of a group: the data's, named (or not) by the reference bank."""

    id: int
    name: str  # the nearest reference's name at cosine >= name_cos, else "unnamed-<i>"
    size: int  # fit kernels in it
    share: float  # of the fit kernels
    minor: bool  # below min_share: its kernels are never classified
    classified_share: float  # of its kernels at tau_null
    reference: dict[str, Any]  # the nearest references and their cosines
    prototype: list[float]  # the unit-norm prototype, flattened (kh*kw)


class GroupResult(_Record):
    """The result of one analysis group (a kernel shape, ``planted-<shape>`` or ``regular-<shape>``)."""

    version: Literal[1] = RESULT_VERSION
    shape: str  # the group's name
    n_kernels: int
    n_fit: int  # kernels the clusters were fitted on (non-control, usable)
    n_dead: int
    n_rejected: int
    mode: str  # "kmeans" (the default) or "paper"
    tau: float
    tau_null: float
    classified_share: float  # of the fit kernels, at tau_null, out of sample
    classified_share_tau: float
    tau_curve: dict[str, list[float]]
    clusters: list[ClusterResult]
    controls: dict[str, Any]
    classification: dict[str, Any]
    selection: dict[str, Any] | None = None  # the merge threshold, how it was chosen, seed stability, what was removed


def jsonable(o: Any) -> Any:
    """``json.dumps``'s ``default`` for what the analysis produces (NumPy scalars and arrays, paths)."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, Path)):
        return o.tolist() if isinstance(o, np.ndarray) else str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def record_of(summary: dict[str, Any]) -> dict[str, Any]:
    """Check a group's summary against the record's types; the JSON-ready record to store."""
    plain = json.loads(json.dumps(summary, default=jsonable))
    try:
        return GroupResult.model_validate({**plain, "version": RESULT_VERSION}).model_dump(mode="json")
    except ValidationError as e:  # dwk's own bug: the analysis must produce what its record promises
        raise ValueError(f"group {summary.get('shape')!r}: its result does not fit GroupResult: {e}") from e


def read_record(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A stored record, checked; ``StoreSchemaError`` for a record of another version."""
    version = data.get("version")
    if version != RESULT_VERSION:
        raise StoreSchemaError(f"{where}: result record version {version!r}, this dwk reads version "
                               f"{RESULT_VERSION}; analyse again with this dwk (`dwk analyze`) or use the dwk that wrote it")
    return GroupResult.model_validate(data).model_dump(mode="json")
