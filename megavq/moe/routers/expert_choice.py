"""Expert-choice routing (Zhou et al. 2022): each expert picks its top tokens.

Legend: T tokens, D hidden, E experts, n groups of G tokens (T = n * G), C tokens per expert (capacity).
p = softmax(x W^T) over experts; in each group, expert e takes the C = ceil(G * c / E) tokens with the
largest p[:, e] (at most G), weight p[t, e]. A token gets 0..E experts: the output has K = E slots, slot e
holding expert e when it chose the token, else index -1 and weight 0. No balance loss is needed.
Not causal: a token's routing depends on the other tokens of its group, later ones included.
"""
from __future__ import annotations

import math

import torch

from megavq.errors import ConfigError
from megavq.moe.routers.base import Router, RouterOutput, linear_gate, register, routing_metrics


def group_size(num_tokens: int, seq_len: int | None, group: str) -> int:
    """Tokens per routing group: one sequence (when its length is known) or the whole batch."""
    if group == "batch" or seq_len is None:
        return num_tokens
    assert num_tokens % seq_len == 0, f"{num_tokens} tokens are not whole sequences of {seq_len}"
    return seq_len


def check_group(router: str, group: str) -> None:
    if group not in ("sequence", "batch"):
        raise ConfigError(f"{router}: group must be 'sequence' or 'batch', got {group!r}")


def slots_from_mask(chosen_TE: torch.Tensor, probs_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K = E slots: slot e holds expert e (weight p[t, e]) where chosen, else -1 (weight 0)."""
    experts_TE = torch.arange(chosen_TE.shape[1], device=chosen_TE.device).expand_as(chosen_TE)
    indices_TE = torch.where(chosen_TE, experts_TE, -1)
    weights_TE = torch.where(chosen_TE, probs_TE, 0.0)
    return weights_TE, indices_TE


def coverage_metrics(chosen_TE: torch.Tensor) -> dict:
    """How many experts each token got: mean, and the fraction of tokens no expert took."""
    n_T = chosen_TE.sum(-1).float()
    return {"experts_per_token": n_T.mean(), "unrouted_tokens": (n_T == 0).float().mean()}


@register("expert_choice")
class ExpertChoiceRouter(Router):
    causal = False
    needs_seq_len = True  # the MoE layer passes seq_len=S

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, capacity_factor: float = 2.0,
                 group: str = "batch"):
        super().__init__(hidden_size, num_experts, top_k)
        if capacity_factor <= 0:
            raise ConfigError(f"expert_choice: capacity_factor must be > 0, got {capacity_factor}")
        check_group("expert_choice", group)
        self.gate = linear_gate(hidden_size, num_experts)
        self.capacity_factor, self.group = capacity_factor, group

    def capacity(self, group_tokens: int) -> int:
        return min(group_tokens, math.ceil(group_tokens * self.capacity_factor / self.num_experts))

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        probs_TE = self.gate(x_TD).softmax(dim=-1)
        G = group_size(T, seq_len, self.group)
        probs_nGE = probs_TE.view(T // G, G, E)
        picked_nCE = probs_nGE.topk(self.capacity(G), dim=1).indices  # each expert's tokens
        chosen_TE = torch.zeros_like(probs_nGE, dtype=torch.bool).scatter_(1, picked_nCE, True).view(T, E)
        weights_TE, indices_TE = slots_from_mask(chosen_TE, probs_TE)
        metrics = routing_metrics(indices_TE, probs_TE)
        metrics.update(coverage_metrics(chosen_TE))
        return RouterOutput(weights_TE, indices_TE, probs_TE, probs_TE.new_zeros(()), metrics)
