"""Hugging Face export of every causal router, with its tokenizer: megavq checkpoints (random weights, the shipped
tokenizer) -> scripts/export.py or megavq.convert.hf.load.save_hf -> transformers (AutoModelForCausalLM, AutoTokenizer,
generate) -> the same logits, the same greedy tokens stopping at EOS, SentencePiece's ids; and
lm-evaluation-harness on an exported vq model."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT
from test_hf import randomize

from megavq.config import load_config
from megavq.convert.hf.export import save_hf
from megavq.convert.load import load_model
from megavq.data import Tokenizer, read_corpus
from megavq.data.dataset import BUILTIN_TOKENIZER
from megavq.errors import MegavqError
from megavq.model import Transformer
from megavq.moe.routers import available_routers, router_class
from megavq.store.model_dir import save_model

transformers = pytest.importorskip("transformers")
V = 4096  # the shipped tokenizer's vocabulary
SMALL = ["model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=48",
         "model.seq_len=64", f"model.vocab_size={V}", "model.tie_embeddings=false", "moe.num_experts=4"]
CASES = {  # name: (overrides, the architecture transformers loads)
    "topk": (["moe.router=topk"], "MixtralForCausalLM"),
    "compete": (["moe.router=compete"], "MixtralForCausalLM"),
    "vq": (["moe.router=vq", "moe.top_k=3"], "MegavqForCausalLM"),
    "vq-k2-codes": (["moe.router=vq", "moe.router_options.num_codes=8", "moe.router_options.code_dim=16"],
                    "MegavqForCausalLM"),
    "xmoe": (["moe.router=xmoe"], "MegavqForCausalLM"),
    "xmoe-tied-mqa": (["moe.router=xmoe", "model.tie_embeddings=true", "model.n_kv_heads=1"], "MegavqForCausalLM"),
    "usmoe-token": (["moe.router=usmoe", "moe.router_options.selection=token"], "MegavqForCausalLM"),
    "topk-switch-every2": (["moe.router=topk", "moe.top_k=1", "moe.every=2"], "Qwen2MoeForCausalLM"),
    "topk-sigmoid-bias": (["moe.router=topk", "moe.router_options={score: sigmoid, route_scale: 2.5, bias_rate: 0.001}"],
                          "MegavqForCausalLM"),  # no Hugging Face architecture routes with a bias
    "topk-qk-norm-clip": (["moe.router=topk", "model.qk_norm=proj", "model.clip_qkv=0.5"], "OlmoeForCausalLM"),
    "topk-head-norm-dense0": (["moe.router=topk", "model.qk_norm=head", "model.head_dim=12", "moe.dense_layers=[0]"],
                              "Qwen3MoeForCausalLM"),
    "topk-shared-expert": (["moe.router=topk", "moe.shared_experts=2", "moe.d_shared=16", "moe.shared_gate=true",
                            "moe.dense_layers=[1]"], "Qwen2MoeForCausalLM"),
    "vq-gelu-learned-layernorm-biases": (["moe.router=vq", "model.mlp=gelu", "model.pos=learned",
                                          "model.norm=layernorm", "model.qkv_bias=true", "model.out_bias=true",
                                          "model.mlp_bias=true"], "MegavqForCausalLM"),
    "dense-gelu-learned": (["moe.every=0", "model.mlp=gelu", "model.pos=learned", "model.norm=layernorm"],
                           "MegavqForCausalLM"),
}
PROMPTS = [[412, 9, 1093, 33, 2048], [7, 260, 11], [12, 3000, 45, 101, 77, 5, 19]]
ADVERSARIAL = ["<s>", "</s>", "<unk>", "a<s>b</s>c<unk>d", " <s> </s>", "<s></s><unk>", "😀", "👩‍💻 and 🇫🇷",
               "㐀𠀀𪚥", "漢字かな", " leading space", "   three spaces", "\n", "\n\nnew\nlines\n", "\ttab", "12345",
               "3.14159 and 2,718", "x=10**-6", "", " ", "▁", "<0x41>", "<pad>", "[CLS] [SEP]", "café naïve",
               "\u200b\u00a0nbsp", "def f(x):\n    return x  # done\n"]


def checkpoint(tmp_path, overrides, name="ckpt", tokenizer=BUILTIN_TOKENIZER):
    """A saved megavq model with random weights (distinct experts, a router far from uniform)."""
    torch.manual_seed(0)
    model = Transformer(load_config("tiny", [*SMALL, *overrides]))
    randomize(model, std=0.2)
    for name, b in model.named_buffers():
        if name.endswith("balance.bias"):  # the expert bias routes too
            b.normal_(0, 0.2)
    model.eval()
    save_model(model.state_dict(), model.cfg, tmp_path / name, tokenizer)
    return load_model(tmp_path / name), tmp_path / name


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


def eos_after_a_few_tokens(model, hf):
    """Make </s> (id 2) the greedy choice wherever the token that row 0's third greedy step picks would be: its
    lm_head row becomes that token's (argmax takes the first of equal values), in both models."""
    t = model.generate(PROMPTS[:1], 3, greedy=True)[0][2]
    with torch.no_grad():
        model.lm_head.weight[2] = model.lm_head.weight[t]
        hf.get_output_embeddings().weight[2] = hf.get_output_embeddings().weight[t]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_with_the_same_logits_and_generates_to_eos(case, tmp_path):
    overrides, arch = CASES[case]
    model, ckpt = checkpoint(tmp_path, overrides)
    save_hf(model, tmp_path / "hf", BUILTIN_TOKENIZER, remote_code=True)
    hf = hf_model(tmp_path / "hf")
    assert type(hf).__name__ == arch
    idx = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(1))  # the whole trained context
    with torch.no_grad():
        diff = (hf(idx).logits - model(idx)).abs().max().item()
    print(f"{case}: {arch}, max |logit diff| transformers vs megavq = {diff:.2e}")
    assert diff <= 1e-5
    assert hf.generation_config.eos_token_id == 2 and hf.config.max_position_embeddings == 64
    eos_after_a_few_tokens(model, hf)
    ours = model.generate([PROMPTS[0]], 12, greedy=True, eos_id=2)[0]
    out = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, do_sample=False)[0, len(PROMPTS[0]):].tolist()
    assert 0 < len(ours) < 12 and out == ours + [2]  # stops at </s>, as megavq's generate does


