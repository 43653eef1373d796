"""Expert-parallel communication: the experts of a layer sharded over an expert-parallel (EP) group, dropless.

Legend: T tokens, D hidden, E experts (global), L = E / ep local experts, K slots per token, N rows sent (one per
(token, destination rank)), P (row, slot) pairs a rank computes, R ranks of the EP group (R = ep_size).
Rank r of an EP group holds experts [r*L, (r+1)*L) (`Experts(L, ..., first_expert=r*L)`, initialised by
global id, so the weights equal the ep_size=1 model's). A routed forward (`run_routed`) sends each token at most
once to each rank that holds one of its experts, with a variable-size `all_to_all_single`: the row carries the
token's hidden state and the route weights of its slots there (K extra columns, so their gradient comes back
through the backward exchange), and beside it the slots' local expert ids (K int32, no gradient). The receiving
rank fans the row out to its slots, runs the local experts, sums the weighted outputs per row and sends one row
back per (token, rank). The competition step (every expert on every token, `run_sharded`) sends one row per
(token, expert) and returns the unweighted outputs. `TRAFFIC` counts what the row exchanges send to other ranks.

Group layout (DeepSpeed's E + D layout, so its gradient reduction and ours agree): EP groups are runs of
consecutive ranks [i*R, (i+1)*R); a rank's EP rank is rank % R; its expert-data-parallel group holds the
ranks with the same EP rank. Under the DeepSpeed engine (`megavq.train.engine`) the groups come from
`deepspeed.utils.groups` and expert gradients are reduced over the expert-data-parallel group only.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

from megavq.errors import ConfigError
from megavq.moe.phases import phase
from megavq.moe.routers.base import expert_counts


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


class Traffic:
    """What this process passed to all_to_all_single for the other ranks of its EP group (its own rows excluded),
    summed over the row exchanges (dispatch, combine, their backward; not the counts) since `reset()`: the
    measured all-to-all volume."""

    def __init__(self):
        self.rows, self.bytes = 0, 0

    def reset(self) -> None:
        self.rows, self.bytes = 0, 0

    def add(self, x_N: torch.Tensor, send_splits: list[int], group, hidden: bool) -> None:
        """Count rows x_N split by send_splits; `hidden`: rows of hidden states (else route data beside them)."""
        off_rank = sum(send_splits) - send_splits[dist.get_rank(group)]
        self.bytes += off_rank * math.prod(x_N.shape[1:]) * x_N.element_size()
        self.rows += off_rank if hidden else 0


TRAFFIC = Traffic()


def exchange(x_N: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
             hidden: bool = True) -> torch.Tensor:
    """all_to_all_single of rows with variable splits (no autograd), counted in TRAFFIC."""
    TRAFFIC.add(x_N, send_splits, group, hidden)
    out = x_N.new_empty((sum(recv_splits), *x_N.shape[1:]))
    dist.all_to_all_single(out, x_N.contiguous(), recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable row splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return exchange(x_ND, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(grad_out.contiguous(), recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    with phase("comm"):
        return _AllToAll.apply(x_ND, send_splits, recv_splits, group)


def exchange_counts(counts_E: torch.Tensor, ep_size: int, group) -> torch.Tensor:
    """(R*C,) counts this rank sends, C per destination rank (rows per global expert: C = L) -> (R, C) the counts
    it receives, per source rank."""
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


def run_routed(x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor, local_fn, num_experts: int,
               ep_size: int, group) -> torch.Tensor:
    """y_TD = sum_k w_tk * expert_{i_tk}(x_t) with the experts sharded over the EP group, each token sent at most once
    to each rank (unused slots, -1, are skipped). One host read per layer: the row and slot counts this rank sends
    and receives, read together after their exchange."""
    T, L = x_TD.shape[0], num_experts // ep_size
    with phase("dispatch"):
        rank_TK = torch.where(indices_TK >= 0, indices_TK // L, ep_size)  # unused slots: a column dropped below
        on_RT = torch.zeros(T, ep_size + 1, dtype=torch.bool, device=x_TD.device).scatter_(1, rank_TK, True)
        on_RT = on_RT[:, :ep_size].t()
        # to each rank: rows, then slots per local expert there
        send_RC = torch.cat([on_RT.sum(1, keepdim=True), expert_counts(indices_TK, num_experts).view(ep_size, L)], 1)
    recv_RC = exchange_counts(send_RC.reshape(-1), ep_size, group)
    send_RC, recv_RC = torch.stack([send_RC, recv_RC]).cpu()  # the host read
    send_splits, recv_splits = send_RC[:, 0].tolist(), recv_RC[:, 0].tolist()
    with phase("dispatch"):
        row_N = torch.argsort((~on_RT).reshape(-1).to(torch.uint8), stable=True)[:sum(send_splits)]  # by rank
        dest_N, token_N = row_N // T, row_N % T
        here_NK = rank_TK[token_N] == dest_N[:, None]
        w_NK = torch.where(here_NK, weights_TK[token_N], 0).to(x_TD.dtype)
        local_NK = torch.where(here_NK, indices_TK[token_N] - dest_N[:, None] * L, -1).to(torch.int32)
        x_ND = torch.cat([x_TD[token_N], w_NK], 1)  # the route weights travel as K extra columns
    x_recv = all_to_all(x_ND, send_splits, recv_splits, group)
    with phase("comm"):
        local_recv = exchange(local_NK, send_splits, recv_splits, group, hidden=False)
    y_recv = fan_out(x_recv, local_recv, recv_RC[:, 1:].sum(0).tolist(), local_fn)
    y_ND = all_to_all(y_recv, recv_splits, send_splits, group)
    with phase("combine"):
        return torch.zeros_like(x_TD).index_add(0, token_N, y_ND)


def fan_out(x_recv: torch.Tensor, local_NK: torch.Tensor, counts_L: list[int], local_fn) -> torch.Tensor:
    """Received rows (D hidden columns, then the K route weights) -> per row, the sum over its slots here (local
    expert ids local_NK, -1: a slot elsewhere) of route weight times expert output, (N, D)."""
    N, K = local_NK.shape
    D = x_recv.shape[1] - K
    with phase("dispatch"):
        keys = torch.where(local_NK >= 0, local_NK, len(counts_L)).reshape(-1)
        pair_P = torch.argsort(keys, stable=True)[:sum(counts_L)]  # (row, slot) pairs by local expert
        row_P = pair_P // K
    y_PD = local_fn(x_recv[row_P, :D], counts_L)
    with phase("combine"):
        y_PD = y_PD * x_recv[:, D:].reshape(-1)[pair_P, None]
        y_ND = x_recv.new_zeros(N, D).index_add(0, row_P, y_PD)
    if x_recv.requires_grad and not y_ND.requires_grad:  # no rows here: keep the backward exchange in step
        y_ND = y_ND + x_recv.sum() * 0
    return y_ND


def expected_ranks(num_experts: int, top_k: int, ep_size: int, groups: int = 0, group_top: int = 0) -> float:
    """The expected number of EP ranks a token is sent to (run_routed: once per rank holding one of its experts)
    when its top_k experts are spread uniformly over the E experts, or over the experts of group_top of the
    `groups` groups (each set of group_top groups alike) under group-limited routing."""
    G, M = (groups, group_top) if group_top else (1, 1)
    L, size = num_experts // ep_size, num_experts // G
    total = 0.0
    for r in range(ep_size):  # the experts group g shares with rank r, for the groups that share any
        overlaps = [max(0, min((g + 1) * size, (r + 1) * L) - max(g * size, r * L)) for g in range(G)]
        shared = tuple(sorted(o for o in overlaps if o))
        total += _rank_hit(shared, G - len(shared), M, M * size, top_k)
    return total


@functools.cache
def _rank_hit(shared: tuple[int, ...], others: int, M: int, n: int, K: int) -> float:
    """P(a rank holds one of K experts drawn from the n experts of M groups, the M drawn from the groups that
    share `shared` experts with the rank and `others` that share none)."""
    ways = {(0, 0): 1}  # (groups drawn among the sharing ones, experts of the rank among them): number of ways
    for o in shared:
        for (m, l), c in list(ways.items()):
            ways[m + 1, l + o] = ways.get((m + 1, l + o), 0) + c
    hit = sum(c * math.comb(others, M - m) * (1 - math.comb(n - l, K) / math.comb(n, K))
              for (m, l), c in ways.items() if m <= M)
    return hit / math.comb(len(shared) + others, M)


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

    def routed(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
        """The weighted sum of each token's experts (run_routed: each token sent at most once to each rank)."""
        return run_routed(x_TD, weights_TK, indices_TK, self.local_fn, self.num_experts, self.ep_size, self.group)
