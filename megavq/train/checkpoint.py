"""Checkpoints: save, publish, discover, resume and reshard. One sharded, layout-free checkpoint per save.

    RUN/checkpoints/
      latest                        the name of the newest published checkpoint (for tools; resuming scans)
      step_0000200/                 a published checkpoint (format 2)
        manifest.json               format, versions, config, tokenizer, step, data position, LR schedule
                                    position, Adam step, DeepSpeed counters, the layout that wrote it, every
                                    rank's CPU and CUDA RNG states, the canonical tensors (shape, dtype, kind),
                                    the files (bytes, sha256)
        config.json, tokenizer.model
        rank_00000.safetensors ...  what each rank owns, as fragments of the canonical tensors (megavq.store.shards)
      .tmp-step_0000400/            a checkpoint being written: never read, removed by the next save
      .trash-step_0000000/          a checkpoint being deleted: never read

Saving (every rank, `Checkpointer.save`): each rank writes the fp32 master weights and both Adam moments it
owns (ZeRO-1/2: its fragments of the flat partition, which cut across parameters; ZeRO-3: its partition of
each parameter; a plain optimizer: its 1/replicas share of every replicated tensor), and the first replica of
each buffer writes it, straight from memory into `.tmp-step_N/rank_R.safetensors`, then fsyncs. Only small
metadata travels between ranks. Rank 0 then writes config.json and the manifest, fsyncs, renames the
directory to `step_N` (publication), rewrites `latest`, and prunes older checkpoints (moved aside, then
deleted; the newest is never removed).

Addresses: a local tensor is a range of a canonical tensor (the native ep_size 1 model: experts stacked
(E, ...) in global expert order). `build_layout` finds each local tensor's canonical name and flat offset
without any collective by running the dispatcher's own `from_canonical` on probes (meta tensors for the
shapes, then stride-0 row numbers): an expert-parallel rank's rows start at its first expert (native), a
DeepSpeed-MoE local expert is one row. A fragment [start, start + n) of a local tensor is then the canonical
range [offset + start, offset + start + n). A dispatcher whose local tensors are not row ranges of the
canonical ones (MegaBlocks) is saved layer by layer through its `to_canonical` (gathered one parameter at a
time over the data-parallel group, written whole by rank 0).

Resharding on resume (any rank count, ep_size, backend, ZeRO 0-3): each rank asks, for every tensor it
keeps, the canonical ranges it needs (its whole local weights, or its ZeRO-3 partition; its own fragments of
the master weights and moments) and reads exactly those bytes from whichever files hold them.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from megavq.compat import deepspeed as ds_compat
from megavq.config import Config, save_config, saved_config
from megavq.errors import CheckpointError, ConfigError, MegavqError
from megavq.files import file_entry, fsync_dir, fsync_file, numel, publish_dir, write_json, write_text
from megavq.moe.experts import Experts
from megavq.store.manifest import MANIFEST, TOKENIZER_FILE, read_manifest, write_manifest
from megavq.store.manifest import upgrade as upgrade_manifests
from megavq.store.shards import (
    LEGACY_FILES,
    LegacyCheckpoint,
    ShardedCheckpoint,
    dtype_name,
    fragment_key,
    open_checkpoint,
    published,
    step_name,
    verify_files,
    write_tensors,
)
from megavq.train.engine import set_schedule_position
from megavq.train.faults import fault

PARAM_KINDS = ("fp32", "exp_avg", "exp_avg_sq")
LATEST = "latest"


# ---- the layout map: every local tensor as a range of a canonical one -----------------------------------
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
    run of rows of a canonical one; None when the dispatcher keeps them in another arrangement."""
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


# ---- what a rank writes, what it reads ----------------------------------------------------------------------
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


# ---- RNG ---------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"cpu": _b64(torch.get_rng_state()), "cuda": cuda}


def set_rng_state(states: list[dict], rank: int) -> None:
    """This rank's saved RNG state (rank r of a run with fewer ranks takes rank r % saved ranks)."""
    if not states:
        return
    mine = states[rank] if rank < len(states) else states[rank % len(states)]
    torch.set_rng_state(_unb64(mine["cpu"]))
    if mine.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in mine["cuda"]][:torch.cuda.device_count()])


# ---- the checkpointer ------------------------------------------------------------------------------------
def layout_record(engine, cfg: Config, world: int) -> dict:
    return {"backend": cfg.moe.backend, "ep_size": cfg.moe.ep_size, "world_size": world,
            "zero_stage": engine.zero_optimization_stage(), "dtype": str(engine.get_data_types()[0])}


