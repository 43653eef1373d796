"""Evaluation figures on cases whose answer is known by construction, and the evaluate / plot scripts."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from megavq.config import load_config
from megavq.eval import CollapseMonitor, consistency, domains, evaluate, lm, routing, write_report
from megavq.eval.stats import (
    agreement,
    bits_per_byte,
    effective_rank,
    load_stats,
    mean_pairwise_cosine,
    router_entropy,
    top1_expert,
)
from megavq.model import Transformer
from megavq.moe.routers import build_router
from megavq.store.model_dir import save_model
from megavq.train.logging import flatten_router_metrics

VOCAB, SEQ = 64, 8
TINY = ["model.n_layers=2", "model.d_model=16", "model.n_heads=2", "model.d_ff=32", f"model.seq_len={SEQ}",
        f"model.vocab_size={VOCAB}", "moe.num_experts=4", "moe.top_k=2", "data.micro_batch_size=4"]
TOP_KEYS = ["checkpoint", "step", "data", "split", "router", "router_options", "backend", "num_experts", "top_k",
            "moe_layers", "causal", "bytes_per_token", "trained_router", "warnings", "tokens", "loss", "perplexity",
            "bits_per_byte", "sources", "layers", "domains", "robustness", "topk_sweep", "discrete_only",
            "budget_sweep", "consistency", "figures"]
LAYER_KEYS = ["layer", "load", "load_cv", "load_max_over_mean", "entropy", "entropy_max", "dropped_frac",
              "router_metrics", "tokens", "experts_per_token", "routing_stability", "effective_rank",
              "expert_output_cosine"]
RANK_KEYS = ["input", "input_dim", "router_view", "router_view_dim", "router_view_kind"]


def tiny_model(*overrides, seed=0):
    torch.manual_seed(seed)
    return Transformer(load_config("tiny", [*TINY, *overrides])).eval()


def batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(VOCAB, (4, SEQ), generator=g), torch.randint(VOCAB, (4, SEQ), generator=g))
            for _ in range(n)]


def hand_made_data(path, tokens=400, n_bytes=1000, ids=(0, VOCAB)):
    """A data directory with three random splits of `tokens` tokens in [ids), each said to hold `n_bytes` bytes of
    text."""
    path.mkdir()
    rng = np.random.default_rng(0)
    splits = {}
    for split in ["train", "val", "test"]:
        rng.integers(*ids, tokens).astype(np.uint16).tofile(path / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": tokens, "bytes": n_bytes}
    meta = {"vocab_size": VOCAB, "dtype": "uint16", "tokenizer": "tokenizer.model", "tokenizer_sha256": "-",
            "source": "hand-made", "splits": splits}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def assert_png(path):
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50, (path, image.shape)


# ---- figures known by construction ---------------------------------------------------------------------------

def test_uniform_routing_has_cv_zero_and_maximal_entropy():
    E = 8
    assert load_stats(torch.full((E,), 1 / E)) == {"load_cv": 0.0, "load_max_over_mean": 1.0}
    assert router_entropy(torch.full((5, E), 1 / E)) == pytest.approx(math.log(E))
    assert router_entropy(torch.eye(E)) == pytest.approx(0.0, abs=1e-9)
    assert load_stats(torch.eye(E)[0])["load_cv"] == pytest.approx(math.sqrt(E - 1))
    # through a model: zero gates give every token the uniform distribution over experts
    model = tiny_model()
    for _, layer in routing.moe_layers(model):
        torch.nn.init.zeros_(layer.router.gate.weight)
    for metrics in lm.lm_eval(model, batches())["router_metrics"]:
        assert metrics["entropy"].item() == pytest.approx(math.log(4), rel=1e-6)


def test_effective_rank_of_identity_and_rank_one():
    assert effective_rank(torch.eye(6)) == pytest.approx(6)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert effective_rank(3 * q) == pytest.approx(6)
    u, v = torch.randn(10, 1), torch.randn(1, 6)
    assert effective_rank(u @ v) == pytest.approx(1, abs=1e-6)
    assert effective_rank(torch.zeros(4, 3)) == 0.0


def test_top1_agreement_and_expert_cosine():
    weights = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.0, 0.0]])
    indices = torch.tensor([[2, 0], [1, 3], [-1, -1]])
    top1 = top1_expert(weights, indices, 4)
    assert top1.tolist() == [2, 3, -1]
    assert agreement(top1, top1) == 1.0 and agreement(top1, torch.tensor([2, 0, -1])) == pytest.approx(2 / 3)
    y = torch.randn(1, 5, 7)
    assert mean_pairwise_cosine(y.expand(4, 5, 7)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.cat([y, -y])) == pytest.approx(-1.0)


def test_bits_per_byte_on_a_hand_made_split(tmp_path):
    data = hand_made_data(tmp_path / "data", tokens=400, n_bytes=1000)
    model = tiny_model()
    save_model(model.state_dict(), model.cfg, tmp_path / "model")
    result = evaluate(tmp_path / "model", str(data), "test", diag_tokens=64)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * 400 / (1000 * math.log(2)), rel=1e-12)
    assert bits_per_byte(math.log(2), 3, 3) == pytest.approx(1.0)


def test_robustness_at_p_zero_is_plain_perplexity():
    model, data = tiny_model(), batches()
    plain = lm.lm_eval(model, data)
    rows = lm.robustness(model, data, [0.0, 0.2], VOCAB, seed=3)
    assert rows[0]["perplexity"] == plain["perplexity"] and rows[0]["loss"] == plain["loss"]
    assert rows[1]["loss"] != plain["loss"]
    x = torch.zeros(200, 50, dtype=torch.long)
    changed = (lm.corrupt_tokens(x, 0.2, 1000, torch.Generator().manual_seed(0)) != 0).double().mean().item()
    assert changed == pytest.approx(0.2 * 999 / 1000, abs=0.01)


def test_identical_checkpoints_have_consistency_one(tmp_path):
    model = tiny_model()
    for name in ["a", "run/checkpoints/step_0000001", "run/checkpoints/step_0000002"]:
        save_model(model.state_dict(), model.cfg, tmp_path / name)
    other = tiny_model(seed=1)
    save_model(other.state_dict(), other.cfg, tmp_path / "run/checkpoints/step_0000003")
    pair = consistency.compare_pair(tmp_path / "a", tmp_path / "run/checkpoints/step_0000001", batches())
    assert pair["layers"] == [0, 1] and pair["top1_agreement"] == [1.0, 1.0]
    run = consistency.compare_run(tmp_path / "run", batches())
    assert run["steps"] == [1, 2, 3]
    assert run["with_final"][-1] == [1.0, 1.0] and run["with_previous"][0] is None
    assert run["with_previous"][1] == [1.0, 1.0] and run["with_previous"][2] == run["with_final"][1]
    assert min(run["with_final"][0]) < 1.0  # a differently initialised model routes differently


def test_topk_sweep_and_discrete_only_restore_the_routers():
    assert lm.sweep_ks(4) == [1, 2, 4] and lm.sweep_ks(6) == [1, 2, 4, 6] and lm.sweep_ks(1) == [1]
    model, data = tiny_model(), batches()
    rows = lm.topk_sweep(model, data)
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert rows[1]["loss"] == pytest.approx(lm.lm_eval(model, data)["loss"], rel=1e-9)  # trained k = 2
    assert all(layer.router.top_k == 2 for _, layer in routing.moe_layers(model))
    assert lm.variant_evals(model, data) == {"discrete_only": None}
    vq = tiny_model("moe.router=vq")
    d = lm.variant_evals(vq, data)["discrete_only"]
    assert d["experts_per_token"] == 1 and d["experts_per_token_trained"] == 2 and d["expert_compute_saved"] == 0.5
    assert not any(layer.router.discrete_only for _, layer in routing.moe_layers(vq))
    assert lm.topk_sweep(vq, data) is None


@pytest.mark.parametrize("router", ["topk", "xmoe", "compete", "vq", "expert_choice", "usmoe", "soft"])
def test_layer_diagnostics_for_each_router(router):
    model = tiny_model(f"moe.router={router}", "moe.allow_noncausal=true")
    inputs = routing.layer_inputs(model, batches(2))
    for i, layer in routing.moe_layers(model):
        d = routing.layer_diagnostics(layer, inputs[i], noise=0.0, seed=0)
        assert d["routing_stability"]["top1_changed"] == 0.0  # no noise, same routing
        assert d["tokens"] == 2 * 4 * SEQ and set(d["effective_rank"]) == set(RANK_KEYS)
        assert 1 <= d["effective_rank"]["router_view"] <= d["effective_rank"]["router_view_dim"] + 1e-6
        assert -1 <= d["expert_output_cosine"] <= 1


def test_noncausal_router_warns_not_fails(tmp_path):
    data = hand_made_data(tmp_path / "data")
    model = tiny_model("moe.router=expert_choice", "moe.allow_noncausal=true")
    save_model(model.state_dict(), model.cfg, tmp_path / "model")
    warned = []
    result = evaluate(tmp_path / "model", str(data), diag_tokens=64, warn=warned.append)
    assert result["causal"] is False and warned == result["warnings"] and "not causal" in warned[0]
    assert result["topk_sweep"] is None and math.isfinite(result["perplexity"])


# ---- training-time health -------------------------------------------------------------------------------------

def record_of(router, x_TD):
    return flatten_router_metrics([router(x_TD).metrics], [0])


def router_of(name, num_experts=4, top_k=2):
    return build_router(name, hidden_size=8, num_experts=num_experts, top_k=top_k)


def test_router_sending_everything_to_one_expert_triggers_the_collapse_warning():
    router = build_router("topk", hidden_size=8, num_experts=4, top_k=1)
    x_TD = torch.rand(64, 8) + 0.1  # positive inputs: a large first gate row wins every token
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 10.0
    monitor = CollapseMonitor({0: router}, share=0.9, patience=3)
    assert [monitor.check(s, record_of(router, x_TD)) for s in (1, 2)] == [[], []]
    warning = monitor.check(3, record_of(router, x_TD))
    assert len(warning) == 1 and "MoE layer 0 collapsed" in warning[0] and "expert 0 gets 100%" in warning[0]
    uniform = {"moe/L0/load": [0.25] * 4}
    assert monitor.check(4, uniform) == [] and monitor.check(7, record_of(router, x_TD)) == []  # streak reset


def test_collapse_share_counts_tokens_under_top_k():
    monitor = CollapseMonitor({3: router_of("topk", top_k=2)}, share=0.9, patience=1)
    assert monitor.check(1, {"moe/L3/load": [0.25] * 4}) == []  # uniform top-2: each expert sees half the tokens
    assert monitor.check(2, {"moe/L3/load": [0.5, 0.2, 0.2, 0.1]}) != []  # expert 0 in every token's top-2
    every = CollapseMonitor({0: router_of("topk", num_experts=2, top_k=2)}, patience=1)
    assert every.check(1, {"moe/L0/load": [0.5, 0.5]}) == []  # k = E


def test_dead_vq_codes_trigger_the_warning():
    monitor = CollapseMonitor({1: router_of("vq")}, patience=2, dead_code_frac=0.5)  # 4 codes
    record = {"moe/L1/load": [0.25] * 4, "moe/L1/dead_codes": 3.0}
    assert monitor.check(1, record) == []
    assert "3 of 4 vq codes are dead" in monitor.check(2, record)[0]
    assert monitor.check(3, {**record, "moe/L1/dead_codes": 1.0}) == []


def test_collapsed_vq_codebook_triggers_the_warning_with_no_dead_code():
    monitor = CollapseMonitor({0: router_of("vq")}, patience=2, code_usage_min=0.5)
    record = {"moe/L0/load": [0.25] * 4, "moe/L0/dead_codes": 0.0, "moe/L0/code_perplexity": 1.19}
    assert monitor.check(1, record) == []
    assert "vq code perplexity 1.19 of 4 codes" in monitor.check(2, record)[0]
    assert monitor.check(3, {**record, "moe/L0/code_perplexity": 3.9}) == []


def test_saturated_vq_mixing_gate_triggers_the_warning():
    monitor = CollapseMonitor({3: router_of("vq")}, share=0.9, patience=2)
    record = {"moe/L3/load": [0.25] * 4, "moe/L3/code_perplexity": 3.9, "moe/L3/gate_discrete": 0.03}
    assert monitor.check(1, record) == []
    assert "gives the continuous path 97% of its weight" in monitor.check(2, record)[0]
    assert monitor.check(3, {**record, "moe/L3/gate_discrete": 0.5}) == []
    assert "discrete path 96%" in CollapseMonitor({0: router_of("vq")}, patience=1).check(
        1, {"moe/L0/load": [0.25] * 4, "moe/L0/gate_discrete": 0.96})[0]


# ---- the scripts on a trained checkpoint ---------------------------------------------------------------------

def run_script(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_evaluate_and_plot_scripts_on_a_trained_run(builtin_data, tmp_path):
    run = tmp_path / "run"
    train = run_script("scripts/pretrain.py", "--data", str(builtin_data), "--out_dir", str(run), "model.n_layers=2",
                       "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.seq_len=32",
                       "data.micro_batch_size=4", "data.eval_batches=2", "train.max_steps=10", "train.save_every=5",
                       "train.eval_every=5", "train.collapse_share=0.3", "train.collapse_patience=1")
    assert "collapsed for 1 consecutive evaluations" in train.stdout + train.stderr  # any top-2 layer > 0.3
    out = tmp_path / "eval"
    run_script("scripts/evaluate.py", "--checkpoint", str(run), "--data", str(builtin_data), "--out", str(out),
               "--max_batches", "4", "--compare", str(run))
    result = json.loads((out / "eval.json").read_text())
    assert list(result) == TOP_KEYS
    assert result["step"] == 10 and result["moe_layers"] == [0, 1] and result["causal"] is True
    for layer in result["layers"]:
        assert list(layer) == LAYER_KEYS and list(layer["effective_rank"]) == RANK_KEYS
        assert sum(layer["load"]) == pytest.approx(1.0, abs=1e-4)
    assert [r["p"] for r in result["robustness"]] == [0.0, 0.05, 0.1, 0.2]
    assert result["robustness"][0]["perplexity"] == result["perplexity"]
    assert [r["k"] for r in result["topk_sweep"]] == [1, 2, 4]
    c = result["consistency"]
    assert c["mode"] == "run" and c["steps"] == [5, 10] and c["with_final"][-1] == [1.0, 1.0]
    assert sorted(result["figures"]) == ["consistency.png", "load.png", "robustness.png", "routing.png",
                                         "routing_modes.png"]
    for name in result["figures"]:
        assert_png(out / name)
    assert "| loss | perplexity | bits per byte |" in (out / "eval.md").read_text()
    run_script("scripts/plot_runs.py", str(run), str(run), "--out", str(tmp_path / "runs.png"))
    assert_png(tmp_path / "runs.png")


# ---- the per-layer diagnostics for every router on every CPU backend, on 2 ranks ------------------------------
CPU_BACKENDS = ("reference", "native", "deepspeed")  # megablocks needs a GPU


def diagnostics_job() -> dict:
    """On this rank: for every router and every CPU backend that serves its layer kind, a tiny model with the same
    weights (expert parallel over the 2 ranks where the backend and router allow it), and evaluate.py's per-layer
    reports (layer_reports: load, entropy, router metrics, stability, effective ranks, expert-output cosine)."""
    from megavq.compat import deepspeed as ds_compat
    from megavq.eval import report
    from megavq.moe.dispatch import dispatcher_class
    from megavq.moe.routers import available_routers, router_class
    from megavq.train.engine import setup_expert_parallel
    out = {}
    for router in available_routers():
        kind = router_class(router).layer_kind
        for backend in (b for b in CPU_BACKENDS if kind in dispatcher_class(b).layer_kinds):
            ep = 2 if dispatcher_class(backend).expert_parallel and kind == "token" else 1
            model = tiny_model(f"moe.router={router}", f"moe.backend={backend}", f"moe.ep_size={ep}",
                               "moe.allow_noncausal=true", "moe.capacity_factor=8", "moe.eval_capacity_factor=8")
            setup_expert_parallel(model, ep)
            if backend == "deepspeed" and ep > 1:
                ds_compat.set_moe_parallelism(model)
            data = batches(2)
            out[router, backend] = {"ep_size": ep, "layers": report.layer_reports(model.eval(), lm.lm_eval(model, data),
                                                                                  data, noise=0.05, seed=0)}
    return out


def assert_same_reports(a: list, b: list, what: str) -> None:
    for la, lb in zip(a, b, strict=True):
        for key in ("load", "load_cv", "entropy", "experts_per_token", "routing_stability", "effective_rank",
                    "expert_output_cosine"):
            va, vb = la[key], lb[key]
            if isinstance(va, dict):
                va, vb = ({k: v for k, v in d.items() if k != "router_view_kind"} for d in (va, vb))
            assert va == pytest.approx(vb, rel=1e-4, abs=1e-5), (what, la["layer"], key, va, vb)


@pytest.mark.slow
def test_layer_diagnostics_for_every_router_on_every_cpu_backend_on_two_ranks():
    """One 2-rank job: the reports exist for every (router, backend) pair, agree between the ranks, and equal the
    reference backend's (same weights, same inputs; capacity large enough to drop nothing)."""
    from test_expert_parallel import run_distributed

    from megavq.moe.routers import available_routers, router_class
    ranks = run_distributed(diagnostics_job, 2)
    pairs = {(r, b) for r in available_routers() for b in CPU_BACKENDS
             if router_class(r).layer_kind == "token" or b != "deepspeed"}
    assert set(ranks[0]) == pairs
    for (router, backend), result in ranks[0].items():
        assert [layer["layer"] for layer in result["layers"]] == [0, 1], (router, backend)
        assert result["ep_size"] == (2 if backend != "reference" and router != "soft" else 1)
        assert_same_reports(result["layers"], ranks[1][router, backend]["layers"], f"{router}/{backend} rank 1")
        assert_same_reports(result["layers"], ranks[0][router, "reference"]["layers"], f"{router}/{backend}")


