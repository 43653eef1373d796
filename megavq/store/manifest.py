"""Versioned formats: every directory megavq writes says what it is and what wrote it.

`manifest.json` in run, checkpoint and model directories (data directories carry the same fields in their
meta.json, megavq.data.dataset):
  format          "megavq-run" | "megavq-checkpoint" | "megavq-model"
  format_version  FORMATS[kind]
  versions        megavq, torch, deepspeed and python versions of the writer
  config          the resolved run configuration
  tokenizer       {"file": name in the directory (or null), "sha256": ...} of the SentencePiece model of the
                  data, or null when unknown (models imported from Hugging Face)
  and what the writer adds (a checkpoint's step, data position, RNG states, tensors and files with their
  sha256: megavq.train.checkpoint).

Checkpoint versions: 1 = model.safetensors + train_state.safetensors + train_state.json (whole canonical
tensors, rank 0 wrote them) beside DeepSpeed's own files; 2 = sharded (megavq.store.shards: each rank's fragments of
the canonical tensors, checksummed). `scripts/upgrade.py` converts 0 and 1 into 2.

Policy: a reader accepts the current version and the previous one, and refuses any other with the command
that converts it. Version 0 is a directory written before manifests existed (megavq 0.1.0 up to commit
ec4c2b2): it loads as a model as before; a version-0 checkpoint resumes after scripts/upgrade.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megavq.errors import CheckpointError, MegavqError
from megavq.files import file_sha256, library_versions, write_json

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
FORMATS = {"run": 1, "checkpoint": 2, "model": 1}
CONVERT = "python scripts/upgrade.py {path}"  # rewrites a directory of an older version in the current one


def tokenizer_entry(path: str | Path | None) -> dict | None:
    """{"file", "sha256"} of a SentencePiece model, or None."""
    if path is None:
        return None
    return {"file": TOKENIZER_FILE, "sha256": file_sha256(path)}


def write_manifest(directory: str | Path, kind: str, config: dict, tokenizer: str | Path | None = None,
                   **extra) -> dict:
    """manifest.json of a directory of `kind`; the tokenizer file (if any) is copied in beside it."""
    directory = Path(directory)
    if tokenizer is not None and Path(tokenizer).resolve() != (directory / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer, directory / TOKENIZER_FILE)
    manifest = {"format": f"megavq-{kind}", "format_version": FORMATS[kind], "versions": library_versions(),
                "config": config, "tokenizer": tokenizer_entry(tokenizer), **extra}
    write_json(directory / MANIFEST, manifest)
    return manifest


def read_manifest(directory: str | Path, kinds: tuple[str, ...]) -> dict:
    """The manifest of a directory of one of `kinds` ({"format_version": 0} for one written before manifests);
    refuses another kind, and a version this megavq does not read, with the command that converts it."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return {"format_version": 0}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (damaged): {e}") from None
    kind = str(manifest.get("format", "")).removeprefix("megavq-")
    if kind not in kinds:
        raise MegavqError(f"{directory} holds a {manifest.get('format')!r} directory, not a megavq "
                          f"{' or '.join(kinds)} directory")
    check_format_version(manifest.get("format_version"), kind, directory)
    return manifest


def check_format_version(version, kind: str, directory: Path) -> None:
    """Accept the current version of `kind` and the previous one; refuse others, naming the converter."""
    current = FORMATS[kind]
    if version in (current, current - 1):
        return
    if isinstance(version, int) and version > current:
        raise MegavqError(f"{directory} is a {kind} directory of format {version}, newer than this megavq reads "
                          f"({current - 1}-{current}): update megavq")
    raise MegavqError(f"{directory} is a {kind} directory of format {version!r}, which this megavq no longer reads "
                      f"({current - 1}-{current}); convert it with: {CONVERT.format(path=directory)}")
