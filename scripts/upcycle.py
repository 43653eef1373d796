"""Upcycle a dense model (megavq or Hugging Face Llama/Mistral/Qwen2/GPT-2) into a sparse MoE model.

    python scripts/upcycle.py --dense PATH --out DIR --num_experts 8 --top_k 2 --router topk [--every 2]
        [--calib_data builtin|DIR] [--calib_tokens 8192] [key=value ...]

Every --every-th MLP (default every other block, starting with the second) becomes an MoE layer of exact
copies; the router is new (vq: k-means codebook from the dense model's hidden states on --calib_data).
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
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. moe.router_options.num_codes=16")
    return p.parse_intermixed_args()


def main():
    args = parse_args()
    with user_errors():
        from megavq.convert.load import load_model
        from megavq.convert.upcycle import (
            calibration_batches,
            needs_calibration,
            preserves_function,
            upcycle,
            upcycle_config,
        )
        from megavq.store.model_dir import is_hf_dir, model_tokenizer, save_model
        dense = load_model(args.dense)
        cfg = upcycle_config(dense.cfg, args.num_experts, args.top_k, args.router, args.every, args.overrides)
        batches = None
        if needs_calibration(cfg):
            m = dense.cfg.model
            batches = calibration_batches(args.calib_data, m.vocab_size, m.seq_len, args.calib_tokens)
        model, report = upcycle(dense, cfg, batches, args.calib_tokens)
        save_model(model.state_dict(), cfg, args.out, None if is_hf_dir(args.dense) else model_tokenizer(args.dense))
    print(f"upcycled {args.dense} -> {args.out}: MoE blocks {report['moe_layers']}, {cfg.moe.num_experts} experts, "
          f"top-{cfg.moe.top_k} {cfg.moe.router}; {model.num_params():,} parameters "
          f"({model.num_params(active=True):,} active, dense {dense.num_params():,})")
    for block, used in report["code_usage"].items():
        print(f"block {block}: k-means codebook uses {used:.0%} of its codes on the calibration data")
    same = ("the dense function" if preserves_function(report) else
            "NOT the dense function: the router's weights do not sum to 1 per token (see docs/upcycling.md)")
    print(f"step 0: max |logit - dense logit| = {report['max_logit_diff']:.2e} "
          f"(logits up to {report['logit_scale']:.2f}): {same}")


if __name__ == "__main__":
    main()
