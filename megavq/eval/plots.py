"""Figures (PNG) of an evaluation result and of training runs, with matplotlib's object API (no pyplot state).

Legend: E experts, L MoE layers, N logged steps.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from megavq.errors import MegavqError


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _grid(n: int, width: float = 3.6, height: float = 2.8, cols: int = 4) -> tuple[Figure, list]:
    cols = min(cols, max(n, 1))
    rows = math.ceil(max(n, 1) / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, [fig.add_subplot(rows, cols, k + 1) for k in range(max(n, 1))]


# ---- one evaluation -----------------------------------------------------------------------------------------

def plot_load(result: dict, path: Path) -> Path:
    layers = result["layers"]
    fig, axes = _grid(len(layers))
    for ax, L in zip(axes, layers):
        E = len(L["load"])
        ax.bar(range(E), L["load"], color="tab:blue")
        ax.axhline(1 / E, color="k", ls="--", lw=1, label="uniform 1/E")
        ax.set(title=f"layer {L['layer']}: CV {L['load_cv']:.2f}, max/mean {L['load_max_over_mean']:.2f}",
               xlabel="expert", ylabel="fraction of routed slots", ylim=(0, max(max(L["load"]), 1 / E) * 1.15))
        ax.legend(fontsize=7)
    fig.suptitle(f"Expert load on the {result['split']} split")
    return _save(fig, path)


def plot_layers(result: dict, path: Path) -> Path:
    layers = result["layers"]
    ids = [L["layer"] for L in layers]
    x = np.arange(len(ids))
    fig, axes = _grid(4, cols=4)
    axes[0].bar(x, [L["entropy"] / L["entropy_max"] for L in layers], color="tab:green")
    axes[0].set(title="router entropy / ln E", ylim=(0, 1.05))
    axes[1].bar(x, [L["routing_stability"]["top1_changed"] for L in layers], color="tab:orange")
    axes[1].set(title=f"top-1 changed by noise {layers[0]['routing_stability']['noise']:g} x rms",
                ylabel="fraction of tokens")
    axes[2].bar(x - 0.2, [L["effective_rank"]["input"] for L in layers], 0.4, label="layer input")
    axes[2].bar(x + 0.2, [L["effective_rank"]["router_view"] for L in layers], 0.4, label="router view")
    dims = f"{layers[0]['effective_rank']['input_dim']} / {layers[0]['effective_rank']['router_view_dim']}"
    axes[2].set(title=f"effective rank (dimensions {dims})")
    axes[2].legend(fontsize=7)
    axes[3].bar(x, [L["expert_output_cosine"] for L in layers], color="tab:red")
    axes[3].set(title="mean pairwise cosine of expert outputs", ylim=(-1, 1))
    for ax in axes:
        ax.set_xticks(x, [f"L{i}" for i in ids])
        ax.set_xlabel("MoE layer")
    fig.suptitle(f"Routing diagnostics ({result['router']})")
    return _save(fig, path)


def plot_robustness(result: dict, path: Path) -> Path:
    fig = Figure(figsize=(4.5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    rows = result["robustness"]
    ax.plot([r["p"] for r in rows], [r["perplexity"] for r in rows], "o-")
    ax.set(title="Perplexity with random input tokens", xlabel="fraction p of tokens replaced", ylabel="perplexity")
    return _save(fig, path)


def plot_routing_modes(result: dict, path: Path) -> Path:
    fig = Figure(figsize=(4.5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    if result["topk_sweep"]:
        rows = result["topk_sweep"]
        ax.plot([r["k"] for r in rows], [r["perplexity"] for r in rows], "o-")
        ax.axvline(result["top_k"], color="k", ls="--", lw=1, label=f"trained k = {result['top_k']}")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="experts per token k (all MoE layers)", ylabel="perplexity", title="Top-k sweep at evaluation")
        ax.set_xticks([r["k"] for r in rows], [str(r["k"]) for r in rows])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    else:
        d = result["discrete_only"]
        ax.bar([0, 1], [result["perplexity"], d["perplexity"]], color=["tab:blue", "tab:purple"])
        ax.set_xticks([0, 1], [f"trained\n({d['experts_per_token_trained']} experts/token)",
                               "discrete_only\n(1 expert/token)"])
        ax.set(ylabel="perplexity", title="vq: continuous + code vs code only")
    return _save(fig, path)


SWEEP_NOTE = ("selection over each whole sequence: a token's experts depend on later tokens, "
              "so these losses are not a causal LM's")


def plot_budget_sweep(sweep: dict, path: Path) -> Path:
    """Loss against experts per token: the swept router's budgets (budget 1 marked) and the original router."""
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.add_subplot()
    pts = sweep["points"]
    ax.plot([p["experts_per_token"] for p in pts], [p["loss"] for p in pts], "o-", label=f"{sweep['router']} budgets")
    for p in pts:
        if p["budget"] == 1:
            ax.plot(p["experts_per_token"], p["loss"], "s", ms=9, mfc="none", color="tab:blue", label="budget 1")
    o = sweep["original"]
    if o:
        ax.plot(o["experts_per_token"], o["loss"], "*", ms=12, color="tab:red", label=f"{o['router']} (original)")
    ax.set(xlabel="experts per token (mean over MoE layers)", ylabel="loss (nats)", title="Budget sweep at evaluation")
    if not sweep["causal"]:
        ax.set_title("Budget sweep at evaluation\n" + SWEEP_NOTE, fontsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_consistency(c: dict, path: Path) -> Path:
    if c["mode"] == "pair":
        fig = Figure(figsize=(4.5, 3.2), layout="constrained")
        ax = fig.add_subplot()
        ax.bar([f"L{i}" for i in c["layers"]], c["top1_agreement"])
        ax.set(title="Top-1 routing agreement of two checkpoints", xlabel="MoE layer", ylim=(0, 1.05))
        return _save(fig, path)
    fig, (ax_f, ax_p) = _grid(2, width=4.5, height=3.2)
    for j, i in enumerate(c["layers"]):
        ax_f.plot(c["steps"], [f[j] for f in c["with_final"]], "o-", label=f"L{i}")
        prev = [(s, p[j]) for s, p in zip(c["steps"], c["with_previous"]) if p is not None]
        ax_p.plot([s for s, _ in prev], [v for _, v in prev], "o-", label=f"L{i}")
    ax_f.set(title="top-1 agreement with the final checkpoint")
    ax_p.set(title="top-1 agreement with the previous checkpoint")
    pad = max(1, (c["steps"][-1] - c["steps"][0]) * 0.05)
    for ax in (ax_f, ax_p):
        ax.set(xlabel="step", ylabel="fraction of tokens", ylim=(0, 1.05),
               xlim=(c["steps"][0] - pad, c["steps"][-1] + pad))
        ax.legend(fontsize=7)
    fig.suptitle(f"Routing consistency over {Path(c['run']).name}")
    return _save(fig, path)


def plot_domains(d: dict, path: Path) -> Path:
    """A heat map per MoE layer: p(expert | domain), each row a source of the mixture."""
    layers = d["layers"]
    fig, axes = _grid(len(layers), height=1.4 + 0.4 * len(d["sources"]))
    for ax, L in zip(axes, layers):
        load_DE = np.array(L["load"])
        image = ax.imshow(load_DE, aspect="auto", cmap="viridis", vmin=0, vmax=max(load_DE.max(), 1e-9))
        ax.set(title=f"layer {L['layer']}: I = {L['mutual_information']:.3f} nats", xlabel="expert",
               yticks=range(len(d["sources"])), yticklabels=d["sources"])
        fig.colorbar(image, ax=ax, label="p(e | source)")
    fig.suptitle(f"Routing by domain (I(source; expert) at most ln {len(d['sources'])} = {d['mi_max']:.3f})")
    return _save(fig, path)


def evaluation_figures(result: dict, out_dir: Path) -> list[Path]:
    """The PNGs of one evaluation; figures that do not apply (no MoE layer, no sweep) are left out."""
    paths = [plot_robustness(result, out_dir / "robustness.png")]
    if result["layers"]:
        paths += [plot_load(result, out_dir / "load.png"), plot_layers(result, out_dir / "routing.png")]
    if result["topk_sweep"] or result["discrete_only"]:
        paths.append(plot_routing_modes(result, out_dir / "routing_modes.png"))
    if result["consistency"]:
        paths.append(plot_consistency(result["consistency"], out_dir / "consistency.png"))
    if result.get("domains"):
        paths.append(plot_domains(result["domains"], out_dir / "domains.png"))
    if result.get("budget_sweep"):
        paths.append(plot_budget_sweep(result["budget_sweep"], out_dir / "budget_sweep.png"))
    return paths


# ---- training runs ------------------------------------------------------------------------------------------

def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MegavqError(f"{run_dir} is not a run directory: {path} is missing")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_layers(records: list[dict]) -> list[int]:
    """The MoE layer indices that have a logged `moe/L{i}/load`."""
    keys = {k for r in records for k in r if k.startswith("moe/L") and k.endswith("/load")}
    return sorted(int(k.split("/")[1][1:]) for k in keys)


def plot_loss_curves(ax, runs: dict[str, list[dict]]) -> None:
    for n, (name, records) in enumerate(runs.items()):
        color = f"C{n % 10}"
        train = [(r["step"], r["train/lm_loss"]) for r in records if "train/lm_loss" in r]
        val = [(r["step"], r["val/loss"]) for r in records if "val/loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, lw=1, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o--", color=color, ms=3, label=f"{name} val")
    ax.set(title="Language-model loss", xlabel="step", ylabel="loss (nats/token)")
    ax.legend(fontsize=7)


def cell_edges(centres: np.ndarray) -> np.ndarray:
    """Edges of cells centred on sorted (possibly unevenly spaced) positions: midpoints, and half a gap outside."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def plot_load_heatmap(fig: Figure, ax, records: list[dict], layer: int, title: str, vmax: float) -> None:
    rows = [(r["step"], r[f"moe/L{layer}/load"]) for r in records if f"moe/L{layer}/load" in r]
    steps, load_NE = np.array([s for s, _ in rows], dtype=float), np.array([v for _, v in rows])
    image = ax.pcolormesh(cell_edges(steps), np.arange(load_NE.shape[1] + 1) - 0.5, load_NE.T, cmap="viridis",
                          vmin=0, vmax=vmax)
    ax.set(title=title, xlabel="step", ylabel="expert")
    fig.colorbar(image, ax=ax, label="fraction of routed slots")


def plot_runs(run_dirs: list, out_file: str | Path) -> Path:
    """Loss curves of all runs on one axes; below, one expert-load heatmap per (run, MoE layer)."""
    runs = {Path(d).name or str(d): read_metrics(Path(d)) for d in run_dirs}
    layers = {name: load_layers(records) for name, records in runs.items()}
    cols = max([len(v) for v in layers.values()] + [1])
    heat_rows = [name for name in runs if layers[name]]
    fig = Figure(figsize=(max(8, 4 * cols), 4 + 2.8 * len(heat_rows)), layout="constrained")
    grid = fig.add_gridspec(1 + len(heat_rows), cols, height_ratios=[1.4] + [1] * len(heat_rows))
    plot_loss_curves(fig.add_subplot(grid[0, :]), runs)
    vmax = max([max(max(r[f"moe/L{i}/load"]) for r in runs[n] if f"moe/L{i}/load" in r)
                for n in heat_rows for i in layers[n]] + [1e-9])
    for row, name in enumerate(heat_rows, start=1):
        for col, i in enumerate(layers[name]):
            plot_load_heatmap(fig, fig.add_subplot(grid[row, col]), runs[name], i, f"{name}: layer {i} load", vmax)
    return _save(fig, Path(out_file))
