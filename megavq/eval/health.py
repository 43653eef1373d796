"""Training-time routing health: detect MoE layers that collapse, from the metrics the trainer logs.

A layer is collapsed at an evaluation when
- one expert receives more than `share` of the tokens: its fraction of the routed slots (`moe/L{i}/load`)
  times the slots per token (k for top-k, the logged `experts_per_token` where a router reports it). For
  top-1 that is its share of tokens; for top-k the largest share a single expert can reach is 1 (every
  token), while uniform routing gives k / E. Layers where every token uses every expert (k >= E) are skipped.
- or more than `dead_code_frac` of a vq codebook's codes are dead (`moe/L{i}/dead_codes`), or its code
  perplexity (`moe/L{i}/code_perplexity`) is below `code_usage_min` of the codes: a codebook can collapse
  onto one code while the others are used just often enough never to count as dead;
- or a vq mixing gate gives one path (discrete or continuous) more than `share` of its weight on average
  (`moe/L{i}/gate_discrete`): the layer then runs top_k experts and uses one path's.
The monitor warns when a layer stays collapsed for `patience` consecutive evaluations, and at every
evaluation after that until it recovers.
"""
from __future__ import annotations

import re

from megavq.errors import ConfigError
from megavq.config import Config

_LOAD_KEY = re.compile(r"moe/L(\d+)/load$")


class CollapseMonitor:
    def __init__(self, share: float = 0.9, patience: int = 3, dead_code_frac: float = 0.5,
                 slots_per_token: float = 1.0, num_codes: int = 0, code_usage_min: float = 0.5):
        if not 0 < share <= 1:
            raise ConfigError(f"train.collapse_share must be in (0, 1], got {share}")
        if patience < 1:
            raise ConfigError(f"train.collapse_patience must be >= 1, got {patience}")
        if not 0 < dead_code_frac <= 1:
            raise ConfigError(f"train.dead_code_frac must be in (0, 1], got {dead_code_frac}")
        if not 0 <= code_usage_min <= 1:
            raise ConfigError(f"train.code_usage_min must be in [0, 1], got {code_usage_min}")
        self.share, self.patience, self.dead_code_frac = share, patience, dead_code_frac
        self.slots_per_token, self.num_codes, self.code_usage_min = slots_per_token, num_codes, code_usage_min
        self.streaks: dict[tuple[int, str], int] = {}  # (layer, "load" | "codes" | "gate") -> evaluations in a row

    @classmethod
    def from_config(cls, cfg: Config) -> "CollapseMonitor":
        from megavq.moe.routers import router_class
        moe, t = cfg.moe, cfg.train
        soft = getattr(router_class(moe.router), "layer_kind", "token") == "soft"  # combine mass sums to 1
        num_codes = (moe.router_options.get("num_codes") or moe.num_experts) if moe.router == "vq" else 0
        return cls(t.collapse_share, t.collapse_patience, t.dead_code_frac, 1.0 if soft else moe.top_k, num_codes,
                   t.code_usage_min)

    def check(self, step: int, record: dict) -> list[str]:
        """Update with one evaluation's logged record; the warnings to print (empty when healthy)."""
        messages = []
        for key, load in record.items():
            match = _LOAD_KEY.fullmatch(key)
            if match:
                i = int(match.group(1))
                messages += self._track(i, "load", self._load_problem(i, load, record), step)
                messages += self._track(i, "codes", self._code_problem(i, record), step)
                messages += self._track(i, "gate", self._gate_problem(i, record), step)
        return messages

    def _load_problem(self, i: int, load: list, record: dict) -> str | None:
        k = record.get(f"moe/L{i}/experts_per_token", self.slots_per_token)
        if k >= len(load):
            return None
        top = max(range(len(load)), key=lambda e: load[e])
        token_share = min(1.0, load[top] * k)
        if token_share <= self.share:
            return None
        return f"expert {top} gets {token_share:.0%} of the tokens (train.collapse_share={self.share})"

    def _code_problem(self, i: int, record: dict) -> str | None:
        if not self.num_codes:
            return None
        dead, perplexity = record.get(f"moe/L{i}/dead_codes"), record.get(f"moe/L{i}/code_perplexity")
        if dead is not None and dead / self.num_codes > self.dead_code_frac:
            return f"{dead:.0f} of {self.num_codes} vq codes are dead (train.dead_code_frac={self.dead_code_frac})"
        if perplexity is not None and perplexity < self.code_usage_min * self.num_codes:
            return (f"vq code perplexity {perplexity:.2f} of {self.num_codes} codes "
                    f"(train.code_usage_min={self.code_usage_min})")
        return None

    def _gate_problem(self, i: int, record: dict) -> str | None:
        g = record.get(f"moe/L{i}/gate_discrete")
        if g is None or max(g, 1 - g) <= self.share:
            return None
        path = "discrete" if g > 0.5 else "continuous"
        return f"the vq mixing gate gives the {path} path {max(g, 1 - g):.0%} of its weight " \
               f"(train.collapse_share={self.share})"

    def _track(self, layer: int, kind: str, problem: str | None, step: int) -> list[str]:
        streak = self.streaks[layer, kind] = self.streaks.get((layer, kind), 0) + 1 if problem else 0
        if streak < self.patience:
            return []
        return [f"warning: step {step}: MoE layer {layer} collapsed for {streak} consecutive evaluations: {problem}"]
