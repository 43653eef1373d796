"""Sharded tensor files: safetensors written tensor by tensor, read range by range, never unpickled.

A sharded checkpoint (format 2, megavq.train.checkpoint writes it) stores every tensor in its CANONICAL form
(the native ep_size 1 model: experts stacked (E, ...) in global expert order), flattened, as fragments:
`rank_RRRRR.safetensors` of each rank holds 1-D entries named `KIND/NAME@START`, the elements
[START, START + numel) of the flattened canonical tensor NAME. KIND is `fp32` (master weights), `exp_avg`,
`exp_avg_sq` (Adam moments) or `buffer` (buffers, and parameters the optimizer does not own). The manifest
lists every canonical tensor (shape, dtype, kind) and every file (bytes, sha256); the fragments of one
tensor cover it exactly once. A reader of any layout reads the ranges it needs from whichever files hold them.

The writer streams each tensor's bytes from its own memory (no copy of the state), hashing as it writes;
the reader reads straight into the destination tensor. The files are plain safetensors (`safe_open` reads
them too). Format 0/1 checkpoints (model.safetensors + train_state.safetensors + train_state.json) are read
through the same interface (`LegacyCheckpoint`), so resuming and `scripts/upgrade.py` share one reader.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import struct
from pathlib import Path

import torch

from megavq.errors import CheckpointError, MegavqError
from megavq.files import file_sha256, numel
from megavq.store.manifest import CONVERT, FORMATS, MANIFEST, read_manifest

KINDS = ("fp32", "exp_avg", "exp_avg_sq", "buffer")
WEIGHT_KINDS = ("fp32", "buffer")  # what a model needs (load_model never reads the optimizer state)
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_TORCH = {v: k for k, v in _DTYPES.items()}
CHUNK_BYTES = 64 << 20  # staging for device tensors and dtype casts


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def fragment_key(kind: str, name: str, start: int) -> str:
    return f"{kind}/{name}@{start}"


def parse_key(key: str) -> tuple[str, str, int]:
    kind, rest = key.split("/", 1)
    name, start = rest.rsplit("@", 1)
    return kind, name, int(start)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# ---- writing -------------------------------------------------------------------------------------------
def write_tensors(path: Path, entries: list[tuple[str, torch.Tensor]], metadata: dict | None = None,
                  on_progress=None) -> dict:
    """A safetensors file of 1-D (or any) contiguous tensors, streamed from their memory, flushed and fsynced.

    Returns {"bytes", "sha256"} of the file. `on_progress(i)` runs before entry i (fault injection).
    """
    header, offset = {"__metadata__": {k: str(v) for k, v in (metadata or {}).items()}}, 0
    for key, t in entries:
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(text)), text):
            f.write(chunk)
            digest.update(chunk)
        for i, (_, t) in enumerate(entries):
            if on_progress is not None:
                on_progress(i)
            for piece in _cpu_pieces(t):
                data = _bytes_of(piece)
                f.write(data)
                digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": 8 + len(text) + offset, "sha256": digest.hexdigest()}


def b64_of_tensor(t: torch.Tensor) -> str:
    """A small tensor's bytes as base64 text (RNG states in a manifest)."""
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def tensor_of_b64(text: str) -> torch.Tensor:
    """The bytes of b64_of_tensor as a uint8 tensor."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _cpu_pieces(t: torch.Tensor):
    """t as CPU contiguous pieces: itself on the CPU, bounded copies from a device."""
    assert t.is_contiguous(), "fragments are contiguous views"
    if t.device.type == "cpu":
        yield t
        return
    flat, step = t.reshape(-1), max(1, CHUNK_BYTES // t.element_size())
    for a in range(0, flat.numel(), step):
        yield flat[a:a + step].cpu()


# ---- reading -------------------------------------------------------------------------------------------
class TensorFile:
    """One safetensors file opened for range reads: `read(key, start, out)` fills `out` from element `start`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.f = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} is missing") from None
        self.header, self.data_start = self._read_header()

    def _read_header(self) -> tuple[dict, int]:
        size = os.fstat(self.f.fileno()).st_size
        head = self.f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{self.path} is truncated or not a safetensors file")
        try:
            header = json.loads(self.f.read(n))
        except ValueError:
            raise CheckpointError(f"{self.path} has a damaged header") from None
        header.pop("__metadata__", None)
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if 8 + n + end > size:
            raise CheckpointError(f"{self.path} is truncated ({size} bytes, its header needs {8 + n + end})")
        return header, 8 + n

    def entry(self, key: str) -> tuple[torch.dtype, list]:
        e = self.header[key]
        return _TORCH[e["dtype"]], e["shape"]

    def read(self, key: str, start: int, out: torch.Tensor) -> None:
        """out (CPU, contiguous, the entry's dtype) <- elements [start, start + out.numel()) of entry `key`."""
        e = self.header[key]
        item = out.element_size()
        self.f.seek(self.data_start + e["data_offsets"][0] + start * item)
        view = _bytes_of(out)
        if self.f.readinto(view) != len(view):
            raise CheckpointError(f"{self.path} is truncated (entry {key})")

    def tensor(self, key: str) -> torch.Tensor:
        dtype, shape = self.entry(key)
        out = torch.empty(shape, dtype=dtype)
        self.read(key, 0, out)
        return out

    def close(self) -> None:
        self.f.close()


