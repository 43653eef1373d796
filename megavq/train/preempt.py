"""Pre-emption: SIGTERM, SIGUSR1 (or a first SIGINT) asks every rank to finish its step, save and exit with
EXIT_RETRY; a second SIGINT interrupts at once.

The signal only sets a flag. At the end of each step the ranks agree on stopping (`step_end_agreed`: one small
all_reduce MAX of the signal number and the step's non-finite-loss flag), so every rank stops after the same
step even when only some of them received the signal, saves, and exits together. Which signal reaches the
ranks depends on the launcher: the DeepSpeed launcher forwards SIGINT and SIGTERM and kills the ranks 30 s
later (SIGUSR1 kills the launcher itself); torchrun forwards SIGTERM (and SIGINT) and kills them 30 s later;
under `srun` every task receives what `scancel --signal` or `sbatch --signal` sends. The step and the save
must fit in that grace period.
"""
from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM, SIGUSR1 and SIGINT set `stop.requested` (the signal number)
    instead of ending the process; the previous handlers come back on exit. `stop.signal`: the name of the
    signal the ranks agreed on (set by the trainer from `step_end_agreed`)."""

    def __init__(self):
        self.requested, self.signal, self._previous = 0, None, {}

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            print(f"megavq: {signal.Signals(signum).name} received: stopping after this step and saving",
                  file=sys.stderr, flush=True)
        self.requested = max(self.requested, int(signum))
        if signum == signal.SIGINT:  # Ctrl-C again: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def __enter__(self) -> "StopSignals":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def step_end_agreed(requested: int, nonfinite: torch.Tensor) -> tuple[str | None, bool]:
    """(the name of the stop signal any rank received or None, whether any rank's loss was non-finite in the
    step): the one collective and host sync of a step's end (one all_reduce MAX of two numbers)."""
    flags = torch.stack([torch.tensor(float(requested), device=nonfinite.device), nonfinite.float()])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    signum, bad = flags.tolist()
    return (signal.Signals(int(signum)).name if signum else None), bad > 0
