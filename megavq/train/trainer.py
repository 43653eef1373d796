"""Pre-training loop: orchestrates data, the DeepSpeed engine, evaluation, checkpoints and logging.

Step numbers count optimizer steps done. The batch of step s is a pure function of (seed, s), and every
rank draws the same global batch and takes its rows, so a resumed run and a run on any number of ranks
see the same data in the same order.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megavq.errors import ConfigError, MegavqError, TrainingError
from megavq.config import Config, save_config
from megavq.eval.health import CollapseMonitor
from megavq.io import load_weights, save_model
from megavq.manifest import TOKENIZER_FILE, write_manifest
from megavq.model import Transformer
from megavq.train.engine import (build_engine, full_optimizer_state, full_state_dict, load_full_optimizer_state,
                                 read_ds_config, reconcile_ds_config, set_schedule_position)
from megavq.train.logging import RunLogger, average_metrics, flatten_router_metrics


def load_data(source: str, rank: int):
    """Tokenize on rank 0 on first use (others wait), then open the token files on every rank."""
    from megavq.data import TokenData, prepare_data
    data_dir, error = None, None
    if rank == 0:
        try:
            data_dir = prepare_data(source)
        except MegavqError as e:
            error = str(e)
    box = [data_dir, error]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise MegavqError(box[1])
    return TokenData(box[0])


def resolve_vocab(cfg: Config, vocab_size: int) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size}")


class Trainer:
    def __init__(self, engine, model: Transformer, cfg: Config, data, out_dir: Path, rank: int, world: int):
        self.engine, self.model, self.cfg, self.data = engine, model, cfg, data
        self.out_dir, self.ckpt_dir = out_dir, out_dir / "checkpoints"
        self.rank, self.world = rank, world
        self.micro = cfg.data.micro_batch_size
        self.global_batch = self.micro * cfg.train.grad_accum_steps * world
        self.moe_layer_ids = [i for i, b in enumerate(model.blocks) if b.is_moe]
        self.health = CollapseMonitor.for_model(model, cfg.train)

    # ---- one optimizer step -------------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        """One optimizer step over grad_accum_steps micro-batches, then the routers' post_step."""
        cfg = self.cfg
        x, y = self.data.batch("train", step, self.global_batch, cfg.model.seq_len, cfg.train.seed)
        x, y = x.to(self.engine.device), y.to(self.engine.device)
        totals, metrics = torch.zeros(3), []
        for m in range(cfg.train.grad_accum_steps):
            micro = m * self.world + self.rank  # this micro-batch's index in the global batch
            self.model.set_step(step, micro)
            rows = slice(micro * self.micro, (micro + 1) * self.micro)
            out = self.engine(x[rows], y[rows])
            stats = torch.stack([out.lm_loss.detach().float(), out.aux_loss.detach().float(),
                                 (~torch.isfinite(out.loss.detach())).float()])
            dist.all_reduce(stats)
            if stats[2] > 0:
                raise TrainingError(f"non-finite loss at step {step + 1} (lm_loss {stats[0] / self.world:.4g}); "
                                    f"nothing was saved after it: resume from {self.ckpt_dir} with --resume, "
                                    f"perhaps with a lower train.lr")
            self.engine.backward(out.loss)
            self.engine.step()
            totals += stats.cpu()
            metrics.append(flatten_router_metrics(out.router_metrics, self.moe_layer_ids))
        self.model.post_step()  # router state (vq's codebook) changes after the optimizer step, on every rank
        n = cfg.train.grad_accum_steps * self.world
        record = {"train/lm_loss": totals[0].item() / n, "train/aux_loss": totals[1].item() / n}
        record["train/loss"] = record["train/lm_loss"] + record["train/aux_loss"]
        record.update(average_metrics(metrics) if metrics[0] else {})
        return record

    # ---- evaluation: every rank runs the same batches (safe under ZeRO-3 and expert parallelism) ------
    @torch.no_grad()
    def evaluate(self, split: str, max_batches: int | None, progress: bool = False) -> tuple[float, int]:
        """(mean loss, tokens) over max_batches batches spread evenly over the split (None: all of it)."""
        self.engine.eval()
        total, count = 0.0, 0
        batches = self.data.eval_batches(split, self.micro, self.cfg.model.seq_len, max_batches)
        for x, y in tqdm(batches, desc=f"eval {split}", disable=not progress or self.rank != 0, mininterval=5):
            out = self.engine(x.to(self.engine.device), y.to(self.engine.device))
            total += out.lm_loss.float().item() * y.numel()
            count += y.numel()
        self.engine.train()
        return total / max(count, 1), count

    # ---- checkpoints ----------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        tag = f"step_{step:07d}"
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag,
                                    client_state={"step": step, "rng": torch.get_rng_state()})
        state = full_state_dict(self.engine)
        optim, adam = full_optimizer_state(self.engine)
        if self.rank == 0:
            save_model(state, self.cfg, self.ckpt_dir / tag, self.out_dir / TOKENIZER_FILE, kind="checkpoint",
                       step=step)
            self._save_portable(self.ckpt_dir / tag, step, optim, adam)
            self._prune()
        dist.barrier()

    def layout(self) -> dict:
        """What DeepSpeed's own checkpoint depends on; a different layout resumes from the portable state."""
        moe = self.cfg.moe
        return {"backend": moe.backend, "ep_size": moe.ep_size, "world_size": self.world,
                "zero_stage": self.engine.zero_optimization_stage(), "dtype": str(self.engine.get_data_types()[0])}

    def _save_portable(self, tag_dir: Path, step: int, optim: dict, adam: int) -> None:
        """train_state.safetensors (canonical fp32 weights, Adam moments, RNG) + train_state.json (positions)."""
        from safetensors.torch import save_file
        save_file({**{k: v.contiguous() for k, v in optim.items()}, "rng": torch.get_rng_state()},
                  str(tag_dir / "train_state.safetensors"))
        meta = {"step": step, "adam_step": adam, "lr_last_epoch": self.engine.lr_scheduler.last_epoch,
                "global_steps": self.engine.global_steps, "global_samples": self.engine.global_samples,
                "layout": self.layout()}
        (tag_dir / "train_state.json").write_text(json.dumps(meta, indent=2) + "\n")

    def _prune(self) -> None:
        tags = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir())
        for old in tags[:-self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> int:
        if not (self.ckpt_dir / "latest").is_file():
            raise MegavqError(f"--resume: no checkpoint in {self.ckpt_dir}")
        tag_dir = self.ckpt_dir / (self.ckpt_dir / "latest").read_text().strip()
        meta_file = tag_dir / "train_state.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        native_ep = self.cfg.moe.backend == "native" and self.cfg.moe.ep_size > 1  # DeepSpeed keeps rank 0's experts
        if meta is not None and (native_ep or meta["layout"] != self.layout()):
            return self._resume_portable(tag_dir, meta)
        if native_ep:
            raise MegavqError(f"--resume: {meta_file} is missing; it is needed to resume moe.ep_size > 1")
        path, client = self.engine.load_checkpoint(str(self.ckpt_dir))
        if path is None:
            raise MegavqError(f"--resume: could not load the checkpoint in {self.ckpt_dir}")
        torch.set_rng_state(client["rng"])
        return int(client["step"])

    def _resume_portable(self, tag_dir: Path, meta: dict) -> int:
        """Resume from the canonical weights and optimizer state: any ep_size, backend, ZeRO-0/1/2 stage, rank count."""
        from safetensors.torch import load_file
        load_weights(self.model, tag_dir)  # parameters and buffers, canonical -> this layout
        state = load_file(str(tag_dir / "train_state.safetensors"))
        rng = state.pop("rng")
        load_full_optimizer_state(self.engine, state, meta["adam_step"])
        set_schedule_position(self.engine, meta["lr_last_epoch"])
        self.engine.global_steps, self.engine.global_samples = meta["global_steps"], meta["global_samples"]
        torch.set_rng_state(rng)
        return int(meta["step"])

    # ---- the loop -------------------------------------------------------------------------------------
    def fit(self, start: int, logger: RunLogger) -> dict:
        t = self.cfg.train
        end = min(t.stop_at_step or t.max_steps, t.max_steps)
        bar = tqdm(range(start, end), initial=start, total=t.max_steps, disable=self.rank != 0,
                   desc="train", dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        t_start, t_window, window, last, done = time.time(), time.time(), [], {}, start
        for step in bar:
            window.append(self.train_step(step))
            done = step + 1
            if done % t.log_every == 0 or done % t.eval_every == 0 or done == end:
                last = self.log_window(done, window, time.time() - t_window, logger)
                bar.set_postfix(loss=f"{last['train/lm_loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
                window, t_window = [], time.time()
            if done % t.save_every == 0:
                self.save(done)
            if t.max_time_s and time.time() - t_start > t.max_time_s:
                break
        bar.close()
        return {"steps": done, "train_time_s": time.time() - t_start, "last": last}

    def log_window(self, done: int, window: list, seconds: float, logger: RunLogger) -> dict:
        tokens = self.global_batch * self.cfg.model.seq_len * len(window)
        record = {"step": done, **average_metrics(window), "lr": self.engine.get_lr()[0],
                  "tokens_per_s": tokens / seconds}
        if done % self.cfg.train.eval_every == 0:
            record["val/loss"], _ = self.evaluate("val", self.cfg.data.eval_batches)
            for message in self.health.check(done, record):  # router metrics of the training window
                if self.rank == 0:
                    tqdm.write(message)
        logger.log(record)
        return record

    def final_eval(self, fit: dict) -> dict:
        """Val and test loss on at most train.final_eval_tokens tokens per split (0: the whole split), spread
        evenly over it; bits per byte use the split's bytes per token."""
        tokens = self.cfg.train.final_eval_tokens
        max_batches = math.ceil(tokens / (self.micro * self.cfg.model.seq_len)) if tokens else None
        test_loss, test_tokens = self.evaluate("test", max_batches, progress=True)
        val_loss, val_tokens = self.evaluate("val", max_batches, progress=True)
        summary = {
            "steps": fit["steps"],
            "train_loss": fit["last"].get("train/lm_loss"),
            "val_loss": val_loss,
            "val_tokens": val_tokens,
            "test_loss": test_loss,
            "test_tokens": test_tokens,
            "test_ppl": math.exp(test_loss),
            "test_bits_per_byte": test_loss / math.log(2) / self.data.bytes_per_token("test"),
            "tokens_per_s": fit["last"].get("tokens_per_s"),
            "train_time_s": fit["train_time_s"],
            "params": self.model.num_params(),
            "active_params": self.model.num_params(active=True),
            "vocab_size": self.cfg.model.vocab_size,
        }
        return summary


def build_model(cfg: Config, init_from: str | None = None) -> Transformer:
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg)
    if init_from:
        load_weights(model, init_from)
    return model


def run(cfg: Config, ds_config: str | Path, out_dir: str | Path, resume: bool = False,
        init_from: str | None = None) -> dict:
    """Pre-train per cfg; returns the summary. Must run inside torch.distributed (see engine.init_distributed)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(out_dir)
    ds = reconcile_ds_config(read_ds_config(ds_config), cfg, world)
    data = load_data(cfg.data.source, rank)
    resolve_vocab(cfg, data.vocab_size)
    model = build_model(cfg, init_from)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.json")
        write_manifest(out_dir, "run", cfg.to_dict(), data.tokenizer().path, data=str(data.dir))
    engine = build_engine(model, cfg, ds)
    trainer = Trainer(engine, model, cfg, data, out_dir, rank, world)
    start = trainer.resume() if resume else 0
    logger = RunLogger(out_dir, cfg.to_dict(), rank == 0, cfg.train.wandb, cfg.train.wandb_project, start)
    fit = trainer.fit(start, logger)
    if fit["steps"] % cfg.train.save_every != 0 and fit["steps"] > start:
        trainer.save(fit["steps"])
    summary = trainer.final_eval(fit)
    logger.finish(summary)
    return summary
