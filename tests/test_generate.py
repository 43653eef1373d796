import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megavq.config import load_config
from megavq.errors import ConfigError, MegavqError
from megavq.model import Transformer
from megavq.model.generate import router_is_causal, top_k_filter, top_p_filter
from megavq.model.kv_cache import KVCache
from megavq.moe.routers import available_routers
from megavq.store.model_dir import checkpoint_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 16
SMALL = ["model.vocab_size=64", "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.d_ff=48",
         f"model.seq_len={SEQ_LEN}", "model.tie_embeddings=false"]  # tied random weights only repeat the last token
PROMPTS = [[5, 9, 1, 33], [7, 2, 60, 11, 4, 18, 40, 3, 21], [12]]


def build(*overrides):
    torch.manual_seed(0)
    return Transformer(load_config("tiny", [*SMALL, *overrides])).eval()


def cached_logits(model, prompts, continuations):
    """Each row's logits (S_b, V) at its real positions: prompts prefilled left-padded in one batch, then the
    continuation tokens fed one step at a time through the KV cache."""
    S = max(len(p) for p in prompts)
    idx_BS = torch.tensor([[0] * (S - len(p)) + p for p in prompts])
    pad_B = torch.tensor([S - len(p) for p in prompts])
    cache = KVCache(model.cfg.model, pad_B, S + continuations.shape[1], torch.float32)
    steps = [model(idx_BS, cache=cache)] + [model(continuations[:, i:i + 1], cache=cache)
                                            for i in range(continuations.shape[1])]
    logits_BLV = torch.cat(steps, dim=1)
    return [logits_BLV[b, pad:] for b, pad in enumerate(pad_B.tolist())]


def assert_cache_matches_recompute(model):
    n = SEQ_LEN - max(len(p) for p in PROMPTS)  # the longest row fills the trained context exactly
    continuations = torch.randint(0, 64, (len(PROMPTS), n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = cached_logits(model, PROMPTS, continuations)
        for prompt, cont, got in zip(PROMPTS, continuations, cached):
            full = model(torch.tensor([prompt + cont.tolist()]))[0]  # the training path, no cache
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    ["moe.every=0"],
    ["moe.router=topk"],
    ["moe.router=vq"],
    ["moe.router=compete"],
    ["moe.router=topk", "model.n_kv_heads=2"],
    ["moe.router=vq", "model.n_kv_heads=1"],
    ["moe.router=topk", "model.pos=learned", "model.norm=layernorm", "model.mlp=gelu", "model.qkv_bias=true"],
    ["moe.every=0", "model.pos=learned", "model.n_kv_heads=2"],
    ["moe.router=topk", "model.document_eos_id=3"],  # PROMPTS[1] holds two documents
    ["moe.every=0", "model.pos=learned", "model.document_eos_id=3"],
], ids=["dense", "topk", "vq", "compete", "topk-gqa", "vq-mqa", "topk-learned-pos", "dense-learned-gqa",
        "topk-documents", "dense-learned-documents"])
def test_kv_cache_decoding_equals_full_recomputation(overrides):
    assert_cache_matches_recompute(build(*overrides))


@pytest.mark.parametrize("router", available_routers())
def test_every_router_generates_or_is_refused_by_its_causality(router):
    model = build(f"moe.router={router}", "moe.allow_noncausal=true")  # a model trained with the opt-in
    if router_is_causal(model.cfg):
        assert_cache_matches_recompute(model)
    else:
        with pytest.raises(ConfigError, match=f"moe.router={router} is not causal"):
            model.generate([[1, 2]], 3)


def test_usmoe_with_token_selection_is_causal_and_generates():
    model = build("moe.router=usmoe", "moe.router_options.selection=token")
    assert router_is_causal(model.cfg)
    assert_cache_matches_recompute(model)


def test_batching_does_not_change_a_prompts_result():
    model = build("model.n_kv_heads=2")
    batch = model.generate(PROMPTS, 6, greedy=True)
    assert batch == [model.generate([p], 6, greedy=True)[0] for p in PROMPTS]
    assert len(set(map(tuple, batch))) == len(PROMPTS)  # the rows really differ
    sampled = model.generate(PROMPTS, 6, seed=5, top_k=20)  # row b draws with seed + b
    assert sampled == [model.generate([p], 6, seed=5 + b, top_k=20)[0] for b, p in enumerate(PROMPTS)]


def test_same_seed_same_tokens_another_seed_differs():
    model = build().train()
    a = model.generate(PROMPTS, 7, seed=3, temperature=1.5)
    assert model.training  # its mode is restored
    assert a == model.generate(PROMPTS, 7, seed=3, temperature=1.5)
    assert a != model.generate(PROMPTS, 7, seed=4, temperature=1.5)
    assert all(len(row) == 7 for row in a)


def test_top_k_1_and_tiny_top_p_sample_the_greedy_tokens():
    model = build()
    greedy = model.generate(PROMPTS, 5, greedy=True)
    assert model.generate(PROMPTS, 5, top_k=1, seed=9) == greedy
    assert model.generate(PROMPTS, 5, top_p=1e-6, seed=9) == greedy
    assert model.generate(PROMPTS, 5, temperature=0) == greedy


