"""The pipeline's stages as plain functions, and ``run`` that chains them without Prefect.

The Prefect tasks in ``tasks/`` call these functions one to one; the flows in ``flows/`` wire the
tasks. Stages pass small references (store path, run id, shape, file paths), never arrays: the
store is the one channel for heavy data, which keeps retries and caching cheap.
"""
from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dwk import sources
from dwk.config import CheckpointSpec, DaskConfig, RunConfig
from dwk.errors import CheckpointsFailedError, NoDepthwiseError
from dwk.extract import (
    EXTRACTOR_VERSION,
    PLANTED_PREFIX,
    REGULAR_PREFIX,
    extract_model,
    extract_regular,
    group_shape,
    with_regular,
)
from dwk.store import KernelStore

logger = logging.getLogger(__name__)


def data_dir(cfg: RunConfig) -> Path:
    """Where dwk writes checkpoint files of its own (planted demo checkpoints)."""
    return cfg.store.parent / "checkpoints"


# ----------------------------------------------------------------------------- extraction
def extract_checkpoint(spec: CheckpointSpec, store_path: Path, data_path: Path, chunk_kernels: int,
                       regular_max_per_layer: int | None = None) -> dict[str, Any]:
    """Extract one checkpoint into the store, unless it is already there from the same weights.

    Torch sources build the model and extract by module structure (re-parameterisable models
    fused first unless ``spec.reparameterize`` is off); the weights-only and ONNX sources read
    their kernels without a model. Per-checkpoint metadata (content hash, timm pretrained config
    and tag, Hub location, remapping, re-parameterisation) goes into the store's record.

    ``regular_max_per_layer`` also extracts a sample of each regular conv's kernels (the comparison
    set) from torch models. Returns ``{id, source, status: "extracted" | "skipped", n_kernels, shapes,
    fingerprint}``.
    Raises ``dwk.errors.CheckpointError`` or ``extract.NoDepthwiseError`` with a message for the user.
    """
    store = KernelStore(store_path)
    src = sources.source_for(spec, data_path)
    fp = src.fingerprint()
    if not spec.reparameterize and src.builds_model:
        fp += "+no-reparam"  # the same weights extracted another way
    if regular_max_per_layer:
        fp += f"+regular{regular_max_per_layer}"
    if store.is_complete(spec.id, fp, EXTRACTOR_VERSION):
        rec = store.checkpoint(spec.id)
        logger.info("%s: already extracted (%d kernels), skipping", spec.id, rec.n_kernels)
        return dict(id=spec.id, source=src.kind, status="skipped", n_kernels=rec.n_kernels, shapes=rec.shapes,
                    fingerprint=fp)
    t0 = time.perf_counter()
    loaded = src.load()
    if loaded.extracted is not None:
        extracted = loaded.extracted
    else:
        try:
            extracted = extract_model(loaded.model, labels=loaded.labels,
                                      reparameterize=spec.reparameterize and loaded.labels is None)
        except NoDepthwiseError as e:  # bad input; any other error is dwk's or the environment's: not wrapped
            raise sources.CheckpointError(spec.id, str(e)) from e
        if regular_max_per_layer:
            extracted = with_regular(extracted, extract_regular(loaded.model, regular_max_per_layer))
    reserved = {"id", "source", "fingerprint", "extractor_version", "layers", "shapes", "complete"}
    extra = dict(model=spec.model_name if loaded.model is not None else None,
                 file=str(loaded.path) if loaded.path else None, reparameterized=extracted.reparameterized)
    extra.update({k: v for k, v in loaded.meta.items() if k not in reserved})
    rec = store.write_checkpoint(
        spec.id, source=src.kind, fingerprint=fp, extractor_version=EXTRACTOR_VERSION, extracted=extracted,
        chunk_kernels=chunk_kernels, extra=extra,
    )
    logger.info("%s: extracted %d depthwise kernels %s from %d layers in %.1fs", spec.id, rec.n_kernels, rec.shapes,
                len(rec.layers), time.perf_counter() - t0)
    return dict(id=spec.id, source=src.kind, status="extracted", n_kernels=rec.n_kernels, shapes=rec.shapes,
                fingerprint=fp)


def regular_max_per_layer(cfg: RunConfig) -> int | None:
    return cfg.controls.regular_max_per_layer if cfg.controls.regular else None


