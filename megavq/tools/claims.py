"""The seed papers' headline claims, each measured at CPU scale by one command (`scripts/claims.py NAME`).

A claim trains what it needs with pretrain.py through megavq.tools.compare (`jobs` runs at a time; a finished run
of the same configuration is reused, so claims share runs: one topk run per seed serves vqmoe-robustness,
xmoe-consistency, compete and usmoe-budget), evaluates them with megavq.eval.evaluate, fine-tunes with
scripts/finetune.py and upcycles with scripts/upcycle.py. It prints the paper's figure beside ours, the paired
differences over seeds (ours minus the baseline at the same seed) and a verdict: "consistent with the claim at
this scale" or "inconsistent with the claim at this scale" when every seed agrees in sign and |mean| exceeds the
std of the differences, otherwise "within noise" (one seed gives no spread: always "within noise"). It writes
OUT_DIR/NAME.json and OUT_DIR/NAME.md; the runs live in OUT_DIR/runs/<label>/seed<S>.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from megavq.config import load_config, with_overrides
from megavq.convert.load import read_model
from megavq.data.dataset import read_meta
from megavq.errors import ConfigError, DataError, check
from megavq.eval import evaluate
from megavq.files import write_json, write_text
from megavq.model.flops import flops_per_token
from megavq.model.transformer import Transformer
from megavq.store.model_dir import resolve_model_dir
from megavq.tools.compare import (PRETRAIN, Entry, finished, fmt, launcher_command, mean_std, parse_entry,
                                  read_run, run_all, run_command, run_log, train_all)

ROOT = PRETRAIN.parents[1]
CONSISTENT = "consistent with the claim at this scale"
INCONSISTENT = "inconsistent with the claim at this scale"
NOISE = "within noise"
COMPETE_2024 = Entry("compete-2024", "compete", (("affinity", "norm"), ("combine", "0.5"), ("distill_target", "topk"),
                                                 ("winner_coef", "0"), ("distill_coef", "0.05"),
                                                 ("diversity_coef", "0"), ("affinity_balance_coef", "0"),
                                                 ("rate", "1.0"), ("warmup_steps", "0")))
BUDGETS = (0.5, 0.75, 0.86, 1.0)  # USMoE's 14% saving is budget 0.86


@dataclass
class Setup:
    """What every claim runs with: seeds, pre-training steps, data, where, how many runs at once, key=value
    overrides of the pre-training runs, the evaluation's test batches."""
    seeds: list[int]
    steps: int
    data: str = "builtin"
    out_dir: Path = Path("runs/claims")
    jobs: int = 2
    overrides: list[str] = field(default_factory=list)
    eval_batches: int = 20
    launcher: str = "python"
    config: str = "tiny"

    def common(self) -> dict:
        """The compare.train settings: checkpoints at quarters of the run (xmoe-consistency reads them)."""
        quarter = max(1, self.steps // 4)
        settings = [f"train.max_steps={self.steps}", f"train.save_every={quarter}", "train.keep_checkpoints=8",
                    f"train.eval_every={max(1, self.steps // 2)}",
                    f"train.warmup_steps={min(30, self.steps // 10)}"]
        return {"config": self.config, "data": self.data, "ds_config": str(ROOT / "ds_configs" / "zero2.json"),
                "overrides": settings + list(self.overrides), "launcher": self.launcher}

    def runs(self) -> Path:
        return self.out_dir / "runs"

    def size(self) -> str:
        return (f"{self.config} preset, {self.steps} pre-training steps, seeds {','.join(map(str, self.seeds))}, "
                f"data {self.data}, evaluation on {self.eval_batches} test batches")


# ---- statistics and verdicts --------------------------------------------------------------------------------
def paired(ours: dict, base: dict) -> list[float]:
    """ours[s] - base[s] for every seed s both have, in seed order."""
    return [ours[s] - base[s] for s in sorted(ours) if s in base]


def verdict(diffs: list[float], better: str) -> str:
    """The verdict on paired differences when the claim predicts them `better` = "lower" or "higher" than 0:
    every seed in one direction and |mean| > std (seed spread of the differences), else within noise."""
    check(better in ("lower", "higher"), f"better must be 'lower' or 'higher', got {better!r}")
    if len(diffs) < 2 or not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        return NOISE
    mean = statistics.fmean(diffs)
    if abs(mean) <= statistics.stdev(diffs):
        return NOISE
    return CONSISTENT if (mean < 0) == (better == "lower") else INCONSISTENT


def comparison(measure: str, paper: str, ours: dict, base: dict, better: str) -> dict:
    """One row: the per-seed figures of ours and the baseline, their paired differences and the verdict."""
    diffs = paired(ours, base)
    return {"measure": measure, "paper": paper, "better": better, "ours": ours, "baseline": base,
            "ours_stat": mean_std(list(ours.values())), "baseline_stat": mean_std(list(base.values())),
            "diff": {**mean_std(diffs), "values": diffs}, "verdict": verdict(diffs, better)}


def equal_flops_steps(steps: int, flops_ref: float, flops_other: float) -> int:
    """The steps (of the same tokens each) that spend on a model of flops_other per token what `steps` spend on one
    of flops_ref: round(steps * flops_ref / flops_other), at least 1."""
    check(steps >= 1 and flops_ref > 0 and flops_other > 0,
          f"equal_flops_steps needs steps >= 1 and positive FLOPs, got {steps}, {flops_ref}, {flops_other}")
    return max(1, round(steps * flops_ref / flops_other))


# ---- running ------------------------------------------------------------------------------------------------
def train_entries(setup: Setup, entries: list[Entry]) -> dict:
    """Train (or reuse) every entry at its seeds (default: the setup's); {label: {seed: run_dir}}."""
    pairs = [(e, s) for e in entries for s in (e.seeds or setup.seeds)]
    train_all(pairs, setup.runs(), setup.common(), setup.jobs)
    out = {}
    for e, s in pairs:
        out.setdefault(e.label, {})[s] = e.run_dir(setup.runs(), s)
    return out


def evaluation(run_dir: Path, name: str, setup: Setup, **options) -> dict:
    """megavq.eval.evaluate of the run's final checkpoint on the test split, kept in run_dir/claims/name.json and
    reused while it is newer than the run's summary.json and was made with the same options."""
    path = run_dir / "claims" / f"{name}.json"
    options = {"max_batches": setup.eval_batches, **options}
    if path.is_file() and path.stat().st_mtime > (run_dir / "summary.json").stat().st_mtime:
        saved = json.loads(path.read_text())
        if saved["options"] == options:
            return saved["result"]
    print(f"= evaluating {run_dir} ({name})", flush=True)
    result = evaluate(resolve_model_dir(run_dir), **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"options": options, "result": result})
    return result


