"""Fine-tuning: sequence classification or continued causal-LM training on a task's rows (megavq.data.task), from a
model's weights, with the pre-training engine, checkpoints, resume and pre-emption (megavq.train.trainer).

What trains (finetune.trainable): all; no_router (X-MoE's recipe: the routers frozen); discrete_only (VQMoE's:
vq routes by its codes alone, one expert per token, the router frozen); no_experts; head (the classification
head, or the output head of a causal LM). Frozen parameters carry no optimizer state (the optimizer is built from
the trainable ones, megavq.train.engine.param_groups).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megavq.config import Config
from megavq.data.task import TaskData
from megavq.errors import ConfigError, MegavqError, check
from megavq.model import Transformer
from megavq.moe.dispatch import dispatcher_class
from megavq.store.model_dir import fit_weights
from megavq.train.engine import build_engine, prepare_model, zero_stage
from megavq.train.trainer import Trainer, drive, resolve_vocab, run

FROZEN = {"all": (), "no_router": (".router.",), "discrete_only": (".router.",), "no_experts": (".experts.",)}


def accuracy_f1(pred_N: torch.Tensor, gold_N: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """Accuracy and macro-F1 (the mean over the classes of 2TP / (2TP + FP + FN); a class absent from both: 0)."""
    pairs_CC = torch.zeros(num_classes, num_classes).index_put_((gold_N, pred_N), torch.ones(len(gold_N)),
                                                                accumulate=True)
    tp_C = pairs_CC.diagonal()
    f1_C = 2 * tp_C / (pairs_CC.sum(0) + pairs_CC.sum(1)).clamp(min=1)
    return (tp_C.sum() / max(len(gold_N), 1)).item(), f1_C.mean().item()


@torch.no_grad()
def score_task(model, data: TaskData, micro: int, device, max_batches: int | None = None) -> dict:
    """The validation rows of `data` scored by `model` (a Transformer or its engine), `micro` rows at a time:
    {"loss", "tokens"}, and {"accuracy", "macro_f1"} for classification."""
    total, count, preds, golds = 0.0, 0, [], []
    for i, (x, y, real_BS) in enumerate(data.eval_batches(micro)):
        if max_batches is not None and i == max_batches:
            break
        out = model(x.to(device), y.to(device), real_BS=real_BS.to(device))
        n = y.numel() if data.task == "classify" else int((y >= 0).sum())
        total, count = total + out.lm_loss.float().item() * n, count + n
        if data.task == "classify":
            preds.append(out.logits.argmax(-1).cpu())
            golds.append(y)
    result = {"loss": total / max(count, 1), "tokens": count}
    if preds:
        result["accuracy"], result["macro_f1"] = accuracy_f1(torch.cat(preds), torch.cat(golds), len(data.classes))
    return result


class FinetuneTrainer(Trainer):
    """The pre-training loop over a task's rows: its batches, its evaluation, its summary."""

    def micro_batch(self, step: int, rows: slice) -> dict:
        x, y, real_BS = self.data.batch(step, self.global_batch, self.cfg.train.seed, rows)
        return {"idx_BS": x, "targets_BS": y, "real_BS": real_BS}

    def resume_sampler(self, recorded: str, path) -> None:
        """Task rows are drawn by their own seeded epochs (megavq.data.task), not by data.sampler."""

    def save(self, step: int) -> None:
        f = self.cfg.finetune
        self.checkpoints.save(step, {"next_step": step, "global_batch": self.global_batch, "seed": self.cfg.train.seed,
                                     "task": f.task, "source": f.data})
        self.saved = step

    def evaluate(self, split: str, max_batches: int | None, progress: bool = False) -> dict:
        """Every rank scores every validation row: {"loss"}, and {"accuracy", "macro_f1"} for classification."""
        self.engine.eval()
        result = score_task(self.engine, self.data, self.micro, self.engine.device)
        self.engine.train()
        return result

    def loss_records(self, split: str, result: dict) -> dict:
        return {f"{split}/{k}": result[k] for k in ("loss", "accuracy", "macro_f1") if k in result}

    def final_eval(self, fit: dict) -> dict:
        val = self.evaluate("val", None, progress=True)
        return {"steps": fit["steps"], "task": self.cfg.finetune.task, "train_loss": fit["last"].get("train/lm_loss"),
                "val_loss": val["loss"], **{k: val[k] for k in ("accuracy", "macro_f1") if k in val},
                "classes": self.data.classes, "val_rows": len(self.data.rows["val"]),
                "train_rows": len(self.data), "tokens_per_s": fit["last"].get("tokens_per_s"),
                "train_time_s": fit["train_time_s"], "params": self.model.num_params(),
                "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}


def check_combination(cfg: Config, ds: dict) -> None:
    """Refuse what finetune.trainable does not support with this model, ZeRO stage and expert parallelism."""
    f, moe = cfg.finetune, cfg.moe
    check(f.trainable != "discrete_only" or (moe.every > 0 and moe.router == "vq"),
          f"finetune.trainable=discrete_only routes by vq's codes alone: the model's router is {moe.router}")
    check(f.trainable not in ("no_router", "discrete_only", "no_experts") or moe.every > 0,
          f"finetune.trainable={f.trainable} freezes part of the MoE layers: the model has none (moe.every=0)")
    deepspeed_moe = moe.every > 0 and dispatcher_class(moe.backend).deepspeed_moe
    check(moe.ep_size == 1 or not deepspeed_moe,
          f"moe.backend={moe.backend} exchanges capacity buffers of one size between expert-parallel ranks, and "
          f"padded rows give each rank its own number of tokens: fine-tune with moe.backend=native for "
          f"moe.ep_size={moe.ep_size}")
    moe_params = moe.every > 0 and (moe.ep_size > 1 or deepspeed_moe)  # DeepSpeed's MoE parameter groups
    check(f.trainable not in ("no_experts", "head") or not moe_params or zero_stage(ds) == 0,
          f"finetune.trainable={f.trainable} freezes the experts, which DeepSpeed's ZeRO stages 1-2 refuse for "
          f"its MoE parameters (moe.backend={moe.backend}, moe.ep_size={moe.ep_size}): use ZeRO stage 0 "
          f"(ds_configs/zero0.json)")
    check(f.trainable == "all" or zero_stage(ds) < 3,
          f"finetune.trainable={f.trainable} freezes parameters, which ZeRO stage 3 cannot checkpoint: use ZeRO "
          f"stage 0-2, or finetune.trainable=all")


def freeze(model: Transformer, cfg: Config) -> None:
    """Only what finetune.trainable trains keeps requires_grad; a classifier's unused, untied output head is frozen."""
    f, tied = cfg.finetune, cfg.model.tie_embeddings
    head = "score." if f.task == "classify" else "lm_head."
    for name, p in model.named_parameters():
        unused = f.task == "classify" and name.startswith("lm_head.") and not tied
        frozen = any(part in name for part in FROZEN.get(f.trainable, ())) or (f.trainable == "head"
                                                                                and not name.startswith(head))
        p.requires_grad_(not (unused or frozen))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"finetune.trainable={f.trainable} leaves nothing to train in this model")


