"""The only module that calls deepspeed.initialize: DeepSpeed config reconciliation, optimizer, schedule."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megavq.config import Config, ConfigError

# DeepSpeed key -> (megavq key, how to read the megavq value)
_RECONCILED = {
    "train_micro_batch_size_per_gpu": ("data.micro_batch_size", lambda c, w: c.data.micro_batch_size),
    "gradient_accumulation_steps": ("train.grad_accum_steps", lambda c, w: c.train.grad_accum_steps),
    "gradient_clipping": ("train.grad_clip", lambda c, w: c.train.grad_clip),
    "train_batch_size": ("data.micro_batch_size x train.grad_accum_steps x world size",
                         lambda c, w: c.data.micro_batch_size * c.train.grad_accum_steps * w),
}


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU); returns (rank, world_size)."""
    import deepspeed
    deepspeed.init_distributed(verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def read_ds_config(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config {path} does not exist") from None
    except ValueError as e:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from None


def reconcile_ds_config(ds: dict, cfg: Config, world_size: int) -> dict:
    """Fill "auto" fields from the megavq config; an explicit value that disagrees is an error naming both."""
    ds = dict(ds)
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"DeepSpeed config has an '{section}' section; megavq builds AdamW and its "
                              f"warmup-cosine schedule from train.* (remove '{section}' from the JSON)")
    for ds_key, (our_key, read) in _RECONCILED.items():
        ours = read(cfg, world_size)
        theirs = ds.get(ds_key, "auto")
        if theirs != "auto" and float(theirs) != float(ours):
            raise ConfigError(f"DeepSpeed config {ds_key}={theirs} contradicts {our_key}={ours}")
        ds[ds_key] = ours
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay, vectors (norms, biases) do not; expert-parallel parameters get their own groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def lr_lambda(cfg: Config):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_engine(model: torch.nn.Module, cfg: Config, ds: dict):
    """deepspeed.initialize with megavq's AdamW and warmup-cosine schedule. `ds` is already reconciled."""
    import deepspeed
    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine


def full_state_dict(engine) -> dict | None:
    """The whole model's state dict in the canonical (native, ep_size 1) layout, on rank 0.

    Gathered under ZeRO-3. Every module with a `to_canonical(prefix, state_dict)` method (expert-parallel
    or DeepSpeed MoE layers) rewrites its own entries; it is called on every rank, so it may communicate.
    Other ranks may get None.
    """
    model = engine.module
    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if hasattr(module, "to_canonical"):
            sd = module.to_canonical(f"{name}.", sd)
    return sd
