"""The progress line, and what a run says about itself besides its numbers.

A coupled run can look healthy in every number it prints and still end badly: a too strong
coupling can pull the replicas onto weights whose mean (the center) no longer works, or
throw a converged run back to its starting loss. `Progress` watches for both, on numbers
every rank already has (the replicas' losses, the evaluation), so it adds no collective;
its warnings go into the progress line (rank 0) and into summary.json.

What it remembers (the losses and the center it judges from, the warnings it is showing, the
training time so far) is in the checkpoint, so that a resumed run says what an uninterrupted
one says.
"""

from __future__ import annotations

import math
import time

from replica_dist.forms import Form, form_class

COLLAPSE_POINTS = 0.10
"""Center test accuracy this far below the ensemble's (classification) is worth a warning."""
COLLAPSE_LOSS_RATIO = 2.0
"""Regression: a center test loss above this many times the ensemble's is worth a warning."""
JUMP_FACTOR = 10.0
"""The replicas' mean minibatch loss this many times above its best so far is a jump..."""
JUMP_SHARE_OF_FIRST = 0.1
"""...when it is also back above this share of the first logged loss: minibatch noise around
a small loss (0.001 to 0.05, say) is not a jump, a return toward the untrained loss is."""
WARMUP_STEPS = 1
"""Steps of this process not used to estimate the time left (start-up, first allocations)."""
MIN_TIMED_STEPS = 3
"""Steps after the warm-up before the time left is shown at all."""


