"""Where each of this rank's tensors sits in the canonical model (the native ep_size 1 model: experts stacked
(E, ...) in global expert order): a local tensor is a range of a canonical one.

A dispatcher declares the canonical rows of its local expert tensors (`Dispatcher.canonical_rows`); for one that
does not, `build_layout` finds them without any collective by running its own `from_canonical` on probes (meta
tensors for the shapes, then stride-0 row numbers). A dispatcher whose local tensors are not row ranges of the
canonical ones (MegaBlocks) is saved layer by layer through its `to_canonical` (megavq.train.fragments).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megavq.compat import deepspeed as ds_compat
from megavq.errors import ConfigError
from megavq.files import numel
from megavq.moe.experts import Experts
from megavq.store.shards import dtype_name


@dataclass
class Slot:
    name: str  # the local state-dict name
    canonical: str | None  # the canonical tensor it is a range of (None: a layer saved through to_canonical)
    offset: int  # where the local tensor's flattened elements start in the canonical one
    tensor: torch.Tensor  # the parameter or buffer
    trainable: bool  # a parameter the optimizer updates (fp32 master and moments); else saved as a buffer
    sharded: bool  # an expert tensor sharded over the expert-parallel group
    numel: int


@dataclass
class Layout:
    slots: list[Slot]
    tensors: dict  # canonical name -> {"shape", "dtype", "kind"}
    fallback: list = field(default_factory=list)  # [(prefix, layer, [Slot])]: not row ranges


def local_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (a tied one once) and persistent buffers, by state-dict name."""
    out = dict(model.named_parameters())
    for mod_name, mod in model.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = buf
    return out


def canonical_experts(prefix: str, layer) -> dict[str, tuple]:
    """Canonical names and shapes of an MoE layer's experts (the native ep_size 1 bank), allocating nothing."""
    with torch.device("meta"):
        bank = Experts.for_spec(layer.dispatcher.spec)
    return {f"{prefix}experts.{n}": tuple(p.shape) for n, p in bank.named_parameters()}


def _row_shaped(shape: tuple, rests: set) -> bool:
    return tuple(shape) in rests or tuple(shape[1:]) in rests


def expert_rows(prefix: str, layer, local: dict) -> dict | None:
    """{local name: (canonical name, first row, canonical shape)} when each local expert tensor of the layer is a
    run of rows of a canonical one (as its dispatcher declares, or as probing finds); None when the dispatcher
    keeps them in another arrangement."""
    declared = layer.canonical_rows(prefix)
    if declared is None:
        return probed_rows(prefix, layer, local)
    canon = canonical_experts(prefix, layer)
    return {k: (c, row, canon[c]) for k, (c, row) in declared.items() if k in local}


def probed_rows(prefix: str, layer, local: dict) -> dict | None:
    """expert_rows of a dispatcher that declares nothing: its from_canonical run on meta tensors (the shapes),
    then on stride-0 row numbers (which canonical rows each local tensor holds)."""
    canon = canonical_experts(prefix, layer)
    names = list(canon)
    shapes = layer.from_canonical(prefix, {k: torch.empty(s, device="meta") for k, s in canon.items()})
    ours = {k: v for k, v in shapes.items() if k in local}
    if any(not _row_shaped(v.shape, {s[1:] for s in canon.values()}) for v in ours.values()):
        return None
    E = max(s[0] for s in canon.values())
    probes = {k: (torch.arange(s[0], dtype=torch.int32) + i * E).view(-1, *[1] * (len(s) - 1)).expand(s)
              for i, (k, s) in enumerate(canon.items())}
    out = {}
    for k, t in layer.from_canonical(prefix, probes).items():
        if k not in local:
            continue
        if t.numel() == 0:
            return None
        c = names[int(t[(0,) * t.dim()]) // E]
        rest = canon[c][1:]
        rows = t.unsqueeze(0) if tuple(t.shape) == rest else t
        if tuple(rows.shape[1:]) != rest or any(st and n > 1 for st, n in zip(rows.stride()[1:], rest)):
            return None  # rows are not constant: not a row range
        ids = rows[(slice(None),) + (0,) * len(rest)].tolist()
        if ids != list(range(ids[0], ids[0] + len(ids))):
            return None
        out[k] = (c, ids[0] % E, canon[c])
    return out


def build_layout(model: torch.nn.Module, ep_size: int) -> Layout:
    """The layout map of this rank's model (no collective; the same canonical tensors on every rank)."""
    local = local_tensors(model)
    mapped, fallback, held = {}, [], set()
    for prefix, layer in model.moe_layers():
        rows = expert_rows(prefix, layer, local)
        if rows is None:
            names = [n for n in local if n.startswith(f"{prefix}experts.")]
            fallback.append((prefix, layer, names))
            held.update(names)
        else:
            mapped.update(rows)
    slots, tensors = [], {}
    for name, t in local.items():
        trainable = isinstance(t, torch.nn.Parameter) and t.requires_grad
        shape = ds_compat.param_shape(t) if isinstance(t, torch.nn.Parameter) else tuple(t.shape)
        if not trainable and ds_compat.is_zero3_param(t):
            raise ConfigError(f"{name}: a frozen parameter under ZeRO-3 cannot be checkpointed")
        canonical, row, cshape = mapped.get(name, (name, 0, shape))
        slot = Slot(name, None if name in held else canonical, row * numel(cshape[1:]), t, trainable,
                    ep_size > 1 and name in mapped, numel(shape))
        slots.append(slot)
        if name not in held:
            tensors[canonical] = {"shape": list(cshape), "kind": "param" if trainable else "buffer",
                                  "dtype": "float32" if trainable else dtype_name(t.dtype)}
    fallback = [(p, layer, [s for s in slots if s.name in names]) for p, layer, names in fallback]
    for prefix, layer, _ in fallback:
        for k, s in canonical_experts(prefix, layer).items():
            tensors[k] = {"shape": list(s), "kind": "param", "dtype": "float32"}
    return Layout([s for s in slots if s.canonical is not None], tensors, fallback)
