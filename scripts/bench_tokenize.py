"""Encode throughput of the data layer on 1 and N threads, on a synthetic corpus in lm1b's layout.

    python scripts/bench_tokenize.py [--dir /tmp/megavq-bench-lm1b] [--mb 200] [--threads 1,2]
                                     [--tokenizer MODEL | --vocab_size 8000]

Writes (once; reused while --mb and --seed agree) DIR/corpus: training-monolingual.tokenized.shuffled/
news.en-000NN-of-00100 files of sentences drawn from the words of the builtin text with their frequencies
(seeded), plus the two held-out files. Without --tokenizer, trains a --vocab_size tokenizer on the first train
file. Then, per thread count: `Tokenizer.encode_batch` on the first train file held in memory, and the whole
`encode_corpus` (read, encode, write all splits) of the corpus. MB = 10^6 bytes of UTF-8 text.
"""
import argparse
import collections
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from megavq.data import TokenData, Tokenizer, encode_corpus, train_tokenizer
from megavq.data.corpus import LM1B_HELDOUT, builtin_text

TRAIN_FILES = 10
HELDOUT_MB = 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/megavq-bench-lm1b", help="where the corpus and outputs go")
    p.add_argument("--mb", type=int, default=200, help="size of the train files, in MB")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="an existing SentencePiece .model")
    group.add_argument("--vocab_size", type=int, default=8000, help="size of the tokenizer to train")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_sentences(path: Path, n_bytes: int, words: np.ndarray, p_words: np.ndarray, rng) -> None:
    """Sentences of 5-40 words and a final ' .', one per line, until the file has about n_bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < n_bytes:
            lengths = rng.integers(5, 41, size=10_000)
            chosen = iter(rng.choice(words, size=int(lengths.sum()), p=p_words))
            text = "".join(" ".join(next(chosen) for _ in range(n)) + " .\n" for n in lengths)
            written += f.write(text)


def make_corpus(root: Path, mb: int, seed: int) -> Path:
    corpus, stamp = root / "corpus", f"mb={mb} seed={seed}\n"
    if (corpus / "DONE").is_file() and (corpus / "DONE").read_text() == stamp:
        return corpus
    counts = collections.Counter(re.findall(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]", builtin_text()))
    words = np.array(sorted(counts))
    p_words = np.array([counts[w] for w in words], dtype=np.float64)
    rng = np.random.default_rng(seed)
    for i in range(1, TRAIN_FILES + 1):
        path = corpus / f"training-monolingual.tokenized.shuffled/news.en-{i:05d}-of-00100"
        write_sentences(path, mb * 10**6 // TRAIN_FILES, words, p_words / p_words.sum(), rng)
    for shard in (0, 1):
        write_sentences(corpus / LM1B_HELDOUT.format(shard), HELDOUT_MB * 10**6, words, p_words / p_words.sum(), rng)
    (corpus / "DONE").write_text(stamp)
    return corpus


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.dir)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    corpus, seconds = timed(lambda: make_corpus(root, args.mb, args.seed))
    first = corpus / "training-monolingual.tokenized.shuffled/news.en-00001-of-00100"
    model = args.tokenizer or root / f"bpe{args.vocab_size}.model"
    if not Path(model).is_file():
        train_tokenizer([first.read_text()], args.vocab_size, Path(model).with_suffix(""))
    tok = Tokenizer(model)
    lines = first.read_text().splitlines(keepends=True)
    mb_lines = sum(len(x.encode()) for x in lines) / 1e6
    print(f"corpus {corpus} ({seconds:.0f} s), tokenizer {model} (vocab {tok.vocab_size})")
    tok.encode_batch(lines[:10_000], 1)  # warm-up: the first call of a process is slower
    print("| threads | encode_batch MB/s | encode_corpus MB/s | encode_corpus s | train.bin sha256 |")
    print("|---|---|---|---|---|")
    for threads in map(int, args.threads.split(",")):
        _, batch_s = timed(lambda: tok.encode_batch(lines, threads))
        out, corpus_s = timed(lambda: encode_corpus(f"lm1b:{corpus}", root / f"out-{threads}", model, threads=threads))
        data = TokenData(out)
        mb = sum(info["bytes"] for info in data.meta["splits"].values()) / 1e6
        digest = hashlib.sha256((out / "train.bin").read_bytes()).hexdigest()[:12]
        print(f"| {threads} | {mb_lines / batch_s:.2f} | {mb / corpus_s:.2f} | {corpus_s:.1f} | {digest} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
