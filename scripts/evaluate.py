"""Evaluate a megavq checkpoint: loss, perplexity, bits per byte, routing diagnostics, robustness, top-k sweep.

    python scripts/evaluate.py --checkpoint RUN_OR_CHECKPOINT [--data builtin|DIR|DIR@W,...] [--split test] [--out DIR]
        [--max_batches N] [--compare CHECKPOINT_OR_RUN] [--router NAME[:OPTION=VALUE,...]]
        [--budget_sweep [0.125,0.25,0.5,0.75,1]] [--sweep_router usmoe[:OPTION=VALUE,...]]

--data defaults to the data the checkpoint was trained on (its config's data.source); data encoded with
another tokenizer than the checkpoint's is refused. Runs on a GPU when there is one. Writes eval.json, eval.md
and PNG figures into --out (default: <checkpoint>/eval); data of several sources adds each one's figures and the
routing by domain. With --compare, the routing consistency with another checkpoint, or with every checkpoint of
a run directory. With --router, the routers are rebuilt as another kind (experts kept, nothing trained; refused
where the new router needs trained tensors the model lacks). With --budget_sweep, the loss of --sweep_router
(usmoe) at each budget against experts per token. A fine-tuned classifier is scored on its task's validation rows:
loss, accuracy, macro-F1. See docs/evaluation.md.
"""
import argparse
from pathlib import Path

from megavq.train.launch import user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model, checkpoint or run directory (newest checkpoint)")
    p.add_argument("--data", default=None, help="'builtin', a directory made by scripts/prepare_data.py, "
                                                  "megatron:PREFIX (with the checkpoint's data.tokenizer and "
                                                  "data.split), or a mixture DIR@W,DIR@W (default: the "
                                                  "checkpoint's data.source)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", default=None, help="output directory (default: <checkpoint dir>/eval)")
    p.add_argument("--max_batches", type=int, default=None, help="evaluate on this many batches (default: all)")
    p.add_argument("--batch_size", type=int, default=0, help="sequences per batch (default: data.micro_batch_size)")
    p.add_argument("--diag_tokens", type=int, default=2048, help="tokens for the routing diagnostics")
    p.add_argument("--noise", type=float, default=0.01, help="routing stability noise, relative to the token rms")
    p.add_argument("--seed", type=int, default=0, help="seed of the corrupted tokens and the noise")
    p.add_argument("--compare", default=None, help="another checkpoint, or a run directory to walk")
    p.add_argument("--router", default=None,
                   help="evaluate with the routers rebuilt as NAME[:OPTION=VALUE,...], e.g. usmoe:budget=0.5")
    p.add_argument("--budget_sweep", nargs="?", const="0.125,0.25,0.5,0.75,1", default=None,
                   help="comma-separated budgets of the sweep router (default 0.125,0.25,0.5,0.75,1)")
    p.add_argument("--sweep_router", default="usmoe", help="the router of the budget sweep, NAME[:OPTION=VALUE,...]")
    p.add_argument("--plugin", action="append", default=[],
                   help="a .py file or module that registers routers or dispatchers (repeatable)")
    return p.parse_args()


def main():
    args = parse_args()
    with user_errors():
        from megavq.errors import MegavqError
        from megavq.eval import evaluate, write_report
        from megavq.plugins import load_plugins
        from megavq.store.model_dir import is_hf_dir, resolve_model_dir
        load_plugins(args.plugin)
        if args.max_batches is not None and args.max_batches < 1:
            raise MegavqError(f"--max_batches must be >= 1, got {args.max_batches}")
        if args.compare and not (Path(args.compare) / "checkpoints").is_dir():
            resolve_model_dir(args.compare)  # fail before the evaluation, not after
        budgets = parse_budgets(args.budget_sweep)
        model_dir = Path(args.checkpoint) if is_hf_dir(args.checkpoint) else resolve_model_dir(args.checkpoint)
        result = evaluate(model_dir, args.data, args.split, args.max_batches, args.batch_size, args.diag_tokens,
                          args.noise, args.seed, compare=args.compare, router=args.router, budgets=budgets,
                          sweep_router=args.sweep_router)
        paths = write_report(result, args.out or model_dir / "eval")
        if result.get("task") == "classify":
            print(f"{result['data']} ({result['split']}, {result['rows']} rows): loss {result['loss']:.4f}  "
                  f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}")
            print("wrote " + ", ".join(str(p) for p in paths))
            return
        bpb = "-" if result["bits_per_byte"] is None else f"{result['bits_per_byte']:.4f}"
        print(f"{result['data']} ({result['split']}): loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
              f"bits/byte {bpb}")
        for d in (result["domains"] or {}).get("layers", []):
            print(f"layer {d['layer']}: I(source; expert) = {d['mutual_information']:.4f} nats")
        if result["budget_sweep"]:
            print_sweep(result["budget_sweep"])
        print("wrote " + ", ".join(str(p) for p in paths))


def parse_budgets(text: str | None) -> list[float] | None:
    from megavq.errors import MegavqError
    if text is None:
        return None
    try:
        budgets = [float(b) for b in text.split(",")]
    except ValueError:
        raise MegavqError(f"--budget_sweep {text!r}: expected comma-separated numbers in (0, 1]") from None
    if not all(0 < b <= 1 for b in budgets):
        raise MegavqError(f"--budget_sweep {text!r}: budgets must be in (0, 1]")
    return budgets


def print_sweep(sweep: dict) -> None:
    print(f"budget sweep of {sweep['router']}" + ("" if sweep["causal"] else " (global selection: sees later tokens)"))
    for p in sweep["points"]:
        print(f"  budget {p['budget']:<6g} experts/token {p['experts_per_token']:.3f}  loss {p['loss']:.4f}")
    o = sweep["original"]
    print(f"  {o['router']} (original) experts/token {o['experts_per_token']:.3f}  loss {o['loss']:.4f}")


if __name__ == "__main__":
    main()