def full_evaluation(run_dir: Path, setup: Setup) -> dict:
    """Everything evaluate.py measures, with the routing consistency over the run's checkpoints (vqmoe-robustness and
    xmoe-consistency share it)."""
    return evaluation(run_dir, "eval", setup, compare=str(run_dir))


def per_seed(runs: dict, figure: Callable[[Path], float]) -> dict:
    """{seed: figure(run_dir)} of one label's runs."""
    return {s: figure(d) for s, d in runs.items()}


def val_loss(run_dir: Path) -> float:
    return read_run(run_dir)["val_loss"]


# ---- the claims -----------------------------------------------------------------------------------------------
def vqmoe_robustness(setup: Setup) -> dict:
    routers = [parse_entry(n) for n in ("vq", "topk", "xmoe", "compete")]
    runs = train_entries(setup, routers)
    curves = {label: per_seed(r, lambda d: full_evaluation(d, setup)["robustness"]) for label, r in runs.items()}
    top = curves["vq"][setup.seeds[0]][-1]["p"]
    degradation = {label: {s: c[-1]["loss"] - c[0]["loss"] for s, c in by_seed.items()}
                   for label, by_seed in curves.items()}
    rows = [comparison(f"test loss increase at p={top}: vq vs {other}", "28% less degradation than other routers",
                       degradation["vq"], degradation[other], "lower") for other in ("topk", "xmoe", "compete")]
    for row in rows:
        less = 1 - row["ours_stat"]["mean"] / row["baseline_stat"]["mean"]
        row["ours_text"] = f"{abs(less):.0%} {'less' if less >= 0 else 'more'} degradation"
    ps = [point["p"] for point in curves["vq"][setup.seeds[0]]]
    table = [["router", *(f"loss at p={p}" for p in ps)]]
    table += [[label, *(fmt(mean_std([c[i]["loss"] for c in by_seed.values()])) for i in range(len(ps)))]
              for label, by_seed in curves.items()]
    return {"rows": rows, "tables": {"Corrupted-input curve (test loss, a fraction p of input tokens random)": table}}


