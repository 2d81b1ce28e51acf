"""Non-finite values and stop requests: noticed by one replica, decided by all together.

Every step, each replica checks its own loss, gradients and BatchNorm statistics, and its
weights on every step that sends, shows or saves them (a coupling step, a logging step, a
checkpoint step). A replica never applies a non-finite update: whatever the policy, it skips
its optimizer step and its pull when its own values are not finite, so its weights, the mean
and every checkpoint stay finite. Finite weights can then turn non-finite only through a
finite update that overflows them (numbers near 3e38); the next step that sends, shows or
saves them reports it, as a non-finite weight. Not reading every weight on every step is what
keeps a plain step's check to one read of the gradients.

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
    guard.max_consecutive_skips, every rank raises the same SkipLimitError instead.
A step can exchange words twice (average's second exchange, a checkpoint's own, a logging
step's whole-model exchange beside a fragment's pull); the second only adds what the first
could not know, and resets nothing.

Every one of these decisions is taken on the device, so that a step makes the host wait for
nothing (on a GPU the host then runs ahead of it). The host reads the outcome back only on
the steps that log or checkpoint (in ReplicaCoupling: a step begun with observe=True or
ended with agree=True, every check_every-th step, and finish()). That is the lag: between
the exchange that decides to end the run and the next read back, every replica skips every
step (none applies anything), and the error is raised at that read back, naming the step of
the value as before. With log.every=k the run ends at most k steps after the decision (in
a loop of the user's, check_every steps after the value); a skip is never delayed.
SIGTERM and SIGINT (Slurm preemption, Ctrl-C) are stop requests, decided the same way: every
rank finishes the step, saves a checkpoint and exits cleanly, at the next read back.
A step that exchanges nothing, logs nothing and saves nothing (a plain step) does less still:
`inspect_and_settle` finds its worst value's kind and writes it to a small window on the
device; the bookkeeping above (first and latest non-finite step, counts of steps not applied)
is done for the whole window at once, in a few vector operations, before the next word, read
back or checkpoint. Nothing can read the counts in between, so the outcome is the same as
step by step (a test holds the two to each other).
A replica's own skip, on a step that exchanges nothing, is on the device too: a fused
optimizer (SGD, Adam, AdamW with fused=True, as the trainer builds them) skips through
found_inf, GradScaler's flag; any other optimizer makes that step read its flag on the host.
"""

from __future__ import annotations

import math
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


# Slots of the guard's state, a small vector on the model's device (see Guard).
_FIRST, _KIND, _LATEST, _IN_ROW, _REQUESTED, _SKIPPED, _COUNTED, _FROZEN, _STOP, _UNCLEAN = range(10)
_WORD_SLOTS = [_FIRST, _KIND, _REQUESTED, _IN_ROW, _LATEST]
"""Where each number of a word comes from (see Guard.word); its columns, by name:"""
WORD_FIRST, WORD_KIND, WORD_REQUESTED, WORD_IN_ROW, WORD_LATEST = range(len(_WORD_SLOTS))


