"""Text generation from a trained model: batched prompts, a KV cache, greedy or sampled decoding.

Legend: B prompts (rows), S prompt slots (the longest prompt), V vocabulary.
The prompts are left-padded to the longest one and prefilled in one forward; then every row decodes one
token per step, reading the cache (megavq.model.kv_cache): padding is masked out and each row has its own
positions, so a row's logits do not depend on the other prompts. Row b samples with its own
torch.Generator seeded with seed + b: the same seed gives the same text, whatever the other prompts.
A row stops at eos_id (not returned) or after max_new_tokens; the batch stops when every row has stopped.
Only causal routers can generate: a decoding step shows the MoE layers the new tokens alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavq.config import Config
from megavq.errors import ConfigError, MegavqError
from megavq.model.kv_cache import KVCache
from megavq.moe.routers import router_class


@dataclass
class Sampling:
    """How the next token is drawn: the argmax (greedy, or temperature 0), or a sample of
    softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all) and then to the
    smallest set of most likely tokens whose probability reaches top_p (1 = all)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise MegavqError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise MegavqError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MegavqError(f"top_p must be in (0, 1], got {self.top_p}")
        self.greedy = self.greedy or self.temperature == 0

    def next_tokens(self, logits_BV: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B,) token ids; row b draws from generators[b]."""
        if self.greedy:
            return logits_BV.argmax(dim=-1)
        logits_BV = top_p_filter(top_k_filter(logits_BV.float() / self.temperature, self.top_k), self.top_p)
        probs_BV = logits_BV.softmax(dim=-1)
        return torch.cat([torch.multinomial(p_V, 1, generator=g) for p_V, g in zip(probs_BV, generators)])


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """-inf outside the k largest logits of each row (0 = keep all)."""
    if k == 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = logits_BV.topk(k, dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """-inf outside the smallest set of most likely tokens whose probability reaches p (the top one always stays)."""
    if p >= 1:
        return logits_BV
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    drop_sorted_BV = probs_BV.cumsum(dim=-1) - probs_BV >= p  # the more likely tokens already reach p
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def router_is_causal(cfg: Config) -> bool:
    """Whether the model routes each token without looking at later ones (a dense model does)."""
    return cfg.moe.every == 0 or router_class(cfg.moe.router).is_causal(cfg.moe.router_options)


def check_request(cfg: Config, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse what generation cannot do: a non-causal router, bad prompts, more tokens than the trained context."""
    if not router_is_causal(cfg):
        raise ConfigError(f"moe.router={cfg.moe.router} is not causal (a token's routing depends on later tokens), "
                          f"so it cannot generate one token at a time")
    if max_new_tokens < 1:
        raise MegavqError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MegavqError("generation needs at least one prompt, and every prompt at least one token")
    V, seq_len = cfg.model.vocab_size, cfg.model.seq_len
    bad = [t for p in prompts for t in p if not 0 <= t < V]
    if bad:
        raise MegavqError(f"token id {bad[0]} is outside the model's vocabulary [0, {V})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > seq_len:
        raise MegavqError(f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} = "
                          f"{longest + max_new_tokens} tokens exceeds the trained context model.seq_len={seq_len}")


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S) token ids, prompts right-aligned after padding id 0, and (B,) the padding of each row."""
    S = max(len(p) for p in prompts)
    idx_BS = torch.tensor([[0] * (S - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    pad_B = torch.tensor([S - len(p) for p in prompts], dtype=torch.long, device=device)
    return idx_BS, pad_B


def row_generators(seed: int, B: int, device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed + b) for b in range(B)]


@torch.inference_mode()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             seed: int = 0) -> list[list[int]]:
    """The new token ids after each prompt (a list of token ids), without eos_id: at most max_new_tokens, fewer
    where the row drew eos_id. Greedy (or temperature 0), else sampled with temperature, top_k, top_p (see
    Sampling); row b draws with seed + b. Runs in eval mode on the model's device; the model's mode is restored."""
    check_request(model.cfg, prompts, max_new_tokens)
    sampling = Sampling(temperature, top_k, top_p, greedy)
    was_training = model.training
    model.eval()
    try:
        return decode(model, prompts, max_new_tokens, eos_id, sampling, seed)
    finally:
        model.train(was_training)


def decode(model, prompts, max_new_tokens: int, eos_id: int | None, sampling: Sampling, seed: int) -> list[list[int]]:
    """Prefill the left-padded prompts in one forward, then decode one token per row and step until all stopped."""
    device = model.embed.weight.device
    idx_BS, pad_B = left_pad(prompts, device)
    cache = KVCache(model.cfg.model, pad_B, idx_BS.shape[1] + max_new_tokens - 1, model.embed.weight.dtype)
    generators = row_generators(seed, len(prompts), device)
    out, done = [[] for _ in prompts], [False] * len(prompts)
    logits_BV = model(idx_BS, cache=cache)[:, -1]  # prefill
    for step in range(max_new_tokens):
        tok_B = sampling.next_tokens(logits_BV, generators)
        for b, t in enumerate(tok_B.tolist()):
            done[b] = done[b] or t == eos_id
            if not done[b]:
                out[b].append(t)
        if all(done) or step == max_new_tokens - 1:
            break
        logits_BV = model(tok_B[:, None], cache=cache)[:, -1]  # stopped rows run on, unread
    return out