def test_filters_keep_the_most_likely_tokens():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()
    kept = lambda t: (t > float("-inf")).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(top_k_filter(logits, 2)) == [1, 3]
    assert kept(top_p_filter(logits, 0.7)) == [1, 3]  # 0.5 < 0.7 <= 0.5 + 0.3
    assert kept(top_p_filter(logits, 0.9)) == [1, 2, 3]
    assert kept(top_p_filter(logits, 0.4)) == [1]


def test_a_row_stops_at_eos_and_the_batch_when_every_row_has():
    model = build()
    free = model.generate(PROMPTS, 7, greedy=True)
    eos = free[0][3]
    assert eos not in free[0][:3] and eos not in free[2]  # row 0 stops at its 4th token, row 2 never
    assert model.generate(PROMPTS, 7, greedy=True, eos_id=eos) == [
        row[:row.index(eos)] if eos in row else row for row in free]
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    both = model.generate([PROMPTS[0], PROMPTS[0] + free[0][:1]], 7, greedy=True, eos_id=eos)
    assert both == [free[0][:3], free[0][1:3]]
    assert len(forwards) == 4  # the prefill and 3 decoding steps: none after the last row stopped


def test_past_the_trained_context_is_an_error_naming_both_numbers():
    model = build()
    assert len(model.generate([[1] * 10], SEQ_LEN - 10, greedy=True)[0]) == SEQ_LEN - 10  # exactly fits
    with pytest.raises(MegavqError, match=rf"= {SEQ_LEN + 1} tokens exceeds .*model.seq_len={SEQ_LEN}"):
        model.generate([[1, 2], [1] * 10], SEQ_LEN - 9)


def test_bad_requests_are_refused():
    model = build()
    for prompts, n, kwargs, message in [([[1]], 0, {}, "max_new_tokens"), ([[]], 2, {}, "at least one token"),
                                        ([[64]], 2, {}, "token id 64"), ([[1]], 2, {"top_p": 0}, "top_p"),
                                        ([[1]], 2, {"temperature": -1}, "temperature")]:
        with pytest.raises(MegavqError, match=message):
            model.generate(prompts, n, **kwargs)


def test_checkpoint_tokenizer_is_the_datas(tmp_path):
    from megavq.data.dataset import BUILTIN_TOKENIZER
    cfg = load_config("tiny", SMALL)
    assert checkpoint_tokenizer(cfg) == BUILTIN_TOKENIZER
    cfg.data.source = str(ROOT / "tests/fixtures/ec4c2b2/data")
    assert checkpoint_tokenizer(cfg) == ROOT / "tests/fixtures/ec4c2b2/data/tokenizer.model"
    cfg.data.source = str(tmp_path)
    with pytest.raises(MegavqError, match="--tokenizer"):
        checkpoint_tokenizer(cfg)


def test_script_prints_the_same_text_for_the_same_seed(tmp_path):
    from megavq.store.model_dir import save_model
    cfg = load_config("tiny", [*SMALL[1:], "model.vocab_size=4096"])
    torch.manual_seed(0)
    save_model(Transformer(cfg).state_dict(), cfg, tmp_path / "model")
    (tmp_path / "prompts.txt").write_text("The module\n\nimport os\n")
    script = [sys.executable, str(ROOT / "scripts/generate.py"), "--checkpoint", str(tmp_path / "model"),
              "--max_new_tokens", "8", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run(script + args, capture_output=True, text=True, env=env, timeout=120)
            for args in (["--prompt", "The module", "--prompt", "import os"],
                         ["--prompts_file", str(tmp_path / "prompts.txt")])]
    for run in runs:
        assert run.returncode == 0, run.stderr
    assert runs[0].stdout == runs[1].stdout  # same seed, same text (and the same prompts from either option)
    blocks = runs[0].stdout.split("--- ")[1:]  # "i: n new tokens ---\n" + prompt + continuation + "\n\n"
    for i, (block, prompt) in enumerate(zip(blocks, ["The module", "import os"])):
        header, text = block.split("\n", 1)
        assert header == f"{i + 1}: 8 new tokens ---"
        assert text.startswith(prompt) and len(text[:-2]) > len(prompt)  # the prompt and a continuation
    assert len(blocks) == 2


def test_the_tokenizer_is_the_one_the_checkpoint_records(tmp_path):
    """The manifest's copy, even when the training data is gone; the data's tokenizer only for checkpoints that
    record none."""
    from megavq.data.dataset import BUILTIN_TOKENIZER
    from megavq.store.model_dir import model_tokenizer, save_model
    cfg = load_config("tiny", [*SMALL[1:], "model.vocab_size=4096", f"data.source={tmp_path / 'gone'}"])
    torch.manual_seed(0)
    save_model(Transformer(cfg).state_dict(), cfg, tmp_path / "model", BUILTIN_TOKENIZER)
    recorded = model_tokenizer(tmp_path / "model")
    assert checkpoint_tokenizer(cfg, recorded) == tmp_path / "model" / "tokenizer.model" == recorded
    with pytest.raises(MegavqError, match="--tokenizer"):
        checkpoint_tokenizer(cfg)  # nothing recorded: the data's tokenizer, which is gone
    run = subprocess.run([sys.executable, str(ROOT / "scripts/generate.py"), "--checkpoint", str(tmp_path / "model"),
                          "--prompt", "The module", "--max_new_tokens", "4", "--greedy"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("--- 1: 4 new tokens ---\nThe module")
