"""Which windows of a token split the training batches read (data.sampler); a pure function of (seed, step).

A source's samples are numbered 0, 1, 2, ... in the order the run draws them (megavq.data.mixture numbers them);
a sampler turns the ordinals drawn at one step into window starts:
  random       windows starting anywhere, drawn with replacement at each step from rng([seed, step]) (and
               source s > 0 from rng([seed, step, s])): the sampler of every run saved before data.sampler
               existed, and of configs saved without the key
  permutation  the non-overlapping windows [w * S, w * S + S + 1) of the split, w in [0, n_windows), each epoch
               (n_windows ordinals) a seeded permutation of them: no window twice within an epoch. The
               permutation is a keyed bijection computed on the fly (WindowPermutation), so no index of the
               windows is stored, however large the split (1 T tokens: 244 M windows of 4096).

Legend: N ordinals, S sequence length.
"""
from __future__ import annotations

import numpy as np

ROUNDS = 6  # Feistel rounds: with a strong round function, 4 already make a pseudo-random permutation
_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping products)."""
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A keyed bijection of [0, n): a balanced Feistel network on [0, 4^h), the smallest such domain holding n,
    walked along its cycles until it lands below n (fewer than 4 passes on average, as 4^h < 4n)."""

    def __init__(self, n: int, key: list[int]):
        assert n >= 1
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence(key).generate_state(ROUNDS, dtype=np.uint64)

    def feistel(self, x_N: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x_N >> h, x_N & self.mask
        for k in self.keys:
            left, right = right, left ^ (mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, i_N: np.ndarray) -> np.ndarray:
        out_N = self.feistel(np.asarray(i_N, dtype=np.uint64))
        walk = out_N >= self.n
        while walk.any():
            out_N[walk] = self.feistel(out_N[walk])
            walk = out_N >= self.n
        return out_N.astype(np.int64)


class RandomWindows:
    """Windows starting anywhere, with replacement: the draws of a step come from rng([seed, step]) (source 0,
    as runs of one source always drew them) or rng([seed, step, source])."""

    name = "random"

    def starts(self, n_tokens: int, seq_len: int, seed: int, source: int, step: int, ordinals_N: np.ndarray):
        rng = np.random.default_rng([seed, step] + ([source] if source else []))
        return rng.integers(0, n_tokens - seq_len, size=len(ordinals_N))


class PermutedWindows:
    """Non-overlapping windows, each epoch in the order of a permutation keyed by (seed, source, epoch)."""

    name = "permutation"

    def __init__(self):
        self.cache = {}  # (n_windows, seed, source, epoch) -> WindowPermutation

    def permutation(self, n_windows: int, seed: int, source: int, epoch: int) -> WindowPermutation:
        key = (n_windows, seed, source, epoch)
        if key not in self.cache:
            if len(self.cache) >= 64:  # a few epochs of each source
                self.cache.clear()
            self.cache[key] = WindowPermutation(n_windows, [seed, source, epoch])
        return self.cache[key]

    def starts(self, n_tokens: int, seq_len: int, seed: int, source: int, step: int, ordinals_N: np.ndarray):
        n_windows = (n_tokens - 1) // seq_len
        epochs_N, k_N = np.divmod(np.asarray(ordinals_N, dtype=np.int64), n_windows)
        starts_N = np.empty(len(k_N), dtype=np.int64)
        for epoch in np.unique(epochs_N):  # a batch may straddle two epochs
            sel = epochs_N == epoch
            starts_N[sel] = self.permutation(n_windows, seed, source, int(epoch))(k_N[sel]) * seq_len
        return starts_N


def build_sampler(name: str):
    return {"random": RandomWindows, "permutation": PermutedWindows}[name]()
