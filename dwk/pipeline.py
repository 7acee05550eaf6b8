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

from dwk import progress, results, retry, sources
from dwk.config import CheckpointSpec, DaskConfig, RunConfig
from dwk.errors import CheckpointsFailedError, NoDepthwiseError
from dwk.extract import (
    EXTRACTOR_VERSION,
    Extracted,
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
    loaded, extracted = load_and_extract(src)
    if regular_max_per_layer and loaded.model is not None:
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


def load_and_extract(src: sources.Source) -> tuple[sources.Loaded, Extracted]:
    """A source's checkpoint and its depthwise kernels (no store): what extraction and ``dwk.kernels`` share.

    ``CheckpointError`` for bad input (one with a ``NoDepthwiseError`` as its cause when the model
    has no depthwise convolution); any other error is dwk's or the environment's and is not wrapped.
    """
    loaded = src.load()
    if loaded.extracted is not None:
        return loaded, loaded.extracted
    spec = src.spec
    try:
        return loaded, extract_model(loaded.model, labels=loaded.labels,
                                     reparameterize=spec.reparameterize and loaded.labels is None)
    except NoDepthwiseError as e:
        raise sources.CheckpointError(spec.id, str(e)) from e


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


def prepare_run(cfg: RunConfig, run_id: str, extracted: list[dict], mlflow_run_id: str | None,
                failed: list[dict] | None = None, *, resume: bool = False) -> list[str]:
    """Register a run over the checkpoints that extracted; returns its analysis groups (see ``analysis_groups``).

    With ``resume`` the run's store group is kept: a group whose checkpoints are the same, from the
    same weights (fingerprints), keeps its finished stages; any other group starts again.
    """
    store = KernelStore(cfg.store, create=False)
    by_id = {c.id: c for c in cfg.checkpoints}
    ckpts = []
    for e in extracted:
        control = sources.is_control(by_id[e["id"]])
        ckpts.append(dict(id=e["id"], source=e["source"], control=control, role=role_of(e["source"], control),
                          fingerprint=e.get("fingerprint")))
    groups = analysis_groups(ckpts, {e["id"]: e["shapes"] for e in extracted}, cfg.controls.regular)
    meta = dict(checkpoints=ckpts, groups=groups, mlflow_run_id=mlflow_run_id, failed=list(failed or []),
                extraction={e["id"]: e["status"] for e in extracted})
    if not resume:
        store.create_run(run_id, dict(config=cfg.model_dump(mode="json"), offsets={}, **meta))
        if mlflow_run_id:
            store.update_run_meta(run_id, mlflow_children=_open_children(store, run_id, mlflow_run_id, groups, {}))
        logger.info("run %s: %d checkpoints in %d groups (if it stops: `dwk run --resume %s`)", run_id, len(ckpts),
                    len(groups), run_id)
        return list(groups)
    old = store.run_meta(run_id)
    if mlflow_run_id:
        meta["mlflow_children"] = _open_children(store, run_id, mlflow_run_id, groups, old.get("mlflow_children") or {})
    was = {c["id"]: c.get("fingerprint") for c in old["checkpoints"]}
    now = {c["id"]: c["fingerprint"] for c in ckpts}
    for group, ids in groups.items():
        same = old["groups"].get(group) == ids and all(was.get(i) == now[i] for i in ids)
        if not same and any(store.stage_record(run_id, group, s) for s in STAGES):
            logger.info("run %s, group %s: its checkpoints changed since the run started: analysed again", run_id, group)
            store.clear_stages(run_id, group)
    store.update_run_meta(run_id, **meta)
    return list(groups)


def _open_children(store: KernelStore, run_id: str, parent: str, groups: dict[str, list[str]],
                   have: dict[str, str]) -> dict[str, str]:
    """One MLflow child run per analysis group (the ones in ``have`` reopened: a resumed run), and
    the run's checkpoints as dataset inputs of the parent (once). Returns group -> child run id."""
    from dwk import tracking

    if not have:
        inputs = []
        for c in store.run_meta(run_id)["checkpoints"]:
            extra = store.checkpoint(c["id"]).extra or {}
            hub = extra.get("hub") or {}
            where = f"https://huggingface.co/{hub['repo_id']}" if hub.get("repo_id") else extra.get("file")
            inputs.append({**c, "location": where, "fingerprint": extra.get("sha256") or c.get("fingerprint")})
        tracking.log_checkpoint_inputs(parent, inputs)
    children = {}
    for group in groups:
        if group in have and tracking.reopen_run(have[group]):
            children[group] = have[group]
        else:
            children[group] = tracking.start_child(parent, group)
    return children


def child_run(cfg: RunConfig, run_id: str, group: str) -> str | None:
    """The MLflow child run of one analysis group (None when the run is not tracked)."""
    return (KernelStore(cfg.store, create=False).run_meta(run_id).get("mlflow_children") or {}).get(group)


def resume_config(store_path: Path, run_id: str) -> RunConfig:
    """The config an unfinished run started with; this process becomes the run's writer.

    ``StoreError`` when the run is finished, or another live process writes it.
    """
    store = KernelStore(store_path, create=False)
    meta = store.claim_run(run_id)
    logger.info("resuming run %s (resumed %d time(s)); stages it finished are skipped", run_id, meta["resumed"])
    return RunConfig.model_validate(meta["config"])


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


# The analysis stages of one group, in order (the one place that says it). Each records itself in
# the store after its outputs are written; a stage with a record is skipped (a resumed run), and a
# stage that runs drops the records of the stages after it.
STAGES = ("normalize", "train", "cluster")


def _after(stage: str) -> tuple[str, ...]:
    return STAGES[STAGES.index(stage) + 1:]


def normalize_run(cfg: RunConfig, run_id: str, client=None) -> dict[str, dict]:
    """Normalise every shape group of a run with Dask; returns per-shape counts."""
    from dwk.normalize import normalize_shape

    store = KernelStore(cfg.store, create=False)
    meta = store.run_meta(run_id)
    out = {}
    for shape, ids in meta["groups"].items():
        done = store.stage_record(run_id, shape, "normalize")
        if done:
            logger.info("%s: normalised already (run %s), skipped", shape, run_id)
            out[shape] = {k: v for k, v in done.items() if k != "at"}
            continue
        res = normalize_shape(store, run_id, shape, ids, cfg.normalize, chunk_kernels=cfg.normalize.chunk_kernels,
                              client=client)
        out[shape] = dict(n_kernels=res.n_kernels, n_nonfinite=res.n_nonfinite, n_dead=res.n_dead,
                          per_checkpoint=res.per_checkpoint)
        store.record_stage(run_id, shape, "normalize", out[shape], clear=_after("normalize"))
    return out


def normalize_stage(cfg: RunConfig, run_id: str) -> dict[str, dict]:
    """``normalize_run`` on the config's Dask cluster, started only when a group is left to normalise."""
    store = KernelStore(cfg.store, create=False)
    if all(store.stage_record(run_id, g, "normalize") for g in store.run_meta(run_id)["groups"]):
        return normalize_run(cfg, run_id)  # every group skipped: no cluster needed
    with dask_client(cfg.dask) as client:
        return normalize_run(cfg, run_id, client)


def run_dir(cfg: RunConfig, run_id: str) -> Path:
    return cfg.out / run_id


def trained_model(cfg: RunConfig, run_id: str, shape: str) -> str | None:
    """The path of a group's trained autoencoder when training finished and the file is the one saved."""
    from dwk import analysis

    done = KernelStore(cfg.store, create=False).stage_record(run_id, shape, "train")
    path = analysis.model_path(run_dir(cfg, run_id) / "models", shape)
    if not done or not path.is_file() or sources.sha256_file(path) != done.get("sha256"):
        return None
    return str(path)


def train_shape(cfg: RunConfig, run_id: str, shape: str, mlflow_run_id: str | None = None) -> str:
    """Train one shape's autoencoder; per-epoch loss to MLflow; returns the saved model's path."""
    from dwk import analysis

    have = trained_model(cfg, run_id, shape)
    if have:
        logger.info("%s: trained already (run %s), skipped", shape, run_id)
        return have
    from dwk import tracking

    child = child_run(cfg, run_id, shape) if mlflow_run_id else None
    on_epoch, flush = tracking.epoch_logger(child, "loss") if child else (None, lambda: None)
    store = KernelStore(cfg.store, create=False)
    with tracking.system_metrics(child):  # CPU, memory, GPU use while training (system/... in the child run)
        path, losses = analysis.train_shape(store, run_id, shape, cfg, run_dir(cfg, run_id) / "models",
                                            on_epoch=on_epoch)
    flush()
    if child:  # the autoencoder is logged by the process that trained it (a GPU worker, perhaps)
        from dwk import autoencoder as ae

        tracking.log_metrics(child, {"final_loss": losses[-1], "epochs": len(losses)})
        tracking.log_model(child, ae.load(path), "autoencoder")
    store.record_stage(run_id, shape, "train", dict(path=str(path), sha256=sources.sha256_file(path),
                                                    epochs=len(losses), final_loss=float(losses[-1])),
                       clear=_after("train"))
    return str(path)


def cluster_shape(cfg: RunConfig, run_id: str, shape: str, model_path: str) -> dict:
    """Cluster, name and classify one group; its result record goes to the store and is returned."""
    from dwk import analysis

    store = KernelStore(cfg.store, create=False)
    if store.stage_record(run_id, shape, "cluster") and store.result(run_id, shape) is not None:
        logger.info("%s: clustered already (run %s), skipped", shape, run_id)
        return results.read_record(store.result(run_id, shape), f"run {run_id}, group {shape}")
    record = results.record_of(analysis.cluster_shape(store, run_id, shape, cfg, Path(model_path)))
    store.write_result(run_id, shape, record)
    store.record_stage(run_id, shape, "cluster", dict(n_clusters=len(record["clusters"])), clear=_after("cluster"))
    return record


# ----------------------------------------------------------------------------- report
def summary_from_store(store: KernelStore, run_id: str) -> dict:
    """A run's summary (tables, controls, per-group results) from the store alone.

    ``summary.json`` is this view, written when the run finishes; ``dwk show`` and ``dwk export``
    build it from the store, so they need no run folder. Groups whose clustering has not finished
    are left out.
    """
    from dwk import analysis, report

    meta = store.run_meta(run_id)
    cfg = RunConfig.model_validate(meta["config"])
    shapes = {g: results.read_record(store.result(run_id, g), f"run {run_id}, group {g}")
              for g in meta["groups"] if store.stage_record(run_id, g, "cluster") and store.result(run_id, g)}
    rows, layer_rows = analysis.checkpoint_tables(store, run_id, shapes)
    status = meta.get("extraction") or {}
    for r in rows:
        r["extraction"] = status.get(r["id"])
    summary = dict(
        run_id=run_id,
        mlflow_run_id=meta.get("mlflow_run_id"),
        store=str(store.path.resolve()),
        out=str(run_dir(cfg, run_id).resolve()),
        config=meta["config"],
        checkpoints=rows,
        failed=meta.get("failed") or [],
        shapes=shapes,
        layers=layer_rows,
        finished=bool(meta.get("finished")),
    )
    summary["controls"] = report.controls_rows(summary)
    return summary


def finalize(cfg: RunConfig, run_id: str, mlflow_run_id: str | None) -> dict:
    """Tables, figures, ``summary.json`` and the MLflow record of a run whose groups are all clustered."""
    import matplotlib.pyplot as plt

    from dwk import analysis, report

    store = KernelStore(cfg.store, create=False)
    out = run_dir(cfg, run_id)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    summary = summary_from_store(store, run_id)
    missing = [g for g in store.run_meta(run_id)["groups"] if g not in summary["shapes"]]
    if missing:
        raise RuntimeError(f"run {run_id}: groups {missing} have no result in the store; the cluster stage must run first")
    summary["finished"] = True
    shape_summaries, rows, layer_rows, failures = (summary["shapes"], summary["checkpoints"], summary["layers"],
                                                   summary["failed"])
    controls = summary["controls"]
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
    for name, fig in figures.items():
        fig.savefig(out / "figures" / name, dpi=110)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=results.jsonable))
    from dwk import html_report  # report.html: self-contained, the PNGs just saved embedded
    html_report.write(out / "report.html", summary, {name: out / "figures" / name for name in figures})
    (out / "checkpoints.txt").write_text(report.checkpoint_table_text(rows + failures) + "\n")
    (out / "controls.txt").write_text(report.controls_text(controls) + "\n")

    if mlflow_run_id:
        from dwk import tracking

        children = store.run_meta(run_id).get("mlflow_children") or {}
        for shape, s in shape_summaries.items():  # the same metric names in every child: Compare lines them up
            child = children.get(shape)
            if not child:
                continue
            tracking.log_metrics(child, group_metrics(s, [c for c in controls if c["shape"] == shape]))
            tracking.log_table(child, cluster_table({shape: s}), "tables/clusters.json")
            for name in (f"gallery-{shape}.png", f"tau-curve-{shape}.png", f"latent-{shape}.png"):
                tracking.log_figure(child, figures[name], f"figures/{name}")
        tracking.log_metrics(mlflow_run_id, dict(n_failed_checkpoints=len(failures), n_checkpoints=len(rows),
                                                 n_groups=len(shape_summaries)))
        tracking.log_table(mlflow_run_id, rows, "tables/checkpoints.json")
        tracking.log_table(mlflow_run_id, layer_rows, "tables/layers.json")
        tracking.log_table(mlflow_run_id, cluster_table(shape_summaries), "tables/clusters.json")
        tracking.log_table(mlflow_run_id, controls, "tables/controls.json")
        for name, fig in figures.items():
            tracking.log_figure(mlflow_run_id, fig, f"figures/{name}")
        tracking.log_artifact(mlflow_run_id, out / "summary.json")
        tracking.log_artifact(mlflow_run_id, out / "report.html")
        tracking.finish_run(mlflow_run_id, status="FINISHED")
    for fig in figures.values():
        plt.close(fig)
    store.finish_run(run_id)
    return summary


