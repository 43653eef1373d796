"""Train several routers with the same preset, data, seed and budget, and tabulate the results.

Each router runs as its own `pretrain.py` process (so tokens/s are measured alike, one after the other in
the same invocation); the table is read back from each run's summary.json and metrics.jsonl.
"""
from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

from megavq.config import MoEConfig
from megavq.errors import MegavqError

COLUMNS = ["router", "val_loss", "val_vs_topk", "test_bits_per_byte", "tokens_per_s", "step_time_vs_topk",
           "load_cv", "vq_code_perplexity", "vq_dead_codes"]


def run_router(router: str, out_dir: Path, launcher: list[str], args: list[str]) -> None:
    cmd = [*launcher, str(Path(__file__).resolve().parents[2] / "scripts" / "pretrain.py"),
           "--out_dir", str(out_dir), "--overwrite", *args, f"moe.router={router}"]  # a comparison starts afresh
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise MegavqError(f"training with moe.router={router} failed (command: {' '.join(cmd)})")


def layer_mean(record: dict, name: str) -> float | None:
    values = [v for k, v in record.items() if k.startswith("moe/L") and k.endswith(f"/{name}")]
    return statistics.fmean(values) if values else None


def read_result(router: str, out_dir: Path) -> dict:
    summary = json.loads((out_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]  # first window warms up
    last = records[-1]
    return {"router": router, "val_loss": summary["val_loss"], "test_bits_per_byte": summary["test_bits_per_byte"],
            "tokens_per_s": statistics.median(speeds), "load_cv": layer_mean(last, "load_cv"),
            "vq_code_perplexity": layer_mean(last, "code_perplexity"), "vq_dead_codes": layer_mean(last, "dead_codes")}


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios against the baseline: the default router (moe.router's default, softmax top-k), else the first."""
    base = next((r for r in rows if r["router"] == MoEConfig.router), rows[0])
    for r in rows:
        r["val_vs_topk"] = r["val_loss"] / base["val_loss"]
        r["step_time_vs_topk"] = base["tokens_per_s"] / r["tokens_per_s"]
    return rows


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def compare(routers: list[str], out_dir: Path, launcher: list[str], args: list[str]) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for router in routers:
        run_router(router, out_dir / router, launcher, args)
        rows.append(read_result(router, out_dir / router))
    rows = add_ratios(rows)
    (out_dir / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out_dir / "compare.md").write_text(markdown_table(rows))
    return rows
