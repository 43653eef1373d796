"""Routers against numbers computed from the official code's equations (CompeteSMoE 2024/2025, USMoE, torchscale
X-MoE, VQMoE), written here by hand: weights, chosen experts and losses on small inputs whose answer is known.

The equations, the official defaults and the files and lines they were read from are in docs/routers.md. Each
router is set up so that its logits are the given ones (hidden size T, inputs the identity, gate = logits^T).
"""
import pytest
import torch

from megavq.config import MoEConfig
from megavq.moe.layer import build_moe_layer
from megavq.moe.routers import build_router
from megavq.moe.spec import MoESpec

TOL = dict(rtol=0, atol=2e-6)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def with_logits(name, logits_TE, top_k, **options):
    """A router whose gate gives `logits_TE` for the identity input (hidden size = T)."""
    T, E = logits_TE.shape
    router = build_router(name, hidden_size=T, num_experts=E, top_k=top_k, **options)
    with torch.no_grad():
        router.gate.weight.copy_(logits_TE.t())
    return router


def dense(r, num_experts):
    """(T, E) weight of each expert in each token's output (slots of one expert add up)."""
    w_TE = torch.zeros(r.weights.shape[0], num_experts)
    valid = r.indices >= 0
    rows = torch.arange(r.weights.shape[0])[:, None].expand_as(r.indices)
    return w_TE.index_put_((rows[valid], r.indices[valid]), r.weights.detach()[valid], accumulate=True)


# ---- CompeteSMoE: T = 3 tokens, E = 4 experts, D = 2, k = 2, one sequence --------------------------------------
Y_TED = t([[[1.0, -0.5], [0.2, 0.3], [-1.0, 2.0], [0.5, 0.5]],
           [[0.0, 0.0], [2.0, 1.0], [0.3, -0.2], [-0.4, 1.5]],
           [[1.5, 1.5], [-2.0, -1.0], [0.8, 0.1], [0.2, -0.3]]])  # every expert's output on every token
Z_COMPETE = t([[0.5, -0.2, 1.0, 0.0], [0.1, 0.9, -0.5, 0.3], [1.2, -1.0, 0.4, 0.0]])  # router logits


def compete_step(**options):
    router = with_logits("compete", Z_COMPETE, 2, rate=1.0, warmup_steps=0, **options).train()
    return router(torch.eye(3), seq_len=3, expert_fn=lambda: Y_TED.transpose(0, 1))


@pytest.mark.parametrize("weights, expected", [
    ("linear", [[0.556062, 0.443938], [0.608386, 0.391614], [0.639831, 0.360169]]),  # a / sum(a), 2025 code
    ("softmax", [[0.561196, 0.438804], [0.648598, 0.351402], [0.677797, 0.322203]])])
def test_compete_2025_winner_weights(weights, expected):
    """a = mean_D softplus(y) = [[0.893669, 0.826247, 1.220095, 0.974077], ...]: winners [2, 3], [1, 3], [0, 2]."""
    r = compete_step(weights=weights)
    assert r.indices.tolist() == [[2, 3], [1, 3], [0, 2]]
    torch.testing.assert_close(r.weights, t(expected), **TOL)


def test_compete_2025_losses():
    """Distillation (hybrid, theta 0.2): MSE over T*E 0.003407 + 0.2 * MSE at the winners 0.004264 = 0.004259;
    diversity: cos of the winners' outputs [0.316228, 0.201653, 0.789352], summed over ordered pairs / (T*k*k) =
    0.217872; affinity balance: E * sum_e f_e P_e with f = [1/3, 1/3, 1/3, 0] (first winners),
    P = mean softmax(a) = [0.289962, 0.254346, 0.236112, 0.219580] -> 1.040560."""
    coefs = dict(distill_coef=1e-3, diversity_coef=0.01, affinity_balance_coef=0.01, balance_coef=0.0)
    r = compete_step(winner_coef=0.2, **coefs)
    m = r.metrics
    torch.testing.assert_close(m["distill_loss"], torch.tensor(0.004259), **TOL)
    torch.testing.assert_close(m["diversity_loss"], torch.tensor(0.217872), **TOL)
    torch.testing.assert_close(m["affinity_balance_loss"], torch.tensor(1.040560), **TOL)
    torch.testing.assert_close(r.aux_loss, torch.tensor(1e-3 * 0.004259 + 0.01 * 0.217872 + 0.01 * 1.040560), **TOL)
    plain = compete_step(winner_coef=0.0, **coefs)  # hybrid off (the VLM default): L_full alone
    torch.testing.assert_close(plain.metrics["distill_loss"], torch.tensor(0.003407), **TOL)


