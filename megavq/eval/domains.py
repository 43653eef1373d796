"""Routing by domain: which experts the tokens of each source of a mixture go to, per MoE layer.

Legend: B batch, S sequence, D domains (sources), E experts, K slots per token.
The load matrix counts every chosen (token, slot) of a domain's tokens per expert; each row is normalised to
the domain's distribution over experts p(e | d). The mutual information between domain and expert takes the
domains as equally likely (each has its own evaluation tokens): I = sum_d,e p(d) p(e|d) ln(p(e|d) / p(e)),
p(d) = 1/D, in nats; 0 when every domain uses the experts alike, ln D when each domain has experts of its own.
"""
from __future__ import annotations

import math

import torch

from megavq.eval import routing


def expert_counts(layer, xs_BSD: list[torch.Tensor]) -> torch.Tensor:
    """(E,) chosen slots per expert over the tokens of xs_BSD (dropped slots, index -1, left out)."""
    E = layer.router.num_experts
    counts_E = torch.zeros(E, dtype=torch.float64)
    for x_BSD in xs_BSD:
        idx = routing.route(layer, x_BSD).indices.flatten().cpu()
        counts_E += torch.bincount(idx[idx >= 0], minlength=E).double()
    return counts_E


@torch.no_grad()
def domain_counts(model, batches_by_domain: list[list]) -> dict[int, torch.Tensor]:
    """{block index: (D, E) chosen slots of each domain's tokens per expert}."""
    inputs = [routing.layer_inputs(model, batches) for batches in batches_by_domain]
    return {i: torch.stack([expert_counts(layer, domain[i]) for domain in inputs])
            for i, layer in routing.moe_layers(model)}


def mutual_information(counts_DE: torch.Tensor) -> float:
    """I(domain; expert) in nats, domains equally likely."""
    p_e_given_d = counts_DE.double() / counts_DE.double().sum(1, keepdim=True)
    p_DE = p_e_given_d / counts_DE.shape[0]
    p_E = p_DE.sum(0, keepdim=True)
    ratio = torch.where(p_DE > 0, p_e_given_d / p_E.clamp(min=1e-300), 1.0)
    return (p_DE * ratio.log()).sum().item()


def domain_report(model, names: list[str], batches_by_domain: list[list]) -> dict:
    """The domain x expert load of every MoE layer (rows: p(e | d)) and its mutual information."""
    layers = []
    for i, counts_DE in domain_counts(model, batches_by_domain).items():
        load_DE = counts_DE / counts_DE.sum(1, keepdim=True)
        layers.append({"layer": i, "load": [[round(v, 6) for v in row] for row in load_DE.tolist()],
                       "mutual_information": mutual_information(counts_DE)})
    return {"sources": names, "mi_max": math.log(len(names)), "layers": layers}
