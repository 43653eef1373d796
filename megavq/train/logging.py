"""Run logging on rank 0: metrics.jsonl (one JSON object per logged step), summary.json, optional wandb.

A resumed run continues the same files and the same wandb run: metrics.jsonl loses the lines after the
checkpoint (they are logged again when the steps are re-done); wandb keeps everything it received, so its
points are plotted against the `step` metric (wandb's own monotonic `_step` counts log calls): the re-done steps
appear a second time at the same `step`, after a `resumed_from` record, instead of being dropped as wandb drops
a step that goes backwards. The wandb run id lives in RUN/run.json (megavq.store.run_dir.update_run_state).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def flatten_router_metrics(per_layer: list[dict], layer_ids: list[int]) -> dict:
    """[{'load': tensor(E), 'load_cv': tensor()}, ...] -> {'moe/L1/load': [...], 'moe/L1/load_cv': 0.1, ...}."""
    out = {}
    for i, metrics in zip(layer_ids, per_layer):
        for name, value in metrics.items():
            value = value.detach().float().cpu() if torch.is_tensor(value) else torch.tensor(float(value))
            out[f"moe/L{i}/{name}"] = value.item() if value.numel() == 1 else [round(v, 6) for v in value.tolist()]
    return out


class MetricSums:
    """Router metrics summed on the device over the micro-batches of a logging window, read once at its end
    (one host sync per log step instead of one per metric and micro-batch)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, per_layer: list[dict], layer_ids: list[int]) -> None:
        for i, metrics in zip(layer_ids, per_layer):
            for name, value in metrics.items():
                key = f"moe/L{i}/{name}"
                value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
                self.sums[key] = value if key not in self.sums else self.sums[key] + value
                self.counts[key] = self.counts.get(key, 0) + 1

    def read(self) -> dict:
        """The window's means ({'moe/L1/load': [...], 'moe/L1/load_cv': 0.1, ...}), and a new window."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        values = torch.cat([self.sums[k].flatten() / self.counts[k] for k in keys]).cpu().tolist()
        out, at = {}, 0
        for k in keys:
            n = self.sums[k].numel()
            out[k] = values[at] if n == 1 else [round(v, 6) for v in values[at:at + n]]
            at += n
        self.sums, self.counts = {}, {}
        return out


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a blank or partial one (a process killed mid-write)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


class RunLogger:
    def __init__(self, out_dir: Path, config: dict, enabled: bool, use_wandb: bool, project: str,
                 resume_step: int = 0, wandb_id: str | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled, self.wandb = enabled, None
        if not enabled:
            return
        self._truncate_after(resume_step)
        if use_wandb:
            import wandb
            if not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None:
                os.environ["WANDB_MODE"] = "offline"  # no key configured: keep the run locally
            self.wandb = wandb.init(project=project, dir=str(out_dir), config=config, name=Path(out_dir).name,
                                    id=wandb_id, resume="allow")
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")
            if resume_step:
                self.wandb.log({"step": resume_step, "resumed_from": resume_step})

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they are re-done); a fresh run starts empty."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if _step_of(line) <= step] if step else []
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def finish_preempted(self) -> None:
        """The run stops to be continued: wandb marks it preempting (its id is reused on resume)."""
        if self.wandb is not None:
            self.wandb.mark_preempting()
            self.wandb.finish(exit_code=75)

    def finish(self, summary: dict) -> None:
        if not self.enabled:
            return
        (self.path.parent / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.wandb is not None:
            self.wandb.summary.update(summary)
            self.wandb.finish()
