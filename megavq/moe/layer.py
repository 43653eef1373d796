"""The MoE layer: router + experts + dispatcher, built from one MoESpec.

Legend: B batch, S sequence, T = B*S tokens, D hidden, E experts, K slots per token.
The router decides (RouterOutput), the dispatcher (moe.backend) moves the routed rows to the experts and
back; the experts are weights in the dispatcher's layout. Every layer has the same interface:
`forward(x_BSD) -> (y_BSD, aux_loss, metrics)`. With moe.shared_experts, every token also goes through the
shared experts (one dense MLP of their summed width, beside the dispatcher), scaled by sigmoid(x W_g) with
moe.shared_gate (Qwen2-MoE): y = routed(x) + [sigmoid(x W_g)] * shared(x). What differs between routers and
dispatchers is declared on their classes (megavq.moe.routers.base.Router, megavq.moe.dispatch.base.Dispatcher) and checked by
`megavq.moe.config.check_layer` before anything is built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megavq.errors import check
from megavq.moe.config import check_layer
from megavq.moe.dispatch import build_dispatcher
from megavq.moe.experts import DenseMLP
from megavq.moe.phases import phase
from megavq.moe.routers import RouterOutput, router_class
from megavq.moe.spec import MoESpec, build_layer_router


class MoELayer(nn.Module):
    """Token routing: `forward(x_BSD) -> (y_BSD, aux_loss, metrics)`."""

    def __init__(self, spec: MoESpec):
        super().__init__()
        check_layer(spec.moe, spec.bias)
        self.router = build_layer_router(spec)
        self.dispatcher = build_dispatcher(spec)  # not a module: it holds no tensors
        self.experts = self.dispatcher.build_experts()
        moe, width = spec.moe, spec.moe.shared_experts * (spec.moe.d_shared or spec.d_hidden)
        self.shared_expert = DenseMLP(spec.d_model, width, spec.mlp, spec.bias) if width else None
        self.shared_expert_gate = nn.Linear(spec.d_model, 1, bias=False) if moe.shared_gate else None

    def forward(self, x_BSD: torch.Tensor,
                real_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """real_BS (padded rows): only the real tokens are routed, as one row of N tokens, so pads count in no
        routing statistic, balance loss or capacity; the pads' outputs are 0. A router's per-sequence scope
        (balance_scope=sequence, expert_choice's groups) then spans the micro-batch's real tokens."""
        if real_BS is not None:
            y_1ND, aux, metrics = self(x_BSD[real_BS][None])
            return torch.zeros_like(x_BSD).masked_scatter(real_BS[..., None], y_1ND), aux, metrics
        with phase("moe"):
            y_BSD, r, extra = self.dispatcher.forward(x_BSD, self.router_fn(x_BSD.shape[1]), self.experts)
        return self.add_shared(x_BSD, y_BSD), r.aux_loss, {**r.metrics, **extra}

    def add_shared(self, x_BSD: torch.Tensor, y_BSD: torch.Tensor) -> torch.Tensor:
        """y_BSD plus the shared experts' output on x_BSD (gated), where the layer has shared experts."""
        if self.shared_expert is None:
            return y_BSD
        shared_BSD = self.shared_expert(x_BSD)
        if self.shared_expert_gate is not None:
            shared_BSD = torch.sigmoid(self.shared_expert_gate(x_BSD)) * shared_BSD
        return y_BSD + shared_BSD

    def router_fn(self, seq_len: int):
        """x_TD -> RouterOutput, the router called with what it declares it needs."""
        def route(x_TD: torch.Tensor) -> RouterOutput:
            with phase("router"):
                return self.router.route(x_TD, seq_len, lambda: self.all_experts(x_TD))
        return route

    def route(self, x_BSD: torch.Tensor) -> RouterOutput:
        """The routing of x_BSD as forward computes it (for diagnostics)."""
        return self.router_fn(x_BSD.shape[1])(x_BSD.reshape(-1, x_BSD.shape[-1]))

    def all_experts(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert of the layer (on every EP rank) on every token, (E, T, D)."""
        return self.dispatcher.all_experts(x_TD, self.experts)

    # ---- distributed set-up and the canonical layout (see megavq.moe.dispatch) --------------------------
    def set_ep_group(self, group) -> None:
        self.dispatcher.set_ep_group(group)

    def expert_parameters(self) -> list[nn.Parameter]:
        return self.dispatcher.expert_parameters(self.experts)

    def to_canonical(self, prefix: str, sd: dict) -> dict:
        return self.dispatcher.to_canonical(self.experts, f"{prefix}experts.", sd)

    def from_canonical(self, prefix: str, sd: dict) -> dict:
        return self.dispatcher.from_canonical(self.experts, f"{prefix}experts.", sd)

    def canonical_rows(self, prefix: str) -> dict | None:
        return self.dispatcher.canonical_rows(self.experts, f"{prefix}experts.")


class SoftMoELayer(MoELayer):
    """Soft MoE (Puigcerver et al. 2024): experts run on soft slots, mixes of a sequence's tokens.

    Legend: N = E*P slots per sequence, M = B*N slots in the batch. Slot n of every sequence is one row routed
    to expert n // P with weight 1, run by the dispatcher like routed tokens.
    """

    def slot_routing(self, batch: int, device) -> RouterOutput:
        """Each slot row goes to its expert with weight 1."""
        E, P = self.router.num_experts, self.router.slots_per_expert
        expert_M = (torch.arange(E * P, device=device) // P).repeat(batch)
        weights_M1 = torch.ones(expert_M.shape[0], 1, device=device)
        return RouterOutput(weights_M1, expert_M[:, None], F.one_hot(expert_M, E).float(),
                            weights_M1.new_zeros(()), {})

    def forward(self, x_BSD: torch.Tensor,
                real_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        check(real_BS is None, "moe.router=soft mixes every token of a row into its slots: padded rows "
                               "(fine-tuning) are not supported")
        with phase("moe"):
            y_BSD, aux, metrics = self._forward(x_BSD)
        return self.add_shared(x_BSD, y_BSD), aux, metrics

    def _forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        B = x_BSD.shape[0]
        with phase("router"):
            dispatch_BSN, combine_BSN = self.router.dispatch_combine(x_BSD)
        with phase("dispatch"):
            slots_BND = (dispatch_BSN.transpose(1, 2) @ x_BSD.float()).to(x_BSD.dtype)
        routing = self.slot_routing(B, x_BSD.device)
        y_BND, _, _ = self.dispatcher.forward(slots_BND, lambda x: routing, self.experts)
        with phase("combine"):
            y_BSD = combine_BSN @ y_BND.float()
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        return y_BSD.to(x_BSD.dtype), aux, self.router.combine_metrics(combine_BSN)


LAYER_KINDS = {"token": MoELayer, "slots": SoftMoELayer}


def build_moe_layer(spec: MoESpec) -> MoELayer:
    """The MoE layer of the kind its router declares."""
    return LAYER_KINDS[router_class(spec.moe.router).layer_kind](spec)