def _remove(path: Path) -> None:
    """Move a directory aside (readers never see it half deleted), then delete it."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name.removeprefix('.tmp-')}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


class Checkpointer:
    """Saves and resumes one engine's state in RUN/checkpoints (collective: call on every rank)."""

    def __init__(self, engine, model, cfg: Config, run_dir: Path, rank: int, world: int):
        self.engine, self.cfg, self.rank, self.world = engine, cfg, rank, world
        self.run_dir, self.dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.layout = build_layout(model, cfg.moe.ep_size)

    # ---- saving ----------------------------------------------------------------------------------------
    def save(self, step: int, data: dict) -> Path:
        """Write, publish and prune; a failed write (no space) leaves the previous checkpoints as they were."""
        tag = step_name(step)
        tmp = self.dir / f".tmp-{tag}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        everyone = [None] * self.world
        dist.all_gather_object(everyone, self._write_rank_file(tmp, step))
        self._check(everyone, tmp, tag)
        fault("save.publish", step)
        status = [self._publish(tmp, step, everyone, data) if self.rank == 0 else None]
        dist.broadcast_object_list(status, src=0)
        self._check([status[0] or {}], tmp, tag)
        return self.dir / tag

    def _write_rank_file(self, tmp: Path, step: int) -> dict:
        entries = owned_entries(self.engine, self.layout, self.rank, self.world, self.cfg.moe.ep_size)
        path, half = tmp / f"rank_{self.rank:05d}.safetensors", len(entries) // 2
        try:
            fault("save.enospc", step)
            info = write_tensors(path, entries, {"format": "megavq-shard", "rank": self.rank, "step": step},
                                 on_progress=lambda i: i == half and fault("save.write", step))
        except OSError as e:
            return {"error": f"{path}: {e.strerror or e}"}
        return {"file": path.name, **info, "rng": rng_state()}

    def _check(self, results: list[dict], tmp: Path, tag: str) -> None:
        errors = [r["error"] for r in results if "error" in r]
        if not errors:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = published(self.dir)
        kept = f"{previous[-1].name} is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointError(f"could not write checkpoint {tag}: {errors[0]}; {kept}")

    def _publish(self, tmp: Path, step: int, everyone: list[dict], data: dict) -> dict | None:
        """Rank 0: config, manifest, fsync, rename, `latest`, prune. None, or {"error"} when a write fails."""
        try:
            files = {r["file"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in everyone}
            self._write_metadata(tmp, step, everyone, files, data)
            final = self.dir / step_name(step)
            _remove(final)  # a checkpoint of this step that a fallback left behind (damaged)
            publish_dir(tmp, final)
            write_text(self.dir / LATEST, final.name + "\n", durable=True)  # for tools: resuming scans the directory
        except OSError as e:
            return {"error": f"{getattr(e, 'filename', None) or tmp}: {e.strerror or e}"}
        try:
            self.prune(final)
        except OSError as e:  # the new checkpoint is published: an old one left behind is harmless
            print(f"warning: pruning old checkpoints: {e}", file=sys.stderr, flush=True)
        return None

    def _write_metadata(self, tmp: Path, step: int, everyone: list[dict], files: dict, data: dict) -> None:
        engine = self.engine
        save_config(self.cfg, tmp / "config.json")
        tokenizer = self.run_dir / TOKENIZER_FILE
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
        for name in ("config.json", TOKENIZER_FILE):
            if (tmp / name).is_file():
                fsync_file(tmp / name)
                files[name] = file_entry(tmp / name)
        write_manifest(tmp, "checkpoint", self.cfg.to_dict(), tmp / TOKENIZER_FILE if tokenizer.is_file() else None,
                       step=step, data=data, schedule={"last_epoch": engine.lr_scheduler.last_epoch},
                       adam_step=ds_compat.adam_step(engine),
                       engine={"global_steps": engine.global_steps, "global_samples": engine.global_samples},
                       layout=layout_record(engine, self.cfg, self.world),
                       rng=[r["rng"] for r in everyone], tensors=self.layout.tensors,
                       shards=[r["file"] for r in everyone], files=files)
        fsync_file(tmp / MANIFEST)
        fsync_dir(tmp)

    def prune(self, newest: Path) -> None:
        """Keep the newest train.keep_checkpoints published checkpoints (never `newest`); remove leftovers."""
        keep = self.cfg.train.keep_checkpoints
        for old in published(self.dir)[:-keep]:
            if old != newest:
                trash = old.with_name(f".trash-{old.name}")
                os.rename(old, trash)
                fault("save.prune", int(newest.name.removeprefix("step_")))
                shutil.rmtree(trash, ignore_errors=True)
        for left in list(self.dir.glob(".trash-*")) + list(self.dir.glob(".tmp-*")):
            shutil.rmtree(left, ignore_errors=True)

    # ---- resuming ---------------------------------------------------------------------------------------
    def resume(self, mode: str) -> dict | None:
        """Load the newest intact checkpoint (mode "strict": the newest, or an error; "auto": falling back to
        older ones, saying so); returns its training state, or None when there is no checkpoint (auto)."""
        candidates = published(self.dir)[::-1]
        if not candidates:
            if mode == "strict":
                raise MegavqError(f"--resume: no checkpoint in {self.dir} (`--resume auto` starts fresh then)")
            return None
        problem = None
        for path in candidates:
            ck, problem = self._open(path)
            if ck is not None:
                try:
                    check_fits(self.layout, ck, path)
                    load_state(self.engine, self.layout, ck)
                    return self._restore(ck, path)
                finally:
                    ck.close()
            if mode == "strict":
                raise CheckpointError(f"{problem}; `--resume auto` falls back to the previous checkpoint")
            if self.rank == 0:
                print(f"warning: {problem}; falling back to the previous checkpoint", file=sys.stderr, flush=True)
        raise CheckpointError(f"no intact checkpoint in {self.dir} ({problem})")

    def _open(self, path: Path):
        """(checkpoint, None), or (None, what is wrong with it): every rank checks the sha256 of some files."""
        manifest = read_manifest(path, ("checkpoint",))
        problems = []
        if manifest.get("format_version", 0) >= 2:
            names = sorted(manifest.get("files", {}))
            problems = verify_files(path, manifest["files"], names[self.rank::self.world])
        gathered = [None] * self.world
        dist.all_gather_object(gathered, problems)
        problems = [p for ps in gathered for p in ps]
        if problems:
            return None, problems[0]
        try:
            if manifest.get("format_version", 0) >= 2:
                return ShardedCheckpoint(path, manifest), None
            return open_checkpoint(path), None
        except CheckpointError as e:
            return None, str(e)

    def _restore(self, ck, path: Path) -> dict:
        """Counters, schedule, Adam step, RNG; returns {"step", "path", "data"}."""
        m, engine = ck.meta, self.engine
        legacy = isinstance(ck, LegacyCheckpoint)
        ds_compat.set_adam_step(engine, m["adam_step"])
        set_schedule_position(engine, m["lr_last_epoch"] if legacy else m["schedule"]["last_epoch"])
        counters = m if legacy else m["engine"]
        engine.global_steps, engine.global_samples = counters["global_steps"], counters["global_samples"]
        if legacy:
            if ck.rng is not None:
                torch.set_rng_state(ck.rng)
        else:
            set_rng_state(m["rng"], self.rank)
        return {"step": int(m["step"]), "path": path, "data": m.get("data", {})}


# ---- converting format 0/1 checkpoints --------------------------------------------------------------------
def upgrade_checkpoint(directory: Path) -> Path:
    """Rewrite a format-0/1 checkpoint (whole canonical tensors, DeepSpeed's pickled files beside them) as a
    format-2 one, in place (written aside, then swapped)."""
    directory = Path(directory)
    ck = LegacyCheckpoint(directory)
    try:
        entries = [(fragment_key(kind, name, 0), ck.tensor(kind, name).reshape(-1)) for kind, name in ck.index]
        m = ck.meta
    finally:
        ck.close()
    config = saved_config(json.loads((directory / "config.json").read_text())).to_dict()  # every option recorded
    new = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir()
    info = write_tensors(new / "rank_00000.safetensors", entries, {"format": "megavq-shard", "rank": 0})
    files = {"rank_00000.safetensors": info}
    write_json(new / "config.json", config)
    old_manifest = read_manifest(directory, ("checkpoint",))
    tokenizer = directory / TOKENIZER_FILE if (old_manifest.get("tokenizer") or {}).get("file") else None
    for name, src in (("config.json", new / "config.json"), (TOKENIZER_FILE, tokenizer)):
        if src is not None and src.is_file():
            if src.parent != new:
                shutil.copyfile(src, new / name)
            files[name] = file_entry(new / name)
    rng = [{"cpu": _b64(ck.rng), "cuda": []}] if ck.rng is not None else []
    tensors = {name: info for name, info in ck.tensors.items()}
    step = int(m["step"])
    write_manifest(new, "checkpoint", config, new / TOKENIZER_FILE if tokenizer else None, step=step,
                   data={"next_step": step}, schedule={"last_epoch": m["lr_last_epoch"]}, adam_step=m["adam_step"],
                   engine={"global_steps": m["global_steps"], "global_samples": m["global_samples"]},
                   layout=m.get("layout"), rng=rng, tensors=tensors, shards=["rank_00000.safetensors"], files=files,
                   upgraded_from=old_manifest.get("format_version", 0))
    fsync_dir(new)
    _remove(directory)
    publish_dir(new, directory)
    return directory


def upgrade(directory: str | Path) -> list[Path]:
    """scripts/upgrade.py: a run (its checkpoints and manifest), a checkpoint or a model directory of an older
    format, rewritten in the current one; returns the directories rewritten."""
    directory = Path(directory)
    ckpts = published(directory / "checkpoints") if (directory / "checkpoints").is_dir() else \
        [directory] if (directory / LEGACY_FILES[0]).is_file() and (directory / LEGACY_FILES[1]).is_file() else []
    done = [upgrade_checkpoint(c) for c in ckpts if (c / LEGACY_FILES[1]).is_file()]
    return done + [d for d in upgrade_manifests(directory) if d not in done]


# ---- the run directory -------------------------------------------------------------------------------------