def test_compete_2024_combine_gate_and_top_k_target():
    """c = 0.5 ||y|| + 0.5 z = [[0.809017, 0.080278, 1.618034, 0.353553], ...]; winners on c [2, 0], [1, 3], [0, 1];
    weights softmax(c_W); target q = softmax of the winners' c, 0 elsewhere; MSE(softmax(z), q) over T*E = 0.031753.
    Without the combine gate the winners are those of the norms, [2, 0], [1, 3], [1, 0], and the MSE 0.046671."""
    recipe = dict(affinity="norm", distill_target="topk", winner_coef=0.0)
    r = compete_step(combine=0.5, **recipe)
    assert r.indices.tolist() == [[2, 0], [1, 3], [0, 1]]
    torch.testing.assert_close(r.weights.detach(), t([[0.691900, 0.308100], [0.655166, 0.344834],
                                                       [0.739356, 0.260644]]), **TOL)
    torch.testing.assert_close(r.metrics["distill_loss"], torch.tensor(0.031753), **TOL)
    norm_only = compete_step(**recipe)
    assert norm_only.indices.tolist() == [[2, 0], [1, 3], [1, 0]]
    torch.testing.assert_close(norm_only.metrics["distill_loss"], torch.tensor(0.046671), **TOL)


def test_compete_combine_gate_sends_the_output_gradient_into_the_router():
    r = compete_step(combine=0.5, affinity="norm", distill_coef=0.0, balance_coef=0.0, diversity_coef=0.0,
                     affinity_balance_coef=0.0)
    assert r.weights.requires_grad  # through the logits in c (the experts' outputs here are constants)


# ---- USMoE: one group of N = 3 tokens, E = 4 ------------------------------------------------------------------
Z_USMOE = t([[2.0, 0.5, -1.0, 0.0], [0.3, 0.2, 0.1, 0.0], [-0.5, 1.5, 1.0, -2.0]])
W_USMOE = t([[0.575249, 0.234837, 0.084912, 0.173051],  # 0.5 softmax(z) + 0.5 sigmoid(z) * 2 / E
             [0.287936, 0.268050, 0.249409, 0.231919],
             [0.132571, 0.486551, 0.353902, 0.038321]])


@pytest.mark.parametrize("top_k, budget, mask", [
    (1, 1.0, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]]),  # 3 pairs: token 1 gets no expert
    (2, 1.0, [[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0]]),  # 6 pairs
    (2, 0.75, [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0]]),  # floor(0.75 * 3 * 2) = 4 pairs
    (2, 0.5, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]])])  # 3 pairs
@pytest.mark.parametrize("normalize", [False, True])
def test_usmoe_global_selection_budget_and_normalisation(top_k, budget, mask, normalize):
    """Weights: w itself (official runs, norm_topk_prob off) or w divided by its sum over all E experts."""
    r = with_logits("usmoe", Z_USMOE, top_k, budget=budget, normalize=normalize)(torch.eye(3), seq_len=3)
    w = W_USMOE / W_USMOE.sum(-1, keepdim=True) if normalize else W_USMOE
    torch.testing.assert_close(dense(r, 4), w * t(mask), **TOL)
    if normalize:  # the hand-computed values of the normalised row 1, k = 2
        torch.testing.assert_close(w[1, :3], t([0.277579, 0.258408, 0.240437]), **TOL)


# ---- torchscale X-MoE and the paper's X-MoE: projected tokens h (d_e = 4 here), E = 4 -------------------------
H_XMOE = t([[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.5, 0.5], [-1.0, 2.0, 0.0, 1.0]])
E_XMOE = t([[0.3, 0.0, 0.0, 0.1], [0.0, 0.2, 0.2, 0.0], [-0.1, 0.1, 0.3, 0.0], [0.0, 0.0, -0.2, 0.4]])


def xmoe_router(mode, **options):
    router = build_router("xmoe", hidden_size=4, num_experts=4, top_k=2, proj_dim=4, mode=mode, balance_coef=1.0,
                          **options)
    with torch.no_grad():
        router.proj.weight.copy_(torch.eye(4))
        router.centroids.copy_(E_XMOE)
    return router


def test_xmoe_torchscale_mode():
    """s = h . e_hat (token not normalised; e rescaled to norm 1.5 changes nothing in s), gates = softmax(s),
    top-2 renormalised g1 / (g1 + g2), balance E * sum_e mean(gates)_e * (first-choice fraction)_e = 1.399119."""
    r = xmoe_router("torchscale")(H_XMOE)
    torch.testing.assert_close(r.scores, t([[0.176266, 0.385197, 0.422884, 0.015653],
                                            [0.279561, 0.301229, 0.233465, 0.185744],
                                            [0.055567, 0.430200, 0.258416, 0.255817]]), **TOL)
    assert r.indices.tolist() == [[2, 1], [1, 0], [1, 2]]
    torch.testing.assert_close(r.weights, t([[0.523319, 0.476681], [0.518654, 0.481346], [0.624731, 0.375269]]),
                               **TOL)
    torch.testing.assert_close(r.aux_loss, torch.tensor(1.399119), **TOL)
    assert "temperature" not in r.metrics and not hasattr(xmoe_router("torchscale"), "log_temperature")


