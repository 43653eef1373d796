"""Tokenized data directories: encoding a corpus into one, and memory-mapped batches out of one.

A data directory holds
  train.bin, val.bin, test.bin   the token ids of each split, documents one after another, each followed by
                                 the end-of-document id (EOS, `eos_id`) where it ends; np.uint16 when
                                 vocab_size < 65,536 else np.uint32
  tokenizer.model                the SentencePiece model that encoded them
  meta.json                      {"format": "megavq-data", "format_version", "versions" (of the writer's
                                 libraries), "vocab_size", "dtype", "eos_id", "tokenizer" (model path,
                                 relative to the directory), "tokenizer_sha256", "source",
                                 "splits": {split: {"file", "tokens", "bytes"}}}
                                 where tokens counts the EOS ids too and bytes is the UTF-8 size of the split's
                                 raw text, so bits per byte (loss x tokens / (bytes x ln 2)) counts the loss on
                                 EOS ids over the bytes of the text: EOS adds loss but no bytes.
meta.json is written last: a directory without it is incomplete.

Format versions: 2 (FORMAT_VERSION, still written for the builtin corpus) has EOS ids. 1 had none (documents
were only separated by newlines); it still loads, with a warning, and `eos_id` is None. 3 is the sharded store
that scripts/prepare_data.py writes (megavq.data.store, megavq.data.encode). A newer version is refused.
`TokenData` also opens Megatron indexed datasets, "megatron:PREFIX" (megavq.data.megatron).

Batches are a pure function of (seed, step): a resumed run sees the same data order, and every rank can
draw the same global batch and take its own slice, x_BS[rank * b:(rank + 1) * b].

Legend: B batch, S sequence length.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from megavq.data import megatron, store
from megavq.data.corpus import SPLITS, Piece, builtin_sha256, char_groups, read_corpus
from megavq.data.tokenizer import Tokenizer, train_tokenizer
from megavq.errors import DataError
from megavq.files import library_versions, publish_dir, write_json

META = "meta.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 2  # part of the builtin cache key: bump when the encoding changes
READABLE_VERSIONS = (1, 2, store.STORE_VERSION)  # 1: no EOS ids; 3: sharded
ENCODE_BATCH_CHARS = 1 << 20  # characters per encode call: bounds memory on any corpus
BUILTIN_TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizers" / "builtin-bpe4k.model"  # package data
META_KEYS = ("vocab_size", "dtype", "tokenizer", "tokenizer_sha256", "source", "splits")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size < 2**16 else np.uint32)


# ---- encoding -------------------------------------------------------------------------------------------

def encode_corpus(source: str, out_dir: str | Path, tokenizer_path: str | Path | None = None,
                  vocab_size: int = 4096, text_column: str = "text", threads: int | None = None) -> Path:
    """Encode the three splits of `source` into `out_dir`; trains a tokenizer on train when none is given.
    Training and encoding use `threads` threads (default os.cpu_count())."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    pieces = {s: read_corpus(source, s, text_column) for s in SPLITS}  # fails early on a bad source
    tokenizer = install_tokenizer(source, out, tokenizer_path, vocab_size, text_column, threads)
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {s: encode_split(pieces[s], tokenizer, out / f"{s}.bin", dtype, threads) for s in SPLITS}
    meta = {"format": "megavq-data", "format_version": FORMAT_VERSION, "versions": library_versions(),
            "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
            "tokenizer": TOKENIZER_FILE, "tokenizer_sha256": tokenizer.sha256, "source": source, "splits": splits}
    write_json(out / META, meta)
    return out


def install_tokenizer(source: str, out: Path, tokenizer_path, vocab_size: int, text_column: str,
                      threads: int | None = None) -> Tokenizer:
    """Copy the given model, or train one on the train split, to out/tokenizer.model."""
    model = out / TOKENIZER_FILE
    if tokenizer_path is None:
        texts = (piece.text for piece in read_corpus(source, "train", text_column))
        train_tokenizer(texts, vocab_size, model.with_suffix(""), threads)
    elif Path(tokenizer_path).resolve() != model.resolve():
        Tokenizer(tokenizer_path).eos_id  # raises when it is missing, not a model or has no EOS piece
        shutil.copyfile(tokenizer_path, model)
        model.with_suffix(".vocab").unlink(missing_ok=True)  # left by an earlier training in out
    return Tokenizer(model)