class Guard:
    """The guard of one replica. Its state is a small tensor on the model's device and every
    per-step decision is a device operation, so that a step reads nothing back to the host;
    `read_back`, on the steps that log or checkpoint, brings the agreed outcome to the host
    (and raises there). See the module's docstring for the rules."""

    WORD_LENGTH = len(_WORD_SLOTS)
    """Numbers in a word: see `word`."""

    def __init__(self, policy: str, max_consecutive_skips: int = 20):
        self.policy = policy
        self.max_consecutive_skips = max_consecutive_skips
        self.all_clean = True
        """Whether no replica saw a non-finite value in the step of the latest read back."""
        self.stop_requested = False
        self.stop_agreed = False
        self._state = torch.zeros(_UNCLEAN + 1, dtype=torch.float64)
        self._slots = self._state.unbind()
        """A 0-dim view of each slot: a step's bookkeeping writes them in place, one device
        operation each, where indexing would add a view and a copy per write."""
        self._error_table: torch.Tensor | None = None
        self._word_slots = torch.tensor(_WORD_SLOTS)
        self._ranks_by_sizes: dict[tuple[int, ...], torch.Tensor] = {}
        self._make_window(torch.device("cpu"))
        self.across_shards = None
        """With a sharded replica (parallel.shard > 1), set by ReplicaCoupling: the largest of a
        0-dim tensor over the ranks of this replica, in place (a collective), through which a
        non-finite value in any rank's shard is every shard's, so that all of them take the
        same step, skip it, or stop."""

    def to(self, device: torch.device) -> Guard:
        """Keep the state on `device` (the model's), where the step's decisions are taken."""
        self._settle_window()
        self._state = self._state.to(device)
        self._slots = self._state.unbind()
        self._word_slots = self._word_slots.to(device)
        self._ranks_by_sizes = {}
        self._make_window(device)
        return self

    WINDOW = 64
    """Plain steps whose bookkeeping waits to be done at once (see inspect_and_settle)."""

    def _make_window(self, device: torch.device) -> None:
        # Each plain step's worst kind (a rank as in _tensor_ranks; 0: all finite), from the
        # step _window_start on; written through 0-dim views, one device operation a step.
        self._window = torch.zeros(self.WINDOW, dtype=torch.float64, device=device)
        self._window_slots = self._window.unbind()
        self._window_offsets = torch.arange(self.WINDOW, dtype=torch.float64, device=device)
        self._window_start, self._window_length = 0, 0

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask for a stop at the next step boundary; a second SIGINT interrupts."""

        def request_stop(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    # ---- a step, on the device

    @torch.no_grad()
    def inspect(
        self,
        step: int,
        loss: torch.Tensor,
        params: Iterable[torch.nn.Parameter],
        buffers: list[torch.Tensor],
        weights: bool = True,
    ) -> torch.Tensor:
        """Whether this replica's loss, the gradients of `params`, every floating buffer the
        forward pass updated (BatchNorm's running statistics) and, with `weights`, the
        parameters themselves are finite, as a 0-dim bool tensor. A step that is not will not
        be applied by this replica: it counts as skipped from here on."""
        self._settle_window()
        top = self._worst_rank(loss, params, buffers, weights)
        is_bad = top > 0
        s = self._slots
        first = is_bad & (s[_FIRST] == 0)
        torch.where(first, len(KINDS) + 1 - top, s[_KIND], out=s[_KIND])
        s[_FIRST].masked_fill_(first, step)
        s[_LATEST].masked_fill_(is_bad, step)
        self._count_skip(step, is_bad)
        return ~is_bad

    @torch.no_grad()
    def inspect_and_settle(
        self, step: int, loss: torch.Tensor, params: Iterable[torch.nn.Parameter], buffers: list[torch.Tensor]
    ) -> torch.Tensor:
        """A plain step's inspect (weights not read) and settle at once: whether this replica
        applies `step`, as a 0-dim bool tensor, true when its loss, gradients and buffers are
        finite and the run is not ending. Its bookkeeping waits in the window, so that the step
        costs the finite test and one write; the steps must follow one another (any other call
        settles the window first)."""
        following = self._window_start + self._window_length == step
        if self._window_length and (not following or self._window_length == self.WINDOW):
            self._settle_window()
        if self._window_length == 0:
            self._window_start = step
        top = self._worst_rank(loss, params, buffers, weights=False)
        self._window_slots[self._window_length].copy_(top)
        self._window_length += 1
        return (top + self._slots[_FROZEN]) == 0  # both are 0 or more: finite, and not frozen

    def _settle_window(self) -> None:
        """The bookkeeping of the plain steps in the window, as inspect and settle would have
        done it step by step (the run's end is not decided within a window: may_apply holds
        for all of its steps or for none)."""
        n = self._window_length
        if n == 0:
            return
        self._window_length = 0
        s, start = self._slots, self._window_start
        tops = self._window[:n]
        bad = tops > 0
        skipped = bad | (s[_FROZEN] != 0)
        steps = self._window_offsets[:n] + start
        any_bad = bad.any()
        # Reductions, not indexing with a tensor, which could read the index back to the host.
        first_bad = torch.where(bad, steps, math.inf).amin()
        first_rank = torch.where(steps == first_bad, tops, 0.0).amax()
        take_first = any_bad & (s[_FIRST] == 0)
        torch.where(take_first, len(KINDS) + 1 - first_rank, s[_KIND], out=s[_KIND])
        torch.where(take_first, first_bad, s[_FIRST], out=s[_FIRST])
        torch.where(any_bad, (steps * bad).amax(), s[_LATEST], out=s[_LATEST])
        s[_SKIPPED].add_(skipped.sum())
        # Steps not applied in a row: those after the window's last applied step, or the count
        # so far and the whole window when none was applied. (_COUNTED, which keeps inspect and
        # settle from counting one step twice, stays: no later step is one of these.)
        after_last_applied = (start + n - 1) - (steps * ~skipped).amax()
        torch.where(skipped.all(), s[_IN_ROW] + n, after_last_applied, out=s[_IN_ROW])

    def _worst_rank(
        self,
        loss: torch.Tensor,
        params: Iterable[torch.nn.Parameter],
        buffers: list[torch.Tensor],
        weights: bool,
    ) -> torch.Tensor:
        """The rank (see _tensor_ranks) of the first kind with a non-finite value, 0 if none,
        a 0-dim tensor on the guard's device."""
        params = list(params)
        groups = (
            [loss.detach()],
            [p.detach() for p in params] if weights else [],
            list(buffers),
            [p.grad for p in params if p.grad is not None],
        )
        # One finite test over every tensor's extremes, not one per group: the guard is a
        # handful of device operations besides the reductions themselves.
        extremes = _extremes([t for group in groups for t in group], self._state.device)
        ranks = self._tensor_ranks(tuple(len(group) for group in groups), len(extremes))
        # x - x is NaN exactly where x is not finite (isfinite takes four operations).
        worst = ((extremes - extremes).isnan() * ranks).amax()
        return worst if self.across_shards is None else self.across_shards(worst)

    def _tensor_ranks(self, sizes: tuple[int, ...], length: int) -> torch.Tensor:
        """The kind of each of `length` extremes (_extremes: the same number for each tensor)
        as a rank, len(KINDS) for the first kind down to 1, for groups of `sizes` tensors (one
        group per kind); made once per shape of the model's lists."""
        key = (*sizes, length)
        ranks = self._ranks_by_sizes.get(key)
        if ranks is None:
            per_tensor = length // max(1, sum(sizes))
            # Filled on the device: a copy from the host would wait for it.
            ranks = torch.cat(
                [
                    torch.full(
                        (n * per_tensor,),
                        float(len(KINDS) - kind),
                        dtype=torch.float64,
                        device=self._state.device,
                    )
                    for kind, n in enumerate(sizes)
                ]
            )
            self._ranks_by_sizes[key] = ranks
        return ranks

    def _count_skip(self, step: int, skipped: torch.Tensor) -> None:
        s = self._slots
        s[_IN_ROW].add_(skipped & (s[_COUNTED] != step))
        s[_COUNTED].masked_fill_(skipped, step)

    def may_apply(self) -> torch.Tensor:
        """False once the replicas agreed to end the run (raised at the next read back): from
        then on no replica applies anything."""
        return self._slots[_FROZEN] == 0

    @torch.no_grad()
    def settle(self, step: int, applied: torch.Tensor) -> None:
        """Record whether this replica applied `step` (after every decision on it)."""
        self._settle_window()
        s = self._slots
        skipped = ~applied
        s[_SKIPPED].add_(skipped)
        self._count_skip(step, skipped)
        s[_IN_ROW].masked_fill_(applied, 0)

    def word(self) -> torch.Tensor:
        """What this rank tells the others in the exchange about to start (a device vector):
        the step of its first non-finite value since the last word (0: none) and its kind,
        whether it was asked to stop, its steps not applied in a row, and the step of its
        latest non-finite value. The non-finite values count as reported from here on; the
        count stays until the replica applies a step."""
        self._settle_window()
        s = self._state
        s[_REQUESTED].fill_(float(self.stop_requested))  # a host flag, written without a read back
        word = s[self._word_slots]
        s[_FIRST : _LATEST + 1].zero_()
        return word

    @torch.no_grad()
    def decide(self, step: int, words: torch.Tensor) -> torch.Tensor:
        """From every rank's word (a (replicas, WORD_LENGTH) table on the device, the same on
        every rank): whether to apply this step, a 0-dim bool tensor. What ends the run (a
        non-finite value under the stop policy, a replica at the skip limit) and a stop
        request are noted on the device; `read_back` raises or reports them."""
        self._settle_window()
        s = self._state
        words = words.to(s.dtype)
        bad_now = (words[:, WORD_LATEST] == step).any()
        error = (words[:, WORD_IN_ROW] >= self.max_consecutive_skips).any()
        if self.policy == "stop":
            error = error | (words[:, WORD_FIRST] > 0).any()
        if self._error_table is None:
            self._error_table = torch.zeros_like(words)
        # The first table that ended the run names what ended it.
        self._error_table = torch.where(error & (s[_FROZEN] == 0), words, self._error_table)
        s[_FROZEN] = torch.where(error, 1.0, s[_FROZEN])
        s[_STOP] = torch.where((words[:, WORD_REQUESTED] > 0).any(), 1.0, s[_STOP])
        s[_UNCLEAN] = torch.where(bad_now, step, s[_UNCLEAN])
        return ~bad_now & (s[_FROZEN] == 0)

    # ---- on the host, at the steps that log or checkpoint

    def read_back(self, step: int) -> None:
        """Bring the decisions up to `step` to the host (one transfer): raises NonFiniteError
        under the stop policy, SkipLimitError when a replica reached the skip limit; sets
        `stop_agreed` and `all_clean`."""
        self._settle_window()
        width = self.WORD_LENGTH
        table = self._error_table if self._error_table is not None else self._state.new_zeros(0, width)
        values = torch.cat([self._state, table.flatten()]).tolist()
        state, rows = values[: len(self._state)], values[len(self._state) :]
        self.stop_agreed = self.stop_agreed or bool(state[_STOP])
        self.all_clean = int(state[_UNCLEAN]) != step
        if state[_FROZEN]:
            table = [[int(v) for v in rows[i : i + width]] for i in range(0, len(rows), width)]
            raise self._error(table)

    def _error(self, rows: list[list[int]]) -> NonFiniteError:
        bad = {r: (row[WORD_FIRST], row[WORD_KIND]) for r, row in enumerate(rows) if row[WORD_FIRST]}
        where = ", ".join(f"non-finite {_kind(k)} in replica {r} at step {s}" for r, (s, k) in bad.items())
        if bad and self.policy == "stop":
            return NonFiniteError(
                f"{where} (guard.nonfinite=stop); {ADVICE}, or set guard.nonfinite=skip to skip such steps"
            )
        # A replica that fails again and again (a diverged one, a fixed batch) would
        # otherwise freeze, or leave the run to end with non-finite results.
        over = [
            (r, row[WORD_IN_ROW])
            for r, row in enumerate(rows)
            if row[WORD_IN_ROW] >= self.max_consecutive_skips
        ]
        who = ", ".join(f"replica {r} skipped {n} steps in a row" for r, n in over)
        seen = f": {where}" if where else ""
        return SkipLimitError(
            f"{who} for non-finite values (guard.max_consecutive_skips={self.max_consecutive_skips})"
            f"{seen}; training diverged: {ADVICE}"
        )

    @property
    def skipped_steps(self) -> int:
        """Steps this replica did not apply (reads the device)."""
        self._settle_window()
        return int(self._state[_SKIPPED])

    @property
    def skips_in_row(self) -> int:
        """Steps in a row this replica did not apply, up to the latest one it knows of (reads the device)."""
        self._settle_window()
        return int(self._state[_IN_ROW])

    _SAVED = {
        "unreported_bad_step": _FIRST,
        "unreported_kind": _KIND,
        "latest_bad_step": _LATEST,
        "skipped_steps": _SKIPPED,
        "skips_in_row": _IN_ROW,
    }

    def state_dict(self) -> dict:
        self._settle_window()
        values = self._state.tolist()
        return {key: int(values[slot]) for key, slot in self._SAVED.items()}

    def load_state_dict(self, state: dict) -> None:
        # Checkpoints written before some entries existed.
        state = {"latest_bad_step": state["unreported_bad_step"]} | dict(state)
        self._window_length = 0  # replaced, not settled
        values = self._state.tolist()
        for key, slot in self._SAVED.items():
            values[slot] = float(state.get(key, 0))
        self._state.copy_(torch.tensor(values, dtype=self._state.dtype))


def _extremes(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The same number of values for each tensor, tensor by tensor in one vector, all finite
    exactly when every value of the tensor is: NaN and inf carry through a max or a min, which
    unlike a sum cannot overflow from finite values. On CUDA one fused kernel for the whole
    list (the largest magnitudes); on the CPU each tensor's min and max, vectorised (its
    inf-norm is not: ten times slower)."""
    if device.type == "cpu":
        values = [v for t in tensors for v in torch.aminmax(t)]
    else:
        values = torch._foreach_norm(tensors, math.inf)
    float32 = [v if v.dtype == torch.float32 else v.to(torch.float32) for v in values]
    return torch.stack(float32)


def _kind(code: int) -> str:
    return KINDS[code - 1] if 1 <= code <= len(KINDS) else "value"
