"""Evaluate a checkpoint: language-model figures, routing diagnostics per MoE layer, robustness, sweeps, and
optionally routing consistency with other checkpoints; write eval.json, eval.md and the figures.

docs/evaluation.md lists every key of eval.json.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from megavq.convert.load import load_model
from megavq.convert.swap import change_routers
from megavq.data import Tokenizer, data_options
from megavq.data.mixture import Mixture, bits_per_byte, tokenizer_sha256
from megavq.data.task import TaskData
from megavq.errors import MegavqError
from megavq.eval import consistency, domains, lm, routing
from megavq.eval.stats import load_stats
from megavq.moe.routers import router_class
from megavq.store.manifest import read_manifest
from megavq.store.model_dir import MODEL_DIR_KINDS, checkpoint_tokenizer, is_hf_dir, model_tokenizer, resolve_model_dir
from megavq.train.finetune import score_task

ROBUSTNESS_PS = (0.0, 0.05, 0.1, 0.2)
STANDARD_METRICS = ("load", "load_cv", "load_max", "entropy")  # recomputed from the averaged load below


def load_data(source: str, data_cfg) -> Mixture:
    return Mixture.open(source, **data_options(data_cfg))


def eval_device() -> torch.device:
    """A GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Batches:
    """Evaluation batches kept on the CPU: each pass moves them to `device` one at a time, under a progress bar
    named `desc` (shown on a terminal only)."""

    def __init__(self, batches: list, device: torch.device, desc: str):
        self.batches, self.device, self.desc = batches, device, desc

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for x_BS, y_BS in tqdm(self.batches, desc=self.desc, unit="batch", disable=None, leave=False):
            yield x_BS.to(self.device), y_BS.to(self.device)


def diagnostic_batches(batches: list, max_tokens: int) -> list:
    """The first batches holding at least one and at most about max_tokens tokens (whole batches)."""
    out, n = [], 0
    for x_BS, y_BS in batches:
        if out and n + x_BS.numel() > max_tokens:
            break
        out.append((x_BS, y_BS))
        n += x_BS.numel()
    return out


def causality_warnings(cfg) -> list[str]:
    if cfg.moe.every == 0 or router_class(cfg.moe.router).is_causal(cfg.moe.router_options):
        return []
    return [f"moe.router={cfg.moe.router} is not causal: a token's routing depends on later tokens of its "
            f"sequence or batch, so this perplexity is not a causal language model's (it can be too low)"]


def layer_summary(metrics: dict) -> dict:
    """Load balance, entropy and the router-specific scalars from the evaluation-averaged router metrics."""
    load_E = metrics["load"]
    extra = {k: v.item() for k, v in metrics.items() if k not in STANDARD_METRICS and v.numel() == 1}
    return {"load": [round(v, 6) for v in load_E.tolist()], **load_stats(load_E),
            "entropy": metrics["entropy"].item(), "entropy_max": math.log(load_E.numel()),
            "dropped_frac": extra.pop("dropped_frac", None), "router_metrics": extra}


def layer_reports(model, base: dict, diag: list, noise: float, seed: int) -> list[dict]:
    inputs = routing.layer_inputs(model, diag)
    reports = []
    for (i, layer), metrics in zip(routing.moe_layers(model), base["router_metrics"]):
        reports.append({"layer": i, **layer_summary(metrics),
                        **routing.layer_diagnostics(layer, inputs[i], noise, seed)})
    return reports


def header(path, model, data, data_source: str, split: str) -> dict:
    cfg = model.cfg
    return {"checkpoint": str(path), "step": consistency.checkpoint_step(path), "data": data_source,
            "split": split, "router": cfg.moe.router, "router_options": cfg.moe.router_options,
            "backend": cfg.moe.backend,
            "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
            "moe_layers": [i for i, _ in routing.moe_layers(model)], "causal": not causality_warnings(cfg),
            "bytes_per_token": data.bytes_per_token(split)}


def recorded_tokenizer_sha256(path) -> str | None:
    """The sha256 of the tokenizer a megavq model or checkpoint directory records (None: format 0, imported from
    Hugging Face, or a Hugging Face directory)."""
    if is_hf_dir(path):
        return None
    entry = read_manifest(resolve_model_dir(path), MODEL_DIR_KINDS).get("tokenizer") or {}
    return entry.get("sha256")


