"""The native dispatcher: dropless, pure PyTorch. Routed (token, slot) rows are sorted by expert and each
expert runs one matrix product on its contiguous rows; with moe.ep_size > 1 the experts are sharded over an
expert-parallel group and each token moves by all-to-all at most once to each rank that holds one of its experts
(expert_parallel.py `run_routed`).

Legend: T tokens, D hidden, E experts, L = E / ep_size local experts, K slots per token, N routed rows.
State dict: this rank's experts as `experts.*` of shape (L, ...): the canonical layout at ep_size 1;
`to_canonical` gathers them to (E, ...) over the EP group, `from_canonical` takes this rank's rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megavq.errors import ConfigError
from megavq.moe.dispatch.base import BankDispatcher, RowCounts, dropless_rows, register_dispatcher
from megavq.moe.dispatch.expert_parallel import ShardedExperts, ep_rank_of, expected_ranks, gather_experts
from megavq.moe.experts import Experts, every_expert, grouped_products
from megavq.moe.phases import phase
from megavq.moe.routers.base import RouterOutput, expert_counts, expert_keys


def expert_order(indices_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat slots sorted by expert with unused slots (-1) last, slots per expert (E,)), on the device."""
    order = torch.argsort(expert_keys(indices_TK, num_experts), stable=True)
    return order, expert_counts(indices_TK, num_experts)


def sort_by_expert(indices_TK: torch.Tensor, num_experts: int):
    """Flatten the routed (token, slot) pairs and sort them by expert; unused slots (-1) sort last and are dropped.

    Returns (token_N, flat_slot_N, counts_E) with N routed pairs in expert order; counts_E is a list, the one
    host read of the layer (the loop over experts splits by it).
    """
    order, counts = expert_order(indices_TK, num_experts)
    counts_E = counts.tolist()
    flat_slot = order[:sum(counts_E)]
    return flat_slot // indices_TK.shape[1], flat_slot, counts_E


def combine(x_TD: torch.Tensor, r: RouterOutput, token_N: torch.Tensor, slot_N: torch.Tensor,
            y_ND: torch.Tensor) -> torch.Tensor:
    """y_TD = sum over a token's rows of its route weight times the expert output."""
    with phase("combine"):
        y_ND = y_ND * r.weights.reshape(-1)[slot_N, None].to(y_ND.dtype)
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND)


def grouped_moe(x_TD: torch.Tensor, r: RouterOutput, experts: Experts) -> torch.Tensor:
    """native_moe without a host read: every (token, slot) pair is kept, unused slots (-1) sorted last, and the
    experts run grouped products on device chunk ends (Experts.grouped zeroes the rows past them)."""
    with phase("dispatch"):
        slot_N, counts_E = expert_order(r.indices, experts.num_experts)
        token_N = slot_N // r.indices.shape[1]
        x_ND = x_TD[token_N]
    return combine(x_TD, r, token_N, slot_N, experts.grouped(x_ND, counts_E.cumsum(0)))


def native_moe(x_TD: torch.Tensor, r: RouterOutput, bank) -> torch.Tensor:
    """y_TD = sum_k w_tk * expert_{i_tk}(x_t); `bank(x_ND, counts_E)` runs its `num_experts` experts on rows
    sorted by expert (an Experts module)."""
    with phase("dispatch"):
        token_N, slot_N, counts_E = sort_by_expert(r.indices, bank.num_experts)
        x_ND = x_TD[token_N]
    return combine(x_TD, r, token_N, slot_N, bank(x_ND, counts_E))


@register_dispatcher("native")
class NativeDispatcher(BankDispatcher):
    expert_parallel = True

    def __init__(self, spec):
        super().__init__(spec)
        self.ep_size = spec.moe.ep_size
        self.local = self.num_experts // self.ep_size
        self.first_expert = ep_rank_of(self.ep_size) * self.local

    def build_experts(self) -> Experts:
        return Experts.for_spec(self.spec, self.local, self.first_expert)

    def bank(self, experts: Experts):
        """The experts of every rank as one callable on rows sorted by global expert."""
        if self.ep_size == 1:
            return experts
        if self.ep_group is None:
            raise ConfigError("an expert-parallel layer has no EP group: build the DeepSpeed engine "
                              "(megavq.train.engine.build_engine) or call model.set_ep_group(new_ep_group(ep_size))")
        return ShardedExperts(experts, self.num_experts, self.ep_size, self.ep_group)

    def run(self, x_TD, r, experts):
        if self.ep_size > 1:
            return self.bank(experts).routed(x_TD, r.weights, r.indices)
        if grouped_products(x_TD, experts):
            return grouped_moe(x_TD, r, experts)
        return native_moe(x_TD, r, experts)

    def all_experts(self, x_TD, experts):
        return every_expert(self.bank(experts), self.num_experts, x_TD)

    def set_ep_group(self, group) -> None:
        assert dist.get_world_size(group) == self.ep_size, (dist.get_world_size(group), self.ep_size)
        self.ep_group = group

    def expert_parameters(self, experts):
        return list(experts.parameters()) if self.ep_size > 1 else []

    def to_canonical(self, experts, prefix, sd):
        """Gather every rank's experts (collective over the EP group)."""
        for name, _ in experts.named_parameters():
            if self.ep_size > 1 and prefix + name in sd:
                sd[prefix + name] = gather_experts(sd[prefix + name], self.ep_group)
        return sd

    @classmethod
    def row_counts(cls, moe, tokens: int) -> RowCounts:
        """T*k rows computed; under expert parallelism one row sent per (token, rank holding one of its experts),
        with the k route weights and expert ids beside it (expected_ranks; the groups of group-limited routing)."""
        rows = dropless_rows(moe, tokens)
        if moe.ep_size == 1:
            return rows
        groups = [moe.router_options.get(k, 0) for k in ("groups", "group_top")]
        sent = expected_ranks(moe.num_experts, moe.top_k, moe.ep_size, *groups)
        return RowCounts(rows.computed, round(tokens * sent), False, route_slots=moe.top_k)

    def canonical_rows(self, experts, prefix):
        """This rank's experts are rows [first_expert, first_expert + local) of every canonical tensor."""
        return {prefix + name: (prefix + name, self.first_expert) for name, _ in experts.named_parameters()}

    def from_canonical(self, experts, prefix, sd):
        for name, _ in experts.named_parameters():
            key = prefix + name
            if key in sd and sd[key].shape[0] == self.num_experts and self.ep_size > 1:
                sd[key] = sd[key][self.first_expert:self.first_expert + self.local]
        return sd
