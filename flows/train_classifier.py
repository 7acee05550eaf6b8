"""The initialisation experiment as a flow (``dwk-train-classifier``), deployable to the GPU pool.

Per (seed, scheme) one training task (a child MLflow run each), then dwk's analysis of every
initial and trained checkpoint, then the comparison table in the parent run. The same steps run
without Prefect in :func:`dwk.classifier.run_experiment`. Deployment ``dwk-train-classifier/gpu``
(deployments/prefect.yaml) reads ``config_path`` on the worker, relative to its checkout.
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from dwk import classifier, tracking
from dwk.classifier import ExperimentConfig
from dwk.errors import ConfigError
from tasks.classifier import analyze_experiment_task, finish_experiment_task, start_experiment_task, train_scheme_task


@flow(name="dwk-train-classifier")
def train_classifier_flow(experiment: ExperimentConfig | None = None, config_path: str | None = None,
                          track: bool = True) -> dict:
    """Run the experiment given inline (``experiment``) or as a YAML file (``config_path``, one of the two)."""
    if (experiment is None) == (config_path is None):
        raise ConfigError("give the experiment inline (experiment=...) or as a YAML file (config_path=...), one of the two")
    cfg = experiment if experiment is not None else classifier.load_experiment(config_path)
    log = get_run_logger()
    started = start_experiment_task(cfg, track)
    run_dir, parent = started["run_dir"], started["parent_run_id"]
    with tracking.closed_on_error(parent):
        results = []
        for seed in cfg.seeds:
            for scheme in cfg.schemes:  # one at a time: they share the GPU
                results.append(train_scheme_task(cfg, scheme, seed, run_dir, parent))
                log.info("%s: val top-1 %.3f", results[-1]["name"], results[-1]["final"]["val_top1"])
        analysis = analyze_experiment_task(cfg, results, run_dir, parent, track) if cfg.analyze else None
        return finish_experiment_task(cfg, results, analysis, run_dir, parent)