class Fragments:
    """Where each canonical tensor's elements are: (kind, name) -> sorted [(start, numel, file, key)]."""

    def __init__(self, tensors: dict):
        self.tensors = tensors  # name -> {"shape", "dtype", "kind"}
        self.index: dict[tuple[str, str], list] = {}
        self.files: dict[str, TensorFile] = {}

    def add_file(self, name: str, tf: TensorFile) -> None:
        self.files[name] = tf
        for key, e in tf.header.items():
            kind, tensor, start = parse_key(key)
            numel = (e["data_offsets"][1] - e["data_offsets"][0]) // _TORCH[e["dtype"]].itemsize
            self.index.setdefault((kind, tensor), []).append((start, numel, name, key))

    def check_coverage(self, where: Path) -> None:
        """Every fragment list covers its tensor exactly once."""
        for (kind, name), frags in self.index.items():
            frags.sort()
            size = numel(self.tensors[name]["shape"]) if name in self.tensors else None
            pos = 0
            for start, n, _, _ in frags:
                if start != pos:
                    break
                pos += n
            if size is None or pos != size:
                raise CheckpointError(f"{where} is incomplete: {kind}/{name} has {pos} of {size} elements in order")

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self.index

    def read_range(self, kind: str, name: str, start: int, out: torch.Tensor) -> None:
        """out (1-D, CPU, contiguous, stored dtype) <- canonical elements [start, start + out.numel())."""
        end = start + out.numel()
        for f_start, n, file, key in self.index[(kind, name)]:
            lo, hi = max(start, f_start), min(end, f_start + n)
            if lo < hi:
                self.files[file].read(key, lo - f_start, out[lo - start:hi - start])

    def fill(self, kind: str, name: str, start: int, dest: torch.Tensor) -> None:
        """dest (1-D view of any dtype and device) <- canonical elements [start, ...), staged when it must be."""
        stored = dtype_of(self.tensors[name]["dtype"])
        if dest.device.type == "cpu" and dest.dtype == stored and dest.is_contiguous():
            return self.read_range(kind, name, start, dest)
        step = max(1, CHUNK_BYTES // stored.itemsize)
        for a in range(0, dest.numel(), step):
            piece = torch.empty(min(step, dest.numel() - a), dtype=stored)
            self.read_range(kind, name, start + a, piece)
            dest[a:a + piece.numel()].copy_(piece)

    def tensor(self, kind: str, name: str) -> torch.Tensor:
        info = self.tensors[name]
        out = torch.empty(info["shape"], dtype=dtype_of(info["dtype"]))
        self.read_range(kind, name, 0, out.view(-1))
        return out

    def close(self) -> None:
        for tf in self.files.values():
            tf.close()
        self.files = {}


# ---- checkpoint directories ------------------------------------------------------------------------------
class ShardedCheckpoint(Fragments):
    """A format-2 checkpoint directory: manifest.json + rank files (see the module docstring)."""

    def __init__(self, directory: Path, manifest: dict):
        super().__init__(manifest["tensors"])
        self.dir, self.manifest = Path(directory), manifest
        for name in manifest["shards"]:
            self.add_file(name, TensorFile(self.dir / name))
        self.check_coverage(self.dir)

    @property
    def meta(self) -> dict:
        return self.manifest


def verify_files(directory: Path, files: dict, names: list[str]) -> list[str]:
    """One line per file of `names` that is missing, of the wrong size, or whose sha256 differs."""
    problems = []
    for name in names:
        path, want = Path(directory) / name, files[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest records {want['bytes']} "
                            f"(truncated or replaced)")
        elif file_sha256(path) != want["sha256"]:
            problems.append(f"{path} does not match its sha256 in the manifest (altered or damaged)")
    return problems


LEGACY_FILES = ("model.safetensors", "train_state.safetensors", "train_state.json")


class LegacyCheckpoint(Fragments):
    """A format-0/1 checkpoint (model.safetensors + train_state.safetensors + train_state.json, whole canonical
    tensors) read through the fragment interface: `fp32/NAME`, `exp_avg/NAME`, ... from train_state, the
    other entries of model.safetensors as buffers."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        model, state = (TensorFile(self.dir / name) for name in LEGACY_FILES[:2])
        try:
            self.meta = json.loads((self.dir / LEGACY_FILES[2]).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{self.dir / LEGACY_FILES[2]} is missing") from None
        super().__init__({})
        self.files = {"state": state, "model": model}
        for file, tf in self.files.items():
            for key in tf.header:
                if file == "state" and "/" not in key:
                    continue  # the RNG state
                kind, name = key.split("/", 1) if file == "state" else ("buffer", key)
                if file == "model" and name in self.tensors:
                    continue  # a parameter: its fp32 master is in train_state
                dtype, shape = tf.entry(key)
                self.tensors.setdefault(name, {"shape": shape, "dtype": dtype_name(dtype),
                                               "kind": "buffer" if file == "model" else "param"})
                self.index[(kind, name)] = [(0, numel(shape), file, key)]
        self.rng = state.tensor("rng") if "rng" in state.header else None


# ---- discovery -------------------------------------------------------------------------------------------
STEP_DIR = re.compile(r"step_(\d+)")
MODEL_FILE = "model.safetensors"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def published(ckpt_dir: Path) -> list[Path]:
    """The published checkpoints of a `checkpoints/` directory, oldest first. A checkpoint is written under a
    temporary name and renamed once complete, so only complete ones carry a `step_N` name (format 0/1, written
    in place, count when their model file is there)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()
             and ((p / MANIFEST).is_file() or (p / MODEL_FILE).is_file())]
    return [p for _, p in sorted(found)]