class Progress:
    def __init__(
        self, total_steps: int, form: str | Form, num_replicas: int, task: str, samples_per_step: int
    ):
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        """Samples all ranks together draw in one step (for the samples/s of the progress line)."""
        form = form_class(form) if isinstance(form, str) else form
        # A center is meant to work only where the form couples: an uncoupled mean is no model.
        self.watch_center = form.moment is not None and num_replicas > 1
        self.advice = form.advice
        """Said of a center that fell: what to change in the form's settings."""
        self.num_replicas = num_replicas
        self.task = task
        self.center_metric: float | None = None
        """The center's test accuracy (classification) or loss (regression) at the latest evaluation."""
        self.center_warning: str | None = None
        """The latest evaluation's warning about the center (None: none)."""
        self._best_center: tuple[float, int] | None = None
        self._first_loss: float | None = None
        self._best_loss: tuple[float, int] | None = None
        self.loss_warning: str | None = None
        """This logging step's warning about the loss (None: none)."""
        self.first_jump: str | None = None
        """The first loss jump of the run, for summary.json."""
        self._timed_from: tuple[int, float] | None = None
        self._steps_done = 0
        self._last_line: tuple[int, float] | None = None
        self._earlier_seconds = 0.0
        """Training time of the segments before this process's (a resumed run), up to the
        checkpoint it resumed from."""
        self._segment_start: float | None = None

    # ---- the checkpoint

    def state_dict(self) -> dict:
        """What shapes the run's later output (warnings, the center shown, the training time),
        the same on every rank: the losses are every replica's mean and the evaluation is shared."""
        return {
            "first_loss": self._first_loss,
            "best_loss": self._best_loss,
            "first_jump": self.first_jump,
            "best_center": self._best_center,
            "center_metric": self.center_metric,
            "center_warning": self.center_warning,
            "wall_seconds": self.wall_seconds(time.perf_counter()),
        }

    def load_state_dict(self, state: dict) -> None:
        def pair(value) -> tuple[float, int] | None:  # a tuple comes back from torch.load as a list
            return None if value is None else (float(value[0]), int(value[1]))

        self._first_loss = state["first_loss"]
        self._best_loss = pair(state["best_loss"])
        self.first_jump = state["first_jump"]
        self._best_center = pair(state["best_center"])
        self.center_metric = state["center_metric"]
        self.center_warning = state["center_warning"]
        self._earlier_seconds = float(state["wall_seconds"])

    # ---- training time

    def start_clock(self, now: float) -> None:
        """Call once, as this process's first step begins, with time.perf_counter()."""
        self._segment_start = now

    def wall_seconds(self, now: float) -> float:
        """Training time of the whole run so far: every earlier segment up to the checkpoint
        it was resumed from (steps redone after a kill count once), and this process's."""
        mine = 0.0 if self._segment_start is None else now - self._segment_start
        return self._earlier_seconds + mine

    # ---- time left

    def step_done(self, step: int, now: float) -> None:
        """Call at the end of every step, with time.perf_counter()."""
        self._steps_done += 1
        if self._steps_done == WARMUP_STEPS:
            self._timed_from = (step, now)

    def seconds_left(self, step: int, now: float) -> float | None:
        """From the steps after the warm-up; None until enough of them have run."""
        if self._timed_from is None or step - self._timed_from[0] < MIN_TIMED_STEPS:
            return None
        first, then = self._timed_from
        return (now - then) / (step - first) * (self.total_steps - step)

    # ---- the loss

    def observe_loss(self, step: int, mean_loss: float) -> None:
        """The replicas' mean minibatch loss at a logging step (a non-finite one is the guard's)."""
        self.loss_warning = None
        if not math.isfinite(mean_loss):
            return
        if self._first_loss is None:
            self._first_loss = mean_loss
        if self._best_loss is not None:
            best, best_step = self._best_loss
            if mean_loss >= JUMP_FACTOR * best and mean_loss >= JUMP_SHARE_OF_FIRST * self._first_loss:
                self.loss_warning = (
                    f"the minibatch loss jumped to {mean_loss:.4g} at step {step} from {best:.4g} "
                    f"at step {best_step}: try a lower optim.lr{' or a weaker coupling' if self.watch_center else ''}"
                )
                self.first_jump = self.first_jump or self.loss_warning
        if self._best_loss is None or mean_loss < self._best_loss[0]:
            self._best_loss = (mean_loss, step)

    # ---- the center

    def observe_evaluation(self, step: int, evaluation: dict, final: bool) -> None:
        """The center against the ensemble on the test set. Early in a coupled run the replicas
        are still far apart and so is their mean: only a center that has *fallen* (or the
        final one) is worth a warning."""
        self.center_warning = None
        if self.task == "classification":
            center, ensemble = evaluation["center"]["test/accuracy"], evaluation["ensemble"]["test/accuracy"]
            self.center_metric = center
            if not self.watch_center:
                return
            gap = ensemble - center
            far = gap > COLLAPSE_POINTS
            was = self._best_center
            fell = was is not None and was[0] - center > COLLAPSE_POINTS
            if far and (fell or final):
                earlier = f" (it was {was[0]:.4f} at step {was[1]})" if fell else ""
                self.center_warning = (
                    f"center accuracy {center:.4f} is {100 * gap:.0f} points below the ensemble's "
                    f"{ensemble:.4f}{earlier}{self.advice if fell else ''}"
                )
            if math.isfinite(center) and (was is None or center > was[0]):
                self._best_center = (center, step)
        else:
            center, ensemble = evaluation["center"]["test/loss"], evaluation["ensemble"]["test/loss"]
            self.center_metric = center
            if not self.watch_center:
                return
            far = center > COLLAPSE_LOSS_RATIO * ensemble
            was = self._best_center
            fell = was is not None and center > COLLAPSE_LOSS_RATIO * was[0]
            if far and (fell or final):
                earlier = f" (it was {was[0]:.4g} at step {was[1]})" if fell else ""
                self.center_warning = (
                    f"center test loss {center:.4g} is {center / ensemble:.3g} times the ensemble's "
                    f"{ensemble:.4g}{earlier}{self.advice if fell else ''}"
                )
            if math.isfinite(center) and (was is None or center < was[0]):
                self._best_center = (center, step)

    # ---- what the run says

    def line(self, step: int, mean_loss: float, now: float) -> str:
        """The progress line of a logging step."""
        name = "center acc" if self.task == "classification" else "center test loss"
        center = "-" if self.center_metric is None else f"{self.center_metric:.4f}"
        parts = [
            f"step {step}/{self.total_steps}",
            f"loss {mean_loss:.4f} (mean of {self.num_replicas} replicas)",
            f"{name} {center}",
        ]
        parts += self._speed(step, now)
        left = self.seconds_left(step, now)
        if left is not None:
            parts.append(f"{left:.0f} s left")
        parts += [f"warning: {w}" for w in (self.loss_warning, self.center_warning) if w]
        return " | ".join(parts)

    def _speed(self, step: int, now: float) -> list[str]:
        """Wall time per step and samples/s (all ranks together) since this process's previous
        line: none on its first line, whose steps include the start-up."""
        since, self._last_line = self._last_line, (step, now)
        if since is None or step <= since[0] or now <= since[1]:
            return []
        seconds_per_step = (now - since[1]) / (step - since[0])
        return [
            f"{1000 * seconds_per_step:.1f} ms/step, {self.samples_per_step / seconds_per_step:.0f} samples/s"
        ]

    def warnings(self) -> list[str]:
        """For summary.json: the first loss jump, and the final evaluation's center warning."""
        return [w for w in (self.first_jump, self.center_warning) if w]
