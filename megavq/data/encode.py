"""Encoding a text source into a sharded token store (data format 3, megavq.data.store) in worker processes.

The main process streams each split's pieces (megavq.data.corpus.read_corpus), cuts them into shards of
`shard_chars` characters (boundaries set by the text alone) and hands each shard to one of `workers`
processes, which encodes it in batches of ENCODE_BATCH_CHARS characters straight into its files. At most
`workers` shards wait or run at a time, so memory is bounded by about (2 x workers + 1) shards of text
whatever the corpus size.

Resuming: a shard's record (SPLIT-NNNNN.json) is written after its files, and holds the key of what it
encodes (source, text column, shard size, tokenizer sha256, split, index and the sha256 of its text). Run
again, the encoder keeps every shard whose record has the same key and whose files match the record's sizes
and sha256, and encodes the others. A tokenizer trained by an interrupted run (no --tokenizer) is reused
when tokenizer_training.json records the same source, text column and vocabulary size.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megavq.data.corpus import SPLITS, Piece, char_groups, read_corpus
from megavq.data.dataset import (ENCODE_BATCH_CHARS, META, TOKENIZER_FILE, encode_pieces, install_tokenizer,
                                 token_dtype)
from megavq.data.store import STORE_VERSION, ends_file, shard_name
from megavq.data.tokenizer import Tokenizer, resolve_threads
from megavq.errors import DataError
from megavq.files import file_sha256, fsync_file, library_versions, write_json

SHARD_CHARS = 32_000_000  # characters of text per shard: about 8 M tokens
TRAINING_RECORD = "tokenizer_training.json"


def encode_store(source: str, out_dir: str | Path, tokenizer_path: str | Path | None = None,
                 vocab_size: int = 4096, text_column: str = "text", workers: int | None = None,
                 shard_chars: int = SHARD_CHARS) -> Path:
    """Encode the three splits of `source` into the store `out_dir` with `workers` processes (default
    os.cpu_count()); trains a tokenizer on train when none is given. Finished shards of an earlier run are kept."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    workers = resolve_threads(workers)
    if shard_chars < 1:
        raise DataError(f"shard_chars must be at least 1, got {shard_chars}")
    pieces = {s: read_corpus(source, s, text_column) for s in SPLITS}  # fails early on a bad source
    tokenizer = store_tokenizer(source, out, tokenizer_path, vocab_size, text_column, workers)
    dtype = token_dtype(tokenizer.vocab_size)
    job = {"out": str(out), "tokenizer": str(tokenizer.path), "dtype": dtype.name, "eos_id": tokenizer.eos_id}
    key = {"source": source, "text_column": text_column, "shard_chars": shard_chars,
           "tokenizer_sha256": tokenizer.sha256}
    with ProcessPoolExecutor(workers) as pool:
        splits = {s: encode_split(pool, workers, pieces[s], s, job, key) for s in SPLITS}
    remove_stale(out, splits)
    meta = {"format": "megavq-data", "format_version": STORE_VERSION, "versions": library_versions(),
            "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "eos_id": tokenizer.eos_id,
            "tokenizer": TOKENIZER_FILE, "tokenizer_sha256": tokenizer.sha256, "source": source,
            "shard_chars": shard_chars, "splits": splits}
    write_json(out / META, meta, durable=True)
    return out


def store_tokenizer(source: str, out: Path, tokenizer_path, vocab_size: int, text_column: str,
                    threads: int) -> Tokenizer:
    """The given model copied in, or the one an earlier run trained for the same corpus, or a new one."""
    training = {"source": source, "text_column": text_column, "vocab_size": vocab_size}
    model, record = out / TOKENIZER_FILE, out / TRAINING_RECORD
    if tokenizer_path is None and model.is_file() and record.is_file() and \
            json.loads(record.read_text()) == {**training, "tokenizer_sha256": file_sha256(model)}:
        return Tokenizer(model)
    record.unlink(missing_ok=True)
    tokenizer = install_tokenizer(source, out, tokenizer_path, vocab_size, text_column, threads)
    if tokenizer_path is None:
        write_json(record, {**training, "tokenizer_sha256": tokenizer.sha256}, durable=True)
    return tokenizer


