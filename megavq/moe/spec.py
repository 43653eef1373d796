"""What one MoE layer is built from: `MoESpec`, made from the run configuration for a block.

Legend: D hidden, H expert hidden, E experts.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from megavq.moe.experts import expert_out_std
from megavq.moe.routers import Router, build_router, router_class


@dataclass
class MoESpec:
    moe: object  # the run's MoEConfig: router, backend, experts, capacity, coefficients, router options
    d_model: int
    d_hidden: int  # H, one expert's hidden size
    mlp: str = "swiglu"  # swiglu | gelu
    bias: bool = False
    init_std: float = 0.02
    out_std: float | None = None  # std of the experts' output projections (default init_std)
    seed: int = 0  # expert e's weights come from a generator seeded by (seed, global id e)
    layer_index: int = 0  # place among the model's MoE layers (schedules and random draws are keyed by it)
    num_moe_layers: int = 1
    max_steps: int = 0  # the run's train.max_steps (0 = unknown): routers with schedules that are fractions of it

    @classmethod
    def for_block(cls, cfg, block: int) -> "MoESpec":
        """The spec of block `block`'s MoE layer in a model built from the run configuration `cfg`."""
        m, moe = cfg.model, cfg.moe
        blocks = moe_blocks(m.n_layers, moe.every)
        return cls(moe, m.d_model, moe.d_expert or m.d_ff, m.mlp, m.mlp_bias, m.init_std,
                   expert_out_std(m.init_std, m.n_layers), seed=cfg.train.seed * 1000 + block,
                   layer_index=blocks.index(block), num_moe_layers=len(blocks), max_steps=cfg.train.max_steps)


def is_moe_layer(i: int, every: int) -> bool:
    """Whether block i's MLP is an MoE layer: zero-based i with (i + 1) % every == 0 (every = 0: none)."""
    return every > 0 and (i + 1) % every == 0


def moe_blocks(n_layers: int, every: int) -> list[int]:
    return [i for i in range(n_layers) if is_moe_layer(i, every)]


def router_options(moe) -> dict:
    """moe.router_options, with moe.aux_loss_coef / moe.z_loss_coef passed to routers that take them."""
    params = inspect.signature(router_class(moe.router).__init__).parameters
    opts = dict(moe.router_options)
    if "balance_coef" in params:
        opts.setdefault("balance_coef", moe.aux_loss_coef)
    if "z_loss_coef" in params:
        opts.setdefault("z_loss_coef", moe.z_loss_coef)
    return opts


def build_layer_router(spec: MoESpec) -> Router:
    moe = spec.moe
    router = build_router(moe.router, hidden_size=spec.d_model, num_experts=moe.num_experts, top_k=moe.top_k,
                          **router_options(moe))
    router.place(spec.layer_index, spec.num_moe_layers, spec.seed, spec.max_steps)
    return router
