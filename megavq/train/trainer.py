"""Pre-training loop: orchestrates data, the DeepSpeed engine, evaluation, checkpoints and logging.

Step numbers count optimizer steps done. The batch of step s is a pure function of (seed, s), and every
rank draws the same global batch and reads only its rows, so a resumed run and a run on any number of ranks
see the same data in the same order.

Nothing in a step waits on the host but the step's end: one all_reduce of the stop signal and the non-finite
flag, read by the host (megavq.train.preempt.step_end_agreed). Losses and router metrics accumulate on the
device and are reduced and read at log steps.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megavq.config import Config, parse_sources, save_config
from megavq.data import data_options, prepare_data
from megavq.data.mixture import Mixture, bits_per_byte
from megavq.data.sampler import build_sampler
from megavq.errors import ConfigError, FatalError, MegavqError, RetryableError, TrainingError
from megavq.model import Transformer
from megavq.model.flops import device_peak_tflops, flops_per_token, utilisation
from megavq.store.manifest import write_manifest
from megavq.store.model_dir import load_weights
from megavq.store.run_dir import clear_run, holds_run, read_run_state, update_run_state
from megavq.store.shards import step_name
from megavq.train.checkpoint import Checkpointer
from megavq.train.engine import build_engine, prepare_model, read_ds_config, reconcile_ds_config
from megavq.train.faults import fault, wants
from megavq.train.health import CollapseMonitor
from megavq.train.launch import exit_code
from megavq.train.logging import MetricSums, RunLogger
from megavq.train.preempt import StopSignals, step_end_agreed


def load_data(data_cfg, rank: int) -> Mixture:
    """Tokenize on rank 0 on first use (others wait), then open the token files of every source on every rank."""
    source, options = data_cfg.source, data_options(data_cfg)
    dirs, error = None, None
    if rank == 0:
        try:
            dirs = {path: prepare_data(path) for path, _ in parse_sources(source)}
            Mixture.open(source, dirs.__getitem__, **options)  # one line for a bad mixture, from rank 0
        except MegavqError as e:
            error = str(e)
    box = [dirs, error]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise MegavqError(box[1])
    return Mixture.open(source, box[0].__getitem__, **options)


def resolve_vocab(cfg: Config, vocab_size: int) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size}")


def resolve_document_mask(cfg: Config, eos_id: int | None) -> None:
    """data.document_mask=true: the model's attention stops at the data's end-of-document id."""
    if not cfg.data.document_mask:
        return
    if eos_id is None:
        raise ConfigError(f"data.document_mask=true needs end-of-document ids, and {cfg.data.source} has none "
                          f"(format 1: rebuild it with scripts/prepare_data.py)")
    cfg.model.document_eos_id = eos_id


class Trainer:
    def __init__(self, engine, model: Transformer, cfg: Config, data, out_dir: Path, rank: int, world: int):
        self.engine, self.model, self.cfg, self.data = engine, model, cfg, data
        self.out_dir, self.ckpt_dir = out_dir, out_dir / "checkpoints"
        self.rank, self.world = rank, world
        self.micro = cfg.data.micro_batch_size
        self.global_batch = self.micro * cfg.train.grad_accum_steps * world
        self.moe_layer_ids = [i for i, b in enumerate(model.blocks) if b.is_moe]
        self.health = CollapseMonitor.for_model(model, cfg.train)
        self.checkpoints = Checkpointer(engine, model, cfg, out_dir, rank, world)
        self.saved, self.current_step = None, 0
        self.sampler = build_sampler(cfg.data.sampler) if cfg.data.sampler != "auto" else None  # set by resume
        self.router_metrics = MetricSums()
        self.flops_token, self.peak_tflops = flops_per_token(model), device_peak_tflops(cfg.train.peak_tflops)
        if wants("step"):  # MEGAVQ_FAULT=step...: fail in the middle of a step (megavq.train.faults)
            model.register_forward_pre_hook(lambda m, _: m.training and fault("step", self.current_step))

    # ---- one optimizer step -------------------------------------------------------------------------
    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches, then the routers' post_step. Returns this
        rank's sums over its micro-batches of (lm loss, aux loss, non-finite losses), on the device, unread."""
        cfg, device = self.cfg, self.engine.device
        totals = torch.zeros(3, device=device)
        for m in range(cfg.train.grad_accum_steps):
            micro = m * self.world + self.rank  # this micro-batch's index in the global batch
            self.model.set_step(step, micro)
            rows = slice(micro * self.micro, (micro + 1) * self.micro)
            out = self.engine(**{k: t.to(device) for k, t in self.micro_batch(step, rows).items()})
            loss = out.loss.detach()
            totals += torch.stack([out.lm_loss.detach().float(), out.aux_loss.detach().float(),
                                   (~torch.isfinite(loss)).float()])
            self.engine.backward(out.loss)
            self.engine.step()
            self.router_metrics.add(out.router_metrics, self.moe_layer_ids)
        self.model.post_step()  # router state (vq's codebook) changes after the optimizer step, on every rank
        return totals

    def micro_batch(self, step: int, rows: slice) -> dict:
        """The model's forward arguments for rows `rows` of step `step`'s global batch."""
        t = self.cfg.train
        x, y = self.data.batch("train", step, self.global_batch, self.cfg.model.seq_len, t.seed, rows, self.sampler)
        return {"idx_BS": x, "targets_BS": y}

    # ---- evaluation: every rank runs the same batches (safe under ZeRO-3 and expert parallelism) ------
    def evaluate(self, split: str, max_batches: int | None, progress: bool = False) -> dict:
        """{"loss", "tokens", "sources"}: the loss of each source ({name: (mean loss, tokens)}) over max_batches
        batches spread evenly over its split (None: all of it), and the mixture's, their mean under the weights."""
        per_source = {name: self.evaluate_source(data, split, max_batches, progress)
                      for name, data in zip(self.data.names, self.data.sources)}
        loss = sum(w * loss for w, (loss, _) in zip(self.data.weights, per_source.values()))
        return {"loss": loss, "tokens": sum(n for _, n in per_source.values()), "sources": per_source}

    @torch.no_grad()
    def evaluate_source(self, data, split: str, max_batches: int | None, progress: bool) -> tuple[float, int]:
        self.engine.eval()
        total, count = 0.0, 0
        batches = data.eval_batches(split, self.micro, self.cfg.model.seq_len, max_batches)
        for x, y in tqdm(batches, desc=f"eval {split}", disable=not progress or self.rank != 0, mininterval=5):
            out = self.engine(x.to(self.engine.device), y.to(self.engine.device))
            total += out.lm_loss.float().item() * y.numel()
            count += y.numel()
        self.engine.train()
        return total / max(count, 1), count

    # ---- checkpoints (megavq.train.checkpoint) ----------------------------------------------------------
    def save(self, step: int) -> None:
        self.checkpoints.save(step, {"next_step": step, "global_batch": self.global_batch,
                                     "samples": step * self.global_batch, "seed": self.cfg.train.seed,
                                     "sampler": self.cfg.data.sampler, "source": self.cfg.data.source})
        self.saved = step

    def resume(self, mode: str) -> int:
        """Load the newest intact checkpoint; returns its step (0: none, and mode "auto")."""
        state = self.checkpoints.resume(mode)
        if state is None:
            return 0
        batch = state["data"].get("global_batch")
        self.resume_sampler(state["data"].get("sampler", "random"), state["path"])  # random: before data.sampler
        if self.rank == 0:
            print(f"resuming from {state['path']} (step {state['step']})", file=sys.stderr, flush=True)
            if batch not in (None, self.global_batch):
                print(f"warning: {state['path']} was written with {batch} sequences per step, this run takes "
                      f"{self.global_batch}: the batches after it differ from the first run's", file=sys.stderr)
        self.saved = state["step"]
        return state["step"]

    def resume_sampler(self, recorded: str, path) -> None:
        """data.sampler=auto continues with the checkpoint's sampler; another one than it recorded is warned of."""
        data = self.cfg.data
        if data.sampler == "auto":
            data.sampler = recorded
        elif data.sampler != recorded and self.rank == 0:
            print(f"warning: {path} was written with data.sampler={recorded}, this run has data.sampler="
                  f"{data.sampler}: the batches after it differ from the first run's", file=sys.stderr)
        self.sampler = build_sampler(data.sampler)

    # ---- the loop -------------------------------------------------------------------------------------
    def fit(self, start: int, logger: RunLogger, stop: StopSignals) -> dict:
        """Steps start+1 .. end; saves every train.save_every steps; after a stop signal, every rank saves at the
        same step and the result has "stopped" set."""
        t = self.cfg.train
        end = min(t.stop_at_step or t.max_steps, t.max_steps)
        bar = tqdm(range(start, end), initial=start, total=t.max_steps, disable=self.rank != 0,
                   desc="train", dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        t_start, t_window, last, done, stopped = time.time(), time.time(), {}, start, False
        window, window_steps = torch.zeros(3, device=self.engine.device), 0
        for step in bar:
            self.current_step = step + 1
            window += self.train_step_checked(step, start, stop)
            done, window_steps = step + 1, window_steps + 1
            if done % t.log_every == 0 or done % t.eval_every == 0 or done == end:
                last = self.log_window(done, window, window_steps, time.time() - t_window, logger)
                bar.set_postfix(loss=f"{last['train/lm_loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
                window, window_steps, t_window = torch.zeros_like(window), 0, time.time()
            stopped = stop.signal is not None
            if done % t.save_every == 0 or stopped:
                self.save(done)
            if stopped or (t.max_time_s and time.time() - t_start > t.max_time_s):
                break
        bar.close()
        return {"steps": done, "train_time_s": time.time() - t_start, "last": last, "stopped": stopped}

    def train_step_checked(self, step: int, start: int, stop: StopSignals) -> torch.Tensor:
        """train_step, then the ranks agree on a stop signal and on the loss being finite. A non-finite loss raises
        TrainingError before anything is saved after it; at a step that already failed before this resume it is
        fatal (exit 3): a requeue must not retry it forever."""
        totals = self.train_step(step)
        stop.signal, nonfinite = step_end_agreed(stop.requested, totals[2])
        if not nonfinite:
            return totals
        lm_loss = totals[0].item() / self.cfg.train.grad_accum_steps
        failed = read_run_state(self.out_dir).get("nonfinite_step")
        dist.barrier()
        if self.rank == 0:
            update_run_state(self.out_dir, nonfinite_step=step + 1)
        if failed == step + 1 and start < step + 1:
            raise FatalError(f"non-finite loss at step {step + 1} again after resuming from step {start}: "
                             f"it is not a transient fault; lower train.lr (or train.grad_clip) and resume, or "
                             f"restart from an earlier checkpoint")
        raise TrainingError(f"non-finite loss at step {step + 1} (lm_loss {lm_loss:.4g} on rank {self.rank}); "
                            f"nothing was saved after it: resume from {self.ckpt_dir} with --resume, "
                            f"perhaps with a lower train.lr")

    def log_window(self, done: int, window: torch.Tensor, steps: int, seconds: float, logger: RunLogger) -> dict:
        """Reduce the window's loss sums over the ranks, read them with the router metrics, evaluate on eval steps."""
        dist.all_reduce(window)
        lm, aux, _ = (window / (steps * self.cfg.train.grad_accum_steps * self.world)).tolist()
        tokens_per_s = self.global_batch * self.cfg.model.seq_len * steps / seconds
        record = {"step": done, "train/lm_loss": lm, "train/aux_loss": aux, "train/loss": lm + aux,
                  **self.router_metrics.read(), "lr": self.engine.get_lr()[0], "tokens_per_s": tokens_per_s,
                  **utilisation(self.flops_token, tokens_per_s, self.world, self.peak_tflops)}
        if done % self.cfg.train.eval_every == 0:
            record.update(self.loss_records("val", self.evaluate("val", self.cfg.data.eval_batches)))
            for message in self.health.check(done, record):  # router metrics of the training window
                if self.rank == 0:
                    tqdm.write(message)
        logger.log(record)
        return record

    def loss_records(self, split: str, result: dict) -> dict:
        """{"val/loss": the mixture's} and, for several sources, {"val/NAME/loss": each source's}."""
        per_source = result["sources"] if len(self.data) > 1 else {}
        return {f"{split}/loss": result["loss"], **{f"{split}/{n}/loss": v[0] for n, v in per_source.items()}}

    def final_eval(self, fit: dict) -> dict:
        """Val and test loss on at most train.final_eval_tokens tokens per split and source (0: the whole split),
        spread evenly over it; bits per byte use the split's bytes per token (None where they are not known)."""
        tokens = self.cfg.train.final_eval_tokens
        max_batches = math.ceil(tokens / (self.micro * self.cfg.model.seq_len)) if tokens else None
        test, val = (self.evaluate(split, max_batches, progress=True) for split in ("test", "val"))
        summary = {
            "steps": fit["steps"],
            "train_loss": fit["last"].get("train/lm_loss"),
            "val_loss": val["loss"],
            "val_tokens": val["tokens"],
            "test_loss": test["loss"],
            "test_tokens": test["tokens"],
            "test_ppl": math.exp(test["loss"]),
            "test_bits_per_byte": bits_per_byte(test["loss"], self.data.bytes_per_token("test")),
            "tokens_per_s": fit["last"].get("tokens_per_s"),
            **{k: fit["last"][k] for k in ("tflops_per_device", "mfu") if k in fit["last"]},
            "train_time_s": fit["train_time_s"],
            "params": self.model.num_params(),
            "active_params": self.model.num_params(active=True),
            "vocab_size": self.cfg.model.vocab_size,
        }
        if len(self.data) > 1:
            summary["sources"] = {name: {"weight": w, "val_loss": val["sources"][name][0],
                                         "test_loss": test["sources"][name][0],
                                         "test_bits_per_byte": bits_per_byte(test["sources"][name][0],
                                                                             data.bytes_per_token("test"))}
                                  for name, w, data in zip(self.data.names, self.data.weights, self.data.sources)}
        return summary


def build_model(cfg: Config, init_from: str | None = None) -> Transformer:
    torch.manual_seed(cfg.train.seed)
    model = prepare_model(Transformer(cfg), cfg)
    if init_from:
        load_weights(model, init_from)
    return model


def prepare_run_dir(out_dir: Path, resume: str | None, overwrite: bool, rank: int) -> None:
    """Refuse to mix a fresh run with an old one; --overwrite deletes the old one first (rank 0)."""
    if overwrite and resume:
        raise ConfigError("--overwrite deletes the run that --resume continues: give one of them")
    error = None
    if rank == 0:
        if overwrite:
            clear_run(out_dir)
        elif not resume and holds_run(out_dir):
            error = (f"{out_dir} already holds a run: continue it with --resume (or --resume auto, which also "
                     f"starts it when it has no checkpoint), or delete it and start again with --overwrite")
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise MegavqError(box[0])


def run(cfg: Config, ds_config: str | Path, out_dir: str | Path, resume: bool | str | None = None,
        init_from: str | None = None, overwrite: bool = False, body=None) -> dict:
    """Pre-train per cfg; returns the summary. Must run inside torch.distributed (see engine.init_distributed).

    resume: None (a fresh run; refused where a run exists unless `overwrite`), "strict" (or True: continue from
    the newest checkpoint, which must exist and be intact) or "auto" (continue from the newest intact checkpoint,
    falling back to older ones; start fresh when there is none). A stop signal ends the run after a save with
    RetryableError (exit 75). `body(cfg, ds, out_dir, resume, init_from, attempt)`: the run (default: pre-training,
    `train`; megavq.train.finetune passes its own)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir, resume = Path(out_dir), ("strict" if resume is True else resume or None)
    ds = reconcile_ds_config(read_ds_config(ds_config), cfg, world)
    prepare_run_dir(out_dir, resume, overwrite, rank)
    attempt = {"trainer": None}
    try:
        return (body or train)(cfg, ds, out_dir, resume, init_from, attempt)
    except BaseException as e:  # how this attempt ended, for a requeue loop behind a launcher (run.json)
        if rank == 0 and out_dir.is_dir():
            step = attempt["trainer"].current_step if attempt["trainer"] else None
            update_run_state(out_dir, exit={"code": exit_code(e), "reason": str(e).splitlines()[0][:300] if str(e)
                                            else type(e).__name__, "step": step})
        raise


def train(cfg: Config, ds: dict, out_dir: Path, resume: str | None, init_from: str | None, attempt: dict) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_data(cfg.data, rank)
    resolve_vocab(cfg, data.vocab_size)
    resolve_document_mask(cfg, data.eos_id)
    model = build_model(cfg, init_from)
    engine = build_engine(model, cfg, ds)
    trainer = attempt["trainer"] = Trainer(engine, model, cfg, data, out_dir, rank, world)
    start = trainer.resume(resume) if resume else 0  # a run that cannot resume is left as it was
    if trainer.sampler is None:  # data.sampler=auto and nothing to resume: a new run draws random windows
        cfg.data.sampler = "random"
        trainer.sampler = build_sampler(cfg.data.sampler)
    return drive(trainer, start, data.tokenizer().path, ",".join(data.dirs))


def drive(trainer: Trainer, start: int, tokenizer: Path, data: str) -> dict:
    """The run after its set-up (pre-training and fine-tuning): config and manifest, the steps from `start`, the
    last save, the final evaluation."""
    cfg, out_dir, rank = trainer.cfg, trainer.out_dir, trainer.rank
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
        write_manifest(out_dir, "run", cfg.to_dict(), tokenizer, data=data)
        update_run_state(out_dir, exit={"code": None, "reason": "running (null if this attempt was killed)",
                                        "step": start})
    state = run_state(out_dir, rank, cfg.train.wandb)
    logger = RunLogger(out_dir, cfg.to_dict(), rank == 0, cfg.train.wandb, cfg.train.wandb_project, start,
                       state.get("wandb_id"))
    with StopSignals() as stop:
        fit = trainer.fit(start, logger, stop)
        if fit["stopped"]:
            logger.finish_preempted()
            saved = trainer.checkpoints.dir / step_name(fit["steps"])
            raise RetryableError(f"stopped by {stop.signal} after step {fit['steps']}; saved {saved}; continue with "
                                 f"--resume auto")
        if fit["steps"] > start and trainer.saved != fit["steps"]:
            trainer.save(fit["steps"])
    summary = {**trainer.final_eval(fit), "resumed_from": start}
    logger.finish(summary)
    if rank == 0:
        update_run_state(out_dir, exit={"code": 0, "reason": "finished", "step": fit["steps"]})
    return summary


def run_state(out_dir: Path, rank: int, use_wandb: bool) -> dict:
    """run.json, with a wandb run id made on first use (every attempt of the run logs to the same wandb run)."""
    state = read_run_state(out_dir) if rank == 0 else {}
    if rank == 0 and use_wandb and not state.get("wandb_id"):
        import secrets
        import string
        alphabet = string.ascii_lowercase + string.digits  # wandb's own run-id alphabet
        state = update_run_state(out_dir, wandb_id="".join(secrets.choice(alphabet) for _ in range(8)))
    return state