def text_sha256(group: list) -> str:
    digest = hashlib.sha256()
    for piece in group:
        text = piece.text.encode("utf-8")
        digest.update(f"{len(text)}:{int(piece.eos)}:".encode() + text)
    return digest.hexdigest()


def encode_split(pool, workers: int, pieces, split: str, job: dict, key: dict) -> dict:
    """Encode (or keep) every shard of one split; returns the split's manifest entry."""
    records, pending = {}, set()
    bar = tqdm(desc=split, unit="shard", disable=None)
    for i, group in enumerate(char_groups(pieces, key["shard_chars"])):
        shard_key = {**key, "split": split, "index": i, "text_sha256": text_sha256(group)}
        kept = finished_record(Path(job["out"]), shard_name(split, i), shard_key)
        if kept is not None:
            records[i] = kept
            bar.update()
            continue
        if len(pending) >= workers:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            collect(done, records, bar)
        texts, eos = [p.text for p in group], [p.eos for p in group]
        pending.add(pool.submit(encode_shard, job, shard_name(split, i), texts, eos, shard_key))
    collect(wait(pending).done, records, bar)
    bar.close()
    shards = [records[i] for i in range(len(records))]
    tokens = sum(s["tokens"] for s in shards)
    if tokens == 0:
        raise DataError(f"split '{split}' has no text (writing '{job['out']}')")
    return {"tokens": tokens, "bytes": sum(s["bytes"] for s in shards),
            "documents": sum(s["documents"] for s in shards), "shards": shards}


def collect(done, records: dict, bar) -> None:
    for future in done:
        index, record = future.result()
        records[index] = record
        bar.update()


def finished_record(out: Path, name: str, key: dict) -> dict | None:
    """The manifest entry of a finished shard of the same key whose files match its record, else None."""
    path = out / f"{name}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    entry = {k: v for k, v in record.items() if k != "key"}
    files = (out / entry["file"], out / ends_file(entry["file"]))
    if record.get("key") != key or not all(f.is_file() for f in files):
        return None
    if (file_sha256(files[0]), file_sha256(files[1])) != (entry["sha256"], entry["ends_sha256"]):
        return None
    return entry


@lru_cache(maxsize=1)
def worker_tokenizer(path: str) -> Tokenizer:
    return Tokenizer(path)


def encode_shard(job: dict, name: str, texts: list, eos: list, key: dict) -> tuple:
    """In a worker: encode one shard into NAME.bin and NAME.ends, then write its record; returns
    (index, manifest entry)."""
    out, dtype, tokenizer = Path(job["out"]), np.dtype(job["dtype"]), worker_tokenizer(job["tokenizer"])
    bin_path, ends_path = out / f"{name}.bin", out / f"{name}.ends"
    tokens = n_bytes = 0
    ends = []
    with open(f"{bin_path}.tmp", "wb") as f:
        for batch in char_groups(map(Piece, texts, eos), ENCODE_BATCH_CHARS):
            ids = encode_pieces(batch, tokenizer, dtype, threads=1)
            ids.tofile(f)
            ends.append(np.flatnonzero(ids == job["eos_id"]) + 1 + tokens)  # text never encodes to EOS
            tokens += len(ids)
            n_bytes += sum(len(piece.text.encode("utf-8")) for piece in batch)
    np.concatenate(ends or [np.empty(0, np.int64)]).astype(np.int64).tofile(f"{ends_path}.tmp")
    for path in (bin_path, ends_path):
        fsync_file(Path(f"{path}.tmp"))
        Path(f"{path}.tmp").replace(path)
    entry = {"file": bin_path.name, "tokens": tokens, "bytes": n_bytes, "documents": sum(map(len, ends)),
             "sha256": file_sha256(bin_path), "ends_sha256": file_sha256(ends_path)}
    write_json(out / f"{name}.json", {**entry, "key": key}, durable=True)
    return key["index"], entry


def remove_stale(out: Path, splits: dict) -> None:
    """Delete shard files of an earlier encoding that the new manifest does not list, and the split files of a
    format-2 directory re-encoded in place."""
    listed = {f"{Path(s['file']).stem}" for info in splits.values() for s in info["shards"]}
    for split in SPLITS:
        (out / f"{split}.bin").unlink(missing_ok=True)
        for path in out.glob(f"{split}-[0-9]*.*"):
            if path.name.split(".")[0] not in listed:
                path.unlink()
