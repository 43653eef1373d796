"""Train several routers with the same preset, data, step budget and seeds, and tabulate the results.

Routers are given as `NAME[:OPTION=VALUE...][@SEED[+SEED...]]`, comma-separated, e.g.
`topk,usmoe:selection=token,vq:continuous=xmoe:beta=0.25,xmoe@1`: the options go to `moe.router_options` of that
router only (values are read as YAML), `@SEEDS` runs it at those of the seeds only (default: every seed).
The baseline is the default router (`MoEConfig.router`) with no options; it runs at every seed and is added when
the list lacks it. Each (router, seed) runs as its own `pretrain.py` process, one after the other by default, so
tokens/s are measured alike; a run directory that already holds a finished run of the same resolved configuration is reused
(an interrupted comparison continues where it stopped).

The table gives, per router, the mean and sample std over its seeds of the validation loss, the test bits per
byte and the final training loss, and the paired difference from the baseline at the same seed (router minus
baseline: negative is better), with its mean and std. A difference is called a gain or a loss only when every
seed agrees in sign; otherwise it is "mixed".

`jobs` > 1 runs that many trainings at once, each with its share of the cores (OMP_NUM_THREADS = cores // jobs,
at least 1), its own master port and its output in OUT_DIR/logs/; tokens/s then compare runs of one invocation
only.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from megavq.config import MoEConfig, load_config
from megavq.errors import ConfigError, MegavqError
from megavq.moe.routers import router_class
from megavq.train.launch import free_port

PRETRAIN = Path(__file__).resolve().parents[2] / "scripts" / "pretrain.py"
RUN_FIGURES = ["val_loss", "test_bits_per_byte", "train_loss", "tokens_per_s", "load_cv", "vq_code_perplexity",
               "vq_dead_codes"]


@dataclass(frozen=True)
class Entry:
    """One router of the comparison: its label (as written), name, options (raw text) and seeds (None: all)."""
    label: str
    name: str
    options: tuple[tuple[str, str], ...] = ()
    seeds: tuple[int, ...] | None = None
    settings: tuple[str, ...] = ()  # further key=value overrides of this entry (e.g. moe.every=0: a dense model)
    init_from: str | None = None  # pretrain.py --init_from: start from these weights

    def option_values(self) -> dict:
        return {k: yaml.safe_load(v) for k, v in self.options}

    def overrides(self, seed: int | None) -> list[str]:
        out = [f"moe.router={self.name}", *(f"moe.router_options.{k}={v}" for k, v in self.options), *self.settings]
        return out + ([f"train.seed={seed}"] if seed is not None else [])

    def run_dir(self, out_dir: Path, seed: int | None) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.label.replace("=", "-"))
        return out_dir / name / (f"seed{seed}" if seed is not None else "run")


def parse_entry(text: str) -> Entry:
    """'vq:continuous=xmoe:beta=0.25@1+2' -> Entry('vq:continuous=xmoe:beta=0.25@1+2', 'vq', (...), (1, 2))."""
    body, _, seeds = text.strip().partition("@")
    name, *opts = body.split(":")
    options = []
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise ConfigError(f"--routers: '{opt}' in '{text}' is not OPTION=VALUE")
        options.append((key, value))
    try:
        seed_list = tuple(int(s) for s in seeds.split("+")) if seeds else None
    except ValueError:
        raise ConfigError(f"--routers: '@{seeds}' in '{text}' is not a list of seeds such as @1 or @1+2") from None
    return Entry(text.strip(), name, tuple(options), seed_list)


def parse_entries(routers: str, seeds: list[int | None]) -> list[Entry]:
    """The entries of --routers, the baseline first (added when missing), seeds resolved against --seeds."""
    entries = [parse_entry(t) for t in routers.split(",") if t.strip()]
    for e in entries:
        if e.seeds is not None and not set(e.seeds) <= set(seeds):
            raise ConfigError(f"--routers: {e.label} asks for seeds outside --seeds {seeds}")
    base = next((e for e in entries if e.name == MoEConfig.router and not e.options), None)
    entries = [e for e in entries if e is not base]
    return [Entry(MoEConfig.router, MoEConfig.router)] + entries  # the baseline runs at every seed


def parse_seeds(text: str) -> list:
    """'1,2,3' -> [1, 2, 3]; '' -> [None] (the config's train.seed)."""
    try:
        return [int(s) for s in text.split(",")] if text else [None]  # None: the config's train.seed
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers such as 1,2,3, got {text!r}") from None


def seeds_of(entry: Entry, seeds: list[int | None]) -> list[int | None]:
    return list(entry.seeds) if entry.seeds is not None else list(seeds)


def check_entries(entries: list[Entry], seeds: list, config: str, data: str, overrides: list[str]) -> None:
    """Fail before training on a bad option or a non-causal router (the comparison trains causal LMs)."""
    for e in entries:
        cfg = load_config(config, [*overrides, *e.overrides(seeds[0]), f"data.source={data}"])
        if not router_class(cfg.moe.router).is_causal(cfg.moe.router_options):
            raise ConfigError(f"router '{e.label}' is not causal; the comparison trains causal language models")


# ---- running ---------------------------------------------------------------------------------------------
# Settings a run resolves when it starts, with the value that means "resolve": the data's vocabulary and end-of-
# document id, the sampler of a new run, a fine-tuned classifier's class count.
RESOLVED = (("model", "vocab_size", 0), ("model", "document_eos_id", -1), ("data", "sampler", "auto"),
            ("model", "num_classes", 0))


def finished(run_dir: Path, expected: dict) -> bool:
    """A finished run (summary.json) of the same configuration, with the settings it resolved (RESOLVED) as it
    resolved them."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.json").is_file():
        return False
    saved = json.loads((run_dir / "config.json").read_text())
    expected = {section: dict(values) for section, values in expected.items()}
    for section, key, unresolved in RESOLVED:
        if expected[section].get(key) == unresolved and key in saved.get(section, {}):
            expected[section][key] = saved[section][key]
    return saved == expected


def launcher_command(launcher: str) -> list[str]:
    """The command that starts pretrain.py: `deepspeed` on a port of its own, or this Python."""
    return ["deepspeed", "--master_port", str(free_port())] if launcher == "deepspeed" else [sys.executable]


def pending(entry: Entry, seed, run_dir: Path, common: dict) -> bool:
    """Whether (entry, seed) still has to train; a finished run of the same configuration is reused."""
    overrides = [*common["overrides"], *entry.overrides(seed)]
    expected = load_config(common["config"], [*overrides, f"data.source={common['data']}"]).to_dict()
    if finished(run_dir, expected):
        print(f"= {entry.label} seed {seed}: reusing the finished run in {run_dir}", flush=True)
        return False
    return True


def run_command(cmd: list[str], log: Path | None, threads: int | None, what: str) -> None:
    """Run cmd; with `threads`, its output goes to `log` and it uses that many threads. `what` names it in the
    error raised when it fails."""
    if threads is None:
        print("+", " ".join(cmd), flush=True)
        code = subprocess.run(cmd).returncode
        where = ""
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        print("+", " ".join(cmd), f"(log: {log})", flush=True)
        with log.open("w") as out:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        where = f"; its output is in {log}"
    if code != 0:
        raise MegavqError(f"{what} failed (command: {' '.join(cmd)}){where}")


def run_log(run_dir: Path) -> Path:
    """Where a run's output goes when runs share the machine: OUT_DIR/logs/<label>_<seed dir>.log."""
    return run_dir.parents[1] / "logs" / f"{run_dir.parent.name}_{run_dir.name}.log"


def train(entry: Entry, seed, run_dir: Path, common: dict, threads: int | None = None) -> None:
    """One pretrain.py run; with `threads` its output goes to OUT_DIR/logs/ and it uses that many threads."""
    cmd = [*launcher_command(common["launcher"]), str(PRETRAIN), "--out_dir", str(run_dir), "--overwrite",
           "--ds_config", common["ds_config"], "--config", common["config"], "--data", common["data"],
           *(["--init_from", entry.init_from] if entry.init_from else []),
           *common["overrides"], *entry.overrides(seed)]  # an unfinished run starts afresh
    run_command(cmd, run_log(run_dir), threads, f"training {entry.label} (seed {seed})")


def run_all(tasks: list, jobs: int) -> None:
    """Call each task(threads) `jobs` at a time: one job runs them in turn with threads None (output to this
    terminal), more give each cores // jobs threads. Every failure is reported, after all end."""
    if jobs == 1:
        for task in tasks:
            task(None)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(task, threads) for task in tasks]
    errors = [str(f.exception()) for f in futures if f.exception() is not None]
    if errors:
        raise MegavqError(f"{len(errors)} of {len(tasks)} runs failed: " + "; ".join(errors))


