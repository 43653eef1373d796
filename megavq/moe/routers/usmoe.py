"""Unified competitive routing (USMoE, Do, Le, Tran 2025).

Legend: T tokens, D hidden, E experts, K experts per token, n groups of G tokens (T = n * G).
w = (1 - r) * softmax(logits) + r * sigmoid(logits) * 2 / E mixes token choice (softmax over experts)
with independent expert scores (sigmoid). Global selection: in each group (one sequence by default) the
n = max(1, floor(budget * G * k)) largest (token, expert) pairs of w are routed (budget = 1: G * k; a fractional
budget f < 1 routes f * k experts per token on average, the paper's cheaper inference), so a token gets 0..E
experts (K = E slots, -1 where unused). Weights are w divided by its sum over all E experts of the token
(`normalize=True`, the default; the selected weights then do not sum to 1 either), or w itself
(`normalize=False`, the official runs: norm_topk_prob off). `selection="token"` is the causal token-choice
special case: top-k per token on w, same weights (whole k only: budget 1).
Balancing (megavq.moe.routers.balance): balance_scope with either selection; the expert bias (added to w for the
selection) with token selection only. w already mixes softmax and sigmoid: the score option does not apply.
"""
from __future__ import annotations

import math

import torch

from megavq.errors import ConfigError
from megavq.moe.routers.balance import Balance
from megavq.moe.routers.base import Router, RouterOutput, linear_gate, register, routing_metrics
from megavq.moe.routers.expert_choice import check_group, coverage_metrics, group_size, slots_from_mask


@register("usmoe")
class USMoERouter(Router):
    causal = False  # the default, global selection; the instance attribute says it for the chosen selection
    needs_seq_len = True  # the MoE layer passes seq_len=S
    balance_options = ("balance_scope", "bias_rate", "bias_centre", "groups", "group_top")
    balance_refusal = "usmoe's scores already mix softmax and sigmoid ((1 - r) softmax + r sigmoid 2 / E)"

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, mix: float = 0.5, selection: str = "global",
                 group: str = "sequence", balance_coef: float = 0.01, normalize: bool = True, budget: float = 1.0,
                 **balance):
        super().__init__(hidden_size, num_experts, top_k)
        if not 0.0 <= mix <= 1.0:
            raise ConfigError(f"usmoe: mix (r) must be in [0, 1], got {mix}")
        if selection not in ("global", "token"):
            raise ConfigError(f"usmoe: selection must be 'global' or 'token', got {selection!r}")
        if not 0.0 < budget <= 1.0 or (budget < 1.0 and selection == "token"):
            raise ConfigError(f"usmoe: budget must be in (0, 1], and 1 with selection='token' (whole k per token), "
                              f"got budget={budget}, selection={selection!r}")
        check_group("usmoe", group)
        per_token = [k for k in ("bias_rate", "group_top") if balance.get(k, 0)]
        if per_token and selection != "token":
            raise ConfigError(f"usmoe: {per_token[0]} applies with selection='token' only (global selection picks "
                              f"(token, expert) pairs, not experts per token)")
        self.balance = Balance("usmoe", num_experts, top_k, **balance)
        self.gate = linear_gate(hidden_size, num_experts)
        self.mix, self.selection, self.group, self.balance_coef = mix, selection, group, balance_coef
        self.normalize, self.budget = normalize, budget
        self.causal = selection == "token"

    @classmethod
    def is_causal(cls, options: dict) -> bool:
        return options.get("selection", "global") == "token"

    def unified_scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = self.gate(x_TD)
        E = self.num_experts
        return (1 - self.mix) * logits_TE.softmax(dim=-1) + self.mix * logits_TE.sigmoid() * 2 / E

    @property
    def experts_per_token(self) -> float:
        return self.top_k * self.budget

    def pairs(self, group_tokens: int) -> int:
        """(token, expert) pairs routed in a group of G tokens: max(1, floor(budget * G * k))."""
        return max(1, math.floor(self.budget * group_tokens * self.top_k + 1e-9))

    def global_choice(self, w_TE: torch.Tensor, seq_len: int | None) -> torch.Tensor:
        """(T, E) bool: the pairs(G) largest (token, expert) pairs of each group."""
        T, E = w_TE.shape
        G = group_size(T, seq_len, self.group)
        w_nM = w_TE.reshape(T // G, G * E)
        picked_nM = w_nM.topk(self.pairs(G), dim=-1).indices
        return torch.zeros_like(w_nM, dtype=torch.bool).scatter_(1, picked_nM, True).view(T, E)

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        w_TE = self.unified_scores(x_TD)
        probs_TE = w_TE / w_TE.sum(-1, keepdim=True)
        gate_TE = probs_TE if self.normalize else w_TE
        if self.selection == "token":
            indices_TK = self.balance.select(w_TE, self.top_k)
            weights_TK = gate_TE.gather(1, indices_TK)
            metrics = routing_metrics(indices_TK, probs_TE)
        else:
            chosen_TE = self.global_choice(w_TE, seq_len)
            weights_TK, indices_TK = slots_from_mask(chosen_TE, gate_TE)
            metrics = routing_metrics(indices_TK, probs_TE)
            metrics.update(coverage_metrics(chosen_TE))
        balance = self.balance.loss(probs_TE, indices_TK, seq_len)
        metrics.update(balance_loss=balance.detach(), **self.balance.metrics())
        return RouterOutput(weights_TK, indices_TK, probs_TE, self.balance_coef * balance, metrics)