def encode_pieces(pieces: list, tokenizer: Tokenizer, dtype: np.dtype, threads: int | None = None) -> np.ndarray:
    """The ids of consecutive pieces, each followed by the EOS id where it ends its document."""
    ids_list = tokenizer.encode_batch([piece.text for piece in pieces], threads)
    eos = [tokenizer.eos_id]
    ids = itertools.chain.from_iterable(ids + eos if piece.eos else ids for piece, ids in zip(pieces, ids_list))
    count = sum(map(len, ids_list)) + sum(piece.eos for piece in pieces)
    return np.fromiter(ids, dtype=dtype, count=count)


def encode_split(pieces: Iterable[Piece], tokenizer: Tokenizer, path: Path, dtype: np.dtype,
                 threads: int | None = None) -> dict:
    """Stream `pieces` into `path` batch by batch; returns the split's meta entry."""
    tokens = n_bytes = 0
    with open(path, "wb") as f, tqdm(desc=path.stem, unit="B", unit_scale=True, disable=None) as bar:
        for batch in char_groups(pieces, ENCODE_BATCH_CHARS):
            ids = encode_pieces(batch, tokenizer, dtype, threads)
            ids.tofile(f)
            size = sum(len(piece.text.encode("utf-8")) for piece in batch)
            tokens, n_bytes = tokens + len(ids), n_bytes + size
            bar.update(size)
    if tokens == 0:
        raise DataError(f"split '{path.stem}' has no text (writing '{path}')")
    return {"file": path.name, "tokens": tokens, "bytes": n_bytes}


# ---- reading --------------------------------------------------------------------------------------------

