"""Expert-parallel communication: the experts of a layer sharded over an expert-parallel (EP) group, dropless.

Legend: T tokens, D hidden, E experts (global), L = E / ep local experts, N routed rows, R ranks of the EP
group (R = ep_size).
Rank r of an EP group holds experts [r*L, (r+1)*L) (`Experts(L, ..., first_expert=r*L)`, initialised by
global id, so the weights equal the ep_size=1 model's). A forward sorts the routed (token, slot) rows by
expert, sends each row to the rank of its expert with a variable-size `all_to_all_single`, runs the local
experts, and sends the outputs back the same way (the backward is the reverse exchange). The competition
step (every expert on every token) is the same exchange with every token routed to every expert.

Group layout (DeepSpeed's E + D layout, so its gradient reduction and ours agree): EP groups are runs of
consecutive ranks [i*R, (i+1)*R); a rank's EP rank is rank % R; its expert-data-parallel group holds the
ranks with the same EP rank. Under the DeepSpeed engine (`megavq.train.engine`) the groups come from
`deepspeed.utils.groups` and expert gradients are reduced over the expert-data-parallel group only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megavq.errors import ConfigError
from megavq.moe.phases import phase


def ep_rank_of(ep_size: int) -> int:
    """This process's rank in its EP group (rank % ep_size); 0 for ep_size 1."""
    if ep_size == 1:
        return 0
    if not dist.is_initialized():
        raise ConfigError(f"moe.ep_size={ep_size} needs torch.distributed (launch with deepspeed or torchrun)")
    world = dist.get_world_size()
    if world % ep_size:
        raise ConfigError(f"moe.ep_size={ep_size} must divide the number of ranks, got {world}")
    return dist.get_rank() % ep_size


def new_ep_group(ep_size: int):
    """The EP process group of this rank, made with torch.distributed (for use outside the DeepSpeed engine).

    Every rank must call it (new_group is collective)."""
    world, mine = dist.get_world_size(), None
    for start in range(0, world, ep_size):
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= dist.get_rank() < start + ep_size:
            mine = group
    return mine


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable row splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(grad_out.contiguous(), recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    with phase("comm"):
        return _AllToAll.apply(x_ND, send_splits, recv_splits, group)


def exchange_counts(counts_E: torch.Tensor, ep_size: int, group) -> torch.Tensor:
    """(E,) rows this rank sends per global expert -> (R, L) rows it receives per (source rank, local expert)."""
    recv = torch.empty_like(counts_E)
    with phase("comm"):
        dist.all_to_all_single(recv, counts_E.contiguous(), group=group)
    return recv.view(ep_size, -1)


def source_to_expert_order(recv_RL: torch.Tensor) -> torch.Tensor:
    """Row permutation from (source rank, local expert) blocks to (local expert, source rank) blocks."""
    R, L = recv_RL.shape
    starts_RL = (recv_RL.reshape(-1).cumsum(0) - recv_RL.reshape(-1)).view(R, L)
    starts, counts = starts_RL.t().reshape(-1), recv_RL.t().reshape(-1)  # blocks in (L, R) order
    block = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    offset = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return starts[block] + offset


def run_sharded(x_ND: torch.Tensor, counts_E: list[int], local_fn, ep_size: int, group) -> torch.Tensor:
    """Rows sorted by global expert (counts_E[e] rows for expert e) -> the experts' outputs, in the same order.

    `local_fn(x, counts_L)` runs this rank's L experts on rows sorted by local expert.
    """
    counts = torch.tensor(counts_E, dtype=torch.long, device=x_ND.device)  # NCCL exchanges device tensors
    recv_RL = exchange_counts(counts, ep_size, group).cpu()
    send_splits = counts.view(ep_size, -1).sum(1).tolist()
    recv_splits = recv_RL.sum(1).tolist()
    x_recv = all_to_all(x_ND, send_splits, recv_splits, group)  # (source rank, local expert) order
    perm = source_to_expert_order(recv_RL).to(x_ND.device)
    y_sorted = local_fn(x_recv[perm], recv_RL.sum(0).tolist())
    if x_recv.requires_grad and not y_sorted.requires_grad:  # no rows here: keep the backward exchange in step
        y_sorted = y_sorted + x_recv.sum() * 0
    y_recv = torch.empty_like(y_sorted).index_copy(0, perm, y_sorted)  # back to (source, expert) order
    return all_to_all(y_recv, recv_splits, send_splits, group)


def gather_experts(local_L: torch.Tensor, group) -> torch.Tensor:
    """(L, ...) local expert tensors of every EP rank -> (E, ...) in global expert order (no gradient)."""
    parts = [torch.empty_like(local_L) for _ in range(dist.get_world_size(group))]
    with phase("comm"):
        dist.all_gather(parts, local_L.contiguous(), group=group)
    return torch.cat(parts)


class ShardedExperts:
    """The global bank of E experts as seen from one rank: Experts' call interface (`__call__(x_ND, counts_E)`
    on rows sorted by global expert) with the rows exchanged over the EP group. Not a module: the layer owns
    the local experts; `local_fn(x, counts_L)` runs them on rows sorted by local expert."""

    def __init__(self, local_fn, num_experts: int, ep_size: int, group):
        self.local_fn, self.num_experts, self.ep_size, self.group = local_fn, num_experts, ep_size, group

    def __call__(self, x_ND: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        if self.ep_size == 1:
            return self.local_fn(x_ND, counts_E)
        return run_sharded(x_ND, counts_E, self.local_fn, self.ep_size, self.group)
