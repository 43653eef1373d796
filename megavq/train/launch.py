"""Process start-up shared by the scripts: distributed defaults for a plain `python` run or `srun` tasks,
one-line errors and the exit codes a requeue loop reads (megavq.errors: 0 done, 2 bad input or a first
non-finite loss, 3 fatal, 75 retryable: pre-empted after saving, a lost rank, a collective timeout)."""
from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from contextlib import contextmanager

from megavq.errors import EXIT_FATAL, EXIT_RETRY, EXIT_USAGE, FatalError, MegavqError, RetryableError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[03-05,09],cpu1" -> "gpu03")."""
    m = re.match(r"([^\[,]+)(?:\[([^\],-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def slurm_env(env=os.environ) -> dict:
    """The torch.distributed variables of an `srun` task (one task per rank), or {} outside such a step."""
    if "RANK" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1")) < 2:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": env.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0],
            "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": env.get("MASTER_PORT", "29500")}


def single_process_env() -> None:
    """Let `python script.py` run as a world of one when no launcher (deepspeed, torchrun, srun) set the env."""
    os.environ.update(slurm_env())
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


_LOST = ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out", "Broken pipe",
         "NCCL communicator was aborted", "NCCL error")


def lost_rank(e: BaseException) -> bool:
    """A collective that failed because another rank died or hung (retryable), not a bug."""
    import torch.distributed as dist
    return isinstance(e, getattr(dist, "DistError", ())) or (isinstance(e, RuntimeError)
                                                             and any(m in str(e) for m in _LOST))


def exit_code(e: BaseException) -> int:
    """The exit code of a script that ends with exception `e` (1: a bug or an unexpected error)."""
    if isinstance(e, RetryableError) or (isinstance(e, Exception) and lost_rank(e)):
        return EXIT_RETRY
    if isinstance(e, FatalError):
        return EXIT_FATAL
    if isinstance(e, MegavqError):
        return EXIT_USAGE
    return 130 if isinstance(e, KeyboardInterrupt) else 1


def _say(message: str, every_rank: bool = False) -> None:
    rank = os.environ.get("RANK", "0")
    if every_rank or rank == "0":
        print(f"error: {message}" if not every_rank else f"error (rank {rank}): {message}", file=sys.stderr,
              flush=True)


@contextmanager
def user_errors():
    """Print a MegavqError as `error: <message>` (once, from rank 0) and exit with its code (2, 3 or 75); a
    collective broken by a lost rank or a timeout exits 75 too. Either way, shut torch.distributed down cleanly
    (an exit with a live gloo group can abort the process)."""
    import torch.distributed as dist
    code = None
    try:
        yield
    except MegavqError as e:
        _say(str(e))
        code = exit_code(e)
    except Exception as e:  # noqa: BLE001  (re-raised unless another rank was lost)
        if not lost_rank(e):
            raise
        _say(f"a collective failed (a rank was lost or timed out; retryable): {str(e).splitlines()[0][:300]}",
             every_rank=True)
        code = EXIT_RETRY
    finally:
        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001  (a broken group)
                pass
    if code is not None:
        sys.exit(code)


def add_run_arguments(p: argparse.ArgumentParser, overrides_example: str) -> None:
    """The arguments every training script takes: --ds_config, --out_dir, --resume, --overwrite, --plugin, the
    launcher's --local_rank and the key=value overrides (parse with parse_run_args)."""
    p.add_argument("--ds_config", default="ds_configs/zero2.json", help="DeepSpeed JSON config")
    p.add_argument("--out_dir", default=None, help="run directory")
    p.add_argument("--resume", choices=("strict", "auto"), default=None,
                   help="`--resume`: continue from the newest checkpoint in out_dir (it must exist and be intact); "
                        "`--resume auto`: from the newest intact one, or start fresh when there is none")
    p.add_argument("--overwrite", action="store_true", help="delete the run in out_dir and start a fresh one")
    p.add_argument("--plugin", action="append", default=[],
                   help="a .py file or module that registers routers or dispatchers (repeatable)")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {overrides_example}")


def parse_run_args(p: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse with key=value overrides anywhere and `--resume` bare or with its value (resume_argv)."""
    return p.parse_intermixed_args(resume_argv(sys.argv[1:] if argv is None else argv))


def resume_argv(argv: list[str]) -> list[str]:
    """`--resume auto` -> `--resume=auto`, a bare `--resume` -> `--resume=strict` (so that a key=value after a bare
    --resume stays an override)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--resume":
            auto = i + 1 < len(argv) and argv[i + 1] in ("auto", "strict")
            out.append(f"--resume={argv[i + 1] if auto else 'strict'}")
            i += 2 if auto else 1
        else:
            out.append(argv[i])
            i += 1
    return out
