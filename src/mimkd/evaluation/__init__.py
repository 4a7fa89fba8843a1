"""Evaluation: accuracy, FLOPs, parameter counts and single-input CPU latency."""

from .accuracy import evaluate, topk_correct
from .flops import count_flops, count_parameters
from .latency import latency_profile, measure_latency

__all__ = [
    "evaluate",
    "topk_correct",
    "count_flops",
    "count_parameters",
    "latency_profile",
    "measure_latency",
]
