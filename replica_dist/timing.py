"""Where each training step's time goes, for the benchmark; the trainer runs with NO_TIMER.

A step's time is cut at a few points of the loop into compute (forward, backward, the guard's
check), communication (time spent blocked on the coupling all_reduce: all of it when
synchronous, only what forward and backward did not hide when overlapped) and update
(packing the weights, the optimizer step, the pull).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import torch

SECTIONS = ("compute", "communication", "update")


class StepTimer:
    def __init__(self, device: torch.device, peak_memory: Callable[[], int] | None = None):
        # Timing GPU work needs its stream drained at each cut; the current stream only, so
        # that an all_reduce in flight on NCCL's own stream keeps running behind compute.
        self._sync = torch.cuda.current_stream(device).synchronize if device.type == "cuda" else None
        self.steps: list[dict[str, float]] = []
        """Seconds per section of every step so far, in order."""
        self._peak_memory = peak_memory
        self.peak_bytes: list[int] = []
        """`peak_memory()` at the end of every step: the step's peak, if it resets on reading."""
        self._step: dict[str, float] = defaultdict(float)
        self._last = 0.0

    def start_step(self) -> None:
        if self._sync:
            self._sync()
        self._step = defaultdict(float)
        self._last = time.perf_counter()

    def lap(self, section: str) -> None:
        """Charge the time since the previous cut to `section`."""
        if self._sync:
            self._sync()
        now = time.perf_counter()
        self._step[section] += now - self._last
        self._last = now

    def end_step(self, section: str) -> None:
        self.lap(section)
        self.steps.append(dict(self._step))
        if self._peak_memory:
            self.peak_bytes.append(self._peak_memory())


class _NoTimer(StepTimer):
    def __init__(self):
        pass

    def start_step(self) -> None:
        pass

    def lap(self, section: str) -> None:
        pass

    def end_step(self, section: str) -> None:
        pass


NO_TIMER = _NoTimer()
