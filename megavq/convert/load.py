"""The user-facing `load_model`: a megavq model, checkpoint or run directory, or a Hugging Face model directory,
as a Transformer on one CPU process (megavq.store.model_dir reads the first, megavq.convert.hf.load the second)."""
from __future__ import annotations

from pathlib import Path

import torch

from megavq.config import Config
from megavq.convert.hf.load import load_hf_model
from megavq.model import Transformer
from megavq.store.model_dir import fit_weights, is_hf_dir, load_config_file, load_state_dict, resolve_model_dir


def read_model(path: str | Path) -> tuple[Config, dict]:
    """Config and state dict of a megavq model, checkpoint or run directory, or of a Hugging Face model directory."""
    if is_hf_dir(path):
        return load_hf_model(path)
    model_dir = resolve_model_dir(path)
    return load_config_file(model_dir), load_state_dict(model_dir)


def load_model(path: str | Path, backend: str = "native") -> torch.nn.Module:
    """A Transformer on CPU, in eval mode, from a megavq model, checkpoint or run directory, or from a Hugging
    Face model directory (Llama, Mistral, Qwen2, Mixtral, GPT-2; see megavq.convert.hf.load).

    Its forward takes token ids (B, T) and returns logits (B, T, V).
    """
    cfg, sd = read_model(path)
    cfg.moe.backend, cfg.moe.ep_size = backend, 1
    model = Transformer(cfg)
    fit_weights(model, sd, path)
    return model.eval()
