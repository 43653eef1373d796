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
(E, ...) in global expert order), found by megavq.train.layout: an expert-parallel rank's rows start at its first
expert (native), a DeepSpeed-MoE local expert is one row. A fragment [start, start + n) of a local tensor is then
the canonical range [offset + start, offset + start + n) (megavq.train.fragments). A dispatcher whose local
tensors are not row ranges of the canonical ones (MegaBlocks) is saved layer by layer through its `to_canonical`
(gathered one parameter at a time over the data-parallel group, written whole by rank 0).

Resharding on resume (any rank count, ep_size, backend, ZeRO 0-3): each rank asks, for every tensor it
keeps, the canonical ranges it needs (its whole local weights, or its ZeRO-3 partition; its own fragments of
the master weights and moments) and reads exactly those bytes from whichever files hold them.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megavq.compat import deepspeed as ds_compat
from megavq.config import Config, save_config
from megavq.errors import CheckpointError, MegavqError
from megavq.files import file_entry, fsync_dir, fsync_file, publish_dir, remove_dir, write_text
from megavq.store.manifest import MANIFEST, TOKENIZER_FILE, read_manifest, write_manifest
from megavq.store.shards import (
    LegacyCheckpoint,
    ShardedCheckpoint,
    open_checkpoint,
    published,
    step_name,
    verify_files,
    write_tensors,
)
from megavq.train.engine import set_schedule_position
from megavq.train.faults import fault
from megavq.train.fragments import check_fits, load_state, owned_entries
from megavq.train.layout import build_layout
from megavq.train.rng import rng_state, set_rng_state

LATEST = "latest"


def layout_record(engine, cfg: Config, world: int) -> dict:
    return {"backend": cfg.moe.backend, "ep_size": cfg.moe.ep_size, "world_size": world,
            "zero_stage": engine.zero_optimization_stage(), "dtype": str(engine.get_data_types()[0])}


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
            remove_dir(final)  # a checkpoint of this step that a fallback left behind (damaged)
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
