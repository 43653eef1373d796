"""Figures computed from tensors: load balance, entropy, effective rank, agreement, similarity, bits per byte.

Legend: T tokens, D hidden, E experts, K slots per token, N rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def load_stats(load_E: torch.Tensor) -> dict:
    """Coefficient of variation and max/mean of an expert-load vector (fractions of routed slots)."""
    load = load_E.double()
    mean = load.mean().clamp(min=1e-12)
    return {"load_cv": (load.std(unbiased=False) / mean).item(), "load_max_over_mean": (load.max() / mean).item()}


def router_entropy(probs_TE: torch.Tensor) -> float:
    """Mean over tokens of the entropy (nats) of the router's distribution over experts; at most ln E."""
    p = probs_TE.double().clamp(min=1e-12)
    return -(p * p.log()).sum(-1).mean().item()


def bits_per_byte(loss: float, tokens: int, n_bytes: int) -> float:
    """Mean loss per token (nats) -> bits per byte of text: loss * tokens / (bytes * ln 2)."""
    return loss * tokens / (n_bytes * math.log(2))


def effective_rank(x_ND: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of x_ND (Roy and Vetterli 2007), not centred.

    An N x N matrix with equal singular values (identity, orthogonal) has rank N; a rank-1 matrix has 1.
    """
    s = torch.linalg.svdvals(x_ND.double())
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def top1_expert(weights_TK: torch.Tensor, indices_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The expert with the largest total weight per token, (T,) int64; -1 for a token no expert took."""
    valid_TK = indices_TK >= 0
    w_TE = torch.zeros(indices_TK.shape[0], num_experts, dtype=torch.float64, device=indices_TK.device)
    w_TE.scatter_add_(1, indices_TK.clamp(min=0), weights_TK.double() * valid_TK)
    return torch.where(valid_TK.any(-1), w_TE.argmax(-1), -1)


def agreement(a_T: torch.Tensor, b_T: torch.Tensor) -> float:
    """Fraction of tokens on which two top-1 assignments agree."""
    assert a_T.shape == b_T.shape, (a_T.shape, b_T.shape)
    return (a_T == b_T).double().mean().item()


def mean_pairwise_cosine(y_ETD: torch.Tensor) -> float:
    """Mean over tokens and expert pairs i < j of cos(y_i(x_t), y_j(x_t)).

    With unit vectors u_e: sum_{i != j} u_i . u_j = |sum_e u_e|^2 - sum_e |u_e|^2.
    """
    E = y_ETD.shape[0]
    if E < 2:
        return float("nan")
    u_ETD = F.normalize(y_ETD.double(), dim=-1)
    pair_sum_T = u_ETD.sum(0).pow(2).sum(-1) - u_ETD.pow(2).sum((0, 2))
    return (pair_sum_T / (E * (E - 1))).mean().item()
