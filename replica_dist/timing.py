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
    """Sectioned (the default): each section's time, the GPU's stream drained at every cut, so
    the host never runs ahead of the device and each section is charged its own device work.

    Pipelined (`pipelined=True`): no section and no synchronisation; a step's time is the wall
    time from the end of the step before it to its own end (the loop's work between steps
    included), charged to "step". The host runs ahead as it would in training, so on a GPU the
    mean over many steps is the throughput, while a single step's time says little: the host
    waits for the device only when its queue of launched work is full."""

    def __init__(
        self, device: torch.device, peak_memory: Callable[[], int] | None = None, pipelined: bool = False
    ):
        # Timing GPU work needs its stream drained at each cut; the current stream only, so
        # that an all_reduce in flight on NCCL's own stream keeps running behind compute.
        cuda = device.type == "cuda" and not pipelined
        self._sync = torch.cuda.current_stream(device).synchronize if cuda else None
        self.pipelined = pipelined
        self.steps: list[dict[str, float]] = []
        """Seconds per section of every step so far, in order."""
        self._peak_memory = peak_memory
        self.peak_bytes: list[int] = []
        """`peak_memory()` at the end of every step: the step's peak, if it resets on reading."""
        self._step: dict[str, float] = defaultdict(float)
        self._last_end: float | None = None

    def start_step(self) -> None:
        self._step = defaultdict(float)
        if self.pipelined and self._last_end is None:
            self._last_end = time.perf_counter()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the block to section `name` (pipelined: nothing)."""
        if self.pipelined:
            yield
            return
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
        if self.pipelined:
            now = time.perf_counter()
            self._step["step"], self._last_end = now - self._last_end, now
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