# ----------------------------------------------------------------------------- run set-up
def new_run_id(cfg: RunConfig) -> str:
    """``<name>-<date>-<time>-<config fingerprint>-<4 random hex>``: unique even for two runs of one second."""
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{cfg.fingerprint()[:6]}-{secrets.token_hex(2)}"


def role_of(source: str, control: bool) -> str:
    """``subject`` (a real checkpoint), ``control`` (random init) or ``method-check`` (planted, known labels)."""
    if control:
        return "control"
    return "method-check" if source == "planted" else "subject"


def analysis_groups(ckpts: list[dict], shapes_of: dict[str, dict], regular: bool) -> dict[str, list[str]]:
    """The run's analysis groups: group name -> checkpoint ids, in config order.

    One group per kernel shape. Planted checkpoints (the method's checks) get a group of their own,
    ``planted-<shape>``, when real checkpoints have kernels of the same shape: planted classes must
    never shape the clusters that real kernels are classified against, nor the other way round.
    Random-init controls join the group of the checkpoints they control (the real ones when there
    are any). ``regular-<shape>`` groups hold the comparison set of regular convs, for the shapes
    that depthwise kernels have.
    """
    found = {s for sh in shapes_of.values() for s in sh}
    dw = sorted((s for s in found if not s.startswith(REGULAR_PREFIX)), key=group_shape)
    groups: dict[str, list[str]] = {}
    for shape in dw + ([REGULAR_PREFIX + s for s in dw if REGULAR_PREFIX + s in found] if regular else []):
        have = [c for c in ckpts if shape in shapes_of[c["id"]]]
        subjects = [c["id"] for c in have if c["role"] == "subject"]
        planted = [c["id"] for c in have if c["role"] == "method-check"]
        if subjects and planted:
            groups[shape] = [c["id"] for c in have if c["role"] != "method-check"]
            if not shape.startswith(REGULAR_PREFIX):  # planted models' regular convs are not planted
                groups[PLANTED_PREFIX + shape] = planted
        else:
            groups[shape] = [c["id"] for c in have]
    return groups


def prepare_run(cfg: RunConfig, run_id: str, extracted: list[dict], mlflow_run_id: str | None) -> list[str]:
    """Register a run over the checkpoints that extracted; returns its analysis groups (see ``analysis_groups``)."""
    store = KernelStore(cfg.store, create=False)
    by_id = {c.id: c for c in cfg.checkpoints}
    ckpts = []
    for e in extracted:
        control = sources.is_control(by_id[e["id"]])
        ckpts.append(dict(id=e["id"], source=e["source"], control=control, role=role_of(e["source"], control)))
    groups = analysis_groups(ckpts, {e["id"]: e["shapes"] for e in extracted}, cfg.controls.regular)
    store.create_run(run_id, dict(config=cfg.model_dump(mode="json"), checkpoints=ckpts, groups=groups,
                                  mlflow_run_id=mlflow_run_id, offsets={}))
    return list(groups)