def train_all(runs: list[tuple], out_dir: Path, common: dict, jobs: int) -> None:
    """Train the (entry, seed) pairs not yet trained, `jobs` at a time; every failure is reported, after all end."""
    todo = [(e, seed) for e, seed in runs if pending(e, seed, e.run_dir(out_dir, seed), common)]
    run_all([partial(train, e, seed, e.run_dir(out_dir, seed), common) for e, seed in todo], jobs)


def layer_mean(record: dict, name: str) -> float | None:
    values = [v for k, v in record.items() if k.startswith("moe/L") and k.endswith(f"/{name}")]
    return statistics.fmean(values) if values else None


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records[1:]] or [records[0]["tokens_per_s"]]  # first window warms up
    last = records[-1]
    return {"val_loss": summary["val_loss"], "test_bits_per_byte": summary["test_bits_per_byte"],
            "train_loss": summary.get("train_loss"), "tokens_per_s": statistics.median(speeds),
            "load_cv": layer_mean(last, "load_cv"), "vq_code_perplexity": layer_mean(last, "code_perplexity"),
            "vq_dead_codes": layer_mean(last, "dead_codes")}


# ---- the table -------------------------------------------------------------------------------------------
def mean_std(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def verdict(diffs: list[float]) -> str:
    """'gain' (lower for every seed), 'loss' (higher for every seed), else 'mixed'."""
    if diffs and all(d < 0 for d in diffs):
        return "gain"
    if diffs and all(d > 0 for d in diffs):
        return "loss"
    return "mixed"


def summarize(label: str, runs: list[dict], base: dict) -> dict:
    """One row: mean/std per figure over seeds, and the paired differences from the baseline (same seed)."""
    row = {"router": label, "seeds": [r["seed"] for r in runs]}
    for key in RUN_FIGURES:
        row[key] = mean_std([r[key] for r in runs])
    for key in ("val_loss", "test_bits_per_byte"):
        diffs = [r[key] - base[r["seed"]][key] for r in runs
                 if r["seed"] in base and None not in (r[key], base[r["seed"]][key])]  # no bytes: no bits per byte
        row[f"{key}_diff"] = {**mean_std(diffs), "values": diffs, "verdict": verdict(diffs)}
    row["train_over_val"] = mean_std([r["train_loss"] / r["val_loss"] for r in runs if r["train_loss"] is not None])
    row["step_time_ratio"] = mean_std([base[r["seed"]]["tokens_per_s"] / r["tokens_per_s"] for r in runs
                                       if r["seed"] in base])
    return row


def fmt(stat: dict, spec: str = ".4f") -> str:
    """'mean ± std' (std with one seed omitted) in the format spec, e.g. '.4f' or '+.4f'."""
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:{spec}}" + (f" ± {stat['std']:{spec.lstrip('+')}}" if stat["std"] is not None else "")


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]["router"]
    head = ["router", "seeds", "val loss", "test bits/byte", f"Δ val loss vs {base}", f"Δ bits/byte vs {base}",
            "train loss", "train/val", f"step time vs {base}", "tokens/s", "load_cv", "vq code perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        diffs = ["-", "-"] if i == 0 else [f"{fmt(r[k], '+.4f')} ({r[k]['verdict']})"
                                           for k in ("val_loss_diff", "test_bits_per_byte_diff")]
        cells = [r["router"], ",".join(str(s) for s in r["seeds"]), fmt(r["val_loss"]), fmt(r["test_bits_per_byte"]),
                 *diffs, fmt(r["train_loss"]), fmt(r["train_over_val"], ".3f"), fmt(r["step_time_ratio"], ".2f"),
                 fmt(r["tokens_per_s"], ".0f"), fmt(r["load_cv"], ".3f"), fmt(r["vq_code_perplexity"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(entries: list[Entry], seeds: list, out_dir: Path, common: dict, jobs: int = 1) -> list[dict]:
    """Train every (entry, seed) not yet trained, `jobs` at a time, then write out_dir/compare.json and compare.md;
    the rows. `common`: config, data, ds_config, overrides and launcher ("deepspeed" or "python")."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = [(e, seed) for e in entries for seed in seeds_of(e, seeds)]
    train_all(pairs, out_dir, common, jobs)
    runs = {}
    for e, seed in pairs:
        runs.setdefault(e.label, []).append({"seed": seed, **read_run(e.run_dir(out_dir, seed))})
    base = {r["seed"]: r for r in runs[entries[0].label]}
    rows = [summarize(e.label, runs[e.label], base) for e in entries]
    (out_dir / "compare.json").write_text(json.dumps({"baseline": entries[0].label, "rows": rows, "runs": runs},
                                                     indent=2) + "\n")
    (out_dir / "compare.md").write_text(markdown_table(rows))
    return rows
