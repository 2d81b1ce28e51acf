"""Non-finite values and stop requests: noticed by one replica, decided by all together.

Every step, each replica checks its own loss, weights, gradients and BatchNorm statistics.
A replica never applies a non-finite update: whatever the policy, it skips its optimizer
step and its pull when its own values are not finite, so its weights, the mean and every
checkpoint stay finite.

What the *other* replicas do is decided together, at the next step that communicates anyway:
a coupling step (every step with coupling.every=1), a logging step, or a checkpoint step.
There each rank's "word" rides in the step's one all_reduce, so every rank takes the same
decision in the same step at no extra collective. A word holds
  - the step of this replica's first non-finite value not yet reported (0: none) and what it
    was (loss, weight, BatchNorm buffer or gradient), and the step of its latest one (a
    replica that computes alone between exchanges can have several),
  - whether the replica was asked to stop,
  - how many steps in a row the replica has not applied, this one included when its own
    value is already known to be non-finite (a count, never reset by an exchange of words).
With dist.overlap=true the all_reduce starts before the step's gradient is known, so its
word tells of the steps before; this step's value is agreed on at the next exchange
(checkpoint steps exchange the words once more, before saving). Then:
  - guard.nonfinite=stop: every rank raises the same NonFiniteError, naming what was
    non-finite, the replica(s) and the step;
  - guard.nonfinite=skip: when the non-finite value is in this very step, every rank skips
    it (counted in guard/skipped_steps); an earlier one was already skipped by its replica.
    When some replica's count of steps not applied in a row has reached
    guard.max_consecutive_skips, every rank raises the same SkipLimitError instead: at once
    when every step communicates, else at the next step that does (a replica that
    computes alone meanwhile only skips, never applies, a non-finite value).
A step can exchange words twice (average's second exchange, a checkpoint's own); the second
only adds what the first could not know, and resets nothing.
SIGTERM and SIGINT (Slurm preemption, Ctrl-C) are stop requests, decided the same way: every
rank finishes the step, saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable

import torch

from replica_dist.errors import RunError

KINDS = ("loss", "weight", "buffer", "gradient")
"""What can be non-finite, in the order a replica reports it (codes 1, 2, ... in a word):
a non-finite loss makes every gradient non-finite too, and the loss is the cause to name."""

ADVICE = "try a lower optim.lr"


class NonFiniteError(RunError):
    """guard.nonfinite=stop: a replica saw a non-finite value; every rank raises it together."""


class SkipLimitError(NonFiniteError):
    """guard.nonfinite=skip: a replica has not applied guard.max_consecutive_skips steps in a row."""


class DivergedError(RunError):
    """The final evaluation holds a non-finite number (written to summary.json as status "diverged")."""


class StopRequested(Exception):
    """Every rank agreed to stop at a step boundary (a SIGTERM or SIGINT reached one of them)."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request after step {step}")
        self.step = step