def group_metrics(s: dict, controls: list[dict]) -> dict[str, float]:
    """One group's numbers under the names every child run uses (``classified_share``, ``tau_null``, ...)."""
    m = dict(classified_share=s["classified_share"], classified_share_tau=s["classified_share_tau"],
             tau_null=s["tau_null"], n_clusters=len(s["clusters"]), n_minor_clusters=sum(c["minor"] for c in s["clusters"]),
             n_named_clusters=sum(not c["name"].startswith("unnamed") for c in s["clusters"]),
             n_kernels=s["n_kernels"], n_fit=s["n_fit"])
    if "paper" in s:
        m.update(paper_classified_share=s["paper"]["classified_share"], paper_n_clusters=s["paper"]["n_clusters"])
    planted = {k: p["ari"] for k, p in s.get("planted", {}).items() if p.get("ari") is not None}
    if len(planted) == 1:
        m["planted_ari"] = next(iter(planted.values()))
    else:
        m.update({f"planted_ari.{k}": v for k, v in planted.items()})
    for c in controls:  # e.g. control.seed_stability.ari_mean
        if isinstance(c["value"], (int, float)) and not c["control"].startswith("null checkpoint"):
            key = f"control.{c['control'].split(' (')[0].replace(' ', '_')}.{c['metric']}"
            m[key.replace("@", "_at_")] = c["value"]
    return m


