"""Tools over the whole stack: the memory estimator (estimate.py) and its check against real engines
(estimate_check.py), the throughput benchmark (bench.py), router comparisons (compare.py)."""
