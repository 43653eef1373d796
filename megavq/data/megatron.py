"""Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`, written by Megatron-LM's preprocess_data.py) as a
data source: `megatron:PREFIX` wherever a data directory is accepted.

PREFIX.idx (little-endian):
  b"MMIDIDX\\x00\\x00"   magic
  <Q                    version, 1
  <B                    dtype code of the tokens in .bin (DTYPES)
  <Q                    sequence count N
  <Q                    document-index count D + 1 (D documents)
  int32[N]              sequence lengths, in tokens
  int64[N]              byte offsets of the sequences in .bin
  int64[D + 1]          document indices: document d is sequences [doc[d], doc[d + 1])
  int8[N]               (optional, not flagged in the header) modes of multimodal datasets; ignored
PREFIX.bin holds the sequences' tokens one after another.

The ids belong to the SentencePiece model given with it (`data.tokenizer=PATH`): vocabulary size and the
end-of-document id (EOS) come from that model. Documents written with --append-eod end with EOS; those
without get one appended when read (append_eos=False refuses them). The splits are contiguous document
ranges as Megatron's --split (`data.split`, "969,30,1" by default): weights w normalised, cumulative bounds
c, split i = documents [round(c[i] * D), round(c[i + 1] * D)). Megatron's files record no text bytes, so
bits per byte are not reported for them (loss and perplexity only).
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from megavq.data.corpus import SPLITS
from megavq.data.tokenizer import Tokenizer
from megavq.errors import DataError

PREFIX = "megatron:"
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
HEADER = struct.Struct("<9sQBQQ")
DEFAULT_SPLIT = "969,30,1"
EOS_PROBE_DOCUMENTS = 1000  # documents whose last token tells whether the dataset was written with EOS


def is_megatron(source) -> bool:
    return str(source).startswith(PREFIX)


def megatron_prefix(source: str) -> Path:
    return Path(source[len(PREFIX):])


def parse_split(split: str) -> list:
    """'969,30,1' -> the normalised weights of train, val and test (missing ones 0)."""
    parts = split.split(",")
    ok = 1 <= len(parts) <= 3 and all(re.fullmatch(r"[0-9]*\.?[0-9]+", p.strip()) for p in parts)
    weights = [float(p) for p in parts] + [0.0] * (3 - len(parts)) if ok else []
    if not ok or sum(weights) <= 0:
        raise DataError(f"data.split {split!r} is not 1 to 3 comma-separated non-negative weights (e.g. 969,30,1)")
    return [w / sum(weights) for w in weights]


def split_ranges(split: str, n_documents: int) -> dict:
    """{split: (first document, end document)} as Megatron cuts its --split."""
    bounds = np.cumsum([0.0, *parse_split(split)])
    return {s: (int(round(bounds[i] * n_documents)), int(round(bounds[i + 1] * n_documents)))
            for i, s in enumerate(SPLITS)}


# ---- reading --------------------------------------------------------------------------------------------

def read_index(path: Path) -> dict:
    """The arrays of a .idx file (memory-mapped): dtype, lengths_N, pointers_N, documents_D1."""
    if not path.is_file():
        raise DataError(f"Megatron index '{path}' does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER.size)
    if len(head) < HEADER.size or head[:9] != MAGIC:
        raise DataError(f"'{path}' is not a Megatron index (no MMIDIDX header)")
    _, version, code, n_seq, n_doc = HEADER.unpack(head)
    if version != VERSION or code not in DTYPES:
        raise DataError(f"Megatron index '{path}' has version {version} and dtype code {code}; this megavq reads "
                        f"version {VERSION} with dtype codes {sorted(DTYPES)}")
    need = HEADER.size + n_seq * 12 + n_doc * 8
    if size not in (need, need + n_seq):  # + the int8 modes of a multimodal dataset
        raise DataError(f"Megatron index '{path}' has {size} bytes; its header ({n_seq} sequences, {n_doc} "
                        f"document indices) needs {need}: truncated or corrupt")
    lengths_N = np.memmap(path, np.int32, "r", HEADER.size, (n_seq,))
    pointers_N = np.memmap(path, np.int64, "r", HEADER.size + 4 * n_seq, (n_seq,))
    documents_D1 = np.memmap(path, np.int64, "r", HEADER.size + 12 * n_seq, (n_doc,))
    return {"dtype": np.dtype(DTYPES[code]), "lengths_N": lengths_N, "pointers_N": pointers_N,
            "documents_D1": documents_D1}


def token_starts(index: dict, path: Path) -> np.ndarray:
    """The token offset in .bin of each document's start, and of the end (D + 1 values); refuses an index
    whose sequences are not stored one after another."""
    lengths_N, pointers_N, documents_D1 = index["lengths_N"], index["pointers_N"], index["documents_D1"]
    ends_N = np.cumsum(lengths_N, dtype=np.int64)
    starts_N = ends_N - lengths_N
    if not np.array_equal(pointers_N, starts_N * index["dtype"].itemsize):
        raise DataError(f"Megatron index '{path}': sequences are not stored one after another in the .bin")
    if len(documents_D1) == 0 or documents_D1[0] != 0 or documents_D1[-1] != len(lengths_N) or \
            np.any(np.diff(documents_D1) < 0):
        raise DataError(f"Megatron index '{path}': document indices do not cover its {len(lengths_N)} sequences")
    return np.append(starts_N, ends_N[-1] if len(ends_N) else 0)[documents_D1]


class EosView:
    """Documents of a token array, each followed by an appended EOS id: len() and [a:b] / integer-array
    indexing return numpy arrays."""

    def __init__(self, tokens: np.ndarray, starts_D1: np.ndarray, eos_id: int):
        self.tokens, self.eos_id = tokens, eos_id
        self.starts_D1 = starts_D1  # document d is tokens[starts_D1[d]:starts_D1[d + 1]]
        self.ends_D = starts_D1[1:] - starts_D1[0] + np.arange(1, len(starts_D1))  # exclusive ends in the view
        self.dtype = tokens.dtype

    def __len__(self) -> int:
        return int(self.ends_D[-1]) if len(self.ends_D) else 0

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            return self[np.arange(start, stop, step)]
        idx = np.asarray(key, dtype=np.int64)
        doc = np.searchsorted(self.ends_D, idx, side="right")  # the document of each position
        offset = idx - np.concatenate([[0], self.ends_D])[doc]
        is_eos = offset == self.starts_D1[doc + 1] - self.starts_D1[doc]
        source = np.where(is_eos, 0, self.starts_D1[doc] + offset)
        return np.where(is_eos, self.eos_id, self.tokens[source]).astype(self.dtype)


class MegatronData:
    """The splits of a Megatron indexed dataset: views, document ends and meta.json-like fields."""

    def __init__(self, source: str, tokenizer: str | Path | None, split: str = DEFAULT_SPLIT,
                 append_eos: bool = True):
        prefix = megatron_prefix(source)
        if not tokenizer:
            raise DataError(f"data source {source!r} needs the SentencePiece model of its ids: data.tokenizer=PATH")
        tok = Tokenizer(tokenizer)
        index = read_index(Path(f"{prefix}.idx"))
        bin_path = Path(f"{prefix}.bin")
        starts_D1 = token_starts(index, Path(f"{prefix}.idx"))
        tokens = open_bin(bin_path, index["dtype"], int(starts_D1[-1]))
        eos_id = tok.eos_id
        self.ranges = split_ranges(split, len(starts_D1) - 1)
        ends = has_eos(tokens, starts_D1, eos_id, source)
        if not ends and not append_eos:
            raise DataError(f"Megatron dataset {source!r} has no end-of-document ids (written without "
                            "--append-eod) and data.append_eos is false")
        self.splits, self.doc_ends = {}, {}
        for s, (a, b) in self.ranges.items():
            if a == b:
                raise DataError(f"data.split {split!r} leaves split '{s}' of {source!r} with no documents "
                                f"({len(starts_D1) - 1} in all)")
            starts = starts_D1[a:b + 1]
            self.splits[s] = tokens[starts[0]:starts[-1]] if ends else EosView(tokens, starts, eos_id)
            self.doc_ends[s] = starts[1:] - starts[0] if ends else self.splits[s].ends_D
        self.meta = {"format": "megatron", "source": source, "vocab_size": tok.vocab_size,
                     "dtype": index["dtype"].name, "eos_id": eos_id, "tokenizer": str(tok.path.resolve()),
                     "tokenizer_sha256": tok.sha256, "split": split,
                     "splits": {s: {"tokens": len(v), "bytes": None, "documents": self.ranges[s][1] - self.ranges[s][0]}
                                for s, v in self.splits.items()}}


def open_bin(path: Path, dtype: np.dtype, n_tokens: int) -> np.memmap:
    if not path.is_file():
        raise DataError(f"Megatron token file '{path}' does not exist")
    if path.stat().st_size != n_tokens * dtype.itemsize:
        raise DataError(f"Megatron token file '{path}' has {path.stat().st_size} bytes, its index says "
                        f"{n_tokens * dtype.itemsize} ({n_tokens} tokens of {dtype.name}): truncated or corrupt")
    return np.memmap(path, dtype=dtype, mode="r")


def has_eos(tokens: np.ndarray, starts_D1: np.ndarray, eos_id: int, source: str) -> bool:
    """Whether the documents end with EOS (written with --append-eod), from the first EOS_PROBE_DOCUMENTS."""
    probe = starts_D1[1:EOS_PROBE_DOCUMENTS + 1]
    probe = probe[probe > starts_D1[:len(probe)]]  # non-empty documents
    last = tokens[probe - 1] == eos_id
    if last.all() != last.any():
        raise DataError(f"Megatron dataset {source!r}: some documents end with the end-of-document id "
                        f"{eos_id} and some do not: is data.tokenizer the model its ids belong to?")
    return bool(last.all()) and len(last) > 0


# ---- writing --------------------------------------------------------------------------------------------

def write_megatron(prefix: str | Path, documents: list, vocab_size: int) -> None:
    """Write documents (each a list of sequences, each a sequence of ids) as PREFIX.bin and PREFIX.idx, in the
    layout above, with Megatron's dtype rule: uint16 below 65,500 ids, else int32."""
    dtype = np.dtype(np.uint16 if vocab_size < 65500 else np.int32)
    code = next(c for c, t in DTYPES.items() if np.dtype(t) == dtype)
    sequences = [np.asarray(seq, dtype=dtype) for doc in documents for seq in doc]
    lengths_N = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers_N = (np.cumsum(lengths_N, dtype=np.int64) - lengths_N) * dtype.itemsize
    documents_D1 = np.cumsum([0] + [len(doc) for doc in documents], dtype=np.int64)
    with open(f"{prefix}.bin", "wb") as f:
        for seq in sequences:
            f.write(seq.tobytes())
    with open(f"{prefix}.idx", "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, code, len(sequences), len(documents_D1)))
        for array in (lengths_N, pointers_N, documents_D1):
            f.write(array.tobytes())

