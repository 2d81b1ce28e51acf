"""Non-finite values and stop requests: noticed by one replica, decided by all together.

Every step, each replica checks its own loss and gradients. A replica never applies a
non-finite update: whatever the policy, it skips its optimizer step and its pull when its own
values are not finite, so its weights, the mean and every checkpoint stay finite.

What the *other* replicas do is decided together, at the next step that communicates anyway:
a coupling step (every step with coupling.every=1), or a logging step. There each rank's
"word" (the step of its first unreported non-finite value, and whether it was asked to stop)
rides in the step's one all_reduce, so every rank takes the same decision in the same step
at no extra collective. With dist.overlap=true that all_reduce starts before the step's
gradient is known, so its word tells of the steps before; this step's value is agreed on at
the next exchange (checkpoint steps exchange the words once more, before saving):
  - guard.nonfinite=stop: every rank raises one error naming the replica(s) and the step;
  - guard.nonfinite=skip: when the non-finite value is in this very step, every rank skips
    it (counted in guard/skipped_steps); an earlier one was already skipped by its replica.
SIGTERM and SIGINT (Slurm preemption, Ctrl-C) are stop requests, decided the same way: every
rank finishes the step, saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable

import torch


class StopRequested(Exception):
    """Every rank agreed to stop at a step boundary (a SIGTERM or SIGINT reached one of them)."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request after step {step}")
        self.step = step


class Guard:
    WORD_LENGTH = 2
    """Numbers in a word: see `word`."""

    def __init__(self, policy: str, max_consecutive_skips: int = 20):
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.consecutive_skips = 0
        """Communicating steps in a row at which some replica was non-finite (the same on all ranks)."""
        self._last_bad_step = 0
        self.all_clean = True
        """Whether no replica saw a non-finite value in the step of the latest exchange of words."""
        self._decided_step = 0
        self.unreported_bad_step = 0
        """The step of this replica's first non-finite value not yet shared (0: none)."""
        self.stop_requested = False
        self.stop_agreed = False
        self.skipped_steps = 0
        """Steps this replica did not apply (counted by the loop)."""

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask for a stop at the next step boundary; a second SIGINT interrupts."""

        def request_stop(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    @torch.no_grad()
    def inspect(
        self, step: int, loss: torch.Tensor, params: Iterable[torch.nn.Parameter], buffers: list[torch.Tensor]
    ) -> bool:
        """Whether this replica's loss, its weights and their gradients, and every floating
        buffer the forward pass updated (BatchNorm's running statistics) are finite."""
        params = list(params)
        values = [loss.detach(), *buffers, *params] + [p.grad for p in params if p.grad is not None]
        # A sum is NaN or inf whenever one of its terms is, and costs a fraction of isfinite();
        # only a sum that overflowed from finite terms needs the exact check.
        finite = bool(torch.stack([v.sum() for v in values]).isfinite().all())
        if not finite:
            finite = all(bool(v.isfinite().all()) for v in values)
        if not finite and not self.unreported_bad_step:
            self.unreported_bad_step = step
        return finite

    def word(self) -> list[float]:
        """What this rank tells the others in the exchange about to start: the step of its
        first non-finite value since the last word (0: none), and whether it was asked to
        stop. The non-finite value counts as reported from here on."""
        word = [float(self.unreported_bad_step), float(self.stop_requested)]
        self.unreported_bad_step = 0
        return word

    def decide(self, step: int, words: torch.Tensor) -> bool:
        """From every rank's word (a (world_size, 2) table, the same on every rank): whether
        to apply this step. Raises under the stop policy; notes an agreed stop request."""
        bad_steps = [int(s) for s in words[:, 0].tolist()]
        self.stop_agreed = self.stop_agreed or bool(words[:, 1].sum() > 0)
        bad = {replica: s for replica, s in enumerate(bad_steps) if s}
        # A step can exchange words twice (average's second exchange, a checkpoint's own):
        # a non-finite value reported by either makes the step unclean.
        already_unclean = self._decided_step == step and not self.all_clean
        self.all_clean = step not in bad.values() and not already_unclean
        self._decided_step = step
        where = ", ".join(f"replica {replica} at step {s}" for replica, s in bad.items())
        if bad and self.policy == "stop":
            raise FloatingPointError(f"non-finite loss, gradient or buffer: {where} (guard.nonfinite=stop)")
        if bad and step != self._last_bad_step:
            self.consecutive_skips += 1
            self._last_bad_step = step
        elif not bad and step != self._last_bad_step:  # a second word exchange in a bad step
            self.consecutive_skips = 0
        if self.consecutive_skips >= self.max_consecutive_skips:
            # A replica that fails again and again (a fixed batch) would freeze the run silently.
            raise FloatingPointError(
                f"non-finite values at {self.consecutive_skips} communicating steps in a row, lately "
                f"{where} (guard.max_consecutive_skips={self.max_consecutive_skips})"
            )
        return step not in bad.values()

    def state_dict(self) -> dict:
        return {
            "unreported_bad_step": self.unreported_bad_step,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict) -> None:
        self.unreported_bad_step = state["unreported_bad_step"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]
