"""Token-choice softmax top-k routing (GShard / Switch / Mixtral): the baseline.

Legend: T tokens, D hidden, E experts, K experts per token.
"""
from __future__ import annotations

import torch
from torch import nn

from megavq.moe.routers.base import FP32Linear, Router, RouterOutput, load_balance_loss, register, routing_metrics


@register("topk")
class TopKRouter(Router):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool | None = None,
                 balance_coef: float = 0.01, z_loss_coef: float = 1e-3, jitter: float = 0.0):
        super().__init__(hidden_size, num_experts, top_k)
        self.gate = FP32Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.normalize = top_k > 1 if normalize is None else normalize
        self.balance_coef, self.z_loss_coef, self.jitter = balance_coef, z_loss_coef, jitter

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.jitter, 1 + self.jitter)
        logits_TE = self.gate(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, indices_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        balance = load_balance_loss(probs_TE, indices_TK)
        z_loss = logits_TE.logsumexp(-1).pow(2).mean()
        aux = self.balance_coef * balance + self.z_loss_coef * z_loss
        metrics = routing_metrics(indices_TK, probs_TE)
        metrics.update(balance_loss=balance.detach(), z_loss=z_loss.detach())
        return RouterOutput(weights_TK, indices_TK, probs_TE, aux, metrics)