def second_corpus(setup: Setup) -> str:
    """The text source of --data (the one its meta.json records) or, where that is the builtin corpus, the project's
    own documentation (docs/*.md and README.md, copied as .txt into OUT_DIR/corpora/megavq-docs)."""
    source = "builtin" if setup.data == "builtin" else read_meta(Path(setup.data)).get("source")
    if not source:
        raise DataError(f"--data {setup.data}: its meta.json records no text source for the corpus task")
    if source != "builtin":
        return source
    out = setup.out_dir / "corpora" / "megavq-docs"
    out.mkdir(parents=True, exist_ok=True)
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        shutil.copyfile(doc, out / f"{doc.stem}.txt")
    return str(out)


def corpus_task(setup: Setup) -> tuple[Path, dict, str]:
    """The corpus-classification task (builtin against the second corpus), its baselines and the second corpus."""
    out, second = setup.out_dir / "corpus-task", second_corpus(setup)
    cmd = [sys.executable, str(ROOT / "scripts" / "make_corpus_task.py"), "--corpus", "builtin", "--corpus",
           second, "--per_corpus", "300", "--out_dir", str(out), "--baselines"]
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DataError(f"making the corpus task failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return out, json.loads(done.stdout.split("\n", 1)[1]), second


FINETUNE_TRAINABLE = ("all", "discrete_only")


def finetune_settings(setup: Setup) -> list[str]:
    steps = max(1, setup.steps // 3)
    return [f"train.max_steps={steps}", f"train.warmup_steps={steps // 10}", "train.lr=1e-3",
            "data.micro_batch_size=16", "model.pool=mean", f"train.eval_every={steps}", f"train.save_every={steps}"]


def finetune_run(checkpoint: Path, task: Path, trainable: str, run_dir: Path, setup: Setup,
                 threads: int | None) -> None:
    """scripts/finetune.py on the task, unless run_dir holds the finished fine-tuning of the same configuration."""
    overrides = ["finetune.task=classify", f"finetune.checkpoint={checkpoint}", f"finetune.data={task}",
                 *finetune_settings(setup), f"finetune.trainable={trainable}"]
    expected = with_overrides(read_model(checkpoint)[0], overrides).to_dict()
    if finished(run_dir, expected):
        print(f"= reusing the finished fine-tuning in {run_dir}", flush=True)
        return
    cmd = [*launcher_command(setup.launcher), str(ROOT / "scripts" / "finetune.py"), "--checkpoint", str(checkpoint),
           "--task", "classify", "--data", str(task), "--out_dir", str(run_dir), "--overwrite", "--ds_config",
           setup.common()["ds_config"], *overrides[3:]]
    run_command(cmd, run_log(run_dir), threads, f"fine-tuning {checkpoint} ({trainable})")


def vqmoe_finetune(setup: Setup) -> dict:
    vq = train_entries(setup, [parse_entry("vq")])["vq"]
    task, baselines, second = corpus_task(setup)
    ft_dir = setup.out_dir / "finetune"
    tasks = [partial(finetune_run, d, task, t, ft_dir / f"vq-{t}" / f"seed{s}", setup)
             for s, d in vq.items() for t in FINETUNE_TRAINABLE]
    run_all(tasks, setup.jobs)
    summary = {t: {s: json.loads((ft_dir / f"vq-{t}" / f"seed{s}" / "summary.json").read_text()) for s in vq}
               for t in FINETUNE_TRAINABLE}
    figure = {t: {key: {s: v[key] for s, v in by_seed.items()} for key in ("accuracy", "tokens_per_s")}
              for t, by_seed in summary.items()}
    rows = [comparison("validation accuracy: discrete_only vs all trained", "comparable accuracy (\"strong "
                       "fine-tuning\") with one expert per token", figure["discrete_only"]["accuracy"],
                       figure["all"]["accuracy"], "higher"),
            comparison("fine-tuning tokens/s: discrete_only vs all trained", "less compute: one expert per token "
                       "instead of top_k", figure["discrete_only"]["tokens_per_s"], figure["all"]["tokens_per_s"],
                       "higher")]
    table = [["", "accuracy", "macro-F1"]]
    table += [[name, f"{b['accuracy']:.3f}", f"{b['macro_f1']:.3f}"] for name, b in baselines.items()]
    table += [[f"vq fine-tuned, finetune.trainable={t}", fmt(mean_std(list(figure[t]["accuracy"].values())), ".3f"),
               fmt(mean_std([v["macro_f1"] for v in summary[t].values()]), ".3f")] for t in FINETUNE_TRAINABLE]
    notes = [f"task: passages of builtin against {second} (scripts/make_corpus_task.py, 300 each), "
             f"{' '.join(finetune_settings(setup))}"]
    return {"rows": rows, "tables": {"Corpus classification (validation split)": table}, "notes": notes}


def layer_mean(result: dict, figure: Callable[[dict], float]) -> float:
    return statistics.fmean(figure(layer) for layer in result["layers"])


def agreement_with_final(result: dict) -> float:
    """Mean top-1 agreement with the final checkpoint over the earlier checkpoints and the MoE layers."""
    earlier = result["consistency"]["with_final"][:-1]
    check(len(earlier) > 0, f"{result['checkpoint']}: routing consistency needs two checkpoints or more")
    return statistics.fmean(a for per_layer in earlier for a in per_layer)


def xmoe_consistency(setup: Setup) -> dict:
    runs = train_entries(setup, [parse_entry("topk"), parse_entry("xmoe")])
    evals = {label: per_seed(r, lambda d: full_evaluation(d, setup)) for label, r in runs.items()}
    figures = [("top-1 agreement of earlier checkpoints with the final one", agreement_with_final, "higher",
                "more consistent routing during training (routing fluctuation lower than SMoE)"),
               ("top-1 changed by input noise", lambda r: layer_mean(r, lambda L: L["routing_stability"]
                                                                     ["top1_changed"]), "lower",
                "more stable routing"),
               ("effective rank of the MoE layers' inputs", lambda r: layer_mean(r, lambda L: L["effective_rank"]
                                                                            ["input"]), "higher",
                "less representation collapse")]
    rows = [comparison(f"{name}: xmoe vs topk", paper, {s: fig(r) for s, r in evals["xmoe"].items()},
                       {s: fig(r) for s, r in evals["topk"].items()}, better) for name, fig, better, paper in figures]
    return {"rows": rows, "tables": {}}


def compete(setup: Setup) -> dict:
    runs = train_entries(setup, [parse_entry("topk"), parse_entry("compete"), COMPETE_2024])
    loss = {label: per_seed(r, val_loss) for label, r in runs.items()}
    bpb = {label: per_seed(r, lambda d: read_run(d)["test_bits_per_byte"]) for label, r in runs.items()}
    rows = []
    for label, mode in (("compete", "2025"), ("compete-2024", "2024")):
        paper = f"CompeteSMoE {mode}: better than SMoE (topk) baselines"
        rows.append(comparison(f"validation loss: {label} vs topk", paper, loss[label], loss["topk"], "lower"))
        if None not in (*bpb[label].values(), *bpb["topk"].values()):
            rows.append(comparison(f"test bits/byte: {label} vs topk", paper, bpb[label], bpb["topk"], "lower"))
    notes = ["compete: the router's defaults (2025: softplus affinity, rate 0.07, warm-up 100 steps); compete-2024: "
             + ", ".join(f"{k}={v}" for k, v in COMPETE_2024.options)]
    return {"rows": rows, "tables": {}, "notes": notes}


def usmoe_budget(setup: Setup) -> dict:
    topk = train_entries(setup, [parse_entry("topk")])["topk"]
    sweeps = per_seed(topk, lambda d: evaluation(d, "budget", setup, budgets=list(BUDGETS))["budget_sweep"])
    token = per_seed(topk, lambda d: evaluation(d, "budget-token", setup, budgets=[1.0],
                                                sweep_router="usmoe:selection=token")["budget_sweep"])
    original = {s: sw["original"]["loss"] for s, sw in sweeps.items()}

    def at(budget, sw):
        return next(p["loss"] for p in sw["points"] if p["budget"] == budget)
    rows = [comparison("test loss: usmoe (global selection, budget 1) vs the trained topk", "up to 10% better",
                       {s: at(1.0, sw) for s, sw in sweeps.items()}, original, "lower"),
            comparison("test loss: usmoe (global selection, budget 0.86: 14% fewer experts) vs the trained topk",
                       "14% less inference compute at no loss", {s: at(0.86, sw) for s, sw in sweeps.items()},
                       original, "lower"),
            comparison("test loss: usmoe (token selection, causal) vs the trained topk", "up to 10% better",
                       {s: sw["points"][0]["loss"] for s, sw in token.items()}, original, "lower")]
    for row in rows:
        row["ours_text"] = f"{row['ours_stat']['mean'] / row['baseline_stat']['mean'] - 1:+.2%} loss"
    table = [["budget", "experts/token", "test loss"]]
    table += [[b, fmt(mean_std([next(p["experts_per_token"] for p in sw["points"] if p["budget"] == b)
                                for sw in sweeps.values()]), ".3f"),
               fmt(mean_std([at(b, sw) for sw in sweeps.values()]))] for b in BUDGETS]
    table.append(["topk (trained)", fmt(mean_std([sw["original"]["experts_per_token"] for sw in sweeps.values()]),
                                        ".3f"), fmt(mean_std(list(original.values())))])
    notes = ["global selection picks (token, expert) pairs over each whole sequence: a token's experts depend on "
             "later tokens, so its losses are not a causal language model's (they can be too low); the token-selection "
             "row is causal"]
    return {"rows": rows, "tables": {"Budget sweep of usmoe on the trained topk models (nothing trained)": table},
            "notes": notes}


def upcycle_model(dense_run: Path, out: Path, moe) -> None:
    """scripts/upcycle.py of the dense run into out (every MLP: the MoE model's layout), unless done since the dense
    run finished."""
    if (out / "config.json").is_file() and \
            (out / "config.json").stat().st_mtime > (dense_run / "summary.json").stat().st_mtime:
        return
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "scripts" / "upcycle.py"), "--dense", str(dense_run), "--out", str(out),
           "--num_experts", str(moe.num_experts), "--top_k", str(moe.top_k), "--router", moe.router,
           "--every", str(moe.every)]
    run_command(cmd, None, None, f"upcycling {dense_run}")


