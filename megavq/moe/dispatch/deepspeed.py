"""DeepSpeed-MoE (`deepspeed.moe.layer.MoE`) driven by any megavq router through a gate adapter.

Legend: B batch, S sequence, T = B*S tokens, D hidden, H expert hidden, E experts, L local experts,
K slots per token, C capacity (rows per expert in the dispatch buffer).

The layer's experts are DeepSpeed's `MoE` module itself (the engine finds MoE layers by isinstance), with its
gate replaced by `RouterGate`, which runs the megavq router and turns its RouterOutput into DeepSpeed's gate
contract:
  - 0.19.4 and later (sparse routes): `gate(x, used_token, True, use_tutel)` ->
    (l_aux, C, E, indices[K,T] int32 (-1 = dropped), locations[K,T] int32 < C, gates[K,T] fp32, exp_counts[E]);
  - older releases (dense): `gate(x, used_token)` -> (l_aux, combine[T,E,C], dispatch_mask[T,E,C], exp_counts).
Capacity: C = max(min_capacity, ceil(capacity_factor * T * top_k / E)) (eval_capacity_factor in eval mode),
DeepSpeed's own formula; with moe.drop_tokens=false, C = the largest expert load over the EP group (dropless).
Routes beyond C are dropped (weight 0, the others keep their router weights) in the order of
moe.drop_policy: `position` (first slots first, then token order: DeepSpeed's top-2 gate) or `probs`
(highest router score of the pair first: DeepSpeed's top-k gate). The fraction dropped is the metric `dropped_frac`.

The router is the MoE layer's child, not the gate's: DeepSpeed's MoE checkpointing treats every state-dict key
containing "expert" under the MoE module as an expert weight, and the router's state stays out of that
bookkeeping. Experts are `ExpertMLP`s in `Experts`' per-expert layout, re-initialised by global expert id, so
they equal the native dispatcher's for the same seed. Canonical layout (`to_canonical` / `from_canonical`):
the local experts stacked as (E, ...), gathered over the EP group. DeepSpeed internals are reached through
megavq.compat.deepspeed.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megavq.compat import deepspeed as ds_compat
from megavq.errors import ConfigError
from megavq.moe.dispatch.base import Dispatcher, RowCounts, register_dispatcher
from megavq.moe.dispatch.expert_parallel import ShardedExperts, ep_rank_of, gather_experts
from megavq.moe.experts import Experts, every_expert, expert_mlp
from megavq.moe.routers.base import expert_counts, expert_keys


class ExpertMLP(nn.Module):
    """One expert in `Experts`' per-expert layout: w_in (1|2, D, H), w_out (H, D), optional b_in, b_out."""

    def __init__(self, d_model: int, d_hidden: int, mlp: str = "swiglu", bias: bool = False):
        super().__init__()
        self.mlp, n_in = mlp, (2 if mlp == "swiglu" else 1)
        self.w_in = nn.Parameter(torch.zeros(n_in, d_model, d_hidden))
        self.w_out = nn.Parameter(torch.zeros(d_hidden, d_model))
        self.b_in = nn.Parameter(torch.zeros(n_in, d_hidden)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        y = expert_mlp(x.reshape(-1, x.shape[-1]), self.w_in, self.w_out, self.b_in, self.b_out, self.mlp)
        return y.view_as(x)


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """DeepSpeed's capacity: rows per expert for num_tokens tokens with top_k experts each."""
    return max(min_capacity, math.ceil(factor * num_tokens * top_k / num_experts))


def route_locations(indices_TK: torch.Tensor, priority_TK: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """(T, K) place of each route in its expert's queue (0 = first kept); -1 for unused slots.

    priority_TK None: slot-major position order (all first slots, then all second slots, ...; token order
    within a slot). Otherwise the highest priority first (ties in position order).
    """
    T, K = indices_TK.shape
    expert_M = expert_keys(indices_TK.t(), num_experts)  # (K*T,) slot-major
    order_M = torch.arange(K * T, device=indices_TK.device)
    if priority_TK is not None:
        order_M = torch.argsort(-priority_TK.detach().float().t().reshape(-1), stable=True)
    order_M = order_M[torch.argsort(expert_M[order_M], stable=True)]  # by expert, then by priority
    counts = torch.bincount(expert_M, minlength=num_experts + 1)
    starts = counts.cumsum(0) - counts
    rank_M = torch.empty_like(expert_M)
    rank_M[order_M] = torch.arange(K * T, device=indices_TK.device) - starts[expert_M[order_M]]
    return torch.where(indices_TK >= 0, rank_M.view(K, T).t(), -1)


def dense_combine(indices_TK, locations_TK, gates_TK, num_experts: int, C: int) -> torch.Tensor:
    """combine[T, E, C] of the pre-0.19.4 gate contract (kept routes only)."""
    T = indices_TK.shape[0]
    combine = gates_TK.new_zeros(T, num_experts, C)
    t, k = (indices_TK >= 0).nonzero(as_tuple=True)
    return combine.index_put((t, indices_TK[t, k], locations_TK[t, k]), gates_TK[t, k], accumulate=True)


class RouterGate(nn.Module):
    """A DeepSpeed MoE gate that runs a megavq router; no parameters or buffers of its own.

    The dispatcher sets `route` (x_TD -> RouterOutput) before each forward; after it, `last` holds the
    RouterOutput and `dropped_frac` the fraction of routes beyond capacity.
    """

    def __init__(self, moe):
        super().__init__()
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.capacity_factor, self.eval_capacity_factor = moe.capacity_factor, moe.eval_capacity_factor
        self.min_capacity, self.drop_tokens = moe.min_capacity, moe.drop_tokens
        self.drop_policy = moe.drop_policy
        self.ep_group, self.route, self.last, self.dropped_frac = None, None, None, None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def capacity(self, num_tokens: int, counts_E: torch.Tensor) -> int:
        if not self.drop_tokens:
            C = counts_E.max().clone()
            if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
                dist.all_reduce(C, op=dist.ReduceOp.MAX, group=self.ep_group)
            return max(int(C), 1)
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        return capacity(num_tokens, self.num_experts, self.top_k, factor, self.min_capacity)

    def drop_over_capacity(self, indices_TK: torch.Tensor, scores_TE: torch.Tensor, C: int):
        """(indices with -1 for routes beyond capacity, their locations (0 where dropped)); sets dropped_frac."""
        valid = indices_TK >= 0
        priority_TK = scores_TE.gather(1, indices_TK.clamp(min=0)) if self.drop_policy == "probs" else None
        locations_TK = route_locations(indices_TK, priority_TK, self.num_experts)
        kept = valid & (locations_TK < C)
        self.dropped_frac = ((valid & ~kept).sum() / valid.sum().clamp(min=1)).float().detach()
        return torch.where(kept, indices_TK, -1), torch.where(kept, locations_TK, 0)

    def forward(self, x_TD: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        if use_tutel:
            raise ConfigError("moe.backend=deepspeed: the megavq gate does not run with Tutel (use_tutel=False)")
        r = self.route(x_TD)
        indices_TK = r.indices if used_token is None else torch.where(used_token[:, None] > 0, r.indices, -1)
        counts_E = expert_counts(indices_TK, self.num_experts)
        C = self.capacity(x_TD.shape[0], counts_E)
        indices_TK, locations_TK = self.drop_over_capacity(indices_TK, r.scores, C)
        gates_TK = torch.where(indices_TK >= 0, r.weights.float(), 0.0)
        self.last = r
        if sparse_routes:
            return (r.aux_loss, C, self.num_experts, indices_TK.t().int().contiguous(),
                    locations_TK.t().int().contiguous(), gates_TK.t().contiguous(), counts_E)
        combine = dense_combine(indices_TK, locations_TK, gates_TK, self.num_experts, C)
        return r.aux_loss, combine, combine.bool(), counts_E


@register_dispatcher("deepspeed")
class DeepSpeedDispatcher(Dispatcher):
    """moe.backend=deepspeed: capacity-bounded experts of DeepSpeed-MoE, expert parallel over its own groups."""

    expert_parallel = True
    zero3 = False  # DeepSpeed refuses its MoE layer under ZeRO-3
    layer_kinds = ("token",)
    deepspeed_moe = True

    @classmethod
    def row_counts(cls, moe, tokens: int) -> RowCounts:
        """E * C capacity rows (padding included), computed and exchanged, at the training capacity factor."""
        rows = moe.num_experts * capacity(tokens, moe.num_experts, moe.top_k, moe.capacity_factor, moe.min_capacity)
        return RowCounts(rows, rows, True)

    def __init__(self, spec):
        super().__init__(spec)
        self.ep_size = spec.moe.ep_size
        self.first_expert = ep_rank_of(self.ep_size) * (self.num_experts // self.ep_size)

    def build_experts(self) -> nn.Module:
        s, moe = self.spec, self.spec.moe
        MoE = ds_compat.moe_class()
        with torch.random.fork_rng(devices=[]):  # its TopKGate draws weights: keep the native RNG stream
            experts = MoE(hidden_size=s.d_model, expert=ExpertMLP(s.d_model, s.d_hidden, s.mlp, s.bias),
                          num_experts=moe.num_experts, ep_size=moe.ep_size, k=moe.top_k,
                          capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
                          min_capacity=moe.min_capacity, drop_tokens=moe.drop_tokens, use_rts=False)
        ds_compat.set_moe_gate(experts, RouterGate(moe))
        self.reset_experts(experts)
        return experts

    @torch.no_grad()
    def reset_experts(self, experts: nn.Module) -> None:
        """Each local expert as the native dispatcher's expert of the same global id (DeepSpeed deep-copies one)."""
        local = ds_compat.moe_local_experts(experts)
        ref = Experts.for_spec(self.spec, len(local), self.first_expert)
        for i, expert in enumerate(local):
            for name, p in expert.named_parameters():
                p.copy_(getattr(ref, name)[i])

    def forward(self, x_BSD, route, experts):
        gate = ds_compat.moe_gate(experts)
        gate.route = route
        y_BSD, _, _ = experts(x_BSD)
        r, dropped = gate.last, gate.dropped_frac
        gate.route, gate.last = None, None
        return y_BSD, r, {"dropped_frac": dropped}

    def all_experts(self, x_TD, experts):
        """Every expert of every EP rank on every token of this rank, (E, T, D): the competition step."""
        local = ds_compat.moe_local_experts(experts)

        def run_local(x_ND, counts_L):
            outs = [expert(x) for expert, x in zip(local, torch.split(x_ND, counts_L)) if x.shape[0]]
            return torch.cat(outs) if outs else x_ND[:0]
        bank = ShardedExperts(run_local, self.num_experts, self.ep_size, ds_compat.moe_ep_group(experts))
        return every_expert(bank, self.num_experts, x_TD)

    # ---- canonical (native, ep_size 1) layout ---------------------------------------------------------
    def to_canonical(self, experts, prefix, sd):
        """Stack the local experts and gather them over the EP group (collective: call on every rank)."""
        local = ds_compat.moe_local_experts(experts)
        for name, _ in local[0].named_parameters():
            keys = [f"{prefix}{ds_compat.MOE_LOCAL_EXPERTS}.{i}.{name}" for i in range(len(local))]
            if keys[0] not in sd:
                continue
            stacked = torch.stack([sd.pop(k) for k in keys])
            if self.ep_size > 1:
                stacked = gather_experts(stacked, ds_compat.moe_ep_group(experts))
            sd[prefix + name] = stacked
        return sd

    def canonical_rows(self, experts, prefix):
        """Local expert i is row first_expert + i of every canonical tensor."""
        local = ds_compat.moe_local_experts(experts)
        return {f"{prefix}{ds_compat.MOE_LOCAL_EXPERTS}.{i}.{name}": (prefix + name, self.first_expert + i)
                for i, expert in enumerate(local) for name, _ in expert.named_parameters()}

    def from_canonical(self, experts, prefix, sd):
        local = ds_compat.moe_local_experts(experts)
        for name, _ in local[0].named_parameters():
            if prefix + name not in sd:
                continue
            full = sd.pop(prefix + name)
            for i in range(len(local)):
                sd[f"{prefix}{ds_compat.MOE_LOCAL_EXPERTS}.{i}.{name}"] = full[self.first_expert + i]
        return sd
