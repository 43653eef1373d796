"""DeepSpeed-MoE (`deepspeed.moe.layer.MoE`) driven by any megavq router through a gate adapter.

Legend: B batch, S sequence, T = B*S tokens, D hidden, H expert hidden, E experts, L local experts,
K slots per token, C capacity (rows per expert in the dispatch buffer).

The layer keeps DeepSpeed's `MoE` class (the engine finds MoE layers by isinstance) and replaces its gate by
`RouterGate`, which runs the megavq router and turns its RouterOutput into DeepSpeed's gate contract:
  - 0.19.4 and later (sparse routes): `gate(x, used_token, True, use_tutel)` ->
    (l_aux, C, E, indices[K,T] int32 (-1 = dropped), locations[K,T] int32 < C, gates[K,T] fp32, exp_counts[E]);
  - older releases (dense): `gate(x, used_token)` -> (l_aux, combine[T,E,C], dispatch_mask[T,E,C], exp_counts).
Capacity: C = max(min_capacity, ceil(capacity_factor * T * top_k / E)) (eval_capacity_factor in eval mode),
DeepSpeed's own formula; with moe.drop_tokens=false, C = the largest expert load over the EP group (dropless).
Routes beyond C are dropped (weight 0, the others keep their router weights) in the order of
moe.drop_policy: `position` (first slots first, then token order: DeepSpeed's top-2 gate) or `probs`
(highest router score of the pair first: DeepSpeed's top-k gate). The fraction dropped is the metric `dropped_frac`.

The router is a child of this layer, not of the gate: DeepSpeed's MoE checkpointing treats every state-dict
key containing "expert" under the MoE module as an expert weight (router keys are kept free of it, a
contract test checks that, but the router's state stays out of DeepSpeed's expert bookkeeping either way). Experts are `ExpertMLP`s in `Experts`' per-expert layout,
re-initialised by global expert id, so they equal the native backend's for the same seed.
Canonical layout (`to_canonical` / `from_canonical`): `router.*` and `experts.*` stacked as (E, ...).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megavq.errors import ConfigError
from megavq.config import MoEConfig
from megavq.moe.backends.expert_parallel import ShardedExperts, ep_rank_of, gather_experts
from megavq.moe.experts import Experts, expert_mlp
from megavq.moe.layer import layer_router, router_kwargs
from megavq.moe.routers import RouterOutput

DS_EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts"  # where DeepSpeed keeps the local experts


def require_deepspeed():
    try:
        from deepspeed.moe.layer import MoE
    except ImportError as e:
        raise ConfigError(f"moe.backend=deepspeed needs DeepSpeed (pip install deepspeed): {e}") from None
    return MoE


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
    expert_M = torch.where(indices_TK >= 0, indices_TK, num_experts).t().reshape(-1)  # (K*T,) slot-major
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

    The layer sets `context` (router keyword arguments) before each forward; after it, `last` holds the
    RouterOutput and `dropped_frac` the fraction of routes beyond capacity.
    """

    def __init__(self, router: nn.Module, cfg: MoEConfig):
        super().__init__()
        self._router = (router,)  # a tuple: not registered here (see the module docstring)
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor, self.eval_capacity_factor = cfg.capacity_factor, cfg.eval_capacity_factor
        self.min_capacity, self.drop_tokens = cfg.min_capacity, cfg.drop_tokens
        self.drop_policy = cfg.drop_policy
        self.ep_group, self.context, self.last, self.dropped_frac = None, {}, None, None

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
        r = self._router[0](x_TD, **self.context)
        indices_TK = r.indices if used_token is None else torch.where(used_token[:, None] > 0, r.indices, -1)
        counts_E = torch.bincount(indices_TK[indices_TK >= 0], minlength=self.num_experts)
        C = self.capacity(x_TD.shape[0], counts_E)
        indices_TK, locations_TK = self.drop_over_capacity(indices_TK, r.scores, C)
        gates_TK = torch.where(indices_TK >= 0, r.weights.float(), 0.0)
        self.last = r
        if sparse_routes:
            return (r.aux_loss, C, self.num_experts, indices_TK.t().int().contiguous(),
                    locations_TK.t().int().contiguous(), gates_TK.t().contiguous(), counts_E)
        combine = dense_combine(indices_TK, locations_TK, gates_TK, self.num_experts, C)
        return r.aux_loss, combine, combine.bool(), counts_E


