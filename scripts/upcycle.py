"""Upcycle a dense model (megavq or Hugging Face Llama/Mistral/Qwen2/GPT-2) into a sparse MoE model.

    python scripts/upcycle.py --dense PATH --out DIR --num_experts 8 --top_k 2 --router topk [--every 2]
        [--calib_data builtin|DIR] [--calib_tokens 8192] [--noise S] [--drop R] [--granularity G] [--seed N]
        [key=value ...]

Every --every-th MLP (default every other block, starting with the second) becomes an MoE layer of exact
copies; the router is new (vq: k-means codebook from the dense model's hidden states on --calib_data).
Variants: --noise S (Gaussian noise of S x the dense tensor's std on each copy), --drop R (Drop-Upcycling: a seeded
fraction R of each expert's hidden units re-initialised), --granularity G (each expert 1/G of the dense MLP;
--num_experts and --top_k count these finer experts). See docs/upcycling.md.
Continue with: deepspeed scripts/pretrain.py --ds_config ds_configs/zero2.json --init_from DIR
"""
import argparse

from megavq.train.launch import user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="megavq model/checkpoint/run directory or Hugging Face model dir")
    p.add_argument("--out", required=True, help="output megavq model directory")
    p.add_argument("--num_experts", type=int, required=True)
    p.add_argument("--top_k", type=int, required=True)
    p.add_argument("--router", required=True, help="router name, e.g. topk, xmoe, compete, vq")
    p.add_argument("--every", type=int, default=2, help="MoE in every N-th block (moe.every; default 2)")
    p.add_argument("--calib_data", default="builtin", help="'builtin' or a tokenized data directory (vq only)")
    p.add_argument("--calib_tokens", type=int, default=8192, help="tokens of calibration data for k-means")
    p.add_argument("--noise", type=float, default=0.0, help="noise std on the copies, times the dense tensor's std")
    p.add_argument("--drop", type=float, default=0.0, help="Drop-Upcycling: fraction of hidden units re-initialised")
    p.add_argument("--granularity", type=int, default=1, help="split each dense MLP into this many experts")
    p.add_argument("--seed", type=int, default=None, help="seed of the noise and dropped units (default train.seed)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. moe.router_options.num_codes=16")
    return p.parse_intermixed_args()


def main():
    args = parse_args()
    with user_errors():
        from megavq.convert.load import load_model
        from megavq.convert.upcycle import (
            Recipe,
            calibration_batches,
            needs_calibration,
            preserves_function,
            upcycle,
            upcycle_config,
        )
        from megavq.store.model_dir import is_hf_dir, model_tokenizer, save_model
        dense = load_model(args.dense)
        cfg = upcycle_config(dense.cfg, args.num_experts, args.top_k, args.router, args.every, args.overrides,
                             args.granularity)
        recipe = Recipe(args.noise, args.drop, args.granularity, cfg.train.seed if args.seed is None else args.seed)
        batches = None
        if needs_calibration(cfg):
            m = dense.cfg.model
            batches = calibration_batches(args.calib_data, m.vocab_size, m.seq_len, args.calib_tokens)
        model, report = upcycle(dense, cfg, batches, args.calib_tokens, recipe)
        save_model(model.state_dict(), cfg, args.out, None if is_hf_dir(args.dense) else model_tokenizer(args.dense),
                   upcycled={"dense": str(args.dense), **recipe.to_dict()})
    print(f"upcycled {args.dense} -> {args.out}: MoE blocks {report['moe_layers']}, {cfg.moe.num_experts} experts, "
          f"top-{cfg.moe.top_k} {cfg.moe.router}; {model.num_params():,} parameters "
          f"({model.num_params(active=True):,} active, dense {dense.num_params():,})")
    for block, used in report["code_usage"].items():
        print(f"block {block}: k-means codebook uses {used:.0%} of its codes on the calibration data")
    same = ("the dense function" if preserves_function(report) else
            "NOT the dense function: noise or dropped units, or the router's weights do not sum to 1 per token "
            "(see docs/upcycling.md)")
    print(f"step 0: max |logit - dense logit| = {report['max_logit_diff']:.2e} "
          f"(logits up to {report['logit_scale']:.2f}): {same}")


if __name__ == "__main__":
    main()
