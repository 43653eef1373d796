"""What one MoE layer is built from: `MoESpec`, made from a model's settings for a block.

Legend: D hidden, H expert hidden, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

from megavq.moe.config import MoEConfig, router_options
from megavq.moe.experts import expert_out_std
from megavq.moe.routers import Router, build_router


@dataclass
class MoESpec:
    moe: MoEConfig  # router, backend, experts, capacity, coefficients, router options
    d_model: int
    d_hidden: int  # H, one expert's hidden size
    mlp: str = "swiglu"  # swiglu | gelu
    bias: bool = False
    init_std: float = 0.02
    out_std: float | None = None  # std of the experts' output projections (default init_std)
    seed: int = 0  # expert e's weights come from a generator seeded by (seed, global id e)
    layer_index: int = 0  # place among the model's MoE layers (schedules and random draws are keyed by it)
    num_moe_layers: int = 1

    @classmethod
    def for_block(cls, model, moe: MoEConfig, block: int) -> "MoESpec":
        """The spec of block `block`'s MoE layer in a model of settings `model` (a ModelConfig) and `moe`."""
        blocks = moe_blocks(model.n_layers, moe.every, moe.dense_layers)
        return cls(moe, model.d_model, moe.d_expert or model.d_ff, model.mlp, model.mlp_bias, model.init_std,
                   expert_out_std(model.init_std, model.n_layers), seed=block_seed(model.init_seed, block),
                   layer_index=blocks.index(block), num_moe_layers=len(blocks))


def block_seed(seed: int, block: int) -> int:
    """The seed of block `block`'s MoE layer (its experts' initialisation, its router's draws) from a model seed."""
    return seed * 1000 + block


def is_moe_layer(i: int, every: int, dense: list[int] = ()) -> bool:
    """Whether block i's MLP is an MoE layer: zero-based i with (i + 1) % every == 0 (every = 0: none) and i not
    among the blocks kept dense (moe.dense_layers; Qwen2-MoE's mlp_only_layers with its decoder_sparse_step)."""
    return every > 0 and (i + 1) % every == 0 and i not in dense


def moe_blocks(n_layers: int, every: int, dense: list[int] = ()) -> list[int]:
    """The blocks whose MLP is an MoE layer, in order."""
    return [i for i in range(n_layers) if is_moe_layer(i, every, dense)]


def build_layer_router(spec: MoESpec) -> Router:
    moe = spec.moe
    router = build_router(moe.router, hidden_size=spec.d_model, num_experts=moe.num_experts, top_k=moe.top_k,
                          **router_options(moe))
    router.place(spec.layer_index, spec.num_moe_layers, spec.seed)  # a run's trainer places it again with its length
    return router