def run_flops(config_json: Path, overrides: list[str]) -> float:
    return flops_per_token(Transformer(load_config(str(config_json), overrides)))


def upcycling(setup: Setup) -> dict:
    dense = Entry("dense", "topk", settings=("moe.every=0",))
    dense_runs = train_entries(setup, [dense])["dense"]
    first = next(iter(dense_runs.values())) / "config.json"
    cfg = load_config(setup.config, setup.common()["overrides"])
    moe = cfg.moe
    flops = {"dense": run_flops(first, []), "moe": run_flops(first, [f"moe.every={moe.every}"])}
    moe_steps = equal_flops_steps(setup.steps, flops["dense"], flops["moe"])
    entries = [Entry("moe-scratch", "topk", settings=(f"train.max_steps={moe_steps}",))]
    for s, d in dense_runs.items():
        upcycle_model(d, setup.runs() / "upcycled-model" / f"seed{s}", moe)
        entries += [Entry("dense-continued", "topk", seeds=(s,), settings=("moe.every=0",), init_from=str(d)),
                    Entry("upcycled", "topk", seeds=(s,), settings=(f"train.max_steps={moe_steps}",),
                          init_from=str(setup.runs() / "upcycled-model" / f"seed{s}"))]
    runs = train_entries(setup, entries)
    loss = {label: per_seed(r, val_loss) for label, r in runs.items()}
    paper = "upcycled beats dense continuation and an MoE from scratch at equal extra compute"
    rows = [comparison("validation loss: upcycled vs dense continued", paper, loss["upcycled"],
                       loss["dense-continued"], "lower"),
            comparison("validation loss: upcycled vs MoE from scratch", paper, loss["upcycled"], loss["moe-scratch"],
                       "lower")]
    table = [["continuation", "training FLOPs/token", "extra steps", "extra FLOPs", "validation loss"]]
    tokens = cfg.data.micro_batch_size * cfg.model.seq_len * cfg.train.grad_accum_steps  # per step, one rank
    for label, kind, steps in (("dense-continued", "dense", setup.steps), ("upcycled", "moe", moe_steps),
                               ("moe-scratch", "moe", moe_steps)):
        table.append([label, f"{flops[kind]:.3g}", steps, f"{flops[kind] * steps * tokens:.3g}",
                      fmt(mean_std(list(loss[label].values())))])
    notes = [f"dense model: {setup.steps} steps; each continuation spends the FLOPs of {setup.steps} dense steps "
             f"(megavq.model.flops.flops_per_token): {moe_steps} MoE steps; learning-rate schedule restarted"]
    return {"rows": rows, "tables": {"Continuations at equal extra training FLOPs": table}, "notes": notes}