def cluster_table(shape_summaries: dict[str, dict]) -> list[dict]:
    """One row per cluster of the given groups, with its nearest references flattened."""
    return [dict(shape=sh, **{k: v for k, v in c.items() if k != "reference"},
                 **{f"ref_{k}": v for k, v in c["reference"].items() if k != "name"})
            for sh, s in shape_summaries.items() for c in s["clusters"]]


# ----------------------------------------------------------------------------- all together
def run(cfg: RunConfig, *, track: bool = True, resume: str | None = None) -> dict:
    """The whole pipeline in this process, without Prefect (the flows do the same, task by task).

    A checkpoint that fails is recorded in ``failed`` and the others go on (as in the flows);
    ``CheckpointsFailedError`` when none extracted. The MLflow run (``track``) ends FINISHED, or
    FAILED / KILLED whatever stops the analysis (``tracking.closed_on_error``).

    ``resume``: the id of an unfinished run in ``cfg.store`` (killed, failed, stopped): it goes on
    with the config it started with, under the same run id and MLflow run, and skips every stage
    that finished (``STAGES``); checkpoints are extracted again only where the store lacks them.
    """
    from dwk import tracking

    if track:
        tracking.preflight()  # in seconds, before any work
    if resume:
        cfg = resume_config(cfg.store, resume)
    dpath = data_dir(cfg)
    extracted, failures = [], []
    for spec in progress.track(cfg.checkpoints, "extracting checkpoints"):
        try:
            extracted.append(retry.call(extract_checkpoint, spec, cfg.store, dpath, cfg.chunk_kernels,
                                        regular_max_per_layer(cfg), retries=cfg.retries,
                                        backoff_s=cfg.retry_backoff_s, what=spec.id))
        except sources.CheckpointError as e:
            logger.error("%s", e)
            failures.append(dict(id=spec.id, source=sources.kind_of(spec), error=e.reason))
        except Exception as e:  # noqa: BLE001 - not bad input: keep the traceback in the log, go on (as the flow)
            logger.exception("%s: extraction failed", spec.id)
            failures.append(dict(id=spec.id, source=sources.kind_of(spec), error=f"{type(e).__name__}: {e}"))
    if not extracted:
        raise CheckpointsFailedError(failures)
    run_id = resume or new_run_id(cfg)
    mlflow_run_id = open_tracking(cfg, run_id, resume) if track else None
    with tracking.closed_on_error(mlflow_run_id):
        shapes = prepare_run(cfg, run_id, extracted, mlflow_run_id, failures, resume=bool(resume))
        normalize_stage(cfg, run_id)
        models = {s: train_shape(cfg, run_id, s, mlflow_run_id) for s in shapes}
        for s in shapes:
            cluster_shape(cfg, run_id, s, models[s])
        return finalize(cfg, run_id, mlflow_run_id)


def open_tracking(cfg: RunConfig, run_id: str, resume: str | None, tags: dict[str, str] | None = None) -> str:
    """The MLflow run of a dwk run: a new one, or, resuming, the one it started (a new one if that is gone)."""
    from dwk import tracking

    if resume:
        old = KernelStore(cfg.store, create=False).run_meta(run_id).get("mlflow_run_id")
        if old and tracking.reopen_run(old, tags):
            return old
    return tracking.start_run(cfg.experiment, run_id, cfg.flat_params(),
                              {"dwk.run_id": run_id, **tracking.provenance_tags(), **(tags or {})})