def check_data_tokenizer(path, data, data_source: str) -> None:
    """Refuse data encoded with another tokenizer than the one the checkpoint records (when it records one)."""
    recorded, used = recorded_tokenizer_sha256(path), tokenizer_sha256(data.sources[0])
    if recorded is not None and used != recorded:
        raise MegavqError(f"data {data_source} was encoded with the tokenizer of sha256 {str(used)[:12]}..., but "
                          f"{path} was trained with the one of sha256 {recorded[:12]}...: evaluate on data encoded "
                          f"with the checkpoint's tokenizer "
                          f"(scripts/prepare_data.py --tokenizer CHECKPOINT/tokenizer.model)")


def open_model_and_data(path, model, data_source: str | None, router: str | None = None):
    """The model loaded from path (on the evaluation device; with `router`, NAME[:OPTION=VALUE,...], its routers
    changed without training), its data (data_source, default the checkpoint's data.source), the source used and
    the router the model was trained with."""
    trained_router = model.cfg.moe.router
    if router:
        model = change_routers(model, router)
    data_source = data_source or model.cfg.data.source
    data = load_data(data_source, model.cfg.data)
    check_data_tokenizer(path, data, data_source)
    if data.vocab_size > model.cfg.model.vocab_size:
        raise MegavqError(f"data vocabulary ({data.vocab_size}) is larger than the model's "
                          f"({model.cfg.model.vocab_size})")
    return model.to(eval_device()), data, data_source, trained_router


def evaluate(path, data_source: str | None = None, split: str = "test", max_batches: int | None = None,
             batch_size: int = 0, diag_tokens: int = 2048, noise: float = 0.01, seed: int = 0,
             backend: str = "native", compare: str | None = None, warn=None, router: str | None = None,
             budgets: list[float] | None = None, sweep_router: str = "usmoe") -> dict:
    """All figures of one checkpoint (and, with `compare`, its routing consistency) as a JSON-ready dict, on a GPU
    when there is one. data_source: 'builtin' or a tokenized data directory; default the checkpoint's own
    (its config's data.source), whose tokenizer must be the one the checkpoint records. router: evaluate with the
    routers changed (megavq.convert.swap.change_routers); budgets: the budget sweep of sweep_router."""
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    model = load_model(path, backend)
    if model.cfg.model.num_classes:
        return classification(path, model, data_source, max_batches, batch_size)
    model, data, data_source, trained_router = open_model_and_data(path, model, data_source, router)
    cfg, device = model.cfg, eval_device()
    size = batch_size or cfg.data.micro_batch_size
    per_source = [list(s.eval_batches(split, size, cfg.model.seq_len, max_batches)) for s in data.sources]
    batches = [b for source_batches in per_source for b in source_batches]
    diags = [diagnostic_batches(b, diag_tokens) for b in per_source]
    diag = [b for source_diag in diags for b in source_diag]
    result = {**header(path, model, data, data_source, split), "trained_router": trained_router,
              "warnings": causality_warnings(cfg)}
    for message in result["warnings"]:
        warn(message)
    base, sources = source_evals(model, data, split, per_source, device)
    result.update(tokens=base["tokens"], loss=base["loss"], perplexity=math.exp(base["loss"]),
                  bits_per_byte=bits_per_byte(base["loss"], data.bytes_per_token(split)), sources=sources)
    result["layers"] = layer_reports(model, base, Batches(diag, device, "routing diagnostics"), noise, seed)
    result["domains"] = domains.domain_report(model, data.names, [Batches(d, device, "domains") for d in diags]) \
        if len(data) > 1 and result["layers"] else None
    result["robustness"] = lm.robustness(model, Batches(batches, device, "robustness"), list(ROBUSTNESS_PS),
                                         data.vocab_size, seed)
    result["topk_sweep"] = lm.topk_sweep(model, Batches(batches, device, "top-k sweep"))
    result.update(lm.variant_evals(model, Batches(batches, device, "variants")))
    result["budget_sweep"] = (lm.budget_sweep(model, Batches(batches, device, "budget sweep"), budgets, sweep_router,
                                              base) if budgets else None)
    result["consistency"] = compare_with(path, compare, diag, model, backend) if compare else None
    return result