class Guard:
    WORD_LENGTH = 5
    """Numbers in a word: see `word`."""

    def __init__(self, policy: str, max_consecutive_skips: int = 20):
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.all_clean = True
        """Whether no replica saw a non-finite value in the step of the latest exchange of words."""
        self._decided_step = 0
        self.unreported_bad_step = 0
        """The step of this replica's first non-finite value not yet shared (0: none)."""
        self.unreported_kind = 0
        """What was non-finite at `unreported_bad_step`: 1 + its index in KINDS (0: none)."""
        self.latest_bad_step = 0
        """The step of this replica's latest non-finite value not yet shared (0: none)."""
        self.stop_requested = False
        self.stop_agreed = False
        self.skipped_steps = 0
        """Steps this replica did not apply (counted by `settle`)."""
        self.skips_in_row = 0
        """Steps in a row this replica did not apply, up to the latest one it knows of."""
        self._counted_step = 0

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
        buffer the forward pass updated (BatchNorm's running statistics) are finite. A step
        that is not will not be applied by this replica: it counts as skipped from here on."""
        params = list(params)
        groups = (
            [loss.detach()],
            [p.detach() for p in params],
            list(buffers),
            [p.grad for p in params if p.grad is not None],
        )
        # A sum is NaN or inf whenever one of its terms is, and costs a fraction of isfinite();
        # only a sum that overflowed from finite terms needs the exact check.
        if bool(torch.stack([v.sum() for group in groups for v in group]).isfinite().all()):
            return True
        kind = next(
            (k for k, group in enumerate(groups, 1) if not all(bool(v.isfinite().all()) for v in group)), 0
        )
        if not kind:
            return True
        if not self.unreported_bad_step:
            self.unreported_bad_step, self.unreported_kind = step, kind
        self.latest_bad_step = step
        self._count_skip(step)
        return False

    def _count_skip(self, step: int) -> None:
        if self._counted_step != step:
            self._counted_step = step
            self.skips_in_row += 1

    def settle(self, step: int, applied: bool) -> None:
        """Record whether this replica applied `step` (after every decision on it)."""
        if applied:
            self.skips_in_row = 0
        else:
            self.skipped_steps += 1
            self._count_skip(step)

    def word(self) -> list[float]:
        """What this rank tells the others in the exchange about to start: the step of its
        first non-finite value since the last word (0: none) and its kind, whether it was
        asked to stop, its steps not applied in a row, and the step of its latest non-finite
        value. The non-finite values count as reported from here on; the count stays until
        the replica applies a step."""
        word = [
            float(self.unreported_bad_step),
            float(self.unreported_kind),
            float(self.stop_requested),
            float(self.skips_in_row),
            float(self.latest_bad_step),
        ]
        self.unreported_bad_step = self.unreported_kind = self.latest_bad_step = 0
        return word

    def decide(self, step: int, words: torch.Tensor) -> bool:
        """From every rank's word (a (world_size, WORD_LENGTH) table, the same on every rank):
        whether to apply this step. Raises NonFiniteError under the stop policy, SkipLimitError
        when a replica has reached the skip limit; notes an agreed stop request."""
        rows = [[int(v) for v in row] for row in words.tolist()]
        self.stop_agreed = self.stop_agreed or any(row[2] for row in rows)
        bad = {replica: (row[0], row[1]) for replica, row in enumerate(rows) if row[0]}
        # A non-finite value reported by either exchange of a step makes the step unclean.
        already_unclean = self._decided_step == step and not self.all_clean
        bad_now = any(row[4] == step for row in rows)
        self.all_clean = not bad_now and not already_unclean
        self._decided_step = step
        where = ", ".join(f"non-finite {_kind(k)} in replica {r} at step {s}" for r, (s, k) in bad.items())
        if bad and self.policy == "stop":
            raise NonFiniteError(
                f"{where} (guard.nonfinite=stop); {ADVICE}, or set guard.nonfinite=skip to skip such steps"
            )
        over = [(r, row[3]) for r, row in enumerate(rows) if row[3] >= self.max_consecutive_skips]
        if over:
            # A replica that fails again and again (a diverged one, a fixed batch) would
            # otherwise freeze, or leave the run to end with non-finite results.
            who = ", ".join(f"replica {r} skipped {n} steps in a row" for r, n in over)
            seen = f": {where}" if where else ""
            raise SkipLimitError(
                f"{who} for non-finite values (guard.max_consecutive_skips={self.max_consecutive_skips})"
                f"{seen}; training diverged: {ADVICE}"
            )
        return not bad_now

    def state_dict(self) -> dict:
        return {
            "unreported_bad_step": self.unreported_bad_step,
            "unreported_kind": self.unreported_kind,
            "latest_bad_step": self.latest_bad_step,
            "skipped_steps": self.skipped_steps,
            "skips_in_row": self.skips_in_row,
        }

    def load_state_dict(self, state: dict) -> None:
        self.unreported_bad_step = state["unreported_bad_step"]
        # Checkpoints written before these entries existed.
        self.unreported_kind = state.get("unreported_kind", 0)
        self.latest_bad_step = state.get("latest_bad_step", self.unreported_bad_step)
        self.skipped_steps = state["skipped_steps"]
        self.skips_in_row = state.get("skips_in_row", 0)


def _kind(code: int) -> str:
    return KINDS[code - 1] if 1 <= code <= len(KINDS) else "value"
