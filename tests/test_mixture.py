"""Weighted mixtures of token sources and the samplers: shares, permutations, resume, ranks, one tokenizer."""
import inspect
import textwrap

import numpy as np
import pytest
import torch

from megavq.config import config_from_dict, load_config, parse_sources, saved_config
from megavq.data import TokenData, encode_corpus, prepare_data
from megavq.data.dataset import BUILTIN_TOKENIZER
from megavq.data.mixture import Blend, Mixture
from megavq.data.sampler import PermutedWindows, RandomWindows, WindowPermutation
from megavq.errors import ConfigError, DataError

SEQ = 16


@pytest.fixture(scope="module")
def code_data(tmp_path_factory):
    """A second source: the source code of a few standard-library modules, encoded with the builtin tokenizer."""
    folder = tmp_path_factory.mktemp("code")
    for module in (textwrap, inspect):
        (folder / f"{module.__name__}.py.txt").write_text(inspect.getsource(module))
    return encode_corpus(str(folder), tmp_path_factory.mktemp("data") / "code", tokenizer_path=BUILTIN_TOKENIZER)


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    return prepare_data("builtin", cache_dir=tmp_path_factory.mktemp("cache"))


# ---- the permutation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 17, 1000, 4099])
def test_window_permutation_is_a_bijection(n):
    perm = WindowPermutation(n, [5, 0, 1])
    out = perm(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    if n >= 1000:
        assert not (out == np.arange(n)).all() and not (out == WindowPermutation(n, [5, 0, 2])(np.arange(n))).all()


def test_window_permutation_of_a_trillion_tokens_is_lazy():
    n = 1_000_000_000_000 // 4096  # 244 M windows of 4096
    perm = WindowPermutation(n, [1, 0, 0])
    out = perm(np.arange(0, n, n // 10_000))
    assert (out < n).all() and len(np.unique(out)) == len(out)
    assert perm.keys.nbytes < 100  # a key, no index


def test_no_window_is_drawn_twice_within_an_epoch(builtin_dir):
    mix, sampler = Mixture.open(str(builtin_dir)), PermutedWindows()
    n_windows = (TokenData(builtin_dir).tokens("train") - 1) // SEQ
    B, steps = 64, n_windows // 64 + 3  # a little more than one epoch
    x = torch.cat([mix.batch("train", s, B, SEQ, seed=3, sampler=sampler)[0] for s in range(steps)])
    tokens = torch.from_numpy(np.asarray(TokenData(builtin_dir).split("train"), dtype=np.int64))
    windows_NS = tokens[:n_windows * SEQ].view(n_windows, SEQ)
    first = x[:n_windows]
    starts = sampler.starts(len(tokens), SEQ, 3, 0, 0, np.arange(steps * B))
    assert (starts % SEQ == 0).all()
    epoch = starts[:n_windows] // SEQ
    assert sorted(epoch.tolist()) == list(range(n_windows))  # every window once in the first epoch
    assert torch.equal(first, windows_NS[torch.from_numpy(epoch)])  # and those are the windows read
    second = starts[n_windows:]  # the next epoch: another permutation
    assert len(np.unique(second)) == len(second) and not (second == starts[:len(second)]).all()


# ---- the blend ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], [0.5, 0.25, 0.125, 0.125], [0.123456789, 0.5, 2.0]])
def test_shares_stay_within_one_sample_of_the_weights_over_1000_steps(weights):
    blend = Blend(weights)
    B, steps = 24, 1000
    source_N, ordinal_N = blend(np.arange(B * steps))
    w = np.array(weights) / sum(weights)
    i = np.arange(1, B * steps + 1)
    for s in range(len(weights)):
        counts = np.cumsum(source_N == s)
        assert np.abs(counts - w[s] * i).max() < 1 + 1e-3 * (blend.period > 10_000), (s, weights)
        assert (ordinal_N[source_N == s] == np.arange(counts[-1])).all()  # each source read in its own order


def test_mixture_batches_resume_and_split_over_ranks_as_one_global_batch(builtin_dir, code_data):
    source = f"{builtin_dir}@0.7,{code_data}@0.3"
    mix = Mixture.open(source)
    assert mix.names == [builtin_dir.name, "code"] and mix.weights == pytest.approx([0.7, 0.3])
    for sampler in (PermutedWindows(), RandomWindows()):
        run = [mix.batch("train", s, 8, SEQ, seed=1, sampler=sampler) for s in range(12)]
        resumed = Mixture.open(source)  # a fresh process resuming at step 5
        later = [resumed.batch("train", s, 8, SEQ, seed=1, sampler=type(sampler)()) for s in range(5, 12)]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run[5:], later))
        for world in (2, 4):  # each rank reads its rows: together the global batch of one rank
            for s in (0, 7):
                parts = [mix.batch("train", s, 8, SEQ, 1, slice(r * 8 // world, (r + 1) * 8 // world), sampler)
                         for r in range(world)]
                assert torch.equal(torch.cat([p[0] for p in parts]), run[s][0])
    code_tokens = set(np.asarray(TokenData(code_data).split("train")).tolist())
    assert any(set(row.tolist()) <= code_tokens for row in run[0][0])


def test_one_source_with_the_random_sampler_draws_the_batches_of_earlier_runs(builtin_dir):
    mix, data = Mixture.open(str(builtin_dir)), TokenData(builtin_dir)
    for step in (0, 9):
        assert torch.equal(mix.batch("train", step, 8, SEQ, 5, slice(2, 6))[0],
                           data.batch("train", step, 8, SEQ, 5, slice(2, 6))[0])


def test_sources_of_another_tokenizer_are_refused_in_one_line(builtin_dir, tmp_path):
    (tmp_path / "text.txt").write_text(inspect.getsource(inspect))
    other = encode_corpus(str(tmp_path / "text.txt"), tmp_path / "other", vocab_size=400)
    with pytest.raises(DataError, match=r"was encoded with the tokenizer of sha256 .*same one") as e:
        Mixture.open(f"{builtin_dir},{other}")
    assert "\n" not in str(e.value)


# ---- configuration ----------------------------------------------------------------------------------------------

def test_source_lists_weights_and_samplers_in_the_config(tmp_path):
    assert parse_sources("a@2,b, c@0.5") == [("a", 2.0), ("b", 1.0), ("c", 0.5)]
    for bad, message in [("a@0", "weight '0' of a"), ("a@x", "weight 'x' of a"), ("a,,b", "empty path")]:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny", [f"data.source={bad}"])
    yaml_file = tmp_path / "mix.yaml"
    yaml_file.write_text("data:\n  source:\n    - {path: d1, weight: 3}\n    - {path: d2}\n")
    assert load_config(str(yaml_file)).data.source == "d1@3,d2@1.0"
    with pytest.raises(ConfigError, match="data.sampler must be one of permutation, random or auto"):
        load_config("tiny", ["data.sampler=shuffled"])
    cfg = load_config("tiny")
    assert cfg.data.sampler == "auto" and not cfg.data.document_mask
    saved = cfg.to_dict()
    del saved["data"]["sampler"]  # a config saved before data.sampler existed: random windows
    assert saved_config(saved).data.sampler == "random"
    assert config_from_dict(cfg.to_dict()).data.sampler == "auto"
