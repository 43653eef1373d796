"""The router contract and the registry of routers by name.

Legend: T tokens, D hidden size, E experts, K slots per token.
A router maps x_TD to a RouterOutput. Slots a router does not use carry index -1 and weight 0.
All routing math runs in fp32 whatever the model dtype.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megavq.errors import ConfigError

_REGISTRY: dict[str, type["Router"]] = {}


class RouterOutput(NamedTuple):
    """What a router returns. A NamedTuple, so that DeepSpeed's ZeRO-3 hooks see the tensors inside it
    (and re-gather the router's parameters for the backward pass)."""
    weights: torch.Tensor  # (T, K) fp32, >= 0
    indices: torch.Tensor  # (T, K) int64 in [0, E), or -1 for an unused slot
    scores: torch.Tensor  # (T, E) probability-like, for balance statistics
    aux_loss: torch.Tensor  # scalar, coefficients applied
    metrics: dict  # detached tensors for logging


class Router(nn.Module):
    """Base class. Subclasses set `causal` and implement `forward(x_TD) -> RouterOutput`.

    A router whose decision needs every expert's output on a token (competition routing) sets
    `needs_expert_outputs = True`; the MoE layer then calls `forward(x_TD, expert_fn=f)` where
    `f()` returns the outputs of all experts on all tokens, shape (E, T, D), when the router asks.
    """

    causal: bool = True
    needs_expert_outputs: bool = False

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k


class FP32Linear(nn.Linear):
    """A linear map computed in fp32 whatever the parameters' dtype: routing math runs in fp32.

    Routers call it as a module (never read its weight directly), so that ZeRO-3 gathers the weight for
    the forward and the backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def register(name: str):
    def wrap(cls):
        assert name not in _REGISTRY, f"router {name} registered twice"
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def available_routers() -> list[str]:
    return sorted(_REGISTRY)


def router_class(name: str) -> type[Router]:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown router '{name}' (valid: {available_routers()})")
    return _REGISTRY[name]


def build_router(name: str, hidden_size: int, num_experts: int, top_k: int, **options) -> Router:
    cls = router_class(name)
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        valid = [p for p in params if p not in ("self", "hidden_size", "num_experts", "top_k")]
        raise ConfigError(f"router '{name}' has no option {unknown[0]!r} (valid: {valid})")
    return cls(hidden_size=hidden_size, num_experts=num_experts, top_k=top_k, **options)


def load_balance_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """Switch balance loss E * sum_e f_e * P_e; f_e over routed (token, slot) pairs, P_e mean probability."""
    E = probs_TE.shape[-1]
    valid = indices_TK >= 0
    counts_E = torch.zeros(E, device=probs_TE.device).index_add_(
        0, indices_TK[valid], torch.ones_like(indices_TK[valid], dtype=torch.float32))
    f_E = counts_E / valid.sum().clamp(min=1)
    return E * (f_E * probs_TE.float().mean(0)).sum()


def load_metrics(load_E: torch.Tensor, probs: torch.Tensor) -> dict:
    """Expert load (fractions summing to 1), its coefficient of variation and max/mean, and the entropy of the
    routing distribution `probs` (..., E or slots), averaged over tokens. No gradient."""
    with torch.no_grad():
        p = probs.float().clamp(min=1e-12)
        return {
            "load": load_E,
            "load_cv": load_E.std(unbiased=False) / load_E.mean().clamp(min=1e-12),
            "load_max": load_E.max() * load_E.numel(),
            "entropy": -(p * p.log()).sum(-1).mean(),
        }


def routing_metrics(indices_TK: torch.Tensor, probs_TE: torch.Tensor) -> dict:
    """load_metrics with the load counted over routed (token, slot) pairs."""
    with torch.no_grad():
        valid = indices_TK >= 0
        counts_E = torch.bincount(indices_TK[valid], minlength=probs_TE.shape[-1]).float()
        return load_metrics(counts_E / counts_E.sum().clamp(min=1), probs_TE)
