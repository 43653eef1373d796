"""The reference dispatcher: a plain loop over experts, each on the tokens routed to it (the oracle).

Legend: T tokens, D hidden, E experts, K slots per token.
"""
from __future__ import annotations

import torch

from megavq.moe.dispatch.base import BankDispatcher, dropless_rows, register_dispatcher
from megavq.moe.experts import Experts, every_expert
from megavq.moe.routers.base import RouterOutput


def reference_moe(x_TD: torch.Tensor, r: RouterOutput, experts: Experts) -> torch.Tensor:
    """y_TD = sum_k w_tk * expert_{i_tk}(x_t) with the plain per-expert formula."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        tok, slot = (r.indices == e).nonzero(as_tuple=True)
        if tok.numel():
            y = experts.expert(e, x_TD[tok]) * r.weights[tok, slot, None].to(x_TD.dtype)
            out_TD = out_TD.index_add(0, tok, y)
    return out_TD


@register_dispatcher("reference")
class ReferenceDispatcher(BankDispatcher):
    def build_experts(self) -> Experts:
        return Experts.for_spec(self.spec)

    def run(self, x_TD, r, experts):
        return reference_moe(x_TD, r, experts)

    row_counts = staticmethod(dropless_rows)

    def all_experts(self, x_TD, experts):
        return every_expert(experts, self.num_experts, x_TD)
