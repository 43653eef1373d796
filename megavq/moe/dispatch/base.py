"""The dispatcher protocol and the registry of dispatchers by name (see megavq.moe.dispatch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from megavq.moe.registry import Registry
from megavq.moe.routers.base import RouterOutput

Route = Callable[[torch.Tensor], RouterOutput]  # x_TD -> the router's output for those tokens
DISPATCHERS = Registry("dispatcher", "moe.backend")


@dataclass(frozen=True)
class RowCounts:
    """The expert rows of one MoE layer on one rank, for the memory estimator (megavq.tools.estimate)."""
    computed: int  # rows the experts compute, padding included
    sent: int  # rows one all-to-all moves (sent, and as many received) under expert parallelism
    capacity_buffer: bool  # rows pass through an (E, C, D) capacity buffer and a weighted combine; else routed
    #                        rows are gathered, computed and scattered back (dropless)
    route_slots: int = 0  # route weights (model dtype, their gradient back in the backward) and int32 expert ids
    #                       that travel beside each sent row of the dispatch


def dropless_rows(moe, tokens: int) -> RowCounts:
    """Every (token, slot) pair computed once: T*k rows."""
    return RowCounts(tokens * moe.top_k, tokens * moe.top_k, False)


class Dispatcher:
    """Base class. Declarations (class attributes) are read by the start-up validation:

    expert_parallel   shards the experts over an expert-parallel group (moe.ep_size > 1)
    zero3             runs under ZeRO-3 (parameters partitioned by DeepSpeed)
    layer_kinds       the router layer kinds it serves ("token"; "slots": Soft MoE)
    biases            supports per-expert biases (model.mlp_bias)
    deepspeed_moe     its experts are a DeepSpeed `MoE` module, which sets up its own expert-parallel groups
                      (and keeps one module per expert)

    and by the tools: `row_counts` (the memory estimator), `canonical_rows` (checkpoints).
    """

    name: ClassVar[str]
    expert_parallel: ClassVar[bool] = False
    zero3: ClassVar[bool] = True
    layer_kinds: ClassVar[tuple[str, ...]] = ("token", "slots")
    biases: ClassVar[bool] = True
    deepspeed_moe: ClassVar[bool] = False

    def __init__(self, spec):
        self.spec = spec
        self.num_experts = spec.moe.num_experts
        self.ep_group = None

    def build_experts(self) -> nn.Module:
        """The expert weights in this dispatcher's layout (this rank's share under expert parallelism)."""
        raise NotImplementedError

    def forward(self, x_BSD: torch.Tensor, route: Route,
                experts: nn.Module) -> tuple[torch.Tensor, RouterOutput, dict]:
        """(y_BSD = sum_k w_tk * expert_{i_tk}(x_t), the router's output, extra metrics) for tokens x_BSD."""
        raise NotImplementedError

    def all_experts(self, x_TD: torch.Tensor, experts: nn.Module) -> torch.Tensor:
        """Every expert of the layer (on every EP rank) on every token of this rank, (E, T, D)."""
        raise NotImplementedError

    def set_ep_group(self, group) -> None:
        """The expert-parallel process group (the engine sets it; new_ep_group outside the engine)."""
        self.ep_group = group

    def expert_parameters(self, experts: nn.Module) -> list[nn.Parameter]:
        """Parameters sharded over the EP group, whose gradients DeepSpeed must reduce over the
        expert-data-parallel group only (empty at ep_size 1, and where DeepSpeed's own MoE marks them)."""
        return []

    def to_canonical(self, experts: nn.Module, prefix: str, sd: dict) -> dict:
        return sd

    @classmethod
    def row_counts(cls, moe, tokens: int) -> RowCounts | None:
        """The rows one layer computes and sends for `tokens` tokens of one micro-batch (settings `moe`); None: not
        declared, and the memory estimator refuses this dispatcher."""
        return None

    def canonical_rows(self, experts: nn.Module, prefix: str) -> dict | None:
        """{local expert tensor name: (canonical name, first row)} when every local expert tensor is a run of rows
        of a canonical one (a tensor of the canonical shape less its first dimension is one row); None: not
        declared (checkpoints then probe from_canonical, megavq.train.layout)."""
        return None

    def from_canonical(self, experts: nn.Module, prefix: str, sd: dict) -> dict:
        return sd


class BankDispatcher(Dispatcher):
    """A dispatcher whose experts are an `Experts` bank: route the tokens, then `run` the routed rows."""

    def forward(self, x_BSD, route, experts):
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        r = route(x_TD)
        return self.run(x_TD, r, experts).view_as(x_BSD), r, {}

    def run(self, x_TD: torch.Tensor, r: RouterOutput, experts: nn.Module) -> torch.Tensor:
        raise NotImplementedError


register_dispatcher = DISPATCHERS.register


def available_dispatchers() -> list[str]:
    return DISPATCHERS.names()


def dispatchers_where(declared) -> list[str]:
    """The dispatchers whose class satisfies `declared(cls)`, in registration order (the preferred first)."""
    return DISPATCHERS.where(declared)


def dispatcher_class(name: str) -> type[Dispatcher]:
    return DISPATCHERS.get(name)


def build_dispatcher(spec) -> Dispatcher:
    return dispatcher_class(spec.moe.backend)(spec)

