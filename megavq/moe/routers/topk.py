"""Token-choice top-k routing (GShard / Switch / Mixtral): the baseline; with the balancing options
(megavq.moe.routers.balance) also DeepSeek-V3's sigmoid scores with an expert bias.

Legend: T tokens, D hidden, E experts, K experts per token.
Optional multiplicative jitter on the router input while training (1 +- jitter, uniform), drawn from the
router's keyed generator so that a recomputed forward draws the same noise.
"""
from __future__ import annotations

import torch

from megavq.moe.routers.balance import Balance
from megavq.moe.routers.base import BALANCE_OPTIONS, Router, RouterOutput, linear_gate, register, routing_metrics, z_loss


@register("topk")
class TopKRouter(Router):
    hf_import = True
    needs_seq_len = True  # for balance_scope=sequence
    balance_options = tuple(BALANCE_OPTIONS)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool | None = None,
                 balance_coef: float = 0.01, z_loss_coef: float = 1e-3, jitter: float = 0.0, **balance):
        super().__init__(hidden_size, num_experts, top_k)
        self.gate = linear_gate(hidden_size, num_experts)
        self.normalize = top_k > 1 if normalize is None else normalize
        self.balance_coef, self.z_loss_coef, self.jitter = balance_coef, z_loss_coef, jitter
        self.balance = Balance("topk", num_experts, top_k, **balance)

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            noise_TD = torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter,
                                                       generator=self.generator(x_TD.device))
            x_TD = x_TD * noise_TD
        logits_TE = self.gate(x_TD)
        s_TE = self.balance.scores(logits_TE)
        indices_TK = self.balance.select(s_TE, self.top_k)
        weights_TK = self.balance.weights(s_TE, indices_TK, self.normalize)
        probs_TE = self.balance.probs(s_TE)
        balance, z = self.balance.loss(probs_TE, indices_TK, seq_len), z_loss(logits_TE)
        aux = self.balance_coef * balance + self.z_loss_coef * z
        metrics = routing_metrics(indices_TK, probs_TE)
        metrics.update(balance_loss=balance.detach(), z_loss=z.detach(), **self.balance.metrics())
        return RouterOutput(weights_TK, indices_TK, probs_TE, aux, metrics)

    def hf_routing(self) -> dict | None:
        """None (exported with its own modelling code) with a bias or sigmoid scores."""
        if self.balance.custom:
            return None
        return {"normalize": bool(self.normalize), "jitter": float(self.jitter)}
