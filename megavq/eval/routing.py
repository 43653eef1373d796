"""Routing diagnostics on the inputs of the MoE layers: stability under noise, effective rank of the tokens
and of the router's view of them, similarity of the experts' outputs, and top-1 assignments.

Legend: B batch, S sequence, T = B*S tokens, D hidden, E experts, K slots per token.
The input of an MoE layer is its block's `mlp_norm` output; it is recorded with a forward pre-hook.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from megavq.eval.stats import effective_rank, mean_pairwise_cosine, top1_expert
from megavq.moe.routers import RouterOutput

COSINE_TOKENS = 512  # tokens on which every expert runs for the output similarity (E x T x D activations)


def moe_layers(model) -> list[tuple[int, torch.nn.Module]]:
    """(block index, MoE layer) for every MoE block, in order."""
    return [(i, block.mlp) for i, block in enumerate(model.blocks) if block.is_moe]


@contextmanager
def capture_inputs(model):
    """{block index: [x_BSD of each forward]} filled while the context is open."""
    inputs = {i: [] for i, _ in moe_layers(model)}
    hooks = [layer.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach()))
             for i, layer in moe_layers(model)]
    try:
        yield inputs
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def layer_inputs(model, batches: list) -> dict[int, list[torch.Tensor]]:
    """The input x_BSD of every MoE layer for each batch."""
    with capture_inputs(model) as inputs:
        for x_BS, _ in batches:
            model(x_BS)
    return inputs


@torch.no_grad()
def route(layer, x_BSD: torch.Tensor) -> RouterOutput:
    """The layer's routing of x_BSD, with the router called as the MoE layer calls it."""
    return layer.route(x_BSD)


def top1_of(layer, xs_BSD: list[torch.Tensor]) -> torch.Tensor:
    """Top-1 expert (largest total weight) of every token of the batches, (T,)."""
    E = layer.router.num_experts
    return torch.cat([top1_expert(r.weights, r.indices, E) for r in (route(layer, x) for x in xs_BSD)])


@torch.no_grad()
def top1_routes(model, batches: list) -> dict[int, torch.Tensor]:
    """{block index: top-1 expert per token} of the model on the batches (each layer sees its own inputs)."""
    inputs = layer_inputs(model, batches)
    return {i: top1_of(layer, inputs[i]) for i, layer in moe_layers(model)}


# ---- the router's view of the tokens: the (T, R) scores it ranks experts (or codes, or slots) by -------------

def router_view(layer, x_BSD: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(what it is, (T, R) matrix): the scores the router ranks its choices by (its declared view, else the
    probability-like scores of its output)."""
    view = layer.router.view(x_BSD.reshape(-1, x_BSD.shape[-1]).float())
    return view or ("scores (the router's probability-like output), (T, E)", route(layer, x_BSD).scores.float())


# ---- per-layer diagnostics ----------------------------------------------------------------------------------

def add_noise(x_BSD: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """x + noise * rms(x_t) * N(0, I) per token: Gaussian noise relative to each token's scale."""
    rms_BS1 = x_BSD.float().pow(2).mean(-1, keepdim=True).sqrt()
    eps_BSD = torch.randn(x_BSD.shape, generator=generator).to(x_BSD.device)
    return (x_BSD.float() + noise * rms_BS1 * eps_BSD).to(x_BSD.dtype)


def routing_stability(layer, xs_BSD: list, noise: float, seed: int) -> float:
    """Fraction of tokens whose top-1 expert changes when the layer input gets relative noise `noise`."""
    g = torch.Generator().manual_seed(seed)
    clean_T, noisy_T = top1_of(layer, xs_BSD), top1_of(layer, [add_noise(x, noise, g) for x in xs_BSD])
    return (clean_T != noisy_T).double().mean().item()


def rank_figures(layer, xs_BSD: list) -> dict:
    x_BSD = torch.cat(xs_BSD)
    what, view_TR = router_view(layer, x_BSD)
    return {"input": effective_rank(x_BSD.reshape(-1, x_BSD.shape[-1])), "input_dim": x_BSD.shape[-1],
            "router_view": effective_rank(view_TR), "router_view_dim": view_TR.shape[-1], "router_view_kind": what}


@torch.no_grad()
def layer_diagnostics(layer, xs_BSD: list, noise: float, seed: int) -> dict:
    x_TD = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs_BSD])
    routes = [route(layer, x) for x in xs_BSD]
    slots_T = torch.cat([(r.indices >= 0).sum(-1) for r in routes]).double()
    return {
        "tokens": x_TD.shape[0],
        "experts_per_token": slots_T.mean().item(),
        "routing_stability": {"noise": noise, "top1_changed": routing_stability(layer, xs_BSD, noise, seed)},
        "effective_rank": rank_figures(layer, xs_BSD),
        "expert_output_cosine": mean_pairwise_cosine(layer.all_experts(x_TD[:COSINE_TOKENS])),
    }
