"""Expert backends by name. Each takes (x_TD, RouterOutput, Experts) and returns y_TD = sum_k w_tk * expert_{i_tk}(x_t).

`reference` is a plain loop over experts (the oracle); `native` is dropless: slots sorted by expert,
one matrix product per expert (with moe.ep_size > 1 the experts are sharded over ranks:
`expert_parallel.py`). The DeepSpeed and MegaBlocks backends replace the expert layer itself
(`deepspeed.py`, `megablocks.py`) and are built by `megavq.moe.layer.build_moe_layer`.
"""
from __future__ import annotations

import torch

from megavq.errors import ConfigError
from megavq.moe.routers.base import RouterOutput


def reference_moe(x_TD: torch.Tensor, r: RouterOutput, experts) -> torch.Tensor:
    out_TD = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        tok, slot = (r.indices == e).nonzero(as_tuple=True)
        if tok.numel():
            y = experts.expert(e, x_TD[tok]) * r.weights[tok, slot, None].to(x_TD.dtype)
            out_TD = out_TD.index_add(0, tok, y)
    return out_TD


def sort_by_expert(indices_TK: torch.Tensor, num_experts: int):
    """Flatten the routed (token, slot) pairs and sort them by expert; unused slots (-1) are dropped.

    Returns (token_N, flat_slot_N, counts_E) with N routed pairs in expert order.
    """
    flat_e = indices_TK.reshape(-1)
    flat_slot = (flat_e >= 0).nonzero().squeeze(-1)
    order = torch.argsort(flat_e[flat_slot], stable=True)
    flat_slot = flat_slot[order]
    counts_E = torch.bincount(flat_e[flat_slot], minlength=num_experts)
    return flat_slot // indices_TK.shape[1], flat_slot, counts_E


def native_moe(x_TD: torch.Tensor, r: RouterOutput, experts) -> torch.Tensor:
    token_N, slot_N, counts_E = sort_by_expert(r.indices, experts.num_experts)
    y_ND = experts(x_TD[token_N], counts_E.tolist())
    y_ND = y_ND * r.weights.reshape(-1)[slot_N, None].to(y_ND.dtype)
    return torch.zeros_like(x_TD).index_add(0, token_N, y_ND)


_BACKENDS = {"reference": reference_moe, "native": native_moe}
LAYER_BACKENDS = ("deepspeed", "megablocks")  # backends that are their own MoE layer


def available_backends() -> list[str]:
    return sorted([*_BACKENDS, *LAYER_BACKENDS])


def token_backend(name: str):
    """The function for a token-routing backend that works on an Experts bank (reference, native)."""
    if name not in _BACKENDS:
        raise ConfigError(f"moe.backend={name} is an MoE layer of its own, not a function on an Experts bank "
                          f"(token backends: {sorted(_BACKENDS)})")
    return _BACKENDS[name]
