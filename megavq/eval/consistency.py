"""Routing consistency between checkpoints: the fraction of tokens whose top-1 expert agrees, per MoE layer.

Each model runs on the same token batches and routes its own hidden states; the top-1 expert of a token is
the one with the largest total routing weight.
"""
from __future__ import annotations

import re
from pathlib import Path

from megavq.convert.load import load_model
from megavq.errors import MegavqError
from megavq.eval.routing import top1_routes
from megavq.eval.stats import agreement
from megavq.store.model_dir import run_checkpoints as published_checkpoints


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a `step_XXXXXXX` checkpoint directory, else None."""
    match = re.fullmatch(r"step_(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "checkpoints").is_dir()


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The model checkpoints of a run directory, oldest first."""
    ckpts = published_checkpoints(run_dir)
    if not ckpts:
        raise MegavqError(f"run directory {run_dir} has no published checkpoints")
    return ckpts


def _agreements(a: dict, b: dict, name_a, name_b) -> list[float]:
    if list(a) != list(b):
        raise MegavqError(f"cannot compare {name_a} and {name_b}: their MoE layers differ ({list(a)} vs {list(b)})")
    return [agreement(a[i], b[i]) for i in a]


def compare_pair(path_a, path_b, batches: list, model_a=None, backend: str = "native") -> dict:
    """Top-1 agreement per MoE layer between two checkpoints."""
    routes_a = top1_routes(model_a or load_model(path_a, backend), batches)
    routes_b = top1_routes(load_model(path_b, backend), batches)
    return {"mode": "pair", "checkpoint": str(path_a), "other": str(path_b), "layers": list(routes_a),
            "top1_agreement": _agreements(routes_a, routes_b, path_a, path_b)}


def compare_run(run_dir, batches: list, backend: str = "native") -> dict:
    """Every checkpoint of a run against the final one and against the previous one."""
    ckpts = run_checkpoints(run_dir)
    routes = [top1_routes(load_model(p, backend), batches) for p in ckpts]
    final = routes[-1]
    return {
        "mode": "run", "run": str(run_dir), "layers": list(final),
        "steps": [checkpoint_step(p) for p in ckpts],
        "with_final": [_agreements(r, final, p, ckpts[-1]) for r, p in zip(routes, ckpts)],
        "with_previous": [None] + [_agreements(r, prev, p, q) for r, prev, p, q
                                   in zip(routes[1:], routes, ckpts[1:], ckpts)],
    }
