"""Balancing (megavq.moe.routers.balance): each loss and update against the published formulas written here by hand,
the global loss on 2 gloo ranks against 1 rank, the sequence loss against the micro-batch size, and the expert bias
(selection only, counted once per token in training, resumed exactly across expert-parallel layouts).

Legend: T tokens, E experts, K slots per token, B sequences of S tokens.
"""
import pytest
import torch

from megavq.config import load_config
from megavq.errors import ConfigError
from megavq.model.transformer import Transformer
from megavq.moe.routers import build_router
from megavq.train.engine import prepare_model

E, K = 4, 2
LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.1], [0.3, 1.5, 0.2, -0.4], [-0.2, 0.1, 1.1, 0.9],
                       [1.2, -0.7, 0.4, 0.8], [0.0, 0.2, -0.3, 1.7], [0.6, 0.6, 0.1, -1.2]])  # (T=6, E)
TINY = ["model.vocab_size=64", "model.n_layers=2", "model.d_model=16", "model.n_heads=2", "model.d_ff=32",
        "model.seq_len=8", "moe.num_experts=4"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def with_logits(logits_TE, top_k=K, name="topk", **options):
    """A router whose gate gives `logits_TE` for the identity input (hidden size T)."""
    T, n = logits_TE.shape
    router = build_router(name, hidden_size=T, num_experts=n, top_k=top_k, z_loss_coef=0.0, balance_coef=1.0,
                          **options)
    with torch.no_grad():
        router.gate.weight.copy_(logits_TE.t())
    return router


def switch_by_hand(p_TE, chosen):
    """E * sum_e f_e P_e, f_e = (slots that chose e) / (all slots), P_e = mean_t p[t, e] (Switch, GShard)."""
    T, n = p_TE.shape
    slots = [e for row in chosen for e in row]
    return float(n * sum(slots.count(e) / len(slots) * sum(p_TE[t, e] for t in range(T)) / T for e in range(n)))


# ---- parity with the published formulas --------------------------------------------------------------------
def test_sequence_loss_is_deepseek_v3_sequence_wise_loss_averaged_over_sequences():
    """DeepSeek-V3 eq. 17-20 with sigmoid scores: f_i = E / (K S) * #(tokens of the sequence choosing i),
    P_i = (1 / S) sum_t s'[t, i], s' = s / sum_j s[t, j]; L = sum_i f_i P_i, averaged over the B = 2 sequences."""
    r = with_logits(LOGITS, balance_scope="sequence", score="sigmoid", route_scale=2.5)(torch.eye(6), seq_len=3)
    s = LOGITS.sigmoid()
    chosen = s.topk(K, dim=-1).indices.tolist()
    assert r.indices.tolist() == chosen
    expected = 0.0
    for b in range(2):
        rows = range(3 * b, 3 * b + 3)
        for i in range(E):
            f = E / (K * 3) * sum(i in chosen[t] for t in rows)
            P = sum(s[t, i] / s[t].sum() for t in rows) / 3
            expected += f * P / 2
    torch.testing.assert_close(r.aux_loss, torch.tensor(float(expected)), rtol=0, atol=1e-6)
    w = s.gather(1, torch.tensor(chosen))
    torch.testing.assert_close(r.weights, 2.5 * w / w.sum(-1, keepdim=True))  # normalised top-k times route_scale
    torch.testing.assert_close(r.scores, s / s.sum(-1, keepdim=True))


def test_global_loss_counts_the_running_sum_of_the_step_and_restarts_after_it():
    """Micro-batch m's loss is E * sum_e f_e P_e with f from the counts of micro-batches 1..m of the step (one rank)."""
    router = with_logits(LOGITS, balance_scope="global").train()
    p = LOGITS.softmax(-1)
    halves = (torch.eye(6)[:3], torch.eye(6)[3:])
    chosen = p.topk(K, dim=-1).indices.tolist()
    for step in range(2):
        first, second = router(halves[0]), router(halves[1])
        torch.testing.assert_close(first.aux_loss, torch.tensor(switch_by_hand(p[:3], chosen[:3])))
        counts = torch.bincount(torch.tensor(chosen).flatten(), minlength=E).float()
        f = counts / counts.sum()
        torch.testing.assert_close(second.aux_loss, E * (f * p[3:].mean(0)).sum())  # all 6 tokens' counts
        torch.testing.assert_close(router.balance.running, counts)
        router.post_step()
        assert router.balance.running is None
    router.eval()  # evaluation: this micro-batch's counts, nothing kept
    torch.testing.assert_close(router(halves[1]).aux_loss, torch.tensor(switch_by_hand(p[3:], chosen[3:])))
    assert router.balance.running is None


@pytest.mark.parametrize("centre", [False, True])
def test_bias_update_is_the_sign_rule_on_the_step_load(centre):
    """b_e += u * sign(mean load - load_e) after the step (arXiv 2408.15664 Algorithm 1), centred on request."""
    router = with_logits(LOGITS, bias_rate=0.1, bias_centre=centre).train()
    x = torch.eye(6)
    load = torch.zeros(E)
    for part in (x[:2], x[2:]):  # two micro-batches: one update with their summed load
        load += torch.bincount(router(part).indices.flatten(), minlength=E).float()
    torch.testing.assert_close(router.balance.load, load)
    router.post_step()
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(router.balance.bias, expected - expected.mean() if centre else expected)
    assert router.balance.load is None


def test_bias_changes_the_choice_not_the_weights_and_has_no_gradient():
    router = with_logits(LOGITS, bias_rate=1e-3).train()
    x = torch.eye(6)
    p = LOGITS.softmax(-1)
    with torch.no_grad():
        router.balance.bias.copy_(torch.tensor([-1.0, 0.0, 0.0, 1.0]))  # expert 3 favoured, expert 0 shunned
    r = router(x)
    chosen = (p + router.balance.bias).topk(K, dim=-1).indices
    assert torch.equal(r.indices, chosen) and not torch.equal(chosen, p.topk(K, dim=-1).indices)
    assert (r.indices == 3).any(-1).all() and not (r.indices == 0).any()
    w = p.gather(1, chosen)
    torch.testing.assert_close(r.weights, w / w.sum(-1, keepdim=True))  # the unbiased probabilities
    assert "balance.bias" in dict(router.named_buffers()) and "balance.bias" in router.state_dict()
    assert all("bias" not in n for n, _ in router.named_parameters())
    (r.weights.sum() + r.aux_loss).backward()
    assert not router.balance.bias.requires_grad and router.balance.bias.grad is None
    assert r.metrics["bias_max"] == 1.0 and r.metrics["bias_min"] == -1.0 and r.metrics["bias_mean"] == 0.0


def test_bias_counts_nothing_in_evaluation_and_loads_at_zero_from_a_state_dict_without_it():
    router = with_logits(LOGITS, bias_rate=0.1).eval()
    router(torch.eye(6))
    router.post_step()
    assert router.balance.load is None and (router.balance.bias == 0).all()
    plain = with_logits(LOGITS)
    with torch.no_grad():
        router.balance.bias.fill_(0.5)
    router.load_state_dict(plain.state_dict())  # a model trained without a bias
    assert (router.balance.bias == 0).all()
    router.bfloat16()
    assert router.balance.bias.dtype == torch.float32 and router.gate.weight.dtype == torch.bfloat16


def test_defaults_route_as_before():
    """The defaults are today's Switch loss and softmax top-k: the same weights, choices and loss."""
    router = with_logits(LOGITS)
    r = router(torch.eye(6))
    p = LOGITS.softmax(-1)
    w, i = p.topk(K, dim=-1)
    assert torch.equal(r.indices, i)
    torch.testing.assert_close(r.weights, w / w.sum(-1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(r.aux_loss, torch.tensor(switch_by_hand(p, i.tolist())))
    assert router.hf_routing() == {"normalize": True, "jitter": 0.0}
    assert with_logits(LOGITS, bias_rate=1e-3).hf_routing() is None  # Hugging Face export with remote code only
    assert with_logits(LOGITS, score="sigmoid").hf_routing() is None


@pytest.mark.parametrize("name, options, message", [
    ("xmoe", {"score": "sigmoid"}, "router 'xmoe' takes no 'score': xmoe's scores are cosine"),
    ("compete", {"route_scale": 2.0}, "router 'compete' takes no 'route_scale'"),
    ("usmoe", {"score": "sigmoid"}, "router 'usmoe' takes no 'score'"),
    ("expert_choice", {"bias_rate": 0.01}, "router 'expert_choice' takes no 'bias_rate': it scores no experts"),
    ("soft", {"balance_scope": "global"}, "router 'soft' takes no 'balance_scope'"),
    ("usmoe", {"bias_rate": 0.01}, "bias_rate applies with selection='token' only"),
    ("vq", {"continuous": "xmoe", "score": "sigmoid"}, "vq: score='sigmoid' does not apply: xmoe's"),
    ("topk", {"balance_scope": "batch"}, "balance_scope must be one of"),
    ("topk", {"score": "relu"}, "score must be one of"),
    ("topk", {"route_scale": 2.5}, "route_scale=2.5 applies to score='sigmoid' only")])
def test_options_that_do_not_apply_are_refused_in_one_line(name, options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_router(name, hidden_size=8, num_experts=E, top_k=K, **options)


@pytest.mark.parametrize("name, options", [("xmoe", {}), ("usmoe", {"selection": "token"}), ("compete", {}),
                                           ("vq", {})])
def test_every_per_token_router_selects_with_its_bias(name, options):
    """A large bias on one expert makes every token choose it; the router's weights stay finite and >= 0."""
    torch.manual_seed(0)
    router = build_router(name, hidden_size=8, num_experts=E, top_k=K, bias_rate=1e-3, **options).train()
    balance = router.continuous.balance if name == "vq" else router.balance
    with torch.no_grad():
        balance.bias[2] = 10.0
    r = router(torch.randn(10, 8), seq_len=10) if router.needs_seq_len else router(torch.randn(10, 8))
    assert (r.indices == 2).any(-1).all() and (r.weights >= 0).all()
    assert r.metrics["bias_max"] == 10.0
    router.post_step()
    assert balance.bias[2] < 10.0  # expert 2 was overloaded: its bias went down


# ---- gradients: the sequence loss against the micro-batch size, the global loss across ranks ------------------
def sequence_grad(micro: int, B: int = 8, S: int = 4, **options) -> torch.Tensor:
    """The gate's gradient of the balance loss over B sequences in micro-batches of `micro`, each loss divided by
    the number of micro-batches (gradient accumulation as DeepSpeed does it)."""
    torch.manual_seed(0)
    router = build_router("topk", hidden_size=8, num_experts=E, top_k=K, balance_coef=1.0, z_loss_coef=0.0,
                          **options).train()
    x = torch.randn(B * S, 8, generator=torch.Generator().manual_seed(1))
    for part in x.split(micro * S):
        (router(part, seq_len=S).aux_loss / (B // micro)).backward()
    return router.gate.weight.grad


def test_sequence_loss_gradient_does_not_change_with_the_micro_batch_size():
    ref = sequence_grad(8, balance_scope="sequence")
    for micro in (4, 2, 1):
        torch.testing.assert_close(sequence_grad(micro, balance_scope="sequence"), ref, rtol=0, atol=1e-7)
    assert not torch.allclose(sequence_grad(2), sequence_grad(8))  # the micro-batch loss does change


def _global_rank(batch, micro_batches):
    """On each rank: the global-scope router on its share of every micro-batch; the gate's gradient averaged over
    the ranks (data-parallel averaging), and the running sums after each micro-batch."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    router = build_router("topk", hidden_size=8, num_experts=E, top_k=K, balance_coef=1.0, z_loss_coef=0.0,
                          balance_scope="global").train()
    running = []
    for part in batch.chunk(micro_batches):
        (router(part.chunk(world)[rank]).aux_loss / micro_batches).backward()
        running.append(router.balance.running.clone())
    grad = router.gate.weight.grad
    dist.all_reduce(grad)
    router.post_step()
    return {"grad": grad / world, "running": running}


def _global_ranks(batch):
    return _global_rank(batch, 1), _global_rank(batch, 4)


@pytest.mark.slow
def test_global_loss_on_two_ranks_equals_one_rank_with_the_whole_batch(tmp_path):
    """2 gloo ranks, one micro-batch each: the gate's gradient equals 1 rank's with the global batch as one
    micro-batch (1e-6; Megatron-LM issue 3672 was 1/dp of it). With 4 micro-batches per rank, the counts used at
    each micro-batch are the running sums over both ranks and the micro-batches so far."""
    from test_expert_parallel import run_distributed
    batch = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    (one_each, accum), (other_one_each, other_accum) = run_distributed(_global_ranks, 2, batch)
    torch.manual_seed(0)
    one = build_router("topk", hidden_size=8, num_experts=E, top_k=K, balance_coef=1.0, z_loss_coef=0.0,
                       balance_scope="global").train()
    one(batch).aux_loss.backward()
    torch.testing.assert_close(one_each["grad"], one.gate.weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(other_one_each["grad"], one.gate.weight.grad, rtol=0, atol=1e-6)
    indices = one(batch).indices  # the same gate: the same choices
    counts = [torch.bincount(part.flatten(), minlength=E).float() for part in indices.chunk(4)]
    for m in range(4):
        expected = sum(counts[:m + 1])
        assert torch.equal(accum["running"][m], expected) and torch.equal(other_accum["running"][m], expected)


# ---- the bias in a model: counted once per token, the same however the tokens are split --------------------------
def step_loads(overrides, micro_batches=1):
    """Each MoE router's bias load after one training step's forwards and backwards."""
    cfg = load_config("tiny", [*TINY, "moe.router_options.bias_rate=0.001", *overrides])
    torch.manual_seed(0)
    model = prepare_model(Transformer(cfg), cfg).train()
    x = torch.randint(64, (8, 8), generator=torch.Generator().manual_seed(2))
    for part in x.chunk(micro_batches):
        model(part, part).loss.backward()
    return [r.balance.load.clone() for r in model.routers()]


def test_bias_counts_of_a_step_do_not_change_with_checkpointing_or_accumulation():
    """torchtitan issue 1593: a recomputed forward (activation checkpointing) must not count its tokens again."""
    ref = step_loads([])
    assert all(load.sum() == 8 * 8 * K for load in ref)
    for got in (step_loads(["train.activation_checkpointing=1"]), step_loads([], micro_batches=4),
                step_loads(["train.activation_checkpointing=1"], micro_batches=4)):
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_saved_config_records_the_balancing_options_and_old_configs_load_with_the_defaults():
    cfg = load_config("tiny", ["moe.router_options.bias_rate=0.01"])
    opts = cfg.to_dict()["moe"]["router_options"]
    assert opts["bias_rate"] == 0.01 and opts["balance_scope"] == "micro_batch" and opts["score"] == "softmax"
    plain = load_config("tiny", ["moe.router=xmoe"]).to_dict()["moe"]["router_options"]
    assert plain["balance_scope"] == "micro_batch" and "score" not in plain


# ---- exact resume of the bias across expert-parallel layouts -----------------------------------------------------
BIASED = ["moe.router_options.bias_rate=0.01", "moe.router_options.balance_scope=global", "train.max_steps=8",
          "train.save_every=4"]


def _resume_jobs(data: str, tmp: str) -> dict:
    """2 ranks: the reference (ep 2, 8 steps), a run at ep 1 stopped at step 4, and its copy resumed at ep 2."""
    import json
    import shutil
    from pathlib import Path

    import torch.distributed as dist
    from test_expert_parallel import EP_SMALL
    from test_train import ROOT

    import megavq.train.trainer as trainer
    from megavq.store.model_dir import load_state_dict

    def run(out, overrides, resume=None):
        cfg = load_config("tiny", [*EP_SMALL, f"data.source={data}", *BIASED, *overrides])
        summary = trainer.run(cfg, ROOT / "ds_configs" / "zero2.json", f"{tmp}/{out}", resume=resume)
        lines = (Path(tmp) / out / "metrics.jsonl").read_text().splitlines()
        return {**{r["step"]: r["train/lm_loss"] for r in map(json.loads, lines)}, "from": summary["resumed_from"]}

    out = {"ref": run("ref", ["moe.ep_size=2"]), "ep1": run("ep1", ["train.stop_at_step=4"])}
    if dist.get_rank() == 0:
        shutil.copytree(f"{tmp}/ep1", f"{tmp}/ep1-ep2")
    dist.barrier()
    out["ep1-ep2"] = run("ep1-ep2", ["moe.ep_size=2"], resume="strict")
    out["bias"] = {name: {k: v for k, v in load_state_dict(Path(tmp) / name / "checkpoints" / f"step_{s:07d}").items()
                          if k.endswith("balance.bias")} for name, s in (("ref", 8), ("ep1", 4), ("ep1-ep2", 8))}
    return out


@pytest.mark.slow
def test_bias_resumes_exactly_from_expert_parallel_1_to_2(builtin_data, tmp_path):
    from test_expert_parallel import run_distributed
    r = run_distributed(_resume_jobs, 2, str(builtin_data), str(tmp_path))[0]
    assert r["ep1-ep2"]["from"] == 4  # resumed, not a fresh start that happens to match
    for s in range(1, 5):
        assert abs(r["ep1"][s] - r["ref"][s]) < 1e-5, s  # the layouts train alike
    for s in range(5, 9):
        assert abs(r["ep1-ep2"][s] - r["ref"][s]) < 1e-5, s
    assert len(r["bias"]["ref"]) == 2 and all(b.abs().sum() > 0 for b in r["bias"]["ep1"].values())
    for k, v in r["bias"]["ref"].items():
        assert torch.equal(r["bias"]["ep1-ep2"][k], v), k


# ---- group-limited routing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options", [("topk", {}), ("topk", {"score": "sigmoid", "bias_rate": 0.01}),
                                           ("xmoe", {}), ("compete", {}), ("usmoe", {"selection": "token"})])
def test_every_token_s_experts_lie_in_at_most_group_top_groups(name, options):
    """E = 8 in 4 groups of 2, group_top = 2, k = 3: the group score is the sum of the top-2 (biased) scores in the
    group (DeepSeek-V3), the k experts the top-k of the kept groups' experts."""
    torch.manual_seed(0)
    router = build_router(name, hidden_size=8, num_experts=8, top_k=3, groups=4, group_top=2, **options).train()
    x = torch.randn(64, 8)
    r = router(x, seq_len=64) if router.needs_seq_len else router(x)
    assert ((r.indices // 2).sort(-1).values.diff(dim=-1) != 0).sum(-1).max() + 1 <= 2  # at most 2 groups
    ungrouped = build_router(name, hidden_size=8, num_experts=8, top_k=3, **options).train()
    ungrouped.load_state_dict(router.state_dict())
    free = ungrouped(x, seq_len=64) if ungrouped.needs_seq_len else ungrouped(x)
    assert ((free.indices // 2).unsqueeze(-1) != (free.indices // 2).unsqueeze(-2)).any(-1).any()  # it binds
    if name == "topk":  # by hand
        s = r.scores if "score" not in options else torch.sigmoid(x @ router.gate.weight.t())
        biased = s + router.balance.bias if "bias_rate" in options else s
        group = biased.view(64, 4, 2).sum(-1)  # two experts per group: the top-2 are both
        kept = group.topk(2, dim=-1).indices
        masked = torch.full_like(biased, float("-inf"))
        for t in range(64):
            for g in kept[t].tolist():
                masked[t, 2 * g:2 * g + 2] = biased[t, 2 * g:2 * g + 2]
        assert torch.equal(r.indices, masked.topk(3, dim=-1).indices)


@pytest.mark.parametrize("options, message", [({"groups": 3, "group_top": 1}, "groups must divide the 8 experts"),
                                              ({"groups": 4, "group_top": 1}, "top_k=3 exceeds the experts"),
                                              ({"groups": 4}, "needs group_top > 0"),
                                              ({"groups": 4, "group_top": 5}, "group_top be in")])
def test_bad_groups_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        build_router("topk", hidden_size=8, num_experts=8, top_k=3, **options)
    assert build_router("topk", hidden_size=8, num_experts=8, top_k=3, groups=4, group_top=2).hf_routing() is None


# ---- vq's discrete path: a per-code bias on the distances -------------------------------------------------------
def test_vq_code_bias_moves_the_choice_of_code_by_the_sign_rule_and_is_off_by_default():
    torch.manual_seed(0)
    assert "code_bias" not in build_router("vq", hidden_size=8, num_experts=E, top_k=K).state_dict()
    router = build_router("vq", hidden_size=8, num_experts=E, top_k=K, code_bias_rate=0.5,
                          codebook_init="random").train()
    x = torch.randn(40, 8)
    dist = ((x[:, None] - router.codebook[None]) ** 2).sum(-1)  # (T, Q) by brute force
    with torch.no_grad():
        router.code_bias.copy_(torch.tensor([3.0, 0.0, -1.0, 0.5]))
    r = router(x)
    codes = (dist - router.code_bias).argmin(-1)
    assert torch.equal(r.indices[:, -1], codes % E) and not torch.equal(codes, dist.argmin(-1))
    counts = torch.bincount(codes, minlength=E).float()
    before = router.code_bias.clone()
    router.post_step()
    torch.testing.assert_close(router.code_bias, before + 0.5 * torch.sign(counts.mean() - counts))
    assert r.metrics["code_bias_max"] == 3.0
    router.eval()(x)
    router.post_step()  # evaluation observes nothing: no update
    torch.testing.assert_close(router.code_bias, before + 0.5 * torch.sign(counts.mean() - counts))
    router.load_state_dict(build_router("vq", hidden_size=8, num_experts=E, top_k=K).state_dict())
    assert (router.code_bias == 0).all()  # weights saved without it


def test_global_loss_gradient_is_the_same_with_activation_checkpointing():
    """The recomputed forward takes the running sum as its first forward left it (no second count, no collective)."""
    grads = []
    for overrides in ([], ["train.activation_checkpointing=1"]):
        cfg = load_config("tiny", [*TINY, "moe.router_options.balance_scope=global", "moe.aux_loss_coef=1.0",
                                   *overrides])
        torch.manual_seed(0)
        model = prepare_model(Transformer(cfg), cfg).train()
        x = torch.randint(64, (8, 8), generator=torch.Generator().manual_seed(2))
        for part in x.chunk(2):
            (model(part, part).loss / 2).backward()
        grads.append([r.gate.weight.grad.clone() for r in model.routers()])
        assert all(r.balance.running.sum() == 8 * 8 * K for r in model.routers())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def _train_losses(data: str, out: str, overrides: list) -> dict:
    """One run per balance scope through trainer.run on this process group: {scope: {step: lm loss}}."""
    import json
    from pathlib import Path

    from test_expert_parallel import EP_SMALL
    from test_train import ROOT

    import megavq.train.trainer as trainer
    losses = {}
    for scope in ("global", "micro_batch"):
        cfg = load_config("tiny", [*EP_SMALL, f"data.source={data}", "train.max_steps=6", "moe.aux_loss_coef=1.0",
                                   f"moe.router_options.balance_scope={scope}", *overrides])
        trainer.run(cfg, ROOT / "ds_configs" / "zero2.json", f"{out}/{scope}")
        lines = (Path(out) / scope / "metrics.jsonl").read_text().splitlines()
        losses[scope] = {r["step"]: r["train/lm_loss"] for r in map(json.loads, lines)}
    return losses


def _running_sums_under_accumulation(data: str, out: str) -> list:
    """A 2-step run with train.grad_accum_steps=4 through trainer.run: the global scope's count total at each
    micro-batch forward of the first router, and "step" at each post_step()."""
    from test_expert_parallel import EP_SMALL
    from test_train import ROOT

    import megavq.train.trainer as trainer
    from megavq.moe.routers.balance import Balance
    seen, counts, post = [], Balance.step_counts, Balance.post_step  # seen: (router's balance, total or "step")

    def step_counts(self, counts_E):
        running = counts(self, counts_E)
        seen.append((self, int(running.sum())))
        return running

    def post_step(self):
        seen.append((self, "step"))
        return post(self)
    Balance.step_counts, Balance.post_step = step_counts, post_step
    try:
        cfg = load_config("tiny", [*EP_SMALL, f"data.source={data}", "train.max_steps=2", "train.grad_accum_steps=4",
                                   "data.micro_batch_size=2", "moe.router_options.balance_scope=global"])
        trainer.run(cfg, ROOT / "ds_configs" / "zero2.json", out)
    finally:
        Balance.step_counts, Balance.post_step = counts, post
    return [value for balance, value in seen if balance is seen[0][0]]


def _one_rank(data: str, out: str, overrides: list) -> tuple:
    return _train_losses(data, out, overrides), _running_sums_under_accumulation(data, f"{out}/accumulation")


@pytest.mark.slow
def test_global_loss_trains_two_ranks_as_one_rank_with_the_global_batch(builtin_data, tmp_path):
    """Through DeepSpeed (ZeRO-2, gradients averaged over the ranks): 2 ranks of micro-batch 4 train as 1 rank of
    micro-batch 8 with balance_scope=global (1e-5), where the micro-batch loss makes them differ; and under
    train.grad_accum_steps=4 the trainer keeps the running sum over the step's micro-batches."""
    from test_expert_parallel import run_distributed
    two = run_distributed(_train_losses, 2, str(builtin_data), str(tmp_path / "two"), [])[0]
    one, running = run_distributed(_one_rank, 1, str(builtin_data), str(tmp_path / "one"),
                                   ["data.micro_batch_size=8"])[0]
    runs = {(scope, n): losses[scope] for n, losses in ((2, two), (1, one)) for scope in losses}
    assert max(abs(runs["global", 2][s] - runs["global", 1][s]) for s in range(1, 7)) < 1e-5
    assert max(abs(runs["micro_batch", 2][s] - runs["micro_batch", 1][s]) for s in range(1, 7)) > 1e-5
    # train.grad_accum_steps=4, micro-batches of 2 x 32 tokens x top-2: the counts used at each micro-batch are the
    # step's running sum (128, 256, 384, 512 slots), started again after each optimizer step; evaluation adds none
    assert running == [128, 256, 384, 512, "step"] * 2, running
