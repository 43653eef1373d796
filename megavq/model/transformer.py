"""Decoder-only transformer with MoE layers.

Legend: B batch, S sequence, D hidden, V vocabulary.
The MLP of every `moe.every`-th block (zero-based index i with (i + 1) % every == 0) is an MoE layer, but for the
blocks of moe.dense_layers, whose MLP stays dense (width model.d_ff).
The model is built from the model and MoE settings of a run configuration (`cfg.model`, `cfg.moe`); what a
training run adds comes through methods: with `checkpoint_every = n > 0` (the engine sets it from
train.activation_checkpointing), every n-th block (i % n == 0) keeps only its input for the backward and runs
its forward again there (non-reentrant torch.utils.checkpoint; routers observe nothing in the recompute,
megavq.moe.routers.recomputing); `place_routers` gives the routers the run's seed and length.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megavq.compat.torch import document_block_mask, has_flex_attention
from megavq.config import Config, ModelConfig, MoEConfig
from megavq.errors import check
from megavq.model.generate import generate
from megavq.model.kv_cache import KVCache, LayerKV, document_layout, document_mask, padding_layout
from megavq.model.layers import MLP, CausalSelfAttention, Rope, make_norm
from megavq.model.loss import head_cross_entropy
from megavq.moe.experts import expert_out_std
from megavq.moe.layer import MoELayer, build_moe_layer
from megavq.moe.routers import Router, recomputing
from megavq.moe.spec import MoESpec, block_seed, is_moe_layer, moe_blocks


class LMOutput(NamedTuple):
    logits: torch.Tensor | None  # LM: not made (the loss is computed from the hidden states in chunks,
    # megavq.model.loss); classification: (B, C)
    loss: torch.Tensor  # lm_loss + aux_loss: what is optimised
    lm_loss: torch.Tensor  # the task's loss: next-token cross-entropy, or the classification's
    aux_loss: torch.Tensor
    router_metrics: list  # one dict per MoE layer


class Block(nn.Module):
    def __init__(self, m: ModelConfig, moe: MoEConfig, i: int):
        super().__init__()
        self.attn_norm, self.attn = make_norm(m), CausalSelfAttention(m)
        self.mlp_norm = make_norm(m)
        self.is_moe = is_moe_layer(i, moe.every, moe.dense_layers)
        self.mlp = build_moe_layer(MoESpec.for_block(m, moe, i)) if self.is_moe else MLP(m)

    def forward(self, x: torch.Tensor, rope, kv: LayerKV | None = None, mask: torch.Tensor | None = None,
                real_BS: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
        """real_BS (padded rows): the MoE layer routes the real tokens only."""
        x = x + self.attn(self.attn_norm(x), rope, kv, mask)
        if not self.is_moe:
            return x + self.mlp(self.mlp_norm(x)), None, None
        y, aux, metrics = self.mlp(self.mlp_norm(x), real_BS)
        return x + y, aux, metrics


class LMHead(nn.Linear):
    """The output projection; given targets, it returns the loss without making the (N, V) logits (inside
    its own forward, so that ZeRO-3 gathers its weight for it)."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return head_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight, targets.reshape(-1))