def test_xmoe_paper_mode():
    """cos(h, e) = s / |h|; probabilities softmax(cos / 0.07)."""
    r = xmoe_router("paper")(H_XMOE)
    torch.testing.assert_close(r.scores, t([[0.003829, 0.365761, 0.630410, 0.000000],
                                            [0.250993, 0.729146, 0.019131, 0.000730],
                                            [0.000006, 0.909565, 0.046547, 0.043882]]), **TOL)
    assert r.indices.tolist() == [[2, 1], [1, 0], [1, 2]]


def test_xmoe_torchscale_embeddings_and_dimension():
    router = build_router("xmoe", hidden_size=128, num_experts=8, top_k=2, mode="torchscale")
    assert router.proj.weight.shape == (16, 128)
    torch.testing.assert_close(router.centroids.norm(dim=-1), torch.full((8,), 1.5))
    e = router.centroids.detach() / 1.5
    torch.testing.assert_close(e @ e.t(), torch.eye(8), rtol=0, atol=1e-5)  # orthogonal rows


# ---- VQMoE: the continuous slot (k_c = 1) ----------------------------------------------------------------------
X_VQ = t([[1.0, -1.0, 0.5, 0.0], [0.2, 0.4, -0.6, 1.0], [-1.5, 0.5, 0.5, 0.5]])
S_VQ = t([[0.534523, -0.668153, -0.133631, 1.336306],  # continuous router logits
          [-0.267261, 0.694879, -0.320714, -0.587975],
          [-1.336306, 0.801784, 1.336306, -0.534522]])


def vq_router(continuous_weight):
    router = build_router("vq", hidden_size=4, num_experts=4, top_k=2, codebook_init="random",
                          continuous_weight=continuous_weight).eval()
    e = t([[0.3, 0.1, 0.0, -0.2], [0.0, 0.3, 0.1, 0.2], [-0.2, 0.0, 0.3, 0.1], [0.1, -0.3, 0.2, 0.0]])
    with torch.no_grad():
        router.continuous.gate.weight.copy_(e / e.norm(dim=-1, keepdim=True))  # logits x . e_hat = S_VQ
        router.mix.weight.copy_(t([[0.5, -0.2, 0.1, 0.0], [-0.3, 0.4, 0.0, 0.2]]))
        router.mix.bias.copy_(t([0.1, -0.1]))
    return router


def test_vq_ratio_weight_carries_g_c_and_the_gradient_of_log_p():
    """[g_c, g_d] = softmax(W_m x + b_m) = [[0.838891, 0.161109], [0.465057, 0.534943], [0.205870, 0.794130]]; the
    continuous slot's value is g_c (the official forward: softmax over one score times g_c), its gradient
    d w_c / d s = g_c * (onehot(chosen) - softmax(s))."""
    router = vq_router("ratio")
    r = router(X_VQ)
    assert r.indices[:, 0].tolist() == [3, 1, 2]
    torch.testing.assert_close(r.weights, t([[0.838891, 0.161109], [0.465057, 0.534943], [0.205870, 0.794130]]),
                               **TOL)
    gate = router.continuous.gate.weight
    (grad_ED,) = torch.autograd.grad(r.weights[:, 0].sum(), gate)
    dw_ds_TE = t([[-0.207515, -0.062335, -0.106383, 0.376234],
                  [-0.087898, 0.235002, -0.083323, -0.063781],
                  [-0.007861, -0.066682, 0.092068, -0.017525]])
    torch.testing.assert_close(grad_ED, dw_ds_TE.t() @ X_VQ, rtol=0, atol=1e-5)  # s = x W^T: dW = (dw/ds)^T x


def test_vq_prob_weight_is_the_first_landing_form():
    """[g_c * p, g_d] normalised, p = softmax(s)[chosen] = [0.551511, 0.494680, 0.552786]."""
    r = vq_router("prob")(X_VQ)
    torch.testing.assert_close(r.weights, t([[0.741716, 0.258284], [0.300726, 0.699274], [0.125342, 0.874658]]),
                               **TOL)


@pytest.mark.parametrize("num_experts", [4, 16, 64])
def test_vq_continuous_share_at_initialisation_is_about_half(num_experts):
    """Random inputs, a freshly built vq layer: where the two slots are distinct experts, the continuous expert's
    mean share of the output weight is within 0.35-0.65 (the paper and the official code: about 0.5)."""
    torch.manual_seed(0)
    cfg = MoEConfig(router="vq", num_experts=num_experts, top_k=2)
    layer = build_moe_layer(MoESpec(cfg, 64, 32, seed=0)).train()
    x = torch.randn(4, 128, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer(x)  # the k-means start of the codebook, on this batch
        r = layer.route(x)
    distinct = r.indices[:, 0] != r.indices[:, 1]
    assert distinct.float().mean() > 0.5
    w = r.weights[distinct]
    share = (w[:, 0] / w.sum(-1)).mean().item()
    assert 0.35 <= share <= 0.65, share
