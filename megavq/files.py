"""The small file jobs every writer shares: JSON and text through a rename, fsync, streamed sha256, directory
publication by rename, and the versions a file records of what wrote it."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str, durable: bool = False) -> None:
    """Write through a temporary file and a rename: a reader never sees half a file. `durable`: fsync the file
    before the rename and the directory after it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def write_json(path: Path, obj, durable: bool = False) -> None:
    """obj as indented JSON (config.json, manifests, summaries), through write_text."""
    write_text(path, json.dumps(obj, indent=2) + "\n", durable)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 8 MiB blocks (checkpoint shards are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """{"bytes", "sha256"} of a file, as manifests list them."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def publish_dir(tmp: Path, target: Path) -> None:
    """Rename a finished directory into place and make the rename durable; `target` must not exist."""
    os.rename(tmp, target)
    fsync_dir(Path(target).parent)


def remove_dir(path: Path) -> None:
    """Move a directory aside (readers never see it half deleted), then delete it."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name.removeprefix('.tmp-')}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def numel(shape) -> int:
    """Elements of a tensor of `shape` (a list or tuple of ints)."""
    n = 1
    for s in shape:
        n *= s
    return n


def library_versions() -> dict:
    """The versions of megavq and the libraries whose formats it writes."""
    out = {"python": platform.python_version()}
    for name in ("megavq", "torch", "deepspeed"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out
