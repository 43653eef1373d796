"""Memory and time of saving and resuming a checkpoint, per rank, with 1, 2 and 4 gloo ranks (CPU).

    python scripts/bench_checkpoint.py [--ranks 1,2,4] [--out /tmp/bench_ckpt] [--ds_config ds_configs/zero2.json]
        [key=value ...]

Default model: 107 M parameters (4 layers, d_model 512, 16 experts of hidden 1024 in every layer), fp32,
ZeRO-2, moe.ep_size = ranks, one thread per rank. Each rank trains 2 steps on random tokens (its optimizer
state exists then), takes its plateau (VmRSS), resets its peak (`echo 5 > /proc/self/clear_refs`), saves, reads
VmHWM; resets again, resumes from that checkpoint into the same engine, reads VmHWM. Then it builds a fresh
engine, resumes into it (peak reset before) and trains one step: "fresh resume" is that resume's peak over the
plateau after the step (negative: the resume peaks below the training plateau); "same state": the fresh engine
then holds the saved fp32 weights, moments and Adam step (sums compared). The limit is 1.2 x the bytes of state
the rank owns (the fp32 master weights and Adam moments it writes, and the buffers) + 256 MB.
"""
import argparse
import gc
import os
import shutil
import time
from pathlib import Path

MODEL = ["model.n_layers=4", "model.d_model=512", "model.n_heads=8", "model.seq_len=64", "model.vocab_size=4096",
         "moe.num_experts=16", "moe.d_expert=1024", "moe.top_k=2", "data.micro_batch_size=2"]
MB = 1 << 20


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rank_main(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    import torch
    import torch.distributed as dist
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megavq.compat import deepspeed as ds_compat
    from megavq.config import load_config
    from megavq.model import Transformer
    from megavq.train.checkpoint import Checkpointer
    from megavq.train.fragments import owned_entries
    from megavq.train.engine import build_engine, init_distributed, read_ds_config, reconcile_ds_config
    init_distributed()
    cfg = load_config("tiny", [*MODEL, f"moe.ep_size={world}", *args.overrides])
    ds = reconcile_ds_config(read_ds_config(args.ds_config), cfg, world)
    g = torch.Generator().manual_seed(rank)

    def train(engine, steps):
        for _ in range(steps):
            x = torch.randint(cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.model.seq_len + 1), generator=g)
            out = engine(x[:, :-1], x[:, 1:])
            engine.backward(out.loss)
            engine.step()
    torch.manual_seed(0)
    model = Transformer(cfg)
    params = model.num_params()  # before ZeRO-3 partitions the parameters
    engine = build_engine(model, cfg, ds)
    train(engine, 2)
    ckpt = Checkpointer(engine, model, cfg, Path(args.out), rank, world)
    def state():  # (bytes, sum) of what this rank owns and writes
        entries = [t for _, t in owned_entries(engine, ckpt.layout, rank, world, cfg.moe.ep_size)]
        return sum(t.numel() * t.element_size() for t in entries), sum(t.double().sum().item() for t in entries)
    owned, total = state()
    row = {"rank": rank, "params": params, "owned": owned, "adam_step": ds_compat.adam_step(engine)}
    dist.barrier()
    reset_peak()
    row["plateau"] = status("VmRSS")
    t = time.time()
    ckpt.save(2, {"next_step": 2})
    row["save_s"], row["save_peak"] = time.time() - t, status("VmHWM")
    dist.barrier()
    reset_peak()
    plateau2 = status("VmRSS")
    t = time.time()
    ckpt.resume("strict")
    row["resume_s"], row["resume_peak"], row["plateau2"] = time.time() - t, status("VmHWM"), plateau2
    dist.barrier()
    del ckpt, engine, model
    model = Transformer(cfg)
    engine = build_engine(model, cfg, ds)
    ckpt = Checkpointer(engine, model, cfg, Path(args.out), rank, world)
    dist.barrier()
    reset_peak()
    ckpt.resume("strict")
    row["fresh_peak"] = status("VmHWM")
    row["same"] = state()[1] == total and ds_compat.adam_step(engine) == row["adam_step"]
    train(engine, 1)
    gc.collect()
    row["plateau3"] = status("VmRSS")
    dist.barrier()
    results.put(row)
    dist.destroy_process_group()


def run(world: int, args) -> list[dict]:
    import multiprocessing as mp

    from megavq.train.launch import free_port
    shutil.rmtree(args.out, ignore_errors=True)
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    rows = sorted((results.get(timeout=1800) for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--out", default="/tmp/megavq_bench_ckpt")
    p.add_argument("--ds_config", default=str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"))
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    print("ranks | rank | state owned MB | plateau MB | save +MB | resume +MB | fresh resume +MB | limit MB | "
          "save s | resume s | same state | ok")
    for world in map(int, args.ranks.split(",")):
        for r in run(world, args):
            limit = 1.2 * r["owned"] + 256 * MB
            save, resume = r["save_peak"] - r["plateau"], r["resume_peak"] - r["plateau2"]
            fresh = r["fresh_peak"] - r["plateau3"]
            ok = max(save, resume, fresh) <= limit
            print(f"{world:5d} | {r['rank']:4d} | {r['owned'] / MB:14.0f} | {r['plateau'] / MB:10.0f} | "
                  f"{save / MB:8.1f} | {resume / MB:10.1f} | {fresh / MB:16.1f} | {limit / MB:8.0f} | "
                  f"{r['save_s']:6.1f} | {r['resume_s']:8.1f} | {'yes' if r['same'] else 'NO':>10} | "
                  f"{'yes' if ok else 'NO'}", flush=True)
        print(f"      ({r['params'] / 1e6:.0f} M parameters)", flush=True)
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