@contextlib.contextmanager
def dask_client(cfg: DaskConfig) -> Iterator[Any]:
    """A Dask client: the scheduler at ``cfg.address``, or a local cluster of worker processes.

    The local cluster and its dashboard bind to 127.0.0.1 only.
    """
    from distributed import Client, LocalCluster

    if cfg.address:
        with Client(cfg.address) as client:
            logger.info("Dask: joined %s (dashboard %s)", cfg.address, client.dashboard_link)
            yield client
        return
    with LocalCluster(n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        logger.info("Dask: local cluster of %d workers (dashboard %s)", cfg.n_workers, client.dashboard_link)
        yield client


def normalize_run(cfg: RunConfig, run_id: str, client=None) -> dict[str, dict]:
    """Normalise every shape group of a run with Dask; returns per-shape counts."""
    from dwk.normalize import normalize_shape

    store = KernelStore(cfg.store, create=False)
    meta = store.run_meta(run_id)
    out = {}
    for shape, ids in meta["groups"].items():
        res = normalize_shape(store, run_id, shape, ids, cfg.normalize, chunk_kernels=cfg.normalize.chunk_kernels,
                              client=client)
        out[shape] = dict(n_kernels=res.n_kernels, n_nonfinite=res.n_nonfinite, n_dead=res.n_dead,
                          per_checkpoint=res.per_checkpoint)
    return out


def run_dir(cfg: RunConfig, run_id: str) -> Path:
    return cfg.out / run_id


def train_shape(cfg: RunConfig, run_id: str, shape: str, mlflow_run_id: str | None = None) -> str:
    """Train one shape's autoencoder; per-epoch loss to MLflow; returns the saved model's path."""
    from dwk import analysis

    on_epoch, flush = (None, lambda: None)
    if mlflow_run_id:
        from dwk import tracking

        on_epoch, flush = tracking.epoch_logger(mlflow_run_id, f"loss_{shape}")
    path, losses = analysis.train_shape(KernelStore(cfg.store, create=False), run_id, shape, cfg, run_dir(cfg, run_id) / "models",
                                        on_epoch=on_epoch)
    flush()
    if mlflow_run_id:
        from dwk import tracking

        tracking.log_metrics(mlflow_run_id, {f"final_loss_{shape}": losses[-1]})
    return str(path)


def cluster_shape(cfg: RunConfig, run_id: str, shape: str, model_path: str) -> dict:
    from dwk import analysis

    return analysis.cluster_shape(KernelStore(cfg.store, create=False), run_id, shape, cfg, Path(model_path))


# ----------------------------------------------------------------------------- report
def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, Path)):
        return o.tolist() if isinstance(o, np.ndarray) else str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def finalize(
    cfg: RunConfig,
    run_id: str,
    shape_summaries: dict[str, dict],
    model_paths: dict[str, str],
    failures: list[dict],
    extracted: list[dict],
    mlflow_run_id: str | None,
) -> dict:
    """Tables, figures, ``summary.json`` and the MLflow record of a finished run."""
    import matplotlib.pyplot as plt

    from dwk import analysis, report

    store = KernelStore(cfg.store, create=False)
    out = run_dir(cfg, run_id)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    rows, layer_rows = analysis.checkpoint_tables(store, run_id, shape_summaries)
    status = {e["id"]: e["status"] for e in extracted}
    for r in rows:
        r["extraction"] = status.get(r["id"])
    summary = dict(
        run_id=run_id,
        mlflow_run_id=mlflow_run_id,
        store=str(cfg.store.resolve()),
        out=str(out.resolve()),
        config=cfg.model_dump(mode="json"),
        checkpoints=rows,
        failed=failures,
        shapes=shape_summaries,
        layers=layer_rows,
    )
    figures = {}
    for shape, s in shape_summaries.items():
        figures[f"gallery-{shape}.png"] = report.gallery(s)
        figures[f"latent-{shape}.png"] = report.latent_histogram(s)
        figures[f"tau-curve-{shape}.png"] = report.tau_curve_figure(s)
    tau_null = {shape: s["tau_null"] for shape, s in shape_summaries.items()}
    for r in rows:
        figures[f"layers-{r['id']}.png"] = report.layer_shares(layer_rows, r["id"])
        figures[f"tau-layers-{r['id']}.png"] = report.layer_tau_curves(layer_rows, r["id"], analysis.TAU_GRID.tolist(),
                                                                       tau_null)
    figures["tau-curve-checkpoints.png"] = report.checkpoint_tau_curves(rows, analysis.TAU_GRID.tolist())
    if any(s.startswith(REGULAR_PREFIX) for s in shape_summaries):
        figures["depth-depthwise-vs-regular.png"] = report.depth_comparison(layer_rows)
    controls = report.controls_rows(summary)
    summary["controls"] = controls
    for name, fig in figures.items():
        fig.savefig(out / "figures" / name, dpi=110)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    (out / "checkpoints.txt").write_text(report.checkpoint_table_text(rows + failures) + "\n")
    (out / "controls.txt").write_text(report.controls_text(controls) + "\n")

    if mlflow_run_id:
        from dwk import autoencoder as ae
        from dwk import tracking

        metrics: dict[str, float] = {}
        for shape, s in shape_summaries.items():
            metrics.update({
                f"classified_share_{shape}": s["classified_share"], f"classified_share_tau_{shape}": s["classified_share_tau"],
                f"tau_null_{shape}": s["tau_null"], f"n_clusters_{shape}": len(s["clusters"]),
                f"n_minor_clusters_{shape}": sum(c["minor"] for c in s["clusters"]), f"n_kernels_{shape}": s["n_kernels"],
            })
            if "paper" in s:
                metrics[f"paper_classified_share_{shape}"] = s["paper"]["classified_share"]
                metrics[f"paper_n_clusters_{shape}"] = s["paper"]["n_clusters"]
            for ckpt, p in s.get("planted", {}).items():
                if p.get("ari") is not None:
                    metrics[f"planted_ari_{shape}.{ckpt}"] = p["ari"]
        for r in rows:
            metrics[f"classified_share.{r['id']}"] = r["classified_share"]
        for c in controls:  # e.g. control.7x7.seed_stability.ari_mean
            if isinstance(c["value"], (int, float)) and not c["control"].startswith("null checkpoint"):
                key = f"control.{c['shape']}.{c['control'].split(' (')[0].replace(' ', '_')}.{c['metric']}"
                metrics[key.replace("@", "_at_")] = c["value"]
        metrics["n_failed_checkpoints"] = len(failures)
        tracking.log_metrics(mlflow_run_id, metrics)
        tracking.log_table(mlflow_run_id, rows, "tables/checkpoints.json")
        tracking.log_table(mlflow_run_id, layer_rows, "tables/layers.json")
        cluster_rows = [
            dict(shape=sh, **{k: v for k, v in c.items() if k != "reference"},
                 **{f"ref_{k}": v for k, v in c["reference"].items() if k != "name"})
            for sh, s in shape_summaries.items() for c in s["clusters"]
        ]
        tracking.log_table(mlflow_run_id, cluster_rows, "tables/clusters.json")
        tracking.log_table(mlflow_run_id, controls, "tables/controls.json")
        for name, fig in figures.items():
            tracking.log_figure(mlflow_run_id, fig, f"figures/{name}")
        tracking.log_artifact(mlflow_run_id, out / "summary.json")
        tracking.finish_run(mlflow_run_id, {f"autoencoder-{shape}": ae.load(p) for shape, p in model_paths.items()},
                            status="FINISHED")
    for fig in figures.values():
        plt.close(fig)
    store.finish_run(run_id)
    return summary


