"""Generate text from a megavq checkpoint: each prompt is printed with its continuation.

    python scripts/generate.py --checkpoint RUN_OR_CHECKPOINT --prompt TEXT [--prompt TEXT ...]
        [--prompts_file FILE] [--max_new_tokens 64] [--temperature 0.8] [--top_k 50] [--top_p 0.95]
        [--seed 0] [--greedy] [--tokenizer PATH]

--tokenizer defaults to the checkpoint's own (the copy its manifest records; for older checkpoints the
tokenizer of the data it was trained on). The same seed gives the
same text. Runs on a GPU when there is one.
"""
import argparse
from pathlib import Path

from megavq.train.launch import user_errors


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model, checkpoint or run directory (newest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts_file", default=None, help="a text file, one prompt per line (blank lines skipped)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top_p", type=float, default=0.95, help="... and the most likely ones reaching this probability")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="always the most likely token")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the checkpoint's own)")
    return p.parse_args()


def read_prompts(args) -> list:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    return prompts


def main():
    args = parse_args()
    with user_errors():
        import torch

        import megavq
        from megavq.data import Tokenizer
        from megavq.errors import MegavqError
        from megavq.store.model_dir import checkpoint_tokenizer, is_hf_dir, model_tokenizer
        prompts = read_prompts(args)
        if not prompts:
            raise MegavqError("no prompt: pass --prompt TEXT or --prompts_file FILE")
        model = megavq.load_model(args.checkpoint).to("cuda" if torch.cuda.is_available() else "cpu")
        recorded = None if is_hf_dir(args.checkpoint) else model_tokenizer(args.checkpoint)
        tok = Tokenizer(args.tokenizer or checkpoint_tokenizer(model.cfg, recorded))
        if tok.vocab_size != model.cfg.model.vocab_size:
            raise MegavqError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model "
                              f"{model.cfg.model.vocab_size}: pass the right one with --tokenizer")
        new = model.generate([tok.encode(p) for p in prompts], args.max_new_tokens, eos_id=tok.eos_id,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             greedy=args.greedy, seed=args.seed)
        for i, (prompt, ids) in enumerate(zip(prompts, new)):
            print(f"--- {i + 1}: {len(ids)} new tokens ---\n{prompt}{tok.decode(ids)}\n")


if __name__ == "__main__":
    main()