def task_model(cfg: Config, sd: dict, num_classes: int) -> Transformer:
    """The model of cfg with the weights sd; a classification head of num_classes classes, new or from sd."""
    source = cfg.finetune.checkpoint
    head = sd.get("score.weight")
    if head is not None and cfg.finetune.task == "classify" and head.shape[0] != num_classes:
        raise ConfigError(f"the classification head of {source} has {head.shape[0]} classes, "
                          f"{cfg.finetune.data} has {num_classes}")
    cfg.model.num_classes = num_classes if cfg.finetune.task == "classify" else 0
    if cfg.finetune.trainable == "discrete_only":
        cfg.moe.router_options["discrete_only"] = True
    torch.manual_seed(cfg.train.seed)
    model = prepare_model(Transformer(cfg), cfg)
    head_sd = {k: v for k, v in model.state_dict().items() if k.startswith("score.")}  # new, or sd's below
    body_sd = {k: v for k, v in sd.items() if head_sd or not k.startswith("score.")}  # lm: a classifier's head dropped
    fit_weights(model, {**head_sd, **body_sd}, source)
    freeze(model, cfg)
    return model


def open_task(cfg: Config, tokenizer, rank: int) -> TaskData:
    """Rank 0 reads the data first (datasets' cache), then the others; a bad file is one line from every rank."""
    error, data = None, None
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            try:
                data = TaskData.open(cfg, tokenizer, cfg.train.seed)
            except MegavqError as e:
                error = str(e)
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise MegavqError(box[0])
    return data


def finetune(cfg: Config, sd: dict, tokenizer, ds_config: str | Path, out_dir: str | Path,
             resume: bool | str | None = None, overwrite: bool = False) -> dict:
    """Fine-tune the weights sd (a model of cfg, read from cfg.finetune.checkpoint) on cfg.finetune's task; the
    summary. tokenizer: encode(text) -> ids, eos_id, vocab_size, path. Runs inside torch.distributed."""
    def body(cfg, ds, out_dir, resume, _init_from, attempt):
        rank, world = dist.get_rank(), dist.get_world_size()
        check_combination(cfg, ds)
        data = open_task(cfg, tokenizer, rank)
        resolve_vocab(cfg, tokenizer.vocab_size)
        model = task_model(cfg, sd, len(data.classes))
        engine = build_engine(model, cfg, ds)
        trainer = attempt["trainer"] = FinetuneTrainer(engine, model, cfg, data, out_dir, rank, world)
        start = trainer.resume(resume) if resume else 0
        if rank == 0:
            print(f"fine-tuning {cfg.finetune.task} on {len(data)} rows ({len(data.rows['val'])} validation), "
                  f"{sum(p.numel() for p in model.parameters() if p.requires_grad)} trainable parameters",
                  file=sys.stderr, flush=True)
        return drive(trainer, start, tokenizer.path, cfg.finetune.data)
    return run(cfg, ds_config, out_dir, resume, overwrite=overwrite, body=body)