@dataclass(frozen=True)
class Claim:
    name: str
    line: str  # what --list prints
    paper: str  # the paper's figure and setting
    seeds: str  # default --seeds
    measure: Callable[[Setup], dict]


CLAIMS = {c.name: c for c in [
    Claim("vqmoe-robustness", "VQMoE: vq degrades less than topk, xmoe, compete on corrupted input",
          "VQMoE (Do et al., TMLR 2025): \"a 28% improvement in robustness compared to other SMoE routing methods\" "
          "(abstract); its LMs: 16 experts, every layer MoE, 100k steps of sequence 512", "1,2", vqmoe_robustness),
    Claim("vqmoe-finetune", "VQMoE: fine-tuning vq's discrete path alone vs everything, accuracy and tokens/s",
          "VQMoE: fine-tuning with the discrete path alone (one expert per token) keeps strong accuracy at less "
          "compute; SST-2, SST-5, IMDB, BANKING77 from an enwik8 model", "1,2", vqmoe_finetune),
    Claim("xmoe-consistency", "X-MoE: routing consistency and representation collapse, xmoe vs topk",
          "X-MoE (Chi et al., NeurIPS 2022): more consistent routing and less representation collapse than SMoE; "
          "MLM perplexity 18.72 vs 19.02 (12 layers, width 768, one 32-expert layer)", "1,2", xmoe_consistency),
    Claim("compete", "CompeteSMoE in its 2025 and 2024 modes vs topk",
          "CompeteSMoE (Pham, Do et al. 2024; 2025 revision): competition routing beats SMoE baselines", "1,2",
          compete),
    Claim("usmoe-budget", "USMoE: training-free budget sweep of usmoe on a trained topk model",
          "USMoE (Do, Le, Tran 2025): up to 10% better, or 14% less inference compute, training-free on trained "
          "SMoEs", "1,2,3", usmoe_budget),
    Claim("upcycling", "Sparse Upcycling: upcycled vs dense continued vs MoE from scratch at equal extra FLOPs",
          "Sparse Upcycling (Komatsuzaki et al., ICLR 2023): upcycled beats dense continuation and MoE from scratch "
          "at equal extra compute (T5 and ViT; beats dense with about 50% of the dense pre-training cost)", "1,2",
          upcycling),
]}