def read_meta(data_dir: Path) -> dict:
    if not data_dir.is_dir():
        raise DataError(f"data directory '{data_dir}' does not exist")
    path = data_dir / META
    if not path.is_file():
        raise DataError(f"data directory '{data_dir}' has no {META}: it is incomplete or not tokenized "
                        "(run scripts/prepare_data.py)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"'{path}' is not valid JSON: {e}") from None
    version = check_data_version(meta, data_dir)
    keys = META_KEYS + (("eos_id",) if version >= 2 else ())
    missing = [k for k in keys if k not in meta] + [s for s in SPLITS if s not in meta.get("splits", {})]
    if missing:
        raise DataError(f"'{path}' lacks {', '.join(missing)}")
    return meta


def check_data_version(meta: dict, data_dir: Path) -> int:
    """The format version; raises for an unknown one, warns (one line) for format 1, which has no EOS ids."""
    version = meta.get("format_version", 1)  # the first directories had no version
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise DataError(f"data directory '{data_dir}' has format_version {version!r}, which this megavq cannot "
                        f"read (it reads {', '.join(map(str, READABLE_VERSIONS))}): update megavq or re-run "
                        "scripts/prepare_data.py")
    if version == 1:
        warnings.warn(f"data directory '{data_dir}' has format 1, with no end-of-document ids (EOS), so "
                      f"generation stops only at max_new_tokens; rebuild it with: {rebuild_command(meta, data_dir)}",
                      stacklevel=4)
    return version


def rebuild_command(meta: dict, data_dir: Path) -> str:
    """The command that re-encodes a data directory from its source with its own tokenizer."""
    args = ["python", "scripts/prepare_data.py", "--source", str(meta.get("source", "SOURCE")), "--out", str(data_dir),
            "--tokenizer", str(data_dir / meta.get("tokenizer", TOKENIZER_FILE))]
    return shlex.join(args)


def open_split(data_dir: Path, meta: dict, split: str, dtype: np.dtype):
    """A split's tokens: a memory map (formats 1, 2) or a view of its shards (format 3)."""
    if meta.get("format_version") == store.STORE_VERSION:
        return store.open_split(data_dir, split, meta["splits"][split], dtype)
    return map_split(data_dir, meta["splits"][split], dtype)


def eos_ends(data: np.ndarray, eos_id: int | None, block: int = 1 << 26) -> np.ndarray:
    """Positions after each EOS id, read in blocks (none in format 1)."""
    if eos_id is None:
        return np.empty(0, np.int64)
    parts = [np.flatnonzero(np.asarray(data[i:i + block]) == eos_id) + i + 1 for i in range(0, len(data), block)]
    return np.concatenate(parts or [np.empty(0, np.int64)]).astype(np.int64)


def data_options(data_cfg) -> dict:
    """TokenData's keyword arguments from the data.* settings (megavq.config.DataConfig)."""
    return {"tokenizer": data_cfg.tokenizer or None, "split": data_cfg.split, "append_eos": data_cfg.append_eos}


def map_split(data_dir: Path, info: dict, dtype: np.dtype) -> np.memmap:
    """Memory-map one split after checking its size against meta.json."""
    path = data_dir / info["file"]
    if not path.is_file():
        raise DataError(f"token file '{path}' is missing")
    expected, actual = info["tokens"] * dtype.itemsize, path.stat().st_size
    if expected == 0:
        raise DataError(f"meta.json of '{data_dir}' lists no tokens for '{info['file']}'")
    if actual != expected:
        raise DataError(f"token file '{path}' has {actual} bytes but meta.json says {expected} "
                        f"({info['tokens']} tokens of {dtype.name}): truncated or corrupt, "
                        f"re-run scripts/prepare_data.py")
    return np.memmap(path, dtype=dtype, mode="r")


class TokenData:
    """A validated, memory-mapped tokenized data directory (formats 1-3) or Megatron dataset ("megatron:PREFIX").
    tokenizer: the SentencePiece model of a Megatron dataset's ids (a data directory's own must match it);
    split and append_eos: how a Megatron dataset is split and whether EOS ids are appended (megavq.data.megatron)."""

    def __init__(self, data_dir: str | Path, tokenizer: str | Path | None = None,
                 split: str = megatron.DEFAULT_SPLIT, append_eos: bool = True):
        self.source = str(data_dir)
        self._doc_ends = {}
        if megatron.is_megatron(self.source):
            data = megatron.MegatronData(self.source, tokenizer, split, append_eos)
            self.dir, self.meta, self.splits = megatron.megatron_prefix(self.source).parent, data.meta, data.splits
            self._doc_ends = data.doc_ends
        else:
            self.dir = Path(data_dir)
            self.meta = read_meta(self.dir)
            self.splits = {s: open_split(self.dir, self.meta, s, np.dtype(self.meta["dtype"])) for s in SPLITS}
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = self.meta.get("eos_id")  # None in format 1
        self.dtype = np.dtype(self.meta["dtype"])
        if tokenizer and self.tokenizer().sha256 != Tokenizer(tokenizer).sha256:
            raise DataError(f"data {self.source} was encoded with the tokenizer {self.dir / self.meta['tokenizer']}, "
                            f"not data.tokenizer={tokenizer} (their sha256 differ)")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.tokens(s):,}" for s in SPLITS)
        return f"TokenData('{self.source}', vocab_size={self.vocab_size}, tokens: {sizes})"

    def split(self, split: str):
        """The split's tokens: a np.memmap (formats 1, 2) or a view with len() and [a:b] slicing."""
        if split not in self.splits:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        return self.splits[split]

    def tokens(self, split: str) -> int:
        return len(self.split(split))

    def bytes_per_token(self, split: str) -> float | None:
        """None for a source that does not know the bytes of its text (Megatron): no bits per byte then."""
        info = self.meta["splits"][split]
        return None if info["bytes"] is None else info["bytes"] / info["tokens"]

    def doc_ends(self, split: str) -> np.ndarray:
        """int64 exclusive end offsets of the split's documents in split(split), each EOS included; the last is
        len(split(split)) (a document cut by the end of the split ends there). Computed once per split."""
        if split not in self._doc_ends:
            data = self.split(split)
            if self.meta.get("format_version") == store.STORE_VERSION:
                ends = store.doc_ends(self.dir, self.meta["splits"][split])
            else:
                ends = eos_ends(data, self.eos_id)
            if not len(ends) or ends[-1] != len(data):
                ends = np.append(ends, len(data))
            self._doc_ends[split] = ends.astype(np.int64)
        return self._doc_ends[split]

    def tokenizer(self) -> Tokenizer:
        tok = Tokenizer(self.dir / self.meta["tokenizer"])
        if tok.sha256 != self.meta["tokenizer_sha256"]:
            raise DataError(f"tokenizer '{tok.path}' has sha256 {tok.sha256}, meta.json says "
                            f"{self.meta['tokenizer_sha256']}")
        return tok

    def _checked(self, split: str, seq_len: int) -> np.memmap:
        data = self.split(split)
        if len(data) < seq_len + 1:
            raise DataError(f"split '{split}' of '{self.dir}' has {len(data)} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}")
        return data

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0,
              rows: slice = slice(None)) -> tuple:
        """Random windows (x_BS, y_BS), int64, y = x shifted by one; a pure function of (seed, step). `rows`:
        only those rows of the batch are read (a rank's micro-batch; the others' windows are drawn, not read)."""
        data = self._checked(split, seq_len)
        rng = np.random.default_rng([seed, step])
        starts_B = rng.integers(0, len(data) - seq_len, size=batch_size)
        return windows(data, starts_B[rows], seq_len)

    def eval_batches(self, split: str, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator:
        """(x_BS, y_BS) over consecutive non-overlapping windows covering the split (the last batch may be
        smaller); with max_batches, max_batches * batch_size windows spread evenly over the split."""
        data = self._checked(split, seq_len)
        n_windows = (len(data) - 1) // seq_len
        chosen = np.arange(n_windows)
        if max_batches is not None and max_batches * batch_size < n_windows:
            k = max_batches * batch_size
            chosen = np.arange(k) * n_windows // k
        starts = chosen * seq_len
        return (windows(data, starts[i:i + batch_size], seq_len) for i in range(0, len(starts), batch_size))


def windows(data: np.ndarray, starts_B: np.ndarray, seq_len: int) -> tuple:
    idx_BS = starts_B[:, None] + np.arange(seq_len + 1)  # (B, S + 1)
    xy_BS = torch.from_numpy(data[idx_BS].astype(np.int64))
    return xy_BS[:, :-1].contiguous(), xy_BS[:, 1:].contiguous()


# ---- preparing a data source for training ---------------------------------------------------------------

def prepare_data(source: str, cache_dir: str | Path | None = None) -> Path:
    """'builtin' -> the builtin corpus encoded with the shipped tokenizer (cached); a tokenized data
    directory -> itself, validated; "megatron:PREFIX" -> itself (TokenData opens it with its tokenizer)."""
    if source == "builtin":
        return prepare_builtin(Path(cache_dir) if cache_dir else default_cache_dir())
    if megatron.is_megatron(source):
        return source
    if (Path(source) / META).is_file():
        TokenData(source)
        return Path(source)
    raise DataError(f"data source '{source}' is not 'builtin', 'megatron:PREFIX' nor a tokenized data directory "
                    "(run scripts/prepare_data.py first)")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGAVQ_CACHE") or Path.home() / ".cache" / "megavq")


def builtin_cache_key() -> str:
    """Changes with the shipped tokenizer, the builtin text (Python version) and the encoding format."""
    tokenizer_sha256 = Tokenizer(BUILTIN_TOKENIZER).sha256
    text = f"{FORMAT_VERSION}:{tokenizer_sha256}:{builtin_sha256()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete(data_dir: Path) -> bool:
    try:
        TokenData(data_dir)
        return True
    except DataError:
        return False


def prepare_builtin(cache: Path) -> Path:
    """Encode the builtin corpus once into cache/builtin-KEY; a temp dir renamed into place keeps
    concurrent first uses from seeing half-written data."""
    target = cache / f"builtin-{builtin_cache_key()}"
    if is_complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache))
    try:
        encode_corpus("builtin", tmp, tokenizer_path=BUILTIN_TOKENIZER)
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def publish(tmp: Path, target: Path) -> None:
    """Rename a finished directory into place; a complete one made meanwhile by another process wins."""
    if target.exists() and not is_complete(target):
        shutil.rmtree(target, ignore_errors=True)
    try:
        publish_dir(tmp, target)
    except OSError:
        if not is_complete(target):
            raise
