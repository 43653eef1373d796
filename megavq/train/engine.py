"""The only module that calls deepspeed.initialize: DeepSpeed config reconciliation, the checks that need the
world size, optimizer and schedule. Checkpoints (the layout-free engine state) are megavq.train.checkpoint;
DeepSpeed internals are reached through megavq.compat.deepspeed."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megavq.compat import deepspeed as ds_compat
from megavq.config import Config, validate
from megavq.errors import ConfigError

# DeepSpeed key -> (megavq key, how to read the megavq value)
_RECONCILED = {
    "train_micro_batch_size_per_gpu": ("data.micro_batch_size", lambda c, w: c.data.micro_batch_size),
    "gradient_accumulation_steps": ("train.grad_accum_steps", lambda c, w: c.train.grad_accum_steps),
    "gradient_clipping": ("train.grad_clip", lambda c, w: c.train.grad_clip),
    "train_batch_size": ("data.micro_batch_size x train.grad_accum_steps x world size",
                         lambda c, w: c.data.micro_batch_size * c.train.grad_accum_steps * w),
}


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed (gloo on CPU); returns (rank, world_size). `timeout_s`
    (train.dist_timeout_s): how long a collective waits for a lost or stuck rank before it fails (retryable)."""
    import datetime

    import deepspeed
    ds_compat.check_deepspeed_version()
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(verbose=False, **kwargs)
    torch.distributed.barrier()
    ds_compat.unlink_shm_buffer(torch.distributed.get_rank())  # DeepSpeed leaks it in /dev/shm otherwise
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
    check_world(cfg, world_size)
    validate(cfg, zero_stage(ds))
    return ds


def check_world(cfg: Config, world_size: int) -> None:
    """The start-up checks that need the number of ranks (validate holds the others)."""
    moe = cfg.moe
    if moe.every > 0 and world_size % moe.ep_size:
        raise ConfigError(f"moe.ep_size={moe.ep_size} must divide the number of ranks, got {world_size} rank(s)")


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


def setup_expert_parallel(model: torch.nn.Module, ep_size: int):
    """Layers whose experts megavq shards itself (not DeepSpeed's MoE): DeepSpeed's EP groups, and their expert
    parameters marked as MoE parameters; returns the EP group (None without such layers).

    Expert gradients are then averaged over the expert-data-parallel group (ranks with the same EP rank), the
    rest over all ranks, and the optimizer gets separate MoE parameter groups (param_groups).
    """
    layers = [layer for _, layer in model.moe_layers() if not layer.dispatcher.deepspeed_moe]
    if ep_size == 1 or not layers:
        return None
    name, group = ds_compat.expert_parallel_group(ep_size)
    for layer in layers:
        layer.set_ep_group(group)
        ds_compat.mark_expert_parameters(layer.expert_parameters(), name)
    model.add_module("expert_parallel_tag", ds_compat.expert_parallel_tag(model.cfg.moe.num_experts, ep_size, name))
    return group


def prepare_model(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """What a training run adds to a model built from its settings: activation checkpointing (every
    train.activation_checkpointing-th block) and the routers' seed and schedule length (train.seed, max_steps)."""
    model.checkpoint_every = cfg.train.activation_checkpointing
    model.place_routers(cfg.train.seed, cfg.train.max_steps)
    return model


def build_engine(model: torch.nn.Module, cfg: Config, ds: dict):
    """deepspeed.initialize with megavq's AdamW and warmup-cosine schedule. `ds` is already reconciled."""
    import deepspeed
    t = cfg.train
    ep_group = setup_expert_parallel(model, cfg.moe.ep_size)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    if ep_group is not None and zero_stage(ds) == 0 and model_dtype(ds) == torch.float32:
        ds_compat.clip_by_global_norm(engine, ep_group)  # clipping by the true global norm (see there)
    return engine


def set_schedule_position(engine, last_epoch: int) -> None:
    """Move the LambdaLR schedule to `last_epoch` (its lr per parameter group, whatever the groups are)."""
    sched = engine.lr_scheduler
    sched.last_epoch, sched._step_count = last_epoch, last_epoch + 1
    lrs = [base * lam(last_epoch) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
