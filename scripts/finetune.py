"""Fine-tune a megavq model (a model, checkpoint or run directory, an upcycled model) or an imported Hugging Face
model: sequence classification or continued causal-LM training on a task's text, with DeepSpeed.

    deepspeed scripts/finetune.py --ds_config ds_configs/zero2.json --checkpoint runs/tiny --task classify
        --data task.jsonl [--text_column text] [--label_column label] --out_dir runs/tiny-task
        [--resume | --resume auto | --overwrite] [--tokenizer PATH] [key=value ...]

--data: a .jsonl/.json, .csv or .parquet file, or a dataset name (datasets.load_dataset); without a validation split
finetune.val_fraction of the rows are held out (seeded by train.seed). Options as key=value: finetune.trainable=
all|no_router|discrete_only|no_experts|head, model.pool=last|mean, train.max_steps, train.lr, data.micro_batch_size,
... (docs/finetuning.md). Exit codes as scripts/pretrain.py.
"""
import argparse
import json
from pathlib import Path

from megavq.plugins import load_plugins
from megavq.train.launch import add_run_arguments, parse_run_args, single_process_env, user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, "finetune.trainable=no_router")
    p.add_argument("--checkpoint", required=True, help="a megavq model/checkpoint/run directory or a Hugging Face one")
    p.add_argument("--task", required=True, choices=("classify", "lm"))
    p.add_argument("--data", required=True, help="a .jsonl/.json, .csv or .parquet file, or a dataset name")
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="label")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's own)")
    args = parse_run_args(p)
    if args.out_dir is None:
        p.error("the following arguments are required: --out_dir")
    return args


def tokenizer_path(checkpoint: str, cfg, given: str | None) -> Path:
    """--tokenizer, else the checkpoint's own: its recorded copy, a Hugging Face directory's tokenizer.model."""
    from megavq.errors import MegavqError
    from megavq.store.model_dir import checkpoint_tokenizer, is_hf_dir, model_tokenizer
    if given:
        return Path(given)
    if not is_hf_dir(checkpoint):
        return checkpoint_tokenizer(cfg, model_tokenizer(checkpoint))
    if not (Path(checkpoint) / "tokenizer.model").is_file():
        raise MegavqError(f"{checkpoint} has no SentencePiece tokenizer.model: give one with --tokenizer")
    return Path(checkpoint) / "tokenizer.model"


def main():
    args = parse_args()
    with user_errors():
        load_plugins(args.plugin)
        from megavq.config import with_overrides
        from megavq.convert.load import read_model
        from megavq.data import Tokenizer
        cfg, sd = read_model(args.checkpoint)
        tokenizer = Tokenizer(tokenizer_path(args.checkpoint, cfg, args.tokenizer))
        task = [f"finetune.task={args.task}", f"finetune.checkpoint={args.checkpoint}", f"finetune.data={args.data}",
                f"finetune.text_column={args.text_column}", f"finetune.label_column={args.label_column}"]
        cfg = with_overrides(cfg, task + args.overrides)
        single_process_env()
        from megavq.train.engine import init_distributed
        from megavq.train.finetune import finetune
        rank, _ = init_distributed(cfg.train.dist_timeout_s)
        summary = finetune(cfg, sd, tokenizer, args.ds_config, args.out_dir, resume=args.resume,
                           overwrite=args.overwrite)
        if rank == 0:
            print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
