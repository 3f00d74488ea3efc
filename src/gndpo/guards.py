"""What skips a step or stops a run between steps: non-finite values, and SIGTERM / SIGINT.

A step whose log-probs, advantages or gradients are not finite never reaches the weights (``train.py`` skips it
on every rank and stops after ``trainer.max_bad_steps`` in a row); a signal lets the current step finish, then
the run checkpoints (``checkpoint.on_signal``) and exits.
"""
from __future__ import annotations

import logging
import signal
import threading

import torch

log = logging.getLogger("gndpo")

BAD_KEYS = ("bad/teacher_logprobs", "bad/student_logprobs", "bad/advantages", "bad/gradients")


def nonfinite_counts(mask: torch.Tensor, old_lp, teacher_lp, advantages) -> dict[str, float]:
    """Response tokens holding values no update may train on: NaN or +inf teacher log-probs (-inf is a token the
    teacher rules out: the reward clamp bounds it), non-finite student log-probs, non-finite advantages."""
    def count(x, bad):
        return float(bad(x)[mask.to(x.device)].sum()) if x is not None else 0.0
    return {"bad/teacher_logprobs": count(teacher_lp, lambda x: torch.isnan(x) | torch.isposinf(x)),
            "bad/student_logprobs": count(old_lp, lambda x: ~torch.isfinite(x)),
            "bad/advantages": count(advantages, lambda x: ~torch.isfinite(x))}


class SignalFlag:
    """SIGTERM and SIGINT set ``received`` (the signal number) instead of killing the run, which stops at the
    end of the current step; a second SIGINT interrupts at once. Only in the main thread (signals reach no other)."""

    def __init__(self):
        self.received = 0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: stopping after this step", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
