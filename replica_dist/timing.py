"""Where each training step's time goes, for the benchmark; the trainer runs with NO_TIMER.

The loop and the coupling mark sections of a step: compute (forward, backward, the guard's
check), communication (time spent blocked on the coupling all_reduce: all of it when
synchronous, only what forward and backward did not hide when overlapped) and update
(packing the weights, the optimizer step, the pull).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

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

    def start_step(self) -> None:
        self._step = defaultdict(float)

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the block to section `name`."""
        if self._sync:
            self._sync()
        began = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self._step[name] += time.perf_counter() - began

    def end_step(self) -> None:
        self.steps.append(dict(self._step))
        if self._peak_memory:
            self.peak_bytes.append(self._peak_memory())


class _NoTimer(StepTimer):
    def __init__(self):
        pass

    def start_step(self) -> None:
        pass

    def section(self, name: str) -> AbstractContextManager[None]:
        return nullcontext()

    def end_step(self) -> None:
        pass


NO_TIMER = _NoTimer()