def classification(path, model, data_source: str | None, max_batches: int | None, batch_size: int) -> dict:
    """A classifier's loss, accuracy and macro-F1 on the validation rows of its task (finetune.data, or the task
    file data_source), split and tokenized as fine-tuning did."""
    cfg = model.cfg
    cfg.finetune.data = data_source or cfg.finetune.data
    if cfg.finetune.task != "classify" or not cfg.finetune.data:
        raise MegavqError(f"{path} is a classifier without its task's data recorded: give the task file with --data")
    task = TaskData.open(cfg, Tokenizer(checkpoint_tokenizer(cfg, model_tokenizer(path))), cfg.train.seed)
    if len(task.classes) != cfg.model.num_classes:
        raise MegavqError(f"{path} classifies into {cfg.model.num_classes} classes, {cfg.finetune.data} has "
                          f"{len(task.classes)}")
    device = eval_device()
    scores = score_task(model.to(device).eval(), task, batch_size or cfg.data.micro_batch_size, device, max_batches)
    return {"checkpoint": str(path), "step": consistency.checkpoint_step(path), "task": "classify",
            "data": cfg.finetune.data, "split": "val", "classes": task.classes, "rows": scores["tokens"],
            "loss": scores["loss"], "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


def source_evals(model, data: Mixture, split: str, per_source: list, device) -> tuple[dict, list | None]:
    """(the mixture's loss, tokens and router metrics; for several sources, each one's figures): the mixture's
    loss is the mean of the sources' under the weights, its router metrics the mean over all tokens."""
    evals = [lm.lm_eval(model, Batches(b, device, f"loss {name}")) for name, b in zip(data.names, per_source)]
    if len(evals) == 1:
        return evals[0], None
    tokens = sum(e["tokens"] for e in evals)
    metrics = [{k: sum(e["router_metrics"][i][k] * e["tokens"] for e in evals) / tokens for k in layer}
               for i, layer in enumerate(evals[0]["router_metrics"])]
    sources = [{"name": name, "weight": w, "tokens": e["tokens"], "loss": e["loss"], "perplexity": e["perplexity"],
                "bits_per_byte": bits_per_byte(e["loss"], s.bytes_per_token(split))}
               for name, w, e, s in zip(data.names, data.weights, evals, data.sources)]
    loss = sum(w * e["loss"] for w, e in zip(data.weights, evals))
    return {"loss": loss, "tokens": tokens, "router_metrics": metrics}, sources


def compare_with(path, other, diag: list, model, backend: str) -> dict:
    """Routing consistency on the CPU (the other checkpoints load there)."""
    if consistency.is_run_dir(other):
        return consistency.compare_run(other, diag, backend)
    model_a = model if next(model.parameters()).device.type == "cpu" else None
    return consistency.compare_pair(path, other, diag, model_a=model_a, backend=backend)


# ---- writing ------------------------------------------------------------------------------------------------

def write_report(result: dict, out_dir: str | Path) -> list[Path]:
    """eval.json, eval.md and the PNG figures in out_dir; returns the paths written."""
    from megavq.eval import plots  # lazy: matplotlib takes about 0.8 s to import; only writing a report needs it
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if result.get("task") == "classify":
        (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        (out_dir / "eval.md").write_text("\n".join(
            [f"# Evaluation of {result['checkpoint']}", "", f"Classification of {result['data']} "
             f"({result['split']}: {result['rows']} rows, {len(result['classes'])} classes).", "",
             *_table(["loss", "accuracy", "macro-F1"], [[result["loss"], result["accuracy"], result["macro_f1"]]])]))
        return [out_dir / "eval.json", out_dir / "eval.md"]
    figures = plots.evaluation_figures(result, out_dir)
    result["figures"] = [p.name for p in figures]
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "eval.md").write_text(markdown(result))
    return [out_dir / "eval.json", out_dir / "eval.md", *figures]


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows], ""]


