"""Evaluation: perplexity and bits per byte, routing diagnostics, robustness, consistency, health, plots.

`evaluate(path, ...)` computes everything for one checkpoint and `write_report(result, out_dir)` writes
eval.json, eval.md and the figures (see docs/evaluation.md). `CollapseMonitor` is the trainer's routing health
check. Importing this package does not import matplotlib (megavq.eval.plots does).
"""
from megavq.train.health import CollapseMonitor
from megavq.eval.report import evaluate, write_report

__all__ = ["CollapseMonitor", "evaluate", "write_report"]
