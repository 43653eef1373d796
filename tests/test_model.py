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