@pytest.mark.parametrize("case", ["vq", "xmoe", "topk"])
def test_batched_prompts_padded_by_the_tokenizer_generate_as_each_prompt_alone(case, tmp_path):
    """The tokenizer pads on the left; each row's greedy tokens are megavq's for its prompt alone."""
    model, _ = checkpoint(tmp_path, CASES[case][0])
    save_hf(model, tmp_path / "hf", BUILTIN_TOKENIZER, remote_code=True)
    hf = hf_model(tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    prompts = ["The module", "import os", "Return the number of items in a container, or"]
    batch = tok(prompts, padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tok.pad_token_id == 2 and batch.attention_mask[0, 0] == 0  # left padding
    out = hf.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch.input_ids.shape[1]:]
    sp = Tokenizer(BUILTIN_TOKENIZER)
    ours = [model.generate([sp.encode(p)], 6, greedy=True, eos_id=2)[0] for p in prompts]
    assert [[t for t in row if t != 2] for row in out.tolist()] == ours


def test_auto_tokenizer_gives_sentencepiece_ids(tmp_path):
    """The builtin test split and adversarial strings: the same ids, special-token text encoded as text, and the
    same decoded text."""
    model, _ = checkpoint(tmp_path, CASES["topk"][0])
    save_hf(model, tmp_path / "hf", BUILTIN_TOKENIZER)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = Tokenizer(BUILTIN_TOKENIZER)
    texts = [piece.text for piece in read_corpus("builtin", "test")] + ADVERSARIAL
    assert [tok(t).input_ids for t in texts] == [sp.encode(t) for t in texts]
    assert [tok.decode(sp.encode(t)) for t in texts] == [sp.decode(sp.encode(t)) for t in texts]
    assert tok("<s></s><unk>").input_ids == sp.encode("<s></s><unk>") and 2 not in tok("</s>").input_ids
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert tok.model_max_length == model.cfg.model.seq_len


def test_sharded_export_and_reimport(tmp_path):
    model, _ = checkpoint(tmp_path, CASES["vq"][0])
    save_hf(model, tmp_path / "hf", BUILTIN_TOKENIZER, remote_code=True, max_shard_size="200KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
    assert "model.blocks.0.mlp.router.codebook" in index["weight_map"]  # vq's codebook and code map: buffers
    assert "model.blocks.0.mlp.router.code_map" in index["weight_map"]
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(hf_model(tmp_path / "hf")(idx).logits, model(idx))
        assert torch.equal(load_model(tmp_path / "hf")(idx), model(idx))  # megavq reads its export back


@pytest.mark.parametrize("router", available_routers())
def test_every_causal_router_exports_and_the_others_are_refused(router, tmp_path):
    model, _ = checkpoint(tmp_path, [f"moe.router={router}", "moe.allow_noncausal=true"])
    cls = router_class(router)
    if cls.layer_kind == "token" and cls.is_causal(model.cfg.moe.router_options):
        save_hf(model, tmp_path / "hf", remote_code=True)
        idx = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert (hf_model(tmp_path / "hf")(idx).logits - model(idx)).abs().max() <= 1e-5
    else:
        with pytest.raises(MegavqError, match=f"moe.router={router} is not causal"):
            save_hf(model, tmp_path / "hf", remote_code=True)


def test_options_of_imported_architectures_are_refused_by_the_modelling_code(tmp_path):
    """vq in front of QK-norm: no transformers architecture holds it, and the remote code has no QK-norm."""
    model, _ = checkpoint(tmp_path, ["moe.router=vq", "model.qk_norm=head", "moe.shared_experts=1"])
    with pytest.raises(MegavqError, match="^cannot export to Hugging Face with its own modelling code: it has no "
                                          "model.qk_norm, moe.shared_experts; export with --format megavq instead$"):
        save_hf(model, tmp_path / "hf", remote_code=True)


def test_two_exports_load_side_by_side(tmp_path):
    """Directories of the same name, different routers, one process: each model runs its own routers (transformers
    caches remote code by file and directory name, and keys model classes by config class)."""
    idx = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(5))
    models = {case: checkpoint(tmp_path / case, CASES[case][0])[0] for case in ("vq", "xmoe", "usmoe-token")}
    for case, model in models.items():
        save_hf(model, tmp_path / case / "hf", remote_code=True)
    loaded = {case: hf_model(tmp_path / case / "hf") for case in models}  # all loaded before any is run
    with torch.no_grad():
        for case, model in models.items():
            assert (loaded[case](idx).logits - model(idx)).abs().max() <= 1e-5, case


PLUGIN = '''
"""A router outside megavq: sigmoid scores, top-k renormalised."""
from megavq.moe.routers import Router, RouterOutput, register, routing_metrics
from megavq.moe.routers.base import linear_gate, top_k_weights as topk_renormalised


@register("hf_test_sigmoid")
class SigmoidRouter(Router):
    def __init__(self, hidden_size, num_experts, top_k):
        super().__init__(hidden_size, num_experts, top_k)
        self.gate = linear_gate(hidden_size, num_experts)

    def forward(self, x_TD):
        scores_TE = self.gate(x_TD).sigmoid()
        weights_TK, indices_TK = topk_renormalised(scores_TE, self.top_k, normalize=True)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return RouterOutput(weights_TK, indices_TK, probs_TE, scores_TE.new_zeros(()),
                            routing_metrics(indices_TK, probs_TE))
'''


def test_a_plugin_router_exports_with_its_own_source(tmp_path):
    from megavq.convert.hf.remote import routers_source
    from megavq.plugins import load_plugins
    (tmp_path / "hf_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    load_plugins([str(tmp_path / "hf_test_plugin.py")])
    model, _ = checkpoint(tmp_path, ["moe.router=hf_test_sigmoid"])
    save_hf(model, tmp_path / "hf", remote_code=True)
    (routers_file,) = (tmp_path / "hf").glob("megavq_routers_*.py")
    source = routers_file.read_text()
    assert source == routers_source("hf_test_sigmoid") and "import megavq" not in source
    assert "topk_renormalised = top_k_weights" in source and "from megavq" not in source
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (hf_model(tmp_path / "hf")(idx).logits - model(idx)).abs().max() <= 1e-5


# ---- the script ------------------------------------------------------------------------------------------------
def export(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "export.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_export_script_writes_the_checkpoints_tokenizer_or_refuses_without_one(tmp_path):
    _, ckpt = checkpoint(tmp_path, CASES["vq"][0])
    r = export("--checkpoint", ckpt, "--out", tmp_path / "hf", "--format", "hf")
    assert r.returncode == 2 and "block 0 routes with 'vq'" in r.stderr and "--remote_code" in r.stderr
    r = export("--checkpoint", ckpt, "--out", tmp_path / "hf", "--format", "hf", "--remote_code")
    assert r.returncode == 0, r.stderr
    assert "with its own modelling code" in r.stdout
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert any(re.fullmatch(r"megavq_routers_[0-9a-f]{12}\.py", name) for name in files)
    assert {"config.json", "model.safetensors", "modeling_megavq.py", "configuration_megavq.py",
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"} <= files
    _, bare = checkpoint(tmp_path, CASES["topk"][0], name="bare", tokenizer=None)
    r = export("--checkpoint", bare, "--out", tmp_path / "x", "--format", "hf")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "records no tokenizer" in r.stderr
    assert "--tokenizer PATH" in r.stderr and not (tmp_path / "x").exists()
    r = export("--checkpoint", bare, "--out", tmp_path / "x", "--format", "hf", "--tokenizer", BUILTIN_TOKENIZER)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "x" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


# ---- lm-evaluation-harness -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lm_eval_runs_the_shipped_task_on_an_exported_vq_model(tmp_path):
    """The README's command, offline: lm_eval loads the export with its modelling code and tokenizer, reads the
    task from the repository (any working directory) and prints its accuracy."""
    pytest.importorskip("lm_eval")
    from megavq.lm_eval_tasks import TASKS_DIR
    model, _ = checkpoint(tmp_path, [*CASES["vq"][0], "model.seq_len=128"])
    save_hf(model, tmp_path / "hf", BUILTIN_TOKENIZER, remote_code=True)
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={tmp_path / 'hf'},trust_remote_code=True",
           "--tasks", "megavq_builtin_cloze", "--include_path", str(TASKS_DIR), "--device", "cpu",
           "--batch_size", "16", "--limit", "40"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(r.stdout)
    acc = re.search(r"\|megavq_builtin_cloze\|.*\|acc\s*\|.*?\|\s*([0-9.]+)\|", r.stdout)
    assert acc and 0.0 <= float(acc.group(1)) <= 1.0, r.stdout


def test_the_shipped_task_is_what_the_generator_writes():
    from megavq.data.corpus import builtin_sha256
    from megavq.eval.cloze import make_items
    from megavq.lm_eval_tasks import TASKS_DIR
    folder = TASKS_DIR / "megavq_builtin_cloze"
    rows = [json.loads(line) for line in (folder / "megavq_builtin_cloze.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)
    assert all(r["context"] and r["choices"][r["label"]].startswith(" ") for r in rows)
    made_with = re.search(r"builtin corpus sha256 ([0-9a-f]{64})", (folder / "README.md").read_text())
    if made_with is None or made_with.group(1) != builtin_sha256():
        pytest.skip("this Python's builtin corpus differs from the one the task was made from")
    assert make_items([p.text for p in read_corpus("builtin", "test")]) == rows