def is_sharded(directory: Path) -> bool:
    """Whether a directory is a sharded checkpoint (format 2 or later)."""
    path = Path(directory) / MANIFEST
    if not path.is_file() or (Path(directory) / MODEL_FILE).is_file():
        return False
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return True  # a damaged manifest: reading it says so
    return manifest.get("format") == "megavq-checkpoint" and manifest.get("format_version", 0) >= 2


def open_checkpoint(directory: Path, verify: list[str] | None = None):
    """A checkpoint directory for reading: ShardedCheckpoint (format 2) or LegacyCheckpoint (format 1).
    `verify`: the files whose sha256 to check first (None: all of them; format 1 has no checksums).
    Format 0 and unknown formats are refused with the command that converts them."""
    directory = Path(directory)
    manifest = read_manifest(directory, ("checkpoint",))
    version = manifest.get("format_version", 0)
    if version == 0:
        raise MegavqError(f"{directory} is a checkpoint of format 0, which this megavq reads as a model but no "
                              f"longer resumes; convert its run with: {CONVERT.format(path=directory.parent.parent)}")
    if version < FORMATS["checkpoint"]:
        return LegacyCheckpoint(directory)
    files = manifest["files"]
    problems = verify_files(directory, files, list(files) if verify is None else verify)
    if problems:
        raise CheckpointError(problems[0])
    return ShardedCheckpoint(directory, manifest)
