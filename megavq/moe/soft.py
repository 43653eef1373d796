"""The Soft MoE layer (Puigcerver et al. 2024): experts run on soft slots, mixes of a sequence's tokens.

Legend: B batch, S sequence, D hidden, E experts, P slots per expert, N = E*P slots per sequence,
M = B*N slots in the batch.
Same interface as MoELayer: `forward(x_BSD) -> (y_BSD, aux_loss, metrics)`; the experts run on the slots
through the token backends (slot n of every sequence is one row routed to expert n // P with weight 1),
so the reference and native backends serve it too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megavq.errors import ConfigError
from megavq.config import MoEConfig
from megavq.moe.backends import token_backend
from megavq.moe.experts import Experts
from megavq.moe.layer import layer_router
from megavq.moe.routers import RouterOutput
from megavq.moe.routers.soft import soft_metrics


class SoftMoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, d_hidden: int, mlp: str = "swiglu", bias: bool = False,
                 init_std: float = 0.02, out_std: float | None = None, seed: int = 0):
        super().__init__()
        if cfg.ep_size != 1:
            raise ConfigError(f"moe.router=soft runs with moe.ep_size=1, got {cfg.ep_size}")
        self.router = layer_router(cfg, d_model)
        assert getattr(self.router, "layer_kind", "token") == "soft", cfg.router
        self.experts = Experts(cfg.num_experts, d_model, d_hidden, mlp, bias, init_std, out_std, seed)
        self.backend = cfg.backend
        self.run_experts = token_backend(cfg.backend)

    def slot_routing(self, batch: int, device) -> RouterOutput:
        """Each slot row goes to its expert with weight 1."""
        E, P = self.experts.num_experts, self.router.slots_per_expert
        expert_M = (torch.arange(E * P, device=device) // P).repeat(batch)
        weights_M1 = torch.ones(expert_M.shape[0], 1, device=device)
        return RouterOutput(weights_M1, expert_M[:, None], F.one_hot(expert_M, E).float(),
                            weights_M1.new_zeros(()), {})

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        B, S, D = x_BSD.shape
        dispatch_BSN, combine_BSN = self.router.dispatch_combine(x_BSD)
        slots_BND = (dispatch_BSN.transpose(1, 2) @ x_BSD.float()).to(x_BSD.dtype)
        N = slots_BND.shape[1]
        y_MD = self.run_experts(slots_BND.reshape(B * N, D), self.slot_routing(B, x_BSD.device), self.experts)
        y_BSD = combine_BSN @ y_MD.view(B, N, D).float()
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        return y_BSD.to(x_BSD.dtype), aux, soft_metrics(combine_BSN, self.experts.num_experts)
