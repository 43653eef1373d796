"""Fault injection for the tests of checkpointing and pre-emption: MEGAVQ_FAULT makes a rank fail at a named point.

    MEGAVQ_FAULT=POINT[:RANK][:STEP][:ACTION][,POINT...]

POINT   where (the step is the optimizer step being done, or the step of the checkpoint being saved):
          step           mid-step, in the model's forward
          save.write     while writing this rank's checkpoint file, half of it written
          save.publish   after every rank file is written and flushed, before the checkpoint is published
          save.prune     during pruning, after the old checkpoint was moved aside and before it is deleted
          save.enospc    writing this rank's checkpoint file fails with "No space left on device"
RANK    the global rank that fails (empty or `*`: every rank)
STEP    the step (empty: every step; a failure ends the process the first time)
ACTION  `raise` (default: a RuntimeError, an ordinary crash), `kill` (SIGKILL: the process vanishes) or
        `sleepS` (wait S seconds and go on: slows steps down so that a test can signal a run mid-way)

Unset in normal runs: `fault()` is then one dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal
import time

POINTS = ("step", "save.write", "save.publish", "save.prune", "save.enospc")


class FaultInjected(RuntimeError):
    pass


def _parse(text: str) -> list[tuple[str, int | None, int | None, str]]:
    faults = []
    for item in filter(None, text.split(",")):
        point, rank, step, action = (item.split(":") + ["", "", ""])[:4]
        if point not in POINTS or not (action in ("", "raise", "kill") or action.startswith("sleep")):
            raise ValueError(f"MEGAVQ_FAULT={text!r}: expected POINT[:RANK][:STEP][:raise|kill|sleepS], "
                             f"POINT in {POINTS}")
        faults.append((point, int(rank) if rank not in ("", "*") else None, int(step) if step else None,
                       action or "raise"))
    return faults


def fault(point: str, step: int) -> None:
    """Fail here if MEGAVQ_FAULT names this point (and this rank and step)."""
    text = os.environ.get("MEGAVQ_FAULT")
    if not text:
        return
    rank = int(os.environ.get("RANK", "0"))
    for p, r, s, action in _parse(text):
        if p != point or (r is not None and r != rank) or (s is not None and s != step):
            continue
        if action.startswith("sleep"):
            time.sleep(float(action.removeprefix("sleep")))
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "save.enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise FaultInjected(f"MEGAVQ_FAULT: {point} on rank {rank} at step {step}")


def wants(point: str) -> bool:
    return point in os.environ.get("MEGAVQ_FAULT", "")
