"""Put another kind of router in front of a trained MoE model's experts (megavq or Hugging Face Mixtral/Qwen2-MoE).

    python scripts/swap_router.py --model PATH --out DIR --router NAME[:OPTION=VALUE,...] [--data builtin|DIR]
        [--calib_tokens 8192] [--fit_steps 200] [--fit_lr 1e-2] [--distil_steps 0] [--distil_lr 1e-3]
        [--batch_size 8] [--eval_batches 8] [--seed 0] [key=value ...]

Everything but the routers is kept. The new routers are built from the hidden states entering each MoE layer on
--calib_tokens tokens of the train split of --data (default the model's data.source) and the old routers' routing
of them (vq: k-means codebook, each code mapped to the expert the old router prefers in its cell; then every
router's parameters are fitted to the old routing for --fit_steps Adam steps); then, with --distil_steps N, only
the router parameters train for N batches on the old model's routing of the same tokens. Prints the agreement with
the old routing (top-1, top-k overlap) and the loss on --eval_batches batches of the val split before and after.
Continue with: deepspeed scripts/pretrain.py --ds_config ds_configs/zero2.json --init_from DIR
"""
import argparse

from megavq.train.launch import user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="megavq model/checkpoint/run directory or Hugging Face MoE dir")
    p.add_argument("--out", required=True, help="output megavq model directory")
    p.add_argument("--router", required=True, help="NAME[:OPTION=VALUE,...], e.g. vq:num_codes=16 or xmoe")
    p.add_argument("--data", default=None, help="'builtin' or a tokenized data directory (default: data.source)")
    p.add_argument("--calib_tokens", type=int, default=8192, help="tokens of hidden states to build the routers from")
    p.add_argument("--fit_steps", type=int, default=200, help="Adam steps fitting each router to the old routing")
    p.add_argument("--fit_lr", type=float, default=1e-2)
    p.add_argument("--distil_steps", type=int, default=0, help="batches of router-only distillation (0: none)")
    p.add_argument("--distil_lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--eval_batches", type=int, default=8, help="batches of the val split for the held-out figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the saved config, e.g. train.lr=1e-4")
    return p.parse_intermixed_args()


def main():
    args = parse_args()
    with user_errors():
        from megavq.convert.load import load_model
        from megavq.convert.swap import (
            parse_router_spec,
            routed_config,
            swap_and_distil,
        )
        from megavq.errors import MegavqError
        from megavq.store.model_dir import is_hf_dir, model_tokenizer, save_model
        for key in ("calib_tokens", "batch_size", "eval_batches"):
            if getattr(args, key) < 1:
                raise MegavqError(f"--{key} must be >= 1, got {getattr(args, key)}")
        old = load_model(args.model)
        name, options = parse_router_spec(args.router)
        cfg = routed_config(old.cfg, name, options, overrides=args.overrides)
        new, report = swap_and_distil(old, cfg, args.data or old.cfg.data.source, args.calib_tokens, args.fit_steps,
                                      args.fit_lr, args.distil_steps, args.distil_lr, args.batch_size,
                                      args.eval_batches, args.seed)
        save_model(new.state_dict(), cfg, args.out, None if is_hf_dir(args.model) else model_tokenizer(args.model),
                   swapped={"model": str(args.model), "from": old.cfg.moe.router, "router": args.router, **report})
    print(f"swapped {args.model} ({old.cfg.moe.router}) -> {args.out} ({args.router}); held-out loss of the original "
          f"model {report['original_loss']:.4f}")
    for stage in ("before", "after"):
        r = report[stage]
        if r:
            print(f"{stage} distillation: held-out loss {r['loss']:.4f}  top-1 agreement {mean(r['top1']):.3f}  "
                  f"top-k overlap {mean(r['topk']):.3f}  (per layer top-1 "
                  f"{' '.join(f'{a:.3f}' for a in r['top1'])})")


def mean(values: list) -> float:
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
