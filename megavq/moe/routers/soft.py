"""Soft MoE routing (Puigcerver et al. 2024): every slot is a softmax mix of the tokens of one sequence.

Legend: B batch, S sequence, T = B*S tokens, D hidden, E experts, P slots per expert, N = E*P slots
(expert-major: slot n belongs to expert n // P).
logits = l2norm(X) . (scale * l2norm(Phi)), Phi: (D, N) normalised over D. Dispatch = softmax over the
tokens of a sequence, combine = softmax over the N slots. The layer (megavq.moe.layer.SoftMoELayer) computes
slots_in = dispatch^T X, runs expert n // P on slot n, and returns combine . y_slots. No aux loss.
Not causal: every slot mixes every token of the sequence. It is its own MoE layer kind (`layer_kind = "slots"`):
`build_moe_layer` builds the Soft MoE layer for it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megavq.errors import ConfigError
from megavq.moe.routers.base import HealthLimits, Router, RouterOutput, load_metrics, load_problem, register


def soft_metrics(combine_BSN: torch.Tensor, num_experts: int) -> dict:
    """load[e] = mean over tokens of the combine mass on expert e's slots; entropy of the combine weights."""
    with torch.no_grad():
        B, S, N = combine_BSN.shape
        load_E = combine_BSN.reshape(B * S, num_experts, N // num_experts).sum(-1).mean(0)
        return load_metrics(load_E, combine_BSN)


@register("soft")
class SoftRouter(Router):
    causal = False
    needs_seq_len = True  # the MoE layer passes seq_len=S
    layer_kind = "slots"  # built as megavq.moe.layer.SoftMoELayer, not the token-routing MoELayer

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, slots_per_expert: int = 1,
                 scale_init: float = 1.0):
        super().__init__(hidden_size, num_experts, top_k)  # top_k is unused: every slot sees every token
        if slots_per_expert < 1:
            raise ConfigError(f"soft: slots_per_expert must be >= 1, got {slots_per_expert}")
        self.slots_per_expert = slots_per_expert
        self.phi = nn.Parameter(torch.randn(hidden_size, num_experts * slots_per_expert) / math.sqrt(hidden_size))
        self.scale = nn.Parameter(torch.tensor([float(scale_init)]))  # (1,): DeepSpeed broadcasts no 0-dim params

    def slot_logits(self, x: torch.Tensor) -> torch.Tensor:
        """l2norm(x) . scale * l2norm(Phi): (..., D) -> (..., N), fp32."""
        phi_DN = self.scale.float() * F.normalize(self.phi.float(), dim=0)
        return F.normalize(x.float(), dim=-1) @ phi_DN

    def dispatch_combine(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dispatch (B, S, N): softmax over S; combine (B, S, N): softmax over N. fp32."""
        logits_BSN = self.slot_logits(x_BSD)
        return logits_BSN.softmax(dim=1), logits_BSN.softmax(dim=-1)

    def forward(self, x_TD: torch.Tensor, seq_len: int | None = None) -> RouterOutput:
        """The token-level view: weights[t, e] = combine mass of expert e's slots in token t's output.

        Diagnostics only (it sums to 1 per token); what the Soft MoE layer computes is in megavq.moe.layer.
        """
        T, D = x_TD.shape
        _, combine_BSN = self.dispatch_combine(x_TD.view(-1, seq_len or T, D))
        weights_TE = combine_BSN.reshape(T, self.num_experts, self.slots_per_expert).sum(-1)
        indices_TE = torch.arange(self.num_experts, device=x_TD.device).expand(T, -1)
        metrics = soft_metrics(combine_BSN, self.num_experts)
        return RouterOutput(weights_TE, indices_TE, weights_TE, weights_TE.new_zeros(()), metrics)

    def combine_metrics(self, combine_BSN: torch.Tensor) -> dict:
        return soft_metrics(combine_BSN, self.num_experts)

    def view(self, x_TD: torch.Tensor) -> tuple[str, torch.Tensor]:
        return "slot logits l2norm(x) . scale * l2norm(Phi), (T, slots)", self.slot_logits(x_TD)

    def health(self, metrics: dict, limits: HealthLimits) -> dict[str, str | None]:
        """The load is the combine mass per expert, which sums to 1 per token."""
        return {"load": load_problem(metrics.get("load"), 1.0, limits.share)}
