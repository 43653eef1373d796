import warnings

import pytest
import torch

from megavq.config import load_config
from megavq.model import Transformer

SMALL = ["model.vocab_size=64", "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.d_ff=48",
         "model.seq_len=16"]


def build(*overrides):
    torch.manual_seed(0)
    return Transformer(load_config("tiny", [*SMALL, *overrides])).eval()


def test_future_tokens_do_not_change_past_logits():
    model = build()
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 64, (2, 6))
    torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10])


def test_shapes_and_loss():
    model = build("moe.every=2")
    assert [b.is_moe for b in model.blocks] == [False, True]
    x = torch.randint(0, 64, (3, 16))
    assert model(x).shape == (3, 16, 64)
    out = model(x, x)
    assert out.loss.ndim == 0 and len(out.router_metrics) == 1
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)


def test_dense_model_has_no_experts():
    model = build("moe.every=0")
    assert not any(b.is_moe for b in model.blocks)
    assert model.num_params() == model.num_params(active=True)


def test_gpt2_style_options_build():
    model = build("model.norm=layernorm", "model.pos=learned", "model.mlp=gelu", "model.qkv_bias=true",
                  "model.out_bias=true", "model.mlp_bias=true", "model.tie_embeddings=false", "model.n_kv_heads=2")
    assert model.pos_embed is not None and model.lm_head.weight is not model.embed.weight
    assert model(torch.randint(0, 64, (1, 16))).shape == (1, 16, 64)


def test_active_params_count_topk_experts():
    model = build("moe.num_experts=4", "moe.top_k=1")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert model.num_params() - model.num_params(active=True) == experts - experts // 4


def packed_documents(eos, lengths, generator):
    """Documents of random non-EOS ids, each ending with eos, and their concatenation."""
    docs = [torch.cat([torch.randint(3, 64, (n - 1,), generator=generator), torch.tensor([eos])]) for n in lengths]
    return docs, torch.cat(docs)


@pytest.mark.parametrize("overrides", [["moe.router=topk", "moe.backend=native"],
                                       ["moe.router=topk", "moe.backend=native", "model.pos=learned"],
                                       ["moe.every=0", "model.n_kv_heads=2"]],
                         ids=["topk-dropless", "topk-learned-pos", "dense-gqa"])
def test_document_masking_scores_a_packed_sequence_as_its_documents_apart(overrides):
    """lm_loss of a packed sequence without the predictions made at EOS positions = the sum of the documents'."""
    eos = 2
    model = build(*overrides, f"model.document_eos_id={eos}")
    docs, packed = packed_documents(eos, [5, 1, 7, 3], torch.Generator().manual_seed(0))  # 16 = seq_len
    with torch.no_grad():
        x, y = packed[None], torch.cat([packed[1:], torch.tensor([5])])[None]  # the last target: after an EOS
        out = model(x, y)
        losses = torch.nn.functional.cross_entropy(model(x)[0].double(), y[0], reduction="none")
        packed_sum = out.lm_loss.double() * y.numel() - losses[x[0] == eos].sum()
        apart = sum(model(d[None, :-1], d[None, 1:]).lm_loss.double() * (len(d) - 1) for d in docs if len(d) > 1)
    n = sum(len(d) - 1 for d in docs)  # the predictions left: as a mean loss (lm_loss's scale), equal to 1e-6
    assert n == (x != eos).sum() and abs(packed_sum - apart) / n < 1e-6, (packed_sum, apart)
    plain = build(*overrides)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():  # without masking the later documents see the earlier ones
        assert abs(plain(x, y).lm_loss - out.lm_loss) > 1e-4


