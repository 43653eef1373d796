"""Portable model files: one consolidated safetensors file plus the resolved config, loadable anywhere.

Layout of a model directory: `config.json` (the megavq Config), `model.safetensors` (the Transformer state
dict in the canonical layout: experts stacked as (E, ...) tensors), `manifest.json` (format version, the
writer's library versions, the tokenizer's sha256; megavq/store/manifest.py) and `tokenizer.model` (the
SentencePiece model of the data, when known). The checkpoints of a run directory (format 2,
megavq.train.checkpoint) hold the same config.json, manifest and tokenizer, and the weights as fragments of the
canonical tensors (megavq.store.shards): `load_model` reads those on one CPU process, tensor by tensor, the fp32
master weights and buffers only (never the optimizer state), after checking every file's sha256. Format-0/1
checkpoints (a model.safetensors inside) read as model directories. `load_model` also reads Hugging Face model
directories (converted by megavq.convert.hf.load). Nothing is unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megavq.config import Config, save_config, saved_config
from megavq.data.dataset import BUILTIN_TOKENIZER, TOKENIZER_FILE
from megavq.errors import MegavqError
from megavq.files import file_sha256
from megavq.store.manifest import read_manifest, write_manifest
from megavq.store.shards import WEIGHT_KINDS, is_sharded, open_checkpoint, published

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
HF_CONFIG = "config.json"  # of a Hugging Face model directory (one with a model_type)
MODEL_DIR_KINDS = ("model", "checkpoint")


def save_model(state_dict: dict, cfg: Config, out_dir: str | Path, tokenizer: str | Path | None = None,
               kind: str = "model", **extra) -> Path:
    """model.safetensors (canonical layout), config.json and the manifest (with a copy of the tokenizer, when
    given) of a model directory, or of a checkpoint directory (kind="checkpoint", extra: its step)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if cfg.model.tie_embeddings:
        sd.pop("lm_head.weight", None)  # shares storage with embed.weight
    save_file(sd, str(out_dir / MODEL_FILE), metadata={"format": "megavq"})
    save_config(cfg, out_dir / CONFIG_FILE)
    write_manifest(out_dir, kind, cfg.to_dict(), tokenizer, **extra)
    return out_dir


def is_hf_dir(path: str | Path) -> bool:
    """True when path holds a Hugging Face config.json (one with a model_type)."""
    try:
        data = json.loads((Path(path) / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "model_type" in data


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The published checkpoints of a run directory, oldest first (ones being written or deleted are not)."""
    return published(Path(run_dir) / "checkpoints")


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest published checkpoint under run_dir/checkpoints (by step), or None."""
    ckpts = run_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def is_model_dir(path: Path) -> bool:
    """A model directory, or a checkpoint directory of any format."""
    return (Path(path) / MODEL_FILE).is_file() or is_sharded(path)


def resolve_model_dir(path: str | Path) -> Path:
    """The megavq model directory of a model, checkpoint, checkpoints or run directory."""
    path = Path(path)
    if is_hf_dir(path):
        raise MegavqError(f"{path} is a Hugging Face model, not a megavq one: convert it with "
                          f"`python scripts/export.py --checkpoint {path} --out DIR` (or scripts/upcycle.py)")
    if is_model_dir(path):
        return path
    for run_dir in (path, path.parent):  # a run directory, or its checkpoints/ folder
        if (run_dir / "checkpoints").is_dir() and newest_checkpoint(run_dir) is not None:
            return newest_checkpoint(run_dir)
    raise MegavqError(f"{path} holds no megavq model ({MODEL_FILE} + {CONFIG_FILE}), run with checkpoints, "
                      f"nor Hugging Face model")


def load_config_file(model_dir: Path) -> Config:
    read_manifest(model_dir, MODEL_DIR_KINDS)  # refuses a format this megavq does not read
    try:
        return saved_config(json.loads((model_dir / CONFIG_FILE).read_text()))
    except FileNotFoundError:
        raise MegavqError(f"{model_dir / CONFIG_FILE} is missing") from None


def model_tokenizer(model_dir: str | Path) -> Path | None:
    """The tokenizer a model or checkpoint directory records (a copy inside it), checked against its sha256;
    None when the directory records none (format 0, or a model imported from Hugging Face)."""
    model_dir = resolve_model_dir(model_dir)
    entry = read_manifest(model_dir, MODEL_DIR_KINDS).get("tokenizer")
    if not entry or not entry.get("file"):
        return None
    path = model_dir / entry["file"]
    if not path.is_file() or file_sha256(path) != entry["sha256"]:
        raise MegavqError(f"{path} is missing or is not the tokenizer the manifest of {model_dir} records")
    return path


def load_state_dict(model_dir: Path) -> dict:
    """The canonical state dict of a model directory or of a checkpoint of any format."""
    from safetensors.torch import load_file
    if (Path(model_dir) / MODEL_FILE).is_file():
        return load_file(str(Path(model_dir) / MODEL_FILE))
    ck = open_checkpoint(model_dir)  # format 2: the fp32 master weights and the buffers, tensor by tensor
    try:
        return {name: ck.tensor(kind, name) for kind, name in ck.index if kind in WEIGHT_KINDS}
    finally:
        ck.close()


def fit_weights(model: torch.nn.Module, sd: dict, source: str | Path) -> None:
    """Load canonical state dict `sd` (read from `source`) into `model`; every tensor must fit."""
    sd = model.from_canonical(sd)  # MoE layers whose layout differs from the canonical one
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.cfg.model.tie_embeddings]
    if missing or unexpected:
        raise MegavqError(f"weights of {source} do not fit the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


def load_weights(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Load a model directory's weights into an already-built model of the same shape."""
    fit_weights(model, load_state_dict(resolve_model_dir(model_dir)), model_dir)


def checkpoint_tokenizer(cfg: Config, recorded: str | Path | None = None) -> Path:
    """The SentencePiece model of a checkpoint: `recorded`, the copy its manifest records
    (model_tokenizer(checkpoint), which the caller reads), else,
    for a checkpoint that records none (format 0), the tokenizer of the data it was trained on (its config's
    data.source): the shipped tokenizer for 'builtin', else the tokenized data directory's tokenizer.model."""
    if recorded is not None:
        return Path(recorded)
    if cfg.data.source == "builtin":
        return BUILTIN_TOKENIZER
    path = Path(cfg.data.source) / TOKENIZER_FILE
    if not path.is_file():
        raise MegavqError(f"the checkpoint was trained on data.source={cfg.data.source}, and {path} does not "
                          f"exist here: pass the tokenizer with --tokenizer PATH")
    return path
