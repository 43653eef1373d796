"""Weighted mixtures of token sources (data.source = 'PATH@WEIGHT,...'), blended as Megatron's BlendedDataset.

Sample i of the run (i = step * global batch + row) goes to the source whose share lags its weight most:
argmax_s (w_s (i + 1) - n_s(i)), n_s(i) the samples source s had before i (ties to the first source), so every
source's count stays within one sample of w_s i. With the weights as fractions q_s / P, the counts are exactly
q_s after P samples and the order repeats with period P: one period is computed once (Blend), and sample i is
(source, ordinal within the source) in O(1), at any step, on any rank. A source's sampler (megavq.data.sampler)
turns its ordinals into windows. Every rank computes the sources and windows of the whole global batch and reads
only its rows, so batches are a pure function of (seed, step) and the same at any rank count.

Weights are read as exact decimals (0.3 is 3/10); a period longer than MAX_PERIOD rounds the weights to
multiples of 1 / MAX_PERIOD (largest remainders). Every source must hold token ids of one tokenizer (one sha256).

Legend: N samples, S sequence length, B batch.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from megavq.config import parse_sources
from megavq.data.dataset import TokenData, prepare_data
from megavq.data.sampler import RandomWindows
from megavq.errors import DataError

MAX_PERIOD = 1 << 16


def quotas(weights: list[float]) -> list[int]:
    """Integer quotas q_s, sum P, with q_s / P the normalised weights (rounded when P would exceed MAX_PERIOD)."""
    fractions = [Fraction(repr(float(w))) for w in weights]
    shares = [f / sum(fractions) for f in fractions]
    period = math.lcm(*(s.denominator for s in shares))
    if period <= MAX_PERIOD:
        return [int(s * period) for s in shares]
    raw = [s * MAX_PERIOD for s in shares]
    q = [math.floor(r) for r in raw]
    for s in sorted(range(len(q)), key=lambda s: q[s] - raw[s])[:MAX_PERIOD - sum(q)]:  # largest remainders
        q[s] += 1
    return q


class Blend:
    """Sample index -> (source, ordinal within the source), Megatron's greedy order over one period."""

    def __init__(self, weights: list[float]):
        self.q = np.array(quotas(weights), dtype=np.int64)
        self.period = int(self.q.sum())
        w, counts = self.q / self.period, np.zeros(len(self.q), dtype=np.int64)
        self.source_P = np.empty(self.period, dtype=np.int64)
        self.ordinal_P = np.empty(self.period, dtype=np.int64)
        for i in range(self.period):
            s = int(np.argmax(w * (i + 1) - counts))
            self.source_P[i], self.ordinal_P[i] = s, counts[s]
            counts[s] += 1
        assert (counts == self.q).all()

    def __call__(self, i_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cycles_N, r_N = np.divmod(np.asarray(i_N, dtype=np.int64), self.period)
        source_N = self.source_P[r_N]
        return source_N, cycles_N * self.q[source_N] + self.ordinal_P[r_N]


def source_names(paths: list[str]) -> list[str]:
    """A short name per source (its directory name), made unique with #index where two share one."""
    names = [Path(p).name or p for p in paths]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def bits_per_byte(loss: float, bytes_per_token: float | None) -> float | None:
    """Mean loss per token (nats) -> bits per byte of text; None where the source does not know its bytes."""
    return None if bytes_per_token is None else loss / math.log(2) / bytes_per_token


def tokenizer_sha256(data) -> str:
    """The sha256 of the tokenizer of a source: as its meta.json records it, else of its tokenizer file."""
    return getattr(data, "meta", {}).get("tokenizer_sha256") or data.tokenizer().sha256


class Mixture:
    """Token sources with weights behind the batch interface of one source; one source is a mixture of one."""

    def __init__(self, sources: list, weights: list[float], names: list[str], dirs: list[str] = ()):
        self.sources, self.names, self.dirs = sources, names, list(dirs)  # dirs: where each source was read
        self.weights = [w / sum(weights) for w in weights]
        self.blend = Blend(weights)
        shas = [tokenizer_sha256(s) for s in sources] if len(sources) > 1 else []
        for name, sha in zip(names, shas):
            if sha != shas[0]:
                raise DataError(f"data source {name} was encoded with the tokenizer of sha256 {sha[:12]}..., "
                                f"{names[0]} with {shas[0][:12]}...: every source of a mixture needs the same one")
        self.vocab_size = sources[0].vocab_size
        self.eos_id = sources[0].eos_id

    @classmethod
    def open(cls, source: str, prepare=prepare_data, **options) -> "Mixture":
        """The mixture of data.source; `prepare` turns each path into a data directory (builtin is encoded);
        `options`: TokenData's (megavq.data.data_options: a Megatron source's tokenizer, split, append_eos)."""
        entries = parse_sources(source)
        paths = [p for p, _ in entries]
        dirs = [str(prepare(p)) for p in paths]
        return cls([TokenData(d, **options) for d in dirs], [w for _, w in entries], source_names(paths), dirs)

    def __len__(self) -> int:
        return len(self.sources)

    def tokenizer(self):
        return self.sources[0].tokenizer()

    def split_tokens(self, split: str) -> list[np.ndarray]:
        return [s.split(split) for s in self.sources]

    def batch(self, split: str, step: int, batch_size: int, seq_len: int, seed: int = 0,
              rows: slice = slice(None), sampler=RandomWindows()) -> tuple:
        """(x_BS, y_BS) of the rows `rows` of the global batch of `step`; a pure function of (seed, step)."""
        source_B, ordinal_B = self.blend(step * batch_size + np.arange(batch_size))
        starts_B = np.empty(batch_size, dtype=np.int64)
        for s, data in enumerate(self.split_tokens(split)):
            if len(data) < seq_len + 1:
                raise DataError(f"split '{split}' of {self.names[s]} has {len(data)} tokens, fewer than "
                                f"seq_len + 1 = {seq_len + 1}")
            sel = source_B == s
            if sel.any():
                starts_B[sel] = sampler.starts(len(data), seq_len, seed, s, step, ordinal_B[sel])
        return self.read(split, source_B[rows], starts_B[rows], seq_len)

    def read(self, split: str, source_B: np.ndarray, starts_B: np.ndarray, seq_len: int) -> tuple:
        x_BS = torch.empty(len(starts_B), seq_len, dtype=torch.int64)
        y_BS = torch.empty_like(x_BS)
        for s, data in enumerate(self.split_tokens(split)):
            sel = np.flatnonzero(source_B == s)
            if len(sel):
                x_BS[sel], y_BS[sel] = self.windows(data, starts_B[sel], seq_len)
        return x_BS, y_BS

    @staticmethod
    def windows(data, starts_B: np.ndarray, seq_len: int) -> tuple:
        """(x_BS, y_BS) of the windows [start, start + S + 1) of a 1-D sliceable token view."""
        xy_BS = torch.from_numpy(np.stack([np.asarray(data[s:s + seq_len + 1], dtype=np.int64) for s in starts_B]))
        return xy_BS[:, :-1], xy_BS[:, 1:]

    def bytes_per_token(self, split: str) -> float | None:
        """The mixture's bytes per token (weighted); None when a source does not know its bytes."""
        per_source = [s.bytes_per_token(split) for s in self.sources]
        return None if None in per_source else sum(w * b for w, b in zip(self.weights, per_source))
