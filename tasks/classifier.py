"""The initialisation experiment's tasks: each wraps one step of :mod:`dwk.classifier`.

Training is the GPU task (tag ``gpu``; it trains on the CPU when no GPU is visible). Inputs are the
experiment config and small dicts (paths, run ids): weights travel as safetensors files.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dwk import classifier
from dwk.classifier import ExperimentConfig


@task(name="start-experiment", cache_policy=NO_CACHE)
def start_experiment_task(config: ExperimentConfig, track: bool) -> dict:
    """The run folder and the parent MLflow run, tagged with this Prefect flow run."""
    from prefect.runtime import flow_run

    tags = {"prefect.flow_run_id": str(flow_run.get_id())} if flow_run.get_id() else {}
    return classifier.start_experiment(config, track, tags)


@task(name="train-classifier", task_run_name="train {scheme} seed {seed}", cache_policy=NO_CACHE, tags=["gpu"])
def train_scheme_task(config: ExperimentConfig, scheme: str, seed: int, run_dir: str,
                      parent_run_id: str | None) -> dict:
    return classifier.train_scheme(config, scheme, seed, run_dir, parent_run_id)


@task(name="analyze-checkpoints", cache_policy=NO_CACHE)
def analyze_experiment_task(config: ExperimentConfig, results: list[dict], run_dir: str,
                            parent_run_id: str | None, track: bool) -> dict:
    return classifier.analyze_experiment(config, results, run_dir, parent_run_id, track)


@task(name="finish-experiment", cache_policy=NO_CACHE)
def finish_experiment_task(config: ExperimentConfig, results: list[dict], analysis: dict | None, run_dir: str,
                           parent_run_id: str | None) -> dict:
    """The comparison table: results.json, the parent run's table and metrics, and a Prefect table artifact."""
    from prefect.artifacts import create_table_artifact

    out = classifier.finish_experiment(config, results, analysis, run_dir, parent_run_id)
    create_table_artifact(key="init-experiment", table=out["schemes"],
                          description=f"init experiment {config.name}: accuracy and classified share per scheme")
    return out