def test_write_report_without_moe_layers(tmp_path):
    data = hand_made_data(tmp_path / "data")
    dense = tiny_model("moe.every=0")
    save_model(dense.state_dict(), dense.cfg, tmp_path / "model")
    result = evaluate(tmp_path / "model", str(data), diag_tokens=64)
    paths = write_report(result, tmp_path / "out")
    assert result["layers"] == [] and result["topk_sweep"] is None
    assert [p.name for p in paths] == ["eval.json", "eval.md", "robustness.png"]


def test_evaluate_defaults_to_the_checkpoints_data_and_refuses_another_tokenizers(tmp_path):
    """Trained on a tokenized directory: evaluated on it unless --data says otherwise; data encoded with another
    tokenizer than the one the checkpoint records is refused with one line."""
    from megavq.data.dataset import BUILTIN_TOKENIZER
    from megavq.files import file_sha256
    def data_dir(path, tokenizer_sha256):  # the current format (with EOS ids), encoded by that tokenizer
        meta = json.loads((hand_made_data(path) / "meta.json").read_text())
        meta.update(format_version=2, eos_id=2, tokenizer_sha256=tokenizer_sha256)
        (path / "meta.json").write_text(json.dumps(meta))
        return path
    data = data_dir(tmp_path / "data", file_sha256(BUILTIN_TOKENIZER))
    model = tiny_model(f"data.source={data}")
    save_model(model.state_dict(), model.cfg, tmp_path / "model", BUILTIN_TOKENIZER)
    assert evaluate(tmp_path / "model", diag_tokens=64, max_batches=2)["data"] == str(data)
    other = data_dir(tmp_path / "other", "0" * 64)  # another tokenizer
    script = [sys.executable, "scripts/evaluate.py", "--checkpoint", str(tmp_path / "model"), "--max_batches", "2",
              "--diag_tokens", "64", "--out", str(tmp_path / "eval")]
    default = run_script(*script[1:])
    assert default.stdout.startswith(f"{data} (test): loss ")
    refused = subprocess.run([*script, "--data", str(other)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"error: data {other} was encoded with the tokenizer of sha256 000000000000...")
    assert "scripts/prepare_data.py --tokenizer" in refused.stderr


def test_evaluate_reports_the_expert_bias_of_each_layer(tmp_path):
    """With moe.router_options.bias_rate the per-layer figures carry the bias's range and mean (eval.json, eval.md),
    as the training logs do (moe/L{i}/bias_min, bias_max, bias_mean)."""
    data = hand_made_data(tmp_path / "data")
    model = tiny_model("moe.router_options.bias_rate=0.001")
    with torch.no_grad():
        for i, router in enumerate(model.routers()):
            router.balance.bias.copy_(torch.tensor([0.3, -0.1, 0.0, -0.2]) * (i + 1))
    save_model(model.state_dict(), model.cfg, tmp_path / "model")
    result = evaluate(tmp_path / "model", str(data), diag_tokens=64)
    for i, L in enumerate(result["layers"]):
        got = [L["router_metrics"][k] for k in ("bias_min", "bias_max", "bias_mean")]
        assert got == pytest.approx([-0.2 * (i + 1), 0.3 * (i + 1), 0.0], abs=1e-6)
    write_report(result, tmp_path / "out")
    assert "## Expert bias" in (tmp_path / "out" / "eval.md").read_text()
    logged = flatten_router_metrics(model(*batches(1)[0]).router_metrics, [0, 1])
    assert logged["moe/L1/bias_max"] == pytest.approx(0.6)
# ---- routing by domain ---------------------------------------------------------------------------------------

def domain_routed_model(dim: int):
    """A model whose MoE layers see the token embeddings unchanged (attention and experts output zero) and route
    by the sign of hidden dimension `dim`: +3 for ids below VOCAB / 2, -3 above (dim 0: the domain of the
    vocabularies below), or a random sign per id (dim 1: independent of the domain)."""
    model = tiny_model("moe.top_k=1")
    signs = torch.randint(0, 2, (VOCAB,), generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        model.embed.weight[:, 0] = torch.where(torch.arange(VOCAB) < VOCAB // 2, 3.0, -3.0)
        model.embed.weight[:, 1] = 3.0 * signs
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.experts.w_out.zero_()
            gate = block.mlp.router.gate.weight
            gate.zero_()
            gate[0, dim], gate[1, dim] = 10.0, -10.0
    return model


def domain_batches(low: bool, n=4):
    g = torch.Generator().manual_seed(int(low))
    ids = lambda: torch.randint(0, VOCAB // 2, (4, SEQ), generator=g) + (0 if low else VOCAB // 2)  # noqa: E731
    return [(ids(), ids()) for _ in range(n)]


def test_mutual_information_of_domain_and_expert():
    by_domain = [domain_batches(True), domain_batches(False)]
    forced = domains.domain_report(domain_routed_model(0), ["low", "high"], by_domain)
    assert forced["mi_max"] == pytest.approx(math.log(2))
    for layer in forced["layers"]:
        assert layer["mutual_information"] == pytest.approx(math.log(2), abs=1e-9)
        assert layer["load"] == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    random = domains.domain_report(domain_routed_model(1), ["low", "high"], by_domain)
    for layer in random["layers"]:
        assert layer["mutual_information"] < 0.02, layer
        assert min(layer["load"][0][:2] + layer["load"][1][:2]) > 0.3  # both domains use both experts
    assert domains.mutual_information(torch.tensor([[3.0, 1.0], [3.0, 1.0]])) == pytest.approx(0.0, abs=1e-12)


def test_evaluate_reports_each_source_and_the_routing_by_domain(tmp_path):
    low, high = (hand_made_data(tmp_path / name, ids=ids) for name, ids in [("low", (0, 32)), ("high", (32, 64))])
    model = domain_routed_model(0)
    save_model(model.state_dict(), model.cfg, tmp_path / "model")
    result = evaluate(tmp_path / "model", f"{low}@0.75,{high}@0.25", "test", max_batches=2, diag_tokens=64)
    names = [s["name"] for s in result["sources"]]
    assert names == ["low", "high"] and [s["weight"] for s in result["sources"]] == [0.75, 0.25]
    apart = [evaluate(tmp_path / "model", str(d), "test", max_batches=2, diag_tokens=64) for d in (low, high)]
    assert [s["loss"] for s in result["sources"]] == pytest.approx([r["loss"] for r in apart], rel=1e-9)
    assert result["loss"] == pytest.approx(0.75 * apart[0]["loss"] + 0.25 * apart[1]["loss"], rel=1e-9)
    assert apart[0]["domains"] is None and apart[0]["sources"] is None
    assert [L["mutual_information"] for L in result["domains"]["layers"]] == pytest.approx([math.log(2)] * 2)
    paths = write_report(result, tmp_path / "eval")
    assert_png(tmp_path / "eval" / "domains.png") and tmp_path / "eval" / "domains.png" in paths
    assert "## Routing by domain" in (tmp_path / "eval" / "eval.md").read_text()
