"""Sharded token stores (data format 3): the layout, its reader and its check.

A store directory holds
  tokenizer.model                the SentencePiece model that encoded it
  SPLIT-NNNNN.bin                the token ids of one shard of a split (dtype of meta.json), documents one after
                                 another, each followed by the end-of-document id where it ends
  SPLIT-NNNNN.ends               int64: the exclusive end offset, within the shard, of each document that ends in
                                 it (its EOS included)
  SPLIT-NNNNN.json               the shard's record (the same fields as its manifest entry, and the key of the
                                 text it encodes): written last, it marks the shard finished
  meta.json                      the manifest, written last: {"format": "megavq-data", "format_version": 3,
                                 "versions", "vocab_size", "dtype", "eos_id", "tokenizer", "tokenizer_sha256",
                                 "source", "shard_chars", "splits": {split: {"tokens", "bytes", "documents",
                                 "shards": [{"file", "tokens", "bytes", "documents", "sha256", "ends_sha256"}]}}}
Shard i of a split holds the i-th group of consecutive pieces of the split's text holding at least shard_chars
characters (megavq.data.corpus.char_groups), so the boundaries depend on the text and shard_chars only, not on
the number of workers; a shard holds at most shard_chars characters plus one piece (a line, or a document of
a dataset row). A document cut by a shard boundary goes on in the next shard and ends where its EOS is.
"bytes" counts the UTF-8 bytes of the text (bits per byte), "sha256" is the digest of the .bin file.

Opening a store checks that every shard file exists and has the size its manifest entry gives (one line
naming the first that does not); `verify_store` also checks every file's sha256.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from megavq.errors import DataError
from megavq.files import file_sha256

STORE_VERSION = 3
OPEN_SHARDS = 256  # memory maps kept open per split view


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def ends_file(bin_file: str) -> str:
    return bin_file.removesuffix(".bin") + ".ends"


class ShardView:
    """The shards of one split as one token sequence: len(), [a:b] slices and integer-array indexing return
    numpy arrays, across shard boundaries."""

    def __init__(self, paths: list, counts: list, dtype: np.dtype):
        self.paths, self.dtype = paths, np.dtype(dtype)
        self.starts_K1 = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # shard k: [starts[k], starts[k+1])
        self.shard = lru_cache(maxsize=OPEN_SHARDS)(self._open)

    def _open(self, k: int) -> np.memmap:
        return np.memmap(self.paths[k], dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return int(self.starts_K1[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self.range(start, stop)
        idx = np.asarray(key, dtype=np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} tokens")
        shard = np.searchsorted(self.starts_K1, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=self.dtype)
        for k in np.unique(shard):
            at = shard == k
            out[at] = self.shard(int(k))[idx[at] - self.starts_K1[k]]
        return out if idx.ndim else out[()]

    def range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self.starts_K1, start, side="right")) - 1
        last = int(np.searchsorted(self.starts_K1, stop, side="left"))
        parts = [self.shard(k)[max(start - self.starts_K1[k], 0):stop - self.starts_K1[k]] for k in range(first, last)]
        return np.concatenate(parts)


def open_split(data_dir: Path, name: str, info: dict, dtype: np.dtype) -> ShardView:
    """The split's view, after checking that each shard's files exist with the sizes of the manifest."""
    shards = info.get("shards") or []
    if not shards:
        raise DataError(f"meta.json of '{data_dir}' lists no shards for split '{name}'")
    for shard in shards:
        check_size(data_dir / shard["file"], shard["tokens"] * dtype.itemsize)
        check_size(data_dir / ends_file(shard["file"]), shard["documents"] * 8)
    return ShardView([data_dir / s["file"] for s in shards], [s["tokens"] for s in shards], dtype)


def check_size(path: Path, expected: int) -> None:
    if not path.is_file():
        raise DataError(f"shard file '{path}' is missing: re-run scripts/prepare_data.py (it keeps finished shards)")
    if path.stat().st_size != expected:
        raise DataError(f"shard file '{path}' has {path.stat().st_size} bytes but meta.json says {expected}: "
                        "truncated or corrupt, re-run scripts/prepare_data.py")


def doc_ends(data_dir: Path, info: dict) -> np.ndarray:
    """The exclusive end offsets of the split's documents in its view, from the shards' .ends files."""
    parts, start = [], 0
    for shard in info["shards"]:
        parts.append(np.fromfile(data_dir / ends_file(shard["file"]), dtype=np.int64) + start)
        start += shard["tokens"]
    return np.concatenate(parts)


def verify_store(data_dir: Path, meta: dict) -> int:
    """Check every shard file's sha256 against the manifest; returns the number of files checked."""
    checked = 0
    for split, info in meta["splits"].items():
        for shard in info["shards"]:
            files = ((shard["file"], "sha256", shard["tokens"] * np.dtype(meta["dtype"]).itemsize),
                     (ends_file(shard["file"]), "ends_sha256", shard["documents"] * 8))
            for file, key, size in files:
                check_size(data_dir / file, size)
                if file_sha256(data_dir / file) != shard[key]:
                    raise DataError(f"shard file '{data_dir / file}' of split '{split}' does not match the sha256 "
                                    "of meta.json: corrupt, delete it and re-run scripts/prepare_data.py")
                checked += 1
    return checked