def test_flex_attention_block_mask_equals_the_explicit_document_mask():
    """The GPU path's BlockMask (run here by flex_attention's eager reference) attends as the CPU mask does."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from megavq.compat.torch import document_block_mask
    from megavq.model.kv_cache import document_layout, document_mask
    g = torch.Generator().manual_seed(0)
    idx_BS = torch.randint(3, 50, (2, 128), generator=g)
    idx_BS[0, [30, 100]], idx_BS[1, 5] = 2, 2
    _, doc_BS = document_layout(idx_BS, 2)
    mask = document_mask(doc_BS)
    q, k, v = (torch.randn(2, 4, 128, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention warns that it runs uncompiled
        out = flex.flex_attention(q, k, v, block_mask=document_block_mask(doc_BS))
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def pad_rows(texts, S, left):
    """Rows of the texts padded to S with random ids (left or right), and the real-token mask."""
    idx_BS, real_BS = torch.randint(0, 64, (len(texts), S)), torch.zeros(len(texts), S, dtype=torch.bool)
    for b, t in enumerate(texts):
        cols = slice(S - len(t), S) if left else slice(0, len(t))
        idx_BS[b, cols], real_BS[b, cols] = t, True
    return idx_BS, real_BS


def padding_routers():
    """(router, causal token-choice): every registered router but soft, which refuses padded rows."""
    from megavq.moe.routers import available_routers, router_class
    return [r for r in available_routers() if router_class(r).layer_kind == "token"]


@pytest.mark.parametrize("left", [False, True], ids=["right", "left"])
@pytest.mark.parametrize("router", padding_routers())
def test_padded_rows_give_each_text_its_own_logits(router, left):
    """Real tokens of a padded batch get the logits of their text alone, for every causal token-choice router
    (expert_choice and usmoe's global selection route over the batch's tokens, so only the pads' independence holds);
    changing the pads changes no logit of a real token, no aux loss and no routing statistic."""
    from megavq.moe.routers import router_class
    model = build("moe.every=1", f"moe.router={router}", "moe.num_experts=4", "moe.top_k=2", "moe.allow_noncausal=true")
    texts = [torch.randint(0, 64, (n,)) for n in (16, 5, 11)]
    idx_BS, real_BS = pad_rows(texts, 16, left)
    with torch.no_grad():
        padded = model(idx_BS, real_BS=real_BS)
        out = model(idx_BS, torch.where(real_BS, idx_BS, -100), real_BS=real_BS)
        repadded = model(torch.where(real_BS, idx_BS, 7), torch.where(real_BS, idx_BS, -100), real_BS=real_BS)
        alone = [model(t[None])[0] for t in texts]
        other_pads = model(torch.where(real_BS, idx_BS, 3), real_BS=real_BS)
    torch.testing.assert_close(padded[real_BS], other_pads[real_BS], rtol=0, atol=0)
    torch.testing.assert_close((out.aux_loss, out.router_metrics), (repadded.aux_loss, repadded.router_metrics),
                               rtol=0, atol=0)
    if router_class(router).is_causal(model.cfg.moe.router_options):
        torch.testing.assert_close(padded[real_BS], torch.cat(alone), rtol=1e-5, atol=1e-5)
        lm = sum(torch.nn.functional.cross_entropy(a, t, reduction="sum") for a, t in zip(alone, texts))
        torch.testing.assert_close(out.lm_loss, lm / sum(len(t) for t in texts), rtol=1e-5, atol=1e-6)


def test_soft_refuses_padded_rows():
    model = build("moe.every=1", "moe.router=soft", "moe.allow_noncausal=true")
    with pytest.raises(Exception, match="soft mixes every token"):
        model(torch.randint(0, 64, (2, 16)), real_BS=torch.ones(2, 16, dtype=torch.bool))


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_classification_head_reads_the_real_tokens(pool):
    model = build("model.num_classes=3", f"model.pool={pool}")
    texts = [torch.randint(0, 64, (n,)) for n in (16, 5)]
    (right, real_r), (left, real_l) = pad_rows(texts, 16, False), pad_rows(texts, 16, True)
    with torch.no_grad():
        alone = torch.cat([model(t[None]) for t in texts])
        torch.testing.assert_close(model(right, real_BS=real_r), alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(left, real_BS=real_l), alone, rtol=1e-5, atol=1e-5)
        out = model(left, torch.tensor([0, 2]), real_BS=real_l)
    torch.testing.assert_close(out.lm_loss, torch.nn.functional.cross_entropy(alone, torch.tensor([0, 2])))