# ----------------------------------------------------------------------------- all together
def run(cfg: RunConfig, *, track: bool = True) -> dict:
    """The whole pipeline in this process, without Prefect (the flows do the same, task by task).

    A checkpoint that fails is recorded in ``failed`` and the others go on (as in the flows);
    ``CheckpointsFailedError`` when none extracted. The MLflow run (``track``) ends FINISHED, or
    FAILED / KILLED whatever stops the analysis (``tracking.closed_on_error``).
    """
    from dwk import tracking

    if track:
        tracking.preflight()  # in seconds, before any work
    dpath = data_dir(cfg)
    extracted, failures = [], []
    for spec in cfg.checkpoints:
        try:
            extracted.append(extract_checkpoint(spec, cfg.store, dpath, cfg.chunk_kernels, regular_max_per_layer(cfg)))
        except sources.CheckpointError as e:
            logger.error("%s", e)
            failures.append(dict(id=spec.id, source=sources.kind_of(spec), error=e.reason))
        except Exception as e:  # noqa: BLE001 - not bad input: keep the traceback in the log, go on (as the flow)
            logger.exception("%s: extraction failed", spec.id)
            failures.append(dict(id=spec.id, source=sources.kind_of(spec), error=f"{type(e).__name__}: {e}"))
    if not extracted:
        raise CheckpointsFailedError(failures)
    run_id = new_run_id(cfg)
    mlflow_run_id = tracking.start_run(cfg.experiment, run_id, cfg.flat_params(), {"dwk.run_id": run_id}) if track else None
    with tracking.closed_on_error(mlflow_run_id):
        shapes = prepare_run(cfg, run_id, extracted, mlflow_run_id)
        with dask_client(cfg.dask) as client:
            normalize_run(cfg, run_id, client)
        models = {s: train_shape(cfg, run_id, s, mlflow_run_id) for s in shapes}
        summaries = {s: cluster_shape(cfg, run_id, s, models[s]) for s in shapes}
        return finalize(cfg, run_id, summaries, models, failures, extracted, mlflow_run_id)