# ---- output -------------------------------------------------------------------------------------------------
def table_lines(rows: list[list]) -> list[str]:
    return ["| " + " | ".join(map(str, rows[0])) + " |", "|" + "---|" * len(rows[0]),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows[1:]), ""]


def markdown(result: dict) -> str:
    lines = [f"# {result['claim']}", "", f"Paper: {result['paper']}", "", f"Ours: {result['size']}", ""]
    rows = [["measure", "paper", "ours", "baseline", "paired difference (per seed)", "verdict"]]
    for r in result["rows"]:
        per_seed_text = ", ".join(f"{d:+.4f}" for d in r["diff"]["values"])
        ours = fmt(r["ours_stat"]) + (f" ({r['ours_text']})" if "ours_text" in r else "")
        rows.append([r["measure"], r["paper"], ours, fmt(r["baseline_stat"]),
                     f"{fmt(r['diff'], '+.4f')} ({per_seed_text})", r["verdict"]])
    lines += table_lines(rows)
    for title, table in result["tables"].items():
        lines += [f"## {title}", "", *table_lines(table)]
    lines += [f"- {n}" for n in result.get("notes", [])]
    return "\n".join(lines).rstrip() + "\n"


def run_claim(name: str, setup: Setup) -> dict:
    """Measure the claim, write OUT_DIR/NAME.json and NAME.md; the result."""
    if name not in CLAIMS:
        raise ConfigError(f"unknown claim {name!r}; the claims: {', '.join(CLAIMS)}")
    if setup.jobs < 1 or setup.steps < 1 or setup.eval_batches < 1:
        raise ConfigError(f"--jobs, --steps and --eval_batches must be >= 1, got {setup.jobs}, {setup.steps}, "
                          f"{setup.eval_batches}")
    claim = CLAIMS[name]
    setup.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"claim": name, "paper": claim.paper, "size": setup.size(), **claim.measure(setup)}
    write_json(setup.out_dir / f"{name}.json", result)
    write_text(setup.out_dir / f"{name}.md", markdown(result))
    return result