class DeepSpeedMoELayer(nn.Module):
    """MoE layer on DeepSpeed-MoE (moe.backend=deepspeed): `forward(x_BSD) -> (y_BSD, aux_loss, metrics)`."""

    def __init__(self, cfg: MoEConfig, d_model: int, d_hidden: int, mlp: str = "swiglu", bias: bool = False,
                 init_std: float = 0.02, out_std: float | None = None, seed: int = 0):
        super().__init__()
        MoE = require_deepspeed()  # the class itself: the engine finds MoE layers by isinstance
        self.num_experts, self.ep_size = cfg.num_experts, cfg.ep_size
        self.ep_rank = ep_rank_of(cfg.ep_size)
        self.router = layer_router(cfg, d_model)
        with torch.random.fork_rng(devices=[]):  # its TopKGate draws weights: keep the native RNG stream
            self.moe = MoE(hidden_size=d_model, expert=ExpertMLP(d_model, d_hidden, mlp, bias),
                           num_experts=cfg.num_experts, ep_size=cfg.ep_size, k=cfg.top_k,
                           capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                           min_capacity=cfg.min_capacity, drop_tokens=cfg.drop_tokens, use_rts=False)
        self.moe.deepspeed_moe.gate = RouterGate(self.router, cfg)
        self.first_expert = self.ep_rank * self.moe.num_local_experts
        self.reset_experts(d_model, d_hidden, mlp, bias, init_std, out_std, seed)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    @property
    def experts(self) -> nn.ModuleList:  # an MoE layer has `router` and `experts` (see assign_moe_layers)
        return self.local_experts

    @torch.no_grad()
    def reset_experts(self, d_model, d_hidden, mlp, bias, init_std, out_std, seed) -> None:
        """Each local expert as the native backend's expert of the same global id (DeepSpeed deep-copies one)."""
        ref = Experts(len(self.local_experts), d_model, d_hidden, mlp, bias, init_std, out_std, seed,
                      self.first_expert)
        for i, expert in enumerate(self.local_experts):
            for name, p in expert.named_parameters():
                p.copy_(getattr(ref, name)[i])

    def run_local(self, x_ND: torch.Tensor, counts_L: list[int]) -> torch.Tensor:
        """This rank's experts on rows sorted by local expert."""
        outs = [expert(x) for expert, x in zip(self.local_experts, torch.split(x_ND, counts_L)) if x.shape[0]]
        return torch.cat(outs) if outs else x_ND[:0]

    def all_experts(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Every expert of every EP rank on every token of this rank, (E, T, D): the competition step."""
        bank = ShardedExperts(self.run_local, self.num_experts, self.ep_size, self.moe.deepspeed_moe.ep_group)
        return bank.all_experts(x_TD)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        gate = self.moe.deepspeed_moe.gate
        gate.context = router_kwargs(self.router, x_BSD, lambda: self.all_experts(x_TD))
        y_BSD, _, _ = self.moe(x_BSD)
        r: RouterOutput = gate.last
        gate.context, gate.last = {}, None
        return y_BSD, r.aux_loss, {**r.metrics, "dropped_frac": gate.dropped_frac}

    # ---- canonical (native, ep_size 1) layout ---------------------------------------------------------
    def _local_names(self) -> list[str]:
        return [name for name, _ in self.local_experts[0].named_parameters()]

    def to_canonical(self, prefix: str, sd: dict) -> dict:
        """Stack the local experts and gather them over the EP group (collective: call on every rank)."""
        for name in self._local_names():
            keys = [f"{prefix}{DS_EXPERTS}.{i}.{name}" for i in range(len(self.local_experts))]
            if keys[0] not in sd:
                continue
            stacked = torch.stack([sd.pop(k) for k in keys])
            if self.ep_size > 1:
                stacked = gather_experts(stacked, self.moe.deepspeed_moe.ep_group)
            sd[f"{prefix}experts.{name}"] = stacked
        return sd

    def from_canonical(self, prefix: str, sd: dict) -> dict:
        for name in self._local_names():
            key = f"{prefix}experts.{name}"
            if key not in sd:
                continue
            full = sd.pop(key)
            for i in range(len(self.local_experts)):
                sd[f"{prefix}{DS_EXPERTS}.{i}.{name}"] = full[self.first_expert + i]
        return sd
