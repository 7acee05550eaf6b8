"""Prefect flows: wiring only. The logic lives in ``dwk``; each task wraps one ``dwk`` function."""
from flows.analyze import analyze_flow
from flows.extract import extract_flow
from flows.pipeline import pipeline_flow
from flows.train import train_flow
from flows.train_classifier import train_classifier_flow

__all__ = ["analyze_flow", "extract_flow", "pipeline_flow", "train_classifier_flow", "train_flow"]
