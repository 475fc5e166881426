"""Retrieval suite: RULER-style tasks at exact lengths, scored by exact match, through each method's real cache."""
from kvpack.evaluate.retrieval.report import heatmap, pivot, table
from kvpack.evaluate.retrieval.run import run_retrieval, run_retrieval_eval
from kvpack.evaluate.retrieval.score import exact_match, wilson
from kvpack.evaluate.retrieval.tasks import TASKS, Trial, make_trial

__all__ = ["TASKS", "Trial", "make_trial", "exact_match", "wilson", "run_retrieval", "run_retrieval_eval",
           "table", "pivot", "heatmap"]
