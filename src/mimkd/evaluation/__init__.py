"""Evaluation: accuracy, FLOPs and parameter counts."""

from .accuracy import evaluate, topk_correct
from .flops import count_flops, count_parameters

__all__ = ["evaluate", "topk_correct", "count_flops", "count_parameters"]
