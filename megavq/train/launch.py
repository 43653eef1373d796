"""Process start-up shared by the scripts: distributed defaults for a plain `python` run, one-line errors."""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager

from megavq.errors import MegavqError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Let `python script.py` run as a world of one when no launcher (deepspeed, torchrun) set the env."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


@contextmanager
def user_errors():
    """Print a MegavqError as `error: <message>` (once, from rank 0) and exit with status 2; either way, shut
    torch.distributed down cleanly (an exit with a live gloo group can abort the process)."""
    import torch.distributed as dist
    try:
        yield
    except MegavqError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
