"""Tokenize a text corpus into a sharded token store (data format 3: shards, their document ends, meta.json).

    python scripts/prepare_data.py --source builtin|PATH|lm1b:PATH|hf:NAME[:CONFIG] --out DIR
                               [--tokenizer MODEL | --vocab_size N] [--text_column text] [--workers N]
                               [--shard_chars 32000000] [--format 3|2]
    python scripts/prepare_data.py --verify DIR

Without --tokenizer a BPE tokenizer of --vocab_size pieces is trained on the train split and saved in DIR.
Encoding runs in --workers processes (default: all the machine's CPUs, os.cpu_count()), with memory bounded
by about 2 x workers + 1 shards of text; run again after an interruption, it keeps the finished shards
(checked against their sha256) and encodes the rest. --format 2 writes the former layout (one file per split,
encoded in one process with --workers threads). --verify checks every shard of a format-3 directory against
the sha256 of its meta.json.
"""
import argparse
import sys
from pathlib import Path

from megavq.data import SPLITS, TokenData, encode_corpus
from megavq.data.encode import SHARD_CHARS, encode_store
from megavq.data.store import STORE_VERSION, verify_store
from megavq.errors import DataError, MegavqError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", help="builtin | PATH | lm1b:PATH | hf:NAME[:CONFIG]")
    p.add_argument("--out", help="output data directory")
    p.add_argument("--verify", metavar="DIR", help="check the sha256 of every shard of a format-3 directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="an existing SentencePiece .model to encode with")
    group.add_argument("--vocab_size", type=int, default=4096, help="size of the tokenizer to train")
    p.add_argument("--text_column", default="text", help="text column of a Hugging Face dataset")
    p.add_argument("--workers", "--threads", dest="workers", type=int, default=None,
                   help="encoding processes and tokenizer-training threads (default: os.cpu_count())")
    p.add_argument("--shard_chars", type=int, default=SHARD_CHARS, help="characters of text per shard")
    p.add_argument("--format", type=int, choices=(2, STORE_VERSION), default=STORE_VERSION,
                   help="3: sharded store; 2: one file per split")
    args = p.parse_args(argv)
    if not args.verify and not (args.source and args.out):
        p.error("--source and --out are required (or --verify DIR)")
    return args


def summary(data: TokenData) -> str:
    counts = ", ".join(f"{s} {data.tokens(s):,}" for s in SPLITS)
    return (f"{data.dir}: vocab {data.vocab_size}, tokens: {counts}; "
            f"{data.bytes_per_token('train'):.3f} bytes/token (train)")


def verify(path: str) -> str:
    data = TokenData(path)  # checks every shard's size
    if data.meta.get("format_version") != STORE_VERSION:
        raise DataError(f"'{path}' has format {data.meta.get('format_version', 1)}, not a sharded store (3)")
    return f"{path}: {verify_store(data.dir, data.meta)} shard files match meta.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.verify:
            print(verify(args.verify))
            return 0
        if args.format == STORE_VERSION:
            out = encode_store(args.source, args.out, args.tokenizer, args.vocab_size, args.text_column,
                               args.workers, args.shard_chars)
        else:
            out = encode_corpus(args.source, args.out, args.tokenizer, args.vocab_size, args.text_column,
                                args.workers)
        print(summary(TokenData(Path(out))))
    except MegavqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