def markdown(r: dict) -> str:
    changed = f" (trained with `{r['trained_router']}`, routers changed at evaluation)" if r["trained_router"] else ""
    lines = [f"# Evaluation of {r['checkpoint']}", "",
             f"Router `{r['router']}`{changed}, {r['num_experts']} experts, top-{r['top_k']}, split `{r['split']}` "
             f"({r['tokens']} tokens).", ""]
    lines += [f"> warning: {w}" for w in r["warnings"]] + ([""] if r["warnings"] else [])
    lines += _table(["loss", "perplexity", "bits per byte"], [[r["loss"], r["perplexity"], r["bits_per_byte"]]])
    if r["sources"]:
        lines += ["## Sources", ""] + _table(["source", "weight", "tokens", "loss", "perplexity", "bits per byte"],
                                             [[s["name"], s["weight"], s["tokens"], s["loss"], s["perplexity"],
                                               s["bits_per_byte"]] for s in r["sources"]])
    lines += ["## MoE layers", ""] + _table(
        ["layer", "load CV", "max/mean", "entropy", "ln E", "dropped", "top-1 changed by noise",
         "rank input", "rank router view", "expert cosine"],
        [[L["layer"], L["load_cv"], L["load_max_over_mean"], L["entropy"], L["entropy_max"], L["dropped_frac"],
          L["routing_stability"]["top1_changed"], L["effective_rank"]["input"], L["effective_rank"]["router_view"],
          L["expert_output_cosine"]] for L in r["layers"]])
    lines += markdown_extras(r)
    return "\n".join(lines)


BIAS_METRICS = ("bias_min", "bias_max", "bias_mean")  # routers with an expert bias (moe.router_options.bias_rate)


def bias_table(layers: list[dict]) -> list[str]:
    """The expert bias of each layer (its range and mean), when the routers keep one."""
    rows = [[L["layer"], *(L["router_metrics"][k] for k in BIAS_METRICS)] for L in layers
            if all(k in L["router_metrics"] for k in BIAS_METRICS)]
    return ["## Expert bias", ""] + _table(["layer", "min", "max", "mean"], rows) if rows else []


def markdown_extras(r: dict) -> list[str]:
    lines = bias_table(r["layers"])
    if r["domains"]:
        d = r["domains"]
        lines += [f"## Routing by domain (mutual information, nats; ln {len(d['sources'])} = {d['mi_max']:.4g})", ""]
        lines += _table(["layer", "mutual information"] + [f"{s}: top expert (share)" for s in d["sources"]],
                        [[L["layer"], L["mutual_information"]] +
                         [f"{max(range(len(row)), key=row.__getitem__)} ({max(row):.2f})" for row in L["load"]]
                         for L in d["layers"]])
    lines += ["## Robustness (random input tokens)", ""]
    lines += _table(["p", "loss", "perplexity"], [[x["p"], x["loss"], x["perplexity"]] for x in r["robustness"]])
    if r["topk_sweep"]:
        lines += ["## Top-k sweep", ""] + _table(["k", "loss", "perplexity"],
                                                 [[x["k"], x["loss"], x["perplexity"]] for x in r["topk_sweep"]])
    for name in lm.variant_names():
        if r[name]:
            d = r[name]
            lines += [f"## {r['router']} {name}", ""] + _table(
                ["loss", "perplexity", "experts/token", "trained experts/token", "expert compute saved"],
                [[d["loss"], d["perplexity"], d["experts_per_token"], d["experts_per_token_trained"],
                  d["expert_compute_saved"]]])
    if r.get("budget_sweep"):
        lines += budget_sweep_lines(r["budget_sweep"])
    c = r["consistency"]
    if c and c["mode"] == "pair":
        lines += [f"## Routing consistency with {c['other']}", ""] + _table(
            ["layer", "top-1 agreement"], [[i, a] for i, a in zip(c["layers"], c["top1_agreement"])])
    elif c:
        lines += [f"## Routing consistency over {c['run']}", ""] + _table(
            ["step"] + [f"L{i} vs final" for i in c["layers"]] + [f"L{i} vs previous" for i in c["layers"]],
            [[s, *f, *(p or [None] * len(f))] for s, f, p in zip(c["steps"], c["with_final"], c["with_previous"])])
    return lines


def budget_sweep_lines(sweep: dict) -> list[str]:
    lines = [f"## Budget sweep: `{sweep['router']}` on the model's experts, nothing trained", ""]
    if not sweep["causal"]:
        lines += ["> Global selection picks (token, expert) pairs over each whole sequence: a token's experts depend on "
                  "later tokens, so these losses are not a causal language model's (they can be too low). A fractional "
                  "budget routes that fraction of top_k experts per token on average; some tokens get none.", ""]
    rows = [[p["budget"], p["experts_per_token"], p["loss"], p["perplexity"], p["unrouted_tokens"]]
            for p in sweep["points"]]
    o = sweep["original"]
    if o:
        rows.append([f"{o['router']} (original)", o["experts_per_token"], o["loss"], o["perplexity"], None])
    return lines + _table(["budget", "experts/token", "loss", "perplexity", "tokens with no expert"], rows)
