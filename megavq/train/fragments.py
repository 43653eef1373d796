"""What one rank writes into a checkpoint and reads back from one: its exclusive fragments of the fp32 master
weights and Adam moments (ZeRO-1/2: pieces of the flat partition; ZeRO-3: its partition of each parameter; a
plain optimizer: its 1/replicas share of every replicated tensor), the first replica's buffers, and the layers
saved whole through `to_canonical`; on resume, exactly the canonical ranges it keeps (megavq.train.layout).
"""
from __future__ import annotations

from pathlib import Path

import torch

from megavq.compat import deepspeed as ds_compat
from megavq.errors import ConfigError, MegavqError
from megavq.store.shards import fragment_key
from megavq.train.layout import Layout, Slot, canonical_experts

PARAM_KINDS = ("fp32", "exp_avg", "exp_avg_sq")


def owned_entries(engine, layout: Layout, rank: int, world: int, ep_size: int) -> list[tuple[str, torch.Tensor]]:
    """(key, 1-D tensor) of everything this rank writes: views of the state, no copies (fallback layers aside)."""
    ds_compat.ensure_adam_states(engine)
    out = []
    for s in layout.slots:
        if not s.trainable:
            if ds_compat.replica_position(s.sharded, rank, world, ep_size)[0] == 0:
                out.append((fragment_key("buffer", s.canonical, s.offset), s.tensor.detach().reshape(-1).contiguous()))
            continue
        for start, n, views in _fragments(engine, s, rank, world, ep_size):
            out += [(fragment_key(kind, s.canonical, s.offset + start), views[kind]) for kind in PARAM_KINDS]
    return out + _fallback_entries(engine, layout, rank)


def _fragments(engine, s: Slot, rank: int, world: int, ep_size: int) -> list:
    """This rank's exclusive fragments of a parameter; a replicated one (plain optimizer) split over its replicas."""
    frags = ds_compat.owned_fragments(engine, s.tensor)
    if frags is None:
        views = ds_compat.plain_state(engine, s.tensor)
        if views["fp32"].dtype != torch.float32:
            raise ConfigError(f"{s.name}: checkpoints need fp32 master weights (bf16 and fp16 run through DeepSpeed's "
                              f"mixed-precision optimizers, which keep them)")
        i, count = ds_compat.replica_position(s.sharded, rank, world, ep_size)
        a, b = s.numel * i // count, s.numel * (i + 1) // count
        frags = [(a, b - a, {k: v[a:b] for k, v in views.items()})]
    return [f for f in frags if f[1] > 0]


def _fallback_entries(engine, layout: Layout, rank: int) -> list:
    out = []
    for prefix, layer, slots in layout.fallback:
        for kind in PARAM_KINDS:  # collective: every rank, the same order
            local = {s.name: ds_compat.full_state(engine, s.tensor, kind) for s in slots}
            canon = layer.to_canonical(prefix, local)
            if rank == 0:
                out += [(fragment_key(kind, k, 0), t.detach().reshape(-1).contiguous()) for k, t in canon.items()]
    return out


def check_fits(layout: Layout, ck, where: Path) -> None:
    """Refuse a checkpoint whose canonical tensors are not this model's."""
    for name, info in layout.tensors.items():
        have = ck.tensors.get(name)
        if have is None or list(have["shape"]) != list(info["shape"]):
            raise MegavqError(f"checkpoint {where} does not fit this model: {name} is "
                              f"{'missing' if have is None else tuple(have['shape'])}, the model has "
                              f"{tuple(info['shape'])} (resume with the config that wrote it)")
        for kind in (PARAM_KINDS if info["kind"] == "param" else ("buffer",)):
            if not ck.has(kind, name):
                raise MegavqError(f"checkpoint {where} does not fit this model: it has no {kind} of {name}")
    extra = sorted(set(ck.tensors) - set(layout.tensors) - {"lm_head.weight"})
    if extra:
        raise MegavqError(f"checkpoint {where} does not fit this model: it has {extra[:3]}, which the model lacks")


@torch.no_grad()
def load_state(engine, layout: Layout, ck) -> None:
    """Read into this rank's engine what it keeps: module weights, its fragments of the fp32 master weights and
    Adam moments, buffers (any layout from any layout; see the module docstring)."""
    ds_compat.ensure_adam_states(engine)
    for s in layout.slots:
        if not s.trainable:
            ck.fill("buffer", s.canonical, s.offset, s.tensor.data.view(-1))
            continue
        for start, view in ds_compat.weight_targets(s.tensor):
            ck.fill("fp32", s.canonical, s.offset + start, view)
        frags = ds_compat.owned_fragments(engine, s.tensor)
        if frags is None:  # a plain optimizer: every replica holds the whole
            frags = [(0, s.numel, ds_compat.plain_state(engine, s.tensor))]
        for start, n, views in frags:
            for kind in PARAM_KINDS:
                if n and not (kind == "fp32" and views[kind].data_ptr() == s.tensor.data.data_ptr()):
                    ck.fill(kind, s.canonical, s.offset + start, views[kind])
    for prefix, layer, slots in layout.fallback:
        names = list(canonical_experts(prefix, layer))
        for kind in PARAM_KINDS:
            local = layer.from_canonical(prefix, {k: ck.tensor(kind, k) for k in names})
            for s in slots:
                if kind == "fp32":
                    s.tensor.data.copy_(local[s.name].to(s.tensor.dtype))
                ds_compat.set_full_state(engine, s.tensor, kind, local[s.name])
