"""Encoding a generated corpus into a sharded token store: throughput on 1 and N workers, peak memory of the
whole encoding, and a run killed with SIGKILL then run again giving the uninterrupted run's shards.

    python scripts/bench_tokenize.py [--dir /tmp/megavq-bench-lm1b] [--mb 200] [--workers 1,2]
                                     [--tokenizer MODEL | --vocab_size 8000] [--shard_chars 16000000]

Writes (once; reused while --mb and --seed agree) DIR/corpus-MB: training-monolingual.tokenized.shuffled/
news.en-000NN-of-00100 files of sentences drawn from the words of the builtin text with their frequencies
(seeded), plus the two held-out files. Without --tokenizer, trains a --vocab_size tokenizer on the first train
file (DIR/bpeN.model, reused). Then, per worker count, `scripts/prepare_data.py --source lm1b:CORPUS
--workers W` in a fresh directory, in its own process group, its memory sampled every 0.2 s: the sum over the
process tree of RSS (shared pages counted in each process) and of PSS (shared pages divided among their
processes: the memory the encoding really holds). Last, with the largest worker count, the same command is
killed (SIGKILL to the whole group) once half the train shards are finished, run again, and its shard files
(.bin, .ends) compared with the uninterrupted run's. MB = 10^6 bytes of UTF-8 text.
"""
import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from megavq.data import Tokenizer, train_tokenizer
from megavq.data.corpus import LM1B_HELDOUT, builtin_text

TRAIN_FILES = 10
HELDOUT_MB = 1
SCRIPT = Path(__file__).resolve().parent / "prepare_data.py"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/megavq-bench-lm1b", help="where the corpus and outputs go")
    p.add_argument("--mb", type=int, default=200, help="size of the train files, in MB")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", help="an existing SentencePiece .model")
    group.add_argument("--vocab_size", type=int, default=8000, help="size of the tokenizer to train")
    p.add_argument("--shard_chars", type=int, default=16_000_000, help="characters per shard")
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
    corpus, stamp = root / f"corpus-{mb}", f"mb={mb} seed={seed}\n"
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


def tree_memory(proc: psutil.Process) -> tuple:
    """(sum of RSS, sum of PSS) in bytes over a process and its children."""
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:  # a worker that just ended
            pass
    return rss, pss


def encode(command: list, out: Path, kill_at_shards: int | None = None) -> dict:
    """Run the command in its own process group, sampling its memory; with kill_at_shards, SIGKILL the group
    once that many train shard records exist."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    watched, peak_rss, peak_pss = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        rss, pss = tree_memory(watched)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        if kill_at_shards is not None and len(list(out.glob("train-*.json"))) >= kill_at_shards:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"killed": True, "finished_shards": len(list(out.glob("train-*.json")))}
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {stderr.strip().splitlines()[-1:]}")
    return {"seconds": time.perf_counter() - start, "peak_rss": peak_rss, "peak_pss": peak_pss,
            "stdout": stdout.strip()}


def shard_bytes(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".bin", ".ends")}


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.dir)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    start = time.perf_counter()
    corpus = make_corpus(root, args.mb, args.seed)
    first = corpus / "training-monolingual.tokenized.shuffled/news.en-00001-of-00100"
    model = Path(args.tokenizer or root / f"bpe{args.vocab_size}.model")
    if not model.is_file():
        train_tokenizer([first.read_text()], args.vocab_size, model.with_suffix(""))
    print(f"corpus {corpus} ({time.perf_counter() - start:.0f} s), tokenizer {model} "
          f"(vocab {Tokenizer(model).vocab_size}), shards of {args.shard_chars:,} characters")
    print("| workers | text MB | seconds | MB/s | peak RSS, sum (MiB) | peak PSS, sum (MiB) | shards |")
    print("|---|---|---|---|---|---|---|")
    outs = {}
    for workers in map(int, args.workers.split(",")):
        out = outs[workers] = root / f"out-{args.mb}-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, str(SCRIPT), "--source", f"lm1b:{corpus}", "--out", str(out), "--tokenizer",
                   str(model), "--workers", str(workers), "--shard_chars", str(args.shard_chars)]
        run = encode(command, out)
        meta = json.loads((out / "meta.json").read_text())
        mb = sum(info["bytes"] for info in meta["splits"].values()) / 1e6
        shards = sum(len(info["shards"]) for info in meta["splits"].values())
        print(f"| {workers} | {mb:.1f} | {run['seconds']:.1f} | {mb / run['seconds']:.2f} | "
              f"{run['peak_rss'] / 2**20:.0f} | {run['peak_pss'] / 2**20:.0f} | {shards} |", flush=True)
    workers = max(outs)
    done = outs[workers]
    same_as_one = shard_bytes(done) == shard_bytes(outs[min(outs)])
    print(f"shards of {min(outs)} and {workers} workers byte-identical: {same_as_one}")
    out = root / f"out-{args.mb}-kill"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, str(SCRIPT), "--source", f"lm1b:{corpus}", "--out", str(out), "--tokenizer",
               str(model), "--workers", str(workers), "--shard_chars", str(args.shard_chars)]
    n_train = len(json.loads((done / "meta.json").read_text())["splits"]["train"]["shards"])
    killed = encode(command, out, kill_at_shards=n_train // 2)
    rerun = encode(command, out)
    identical = shard_bytes(out) == shard_bytes(done) and \
        json.loads((out / "meta.json").read_text())["splits"] == json.loads((done / "meta.json").read_text())["splits"]
    print(f"kill -9 (process group) with {killed['finished_shards']} of {n_train} train shards finished, then the "
          f"same command: {rerun['seconds']:.1f} s, peak PSS {rerun['peak_pss'] / 2**20:.0f} MiB; shards and "
          f"manifest byte-identical to the uninterrupted run's: {identical}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if identical and same_as_one else 1


if __name__ == "__main__":
    sys.exit(main())
