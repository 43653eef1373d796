"""Export a checkpoint as a portable megavq model directory or as a Hugging Face model.

    python scripts/export.py --checkpoint PATH --out DIR [--format megavq|hf] [--remote_code] [--tokenizer MODEL]

PATH: a run directory (newest checkpoint), a checkpoint or model directory, or a Hugging Face model directory.
  megavq  model.safetensors + config.json, loadable with megavq.load_model on one CPU process
  hf      for transformers, with the same logits, the tokenizer (tokenizer.json: SentencePiece's ids) and a
          generation config that stops at its end-of-document id. The architecture follows the routers'
          declarations: a Llama-family backbone (RMSNorm, RoPE, SwiGLU) dense as Llama (Qwen2 when only q/k/v have
          biases); routed as softmax top-k at evaluation (topk, compete) in every block and renormalised as
          Mixtral, otherwise as Qwen2-MoE. With --remote_code, any other causal model (vq, xmoe, usmoe with token
          selection, LayerNorm, learned positions, GELU) gets its own modelling code, loaded with
          AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
The tokenizer is the checkpoint's own (its manifest); --tokenizer gives one where the checkpoint records none.
"""
import argparse

from megavq.train.launch import user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run, checkpoint or model directory (megavq or Hugging Face)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("megavq", "hf"), default="megavq")
    p.add_argument("--remote_code", action="store_true",
                   help="hf: write models that no transformers architecture holds with their own modelling code")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's own)")
    p.add_argument("--max_shard_size", default="5GB", help="hf: the largest safetensors shard (e.g. 2GB)")
    p.add_argument("--plugin", action="append", default=[],
                   help="a .py file or module that registers routers or dispatchers (repeatable)")
    return p.parse_args()


def export_tokenizer(args, hf_input: bool):
    """--tokenizer, else the checkpoint's own (None for a Hugging Face input or a checkpoint without one)."""
    from megavq.store.model_dir import model_tokenizer
    return args.tokenizer or (None if hf_input else model_tokenizer(args.checkpoint))


def main():
    args = parse_args()
    with user_errors():
        from megavq.convert.hf.export import export_kind, save_hf
        from megavq.convert.load import load_model
        from megavq.errors import MegavqError
        from megavq.plugins import load_plugins
        from megavq.store.model_dir import is_hf_dir, load_config_file, resolve_model_dir, save_model
        load_plugins(args.plugin)
        model = load_model(args.checkpoint)
        hf_input = is_hf_dir(args.checkpoint)
        tokenizer = export_tokenizer(args, hf_input)
        if args.format == "hf":
            kind = export_kind(model, args.remote_code)  # refuses before the tokenizer is asked for
            if tokenizer is None:
                raise MegavqError(f"{args.checkpoint} records no tokenizer (a format-0 checkpoint, or a model imported "
                                  f"from Hugging Face): pass its SentencePiece model with --tokenizer PATH")
            save_hf(model, args.out, tokenizer, args.remote_code, args.max_shard_size)
        else:  # keep the checkpoint's own config (backend, ep_size), not the single-process one used to load it
            kind = "megavq"
            cfg = model.cfg if hf_input else load_config_file(resolve_model_dir(args.checkpoint))
            save_model(model.state_dict(), cfg, args.out, tokenizer)
    what = f"{model.cfg.moe.router} {model.cfg.moe.num_experts}-expert MoE" if model.cfg.moe.every else "dense"
    own_code = " with its own modelling code" if args.format == "hf" and kind == "megavq" else ""
    print(f"exported {args.checkpoint} ({what}, {model.num_params():,} parameters) -> {args.out} "
          f"({args.format}: {kind}{own_code})")


if __name__ == "__main__":
    main()
