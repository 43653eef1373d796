"""Every rank's CPU and CUDA random-number generator states, as checkpoints record them (base64 in the manifest)."""
from __future__ import annotations

import torch

from megavq.store.shards import b64_of_tensor, tensor_of_b64


def rng_state() -> dict:
    cuda = [b64_of_tensor(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"cpu": b64_of_tensor(torch.get_rng_state()), "cuda": cuda}


def set_rng_state(states: list[dict], rank: int) -> None:
    """This rank's saved RNG state (rank r of a run with fewer ranks takes rank r % saved ranks)."""
    if not states:
        return
    mine = states[rank] if rank < len(states) else states[rank % len(states)]
    torch.set_rng_state(tensor_of_b64(mine["cpu"]))
    if mine.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor_of_b64(s) for s in mine["cuda"]][:torch.cuda.device_count()])
