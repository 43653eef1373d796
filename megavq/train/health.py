"""Training-time routing health: detect MoE layers that collapse, from the metrics the trainer logs.

Each router declares its checks (`Router.health`, megavq.moe.routers): every router checks that no expert
receives more than `share` of the tokens (its fraction of the routed slots, `moe/L{i}/load`, times the slots
per token); vq also checks its codebook (dead codes, code perplexity) and its mixing gate. The monitor warns
when a layer stays collapsed for `patience` consecutive evaluations, and at every evaluation after that until
it recovers.
"""
from __future__ import annotations

from megavq.moe.routers import HealthLimits, Router


class CollapseMonitor:
    def __init__(self, routers: dict[int, Router], share: float = 0.9, patience: int = 3,
                 dead_code_frac: float = 0.5, code_usage_min: float = 0.5):
        self.routers, self.patience = routers, patience  # {block index: its router}
        self.limits = HealthLimits(share, dead_code_frac, code_usage_min)
        self.streaks: dict[tuple[int, str], int] = {}  # (layer, check) -> evaluations in a row

    @classmethod
    def for_model(cls, model, train) -> "CollapseMonitor":
        """The monitor of a Transformer's MoE layers with the thresholds of the train config section."""
        routers = {i: b.mlp.router for i, b in enumerate(model.blocks) if b.is_moe}
        return cls(routers, train.collapse_share, train.collapse_patience, train.dead_code_frac, train.code_usage_min)

    def check(self, step: int, record: dict) -> list[str]:
        """Update with one evaluation's logged record; the warnings to print (empty when healthy)."""
        messages = []
        for i, router in self.routers.items():
            prefix = f"moe/L{i}/"
            metrics = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
            if metrics:
                for kind, problem in router.health(metrics, self.limits).items():
                    messages += self._track(i, kind, problem, step)
        return messages

    def _track(self, layer: int, kind: str, problem: str | None, step: int) -> list[str]:
        streak = self.streaks[layer, kind] = self.streaks.get((layer, kind), 0) + 1 if problem else 0
        if streak < self.patience:
            return []
        return [f"warning: step {step}: MoE layer {layer} collapsed for {streak} consecutive evaluations: {problem}"]
