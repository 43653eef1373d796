"""Converters of older formats into the current ones (`scripts/upgrade.py`): format-0/1 checkpoints (whole
canonical tensors, DeepSpeed's pickled files beside them) become format-2 ones, and the manifests of run and model
directories are rewritten (upgrade_manifests)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megavq.config import saved_config
from megavq.errors import MegavqError
from megavq.files import file_entry, fsync_dir, publish_dir, remove_dir, write_json
from megavq.store.manifest import FORMATS, MANIFEST, TOKENIZER_FILE, read_manifest, write_manifest
from megavq.store.shards import LEGACY_FILES, LegacyCheckpoint, b64_of_tensor, fragment_key, published, write_tensors


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
    rng = [{"cpu": b64_of_tensor(ck.rng), "cuda": []}] if ck.rng is not None else []
    tensors = {name: info for name, info in ck.tensors.items()}
    step = int(m["step"])
    write_manifest(new, "checkpoint", config, new / TOKENIZER_FILE if tokenizer else None, step=step,
                   data={"next_step": step}, schedule={"last_epoch": m["lr_last_epoch"]}, adam_step=m["adam_step"],
                   engine={"global_steps": m["global_steps"], "global_samples": m["global_samples"]},
                   layout=m.get("layout"), rng=rng, tensors=tensors, shards=["rank_00000.safetensors"], files=files,
                   upgraded_from=old_manifest.get("format_version", 0))
    fsync_dir(new)
    remove_dir(directory)
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



def upgrade_manifests(directory: str | Path) -> list[Path]:
    """Rewrite the manifest of a run or model directory of an older format in the current one; returns the
    directories rewritten. Format 0 -> 1: a manifest from the directory's own config.json (the tokenizer is
    unknown to format 0, so it is recorded as null). Checkpoints change more than their manifest: scripts/upgrade.py
    converts them (upgrade_checkpoint), then calls this for their run."""
    directory = Path(directory)
    if (directory / "checkpoints").is_dir():
        return [_upgrade_one(directory, "run")]
    if not (directory / "config.json").is_file():
        raise MegavqError(f"{directory} is not a megavq run, checkpoint or model directory (no config.json)")
    if directory.parent.name == "checkpoints":
        return []  # a checkpoint: upgrade_checkpoint converts it
    return [_upgrade_one(directory, "model")]


def _upgrade_one(directory: Path, kind: str) -> Path:
    version = read_manifest(directory, (kind,)).get("format_version", 0) if (directory / MANIFEST).is_file() else 0
    if version < FORMATS[kind]:
        config = saved_config(json.loads((directory / "config.json").read_text())).to_dict()  # every option recorded
        write_json(directory / "config.json", config)
        write_manifest(directory, kind, config, upgraded_from=version)
    return directory
