"""Export a checkpoint as a portable megavq model directory or as a Hugging Face model.

    python scripts/export.py --checkpoint PATH --out DIR [--format megavq|hf]

PATH: a run directory (newest checkpoint), a checkpoint or model directory, or a Hugging Face model directory.
  megavq  model.safetensors + config.json, loadable with megavq.load_model on one CPU process
  hf      a Llama-family backbone (RMSNorm, RoPE, SwiGLU) for transformers, with the same logits: dense as Llama
          (Qwen2 when only q/k/v have biases); top-k MoE in every block, renormalised, as Mixtral; any other
          top-k MoE (MoE every n-th block, Switch top-1, q/k/v biases) as Qwen2-MoE
"""
import argparse
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not scripts/ (tokenize.py is there)

from megavq.train.launch import user_errors  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run, checkpoint or model directory (megavq or Hugging Face)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("megavq", "hf"), default="megavq")
    p.add_argument("--plugin", action="append", default=[],
                   help="a .py file or module that registers routers or dispatchers (repeatable)")
    return p.parse_args()


def main():
    args = parse_args()
    with user_errors():
        from megavq.hf import is_hf_dir, save_hf
        from megavq.io import load_config_file, load_model, model_tokenizer, resolve_model_dir, save_model
        from megavq.plugins import load_plugins
        load_plugins(args.plugin)
        model = load_model(args.checkpoint)
        if args.format == "hf":
            save_hf(model, args.out)
        else:  # keep the checkpoint's own config (backend, ep_size), not the single-process one used to load it
            hf = is_hf_dir(args.checkpoint)
            cfg = model.cfg if hf else load_config_file(resolve_model_dir(args.checkpoint))
            save_model(model.state_dict(), cfg, args.out, None if hf else model_tokenizer(args.checkpoint))
    kind = f"{model.cfg.moe.num_experts}-expert MoE" if model.cfg.moe.every else "dense"
    print(f"exported {args.checkpoint} ({kind}, {model.num_params():,} parameters) -> {args.out} ({args.format})")


if __name__ == "__main__":
    main()
