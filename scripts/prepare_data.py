"""Tokenize a text corpus into a data directory (train.bin, val.bin, test.bin, meta.json).

    python scripts/prepare_data.py --source builtin|PATH|lm1b:PATH|hf:NAME[:CONFIG] --out DIR
                               [--tokenizer MODEL | --vocab_size N] [--text_column text] [--threads N]

Without --tokenizer a BPE tokenizer of --vocab_size pieces is trained on the train split and saved in DIR.
Training and encoding use --threads threads (default: all the machine's CPUs, os.cpu_count()).
"""
import argparse
import sys

from megavq.data import SPLITS, TokenData, encode_corpus
from megavq.errors import MegavqError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="builtin | PATH | lm1b:PATH | hf:NAME[:CONFIG]")
    p.add_argument("--out", required=True, help="output data directory")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="an existing SentencePiece .model to encode with")
    group.add_argument("--vocab_size", type=int, default=4096, help="size of the tokenizer to train")
    p.add_argument("--text_column", default="text", help="text column of a Hugging Face dataset")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for tokenizer training and encoding (default: os.cpu_count())")
    return p.parse_args(argv)


def summary(data: TokenData) -> str:
    counts = ", ".join(f"{s} {data.tokens(s):,}" for s in SPLITS)
    return (f"{data.dir}: vocab {data.vocab_size}, tokens: {counts}; "
            f"{data.bytes_per_token('train'):.3f} bytes/token (train)")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = encode_corpus(args.source, args.out, args.tokenizer, args.vocab_size, args.text_column,
                            args.threads)
        print(summary(TokenData(out)))
    except MegavqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
