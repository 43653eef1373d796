"""Model FLOPs and utilisation (MFU): the figures of metrics.jsonl, summary.json and the benchmark.

Model FLOPs per token = 6 x the active parameters of the matrix products (the token embedding and learned
positions are lookups, not products; the output head counts once, tied or not) + 12 x layers x n_heads x
head size x seq_len for attention's two products over the sequence (causality not subtracted, as in PaLM's MFU).
Recomputation (activation checkpointing) is not counted: MFU measures useful work.
"""
from __future__ import annotations

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, per device


def flops_per_token(model) -> float:
    """Model FLOPs of one trained token (forward and backward) of a megavq Transformer."""
    m = model.cfg.model
    lookups = model.embed.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed is not None else 0)
    head = 0 if not m.tie_embeddings else model.lm_head.weight.numel()  # tied: counted in the lookups above
    matmul = model.num_params(active=True) - lookups + head
    return 6.0 * matmul + 12.0 * m.n_layers * m.n_heads * m.head_size() * m.seq_len


def device_peak_tflops(given: float = 0.0) -> float | None:
    """`given` (train.peak_tflops) when > 0, else the table's figure for this CUDA device; None: unknown."""
    if given > 0:
        return given
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def utilisation(flops_token: float, tokens_per_s: float, devices: int, peak_tflops: float | None) -> dict:
    """{"tflops_per_device": ..., "mfu": ...} (mfu only with a known peak)."""
    tflops = flops_token * tokens_per_s / devices / 1e12
    out = {"tflops_per_device": tflops}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    return out
