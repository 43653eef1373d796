"""Profiler ranges around the phases of an MoE layer's forward: `megavq.moe` (the whole layer), `megavq.router`,
`megavq.dispatch` (rows sorted and gathered by expert), `megavq.experts` (the experts' products), `megavq.combine`
(weighted outputs scattered back), `megavq.comm` (expert-parallel exchanges). Any profiler sees them
(torch.profiler, Nsight through NVTX); the benchmark (megavq.tools.bench) reads them. A range costs about a
microsecond when no profiler runs. Ranges of one name never nest, so their times add up.
"""
from __future__ import annotations

import torch

PHASES = ("router", "dispatch", "experts", "combine", "comm")
PREFIX = "megavq."


def phase(name: str) -> torch.profiler.record_function:
    """The profiler range of phase `name` (one of PHASES, or "moe"): `with phase("experts"): ...`."""
    return torch.profiler.record_function(PREFIX + name)