def _recompute_contexts():
    """torch.utils.checkpoint's context_fn: nothing around the first forward, `recomputing()` around the recompute."""
    return contextlib.nullcontext(), recomputing()


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        """A model of the settings cfg.model and cfg.moe (a run configuration, or any object with both)."""
        super().__init__()
        m = cfg.model
        assert m.vocab_size > 0, "model.vocab_size must be resolved before building the model"
        assert m.init_seed >= 0, "model.init_seed must be resolved (load_config / config_from_dict do it)"
        self.cfg = cfg
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.pos_embed = nn.Embedding(m.seq_len, m.d_model) if m.pos == "learned" else None
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.ModuleList(Block(m, cfg.moe, i) for i in range(m.n_layers))
        self.norm = make_norm(m)
        self.lm_head = LMHead(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.score = nn.Linear(m.d_model, m.num_classes) if m.num_classes else None  # sequence classification
        self.rope = Rope(m.seq_len, m.head_size(), m.rope_theta) if m.pos == "rope" else None
        self.checkpoint_every = 0  # activation checkpointing: off until a training engine sets it
        self._init_weights(m)

    def _init_weights(self, m: ModelConfig) -> None:
        out_std = expert_out_std(m.init_std, m.n_layers)
        for name, p in self.named_parameters():
            if ".experts." in name or ".router." in name:
                continue  # initialised by their own modules
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)  # norm weights
            else:
                is_residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, std=out_std if is_residual_out else m.init_std)

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None, cache: KVCache | None = None,
                real_BS: torch.Tensor | None = None):
        """Logits (B, S, V) for token ids; with targets, an LMOutput with the losses (and no logits). With a cache
        (generation), idx_BS holds the next tokens of each row and the cache is read and extended. real_BS (bool,
        padded rows, left or right): pads attend to nothing, are read by no real token, are not routed, and
        targets < 0 count in no loss. With a classification head (model.num_classes): logits (B, C), and with
        labels targets_BS (B,) an LMOutput whose logits are those and whose lm_loss is the cross-entropy."""
        if cache is not None:
            return self._forward_cached(idx_BS, cache)
        h_BSD, aux_losses, metrics = self.hidden(idx_BS, real_BS)
        if self.score is not None:
            return self.classify(h_BSD, real_BS, targets_BS, aux_losses, metrics)
        if targets_BS is None:
            return self.lm_head(h_BSD)
        if real_BS is not None:
            keep_BS = targets_BS >= 0
            h_BSD, targets_BS = h_BSD[keep_BS], targets_BS[keep_BS]
        lm_loss = self.lm_head(h_BSD, targets_BS)
        return LMOutput(None, *self.with_aux(lm_loss, aux_losses), metrics)

    def hidden(self, idx_BS: torch.Tensor, real_BS: torch.Tensor | None = None) -> tuple:
        """The final normed hidden states (B, S, D), the MoE layers' aux losses and their metrics."""
        pos, mask = self.layout(idx_BS, real_BS)
        x = self.embed(idx_BS)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos)
        x = self.drop(x)
        rope = None if self.rope is None else (self.rope() if mask is None else self.rope.at(pos))
        aux_losses, metrics = [], []
        for i, block in enumerate(self.blocks):
            if self.checkpointed(i):
                x, aux, met = checkpoint(block, x, rope, None, mask, real_BS, use_reentrant=False,
                                         context_fn=_recompute_contexts)
            else:
                x, aux, met = block(x, rope, None, mask, real_BS)
            if aux is not None:
                aux_losses.append(aux)
                metrics.append(met)
        return self.norm(x), aux_losses, metrics

    @staticmethod
    def with_aux(loss: torch.Tensor, aux_losses: list) -> tuple:
        """(loss + aux, loss, aux): what is optimised, the task's loss, the MoE layers' aux losses."""
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else loss.new_zeros(())
        return loss + aux_loss, loss, aux_loss

    def classify(self, h_BSD: torch.Tensor, real_BS: torch.Tensor | None, labels_B: torch.Tensor | None,
                 aux_losses: list, metrics: list):
        """The classification head on the last real token of each row, or the mean of its real tokens (model.pool)."""
        real_BS = torch.ones(h_BSD.shape[:2], dtype=torch.bool, device=h_BSD.device) if real_BS is None else real_BS
        if self.cfg.model.pool == "mean":
            pooled_BD = (h_BSD * real_BS[..., None]).sum(1) / real_BS.sum(1, keepdim=True).clamp(min=1)
        else:
            slots_S = torch.arange(h_BSD.shape[1], device=h_BSD.device)
            last_B = (real_BS * slots_S).argmax(dim=1)  # the last real slot, left or right padding
            pooled_BD = h_BSD[torch.arange(h_BSD.shape[0], device=h_BSD.device), last_B]
        logits_BC = self.score(pooled_BD).float()
        if labels_B is None:
            return logits_BC
        loss = torch.nn.functional.cross_entropy(logits_BC, labels_B)
        return LMOutput(logits_BC, *self.with_aux(loss, aux_losses), metrics)

    def layout(self, idx_BS: torch.Tensor, real_BS: torch.Tensor | None = None) -> tuple:
        """(positions, attention mask): (S,) and None (causal) for one stream; with padding (real_BS) positions
        counting each row's real tokens and a (B, 1, S, S) bool mask (megavq.model.kv_cache.padding_layout); with
        document masking (B, S) positions from each document's start and attention within documents
        (megavq.model.kv_cache): a BlockMask of flex_attention on a GPU where torch has it and dropout is off,
        else a (B, 1, S, S) bool mask."""
        eos_id = self.cfg.model.document_eos_id
        if real_BS is not None:
            check(eos_id < 0, "padded rows (fine-tuning) and document masking (model.document_eos_id) do not combine")
            return padding_layout(real_BS)
        if eos_id < 0:
            return torch.arange(idx_BS.shape[1], device=idx_BS.device), None
        pos_BS, doc_BS = document_layout(idx_BS, eos_id)
        if has_flex_attention(idx_BS.device) and not (self.training and self.cfg.model.dropout):
            return pos_BS, document_block_mask(doc_BS)
        return pos_BS, document_mask(doc_BS)

    def checkpointed(self, i: int) -> bool:
        """Whether block i recomputes its forward in the backward (activation checkpointing, training only)."""
        n = self.checkpoint_every
        return n > 0 and i % n == 0 and self.training and torch.is_grad_enabled()

    def _forward_cached(self, idx_BS: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, S, V) of the next S tokens of every row; positions and padding come from the cache."""
        pos_BS, mask = cache.layout(idx_BS)  # (B, S), (B, 1, S, L)
        x = self.embed(idx_BS)
        if self.pos_embed is not None:
            x = x + self.pos_embed(pos_BS)
        rope = None if self.rope is None else self.rope.at(pos_BS)
        for block, kv in zip(self.blocks, cache.layers):  # rope: (B, 1, S, hs/2) each
            x, _, _ = block(x, rope, kv, mask)
        return self.lm_head(self.norm(x))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, **options) -> list[list[int]]:
        """The new token ids after each prompt (lists of token ids); options and rules: megavq.model.generate."""
        return generate(self, prompts, max_new_tokens, **options)

    # ---- the MoE layers ---------------------------------------------------------------------------------
    def moe_layers(self) -> list[tuple[str, MoELayer]]:
        """(state-dict prefix, layer) of every MoE layer, in order."""
        return [(f"blocks.{i}.mlp.", b.mlp) for i, b in enumerate(self.blocks) if b.is_moe]

    def routers(self) -> list[Router]:
        return [layer.router for _, layer in self.moe_layers()]

    def place_routers(self, seed: int, max_steps: int = 0) -> None:
        """Give every router its place, the run's seed (keyed by block, as the experts' initialisation) and the
        run's length in optimizer steps (0 = unknown), for schedules given as fractions of the run."""
        blocks = moe_blocks(len(self.blocks), self.cfg.moe.every, self.cfg.moe.dense_layers)
        for index, i in enumerate(blocks):
            self.blocks[i].mlp.router.place(index, len(blocks), block_seed(seed, i), max_steps)

    def set_step(self, step: int, micro_batch: int = 0) -> None:
        """Tell the routers the optimizer step about to run and the global index of this rank's micro-batch
        in it (their schedules and random draws are keyed by them)."""
        for router in self.routers():
            router.set_step(step, micro_batch)

    def post_step(self) -> None:
        """After each optimizer step, on every rank: routers apply what forward observed (vq's codebook)."""
        for router in self.routers():
            router.post_step()

    def set_ep_group(self, group) -> None:
        for _, layer in self.moe_layers():
            layer.set_ep_group(group)

    def to_canonical(self, sd: dict) -> dict:
        """A state dict of this model (or one keyed like it) in the canonical layout (collective under EP)."""
        for prefix, layer in self.moe_layers():
            sd = layer.to_canonical(prefix, sd)
        return sd

    def from_canonical(self, sd: dict) -> dict:
        """A canonical state dict in this model's layout (this rank's experts under EP)."""
        for prefix, layer in self.moe_layers():
            sd = layer.from_canonical(prefix, sd)
        return sd

    def num_params(self, active: bool = False) -> int:
        """All parameters of the model (every expert counted once, also when this rank holds only its
        1/ep_size share), or those a token uses (top_k of num_experts experts per MoE layer)."""
        moe = self.cfg.moe
        expert = sum(p.numel() for n, p in self.named_parameters() if ".experts." in n) * moe.ep_size
        other = sum(p.numel() for n, p in self.named_parameters() if ".experts." not in n)
        return other + (expert * moe.top_k // moe.num_experts if active else expert)
