"""A plain training step reads nothing back from the device: the guard decides there.

On a GPU every value the host reads (`.item()`, `bool(tensor)`, `.tolist()`) makes it wait
for the device, and a step that does so cannot run ahead of it. Counted here on CPU with a
dispatch mode, through the trainer's own loop in a real 2-process world: on steps that
neither log, evaluate nor checkpoint, zero `_local_scalar_dense` (what `.item()`, `int()`,
`float()` and `bool()` of a tensor come down to) and zero guard read backs; on the steps that
log or checkpoint, a handful.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from worlds import COLLECTIVE_TIMEOUT_S, run_world

from replica_dist import loop
from replica_dist.config import load_config
from replica_dist.coupling import ReplicaCoupling
from replica_dist.guard import Guard

READS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
}
"""The ops through which a tensor's value reaches the host as a Python number or bool."""

STEPS = 14
LOGGED = {1, STEPS}  # log.every=100: the first and the last step
CHECKPOINTED = {7, STEPS}
EVALUATED = {STEPS}


class _CountReads(TorchDispatchMode):
    def __init__(self, counts: Counter, current: list[int]):
        super().__init__()
        self.counts, self.current = counts, current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.counts[self.current[0]] += 1
        return func(*args, **(kwargs or {}))


def _count_reads_per_step(rank: int, world_size: int, root: str, runs: dict[str, list[str]]) -> None:
    current = [0]
    begin, read_back = ReplicaCoupling.begin_step, Guard.read_back
    read_backs: Counter = Counter()

    def begin_counting(self, *args, **kwargs):
        current[0] = self.step_count + 1
        return begin(self, *args, **kwargs)

    def read_back_counting(self, step):
        read_backs[step] += 1
        return read_back(self, step)

    ReplicaCoupling.begin_step = begin_counting
    Guard.read_back = read_back_counting
    for name, overrides in runs.items():
        run_dir = Path(root) / name
        cfg, _ = load_config(
            [
                f"train.steps={STEPS}",
                "train.batch_size=16",
                "model.hidden=[32]",
                "log.every=100",
                "eval.every=100",
                "checkpoint.every=7",
                f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
                f"hydra.run.dir={run_dir}",
                *overrides,
            ]
        )
        counts: Counter = Counter()
        read_backs.clear()
        with _CountReads(counts, current):
            loop.train(cfg, run_dir, torch.device("cpu"))
        result = {"reads": dict(counts), "read_backs": dict(read_backs)}
        (run_dir / f"reads.rank{rank}.json").write_text(json.dumps(result))


FORMS = {
    "tanh-overlapped": ["coupling=tanh", "dist.overlap=true"],
    "tanh-sync": ["coupling=tanh", "dist.overlap=false"],
    "linear": ["coupling=linear"],
    "average": ["coupling=average"],
    "average-every-step": ["coupling=average", "coupling.every=1"],
    "none": ["coupling=none"],
    "skip-policy": ["coupling=tanh", "guard.nonfinite=skip"],
    "adam": ["coupling=tanh", "optim=adam"],
}


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reads")
    run_world(_count_reads_per_step, 2, str(root), FORMS, timeout_s=600)
    return root


@pytest.mark.parametrize("name", FORMS)
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_plain_step_reads_nothing_back_from_the_device(counted, name):
    for rank in range(2):
        result = json.loads((counted / name / f"reads.rank{rank}.json").read_text())
        reads = {int(step): n for step, n in result["reads"].items()}
        read_backs = {int(step): n for step, n in result["read_backs"].items()}
        plain = set(range(1, STEPS + 1)) - LOGGED - CHECKPOINTED - EVALUATED
        # The optimizer's first step creates its state (SGD's momentum) from the gradients
        # whatever the guard says: step 1, a logging step here, is decided on the host.
        assert {s: n for s, n in reads.items() if s in plain} == {}, (name, rank)
        assert set(read_backs) == LOGGED | CHECKPOINTED, (name, rank)
        # Logging, evaluating and checkpointing read numbers to write them: a bounded few.
        assert max(reads.values()) <= 40, (name, rank, reads)
        assert reads.get(7, 0) <= 4, (name, rank, reads)  # a checkpoint step that does not log


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("form", ["tanh", "linear", "average", "none"])
def test_cuda_plain_steps_make_no_synchronizing_call(tmp_path, form):
    # torch raises on any call that makes the host wait for the GPU (.item(), a copy to the
    # host, a non-pinned copy from it, a bool of a tensor) while the mode is "error".
    import torch.distributed as tdist

    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(
            device
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
        coupling = ReplicaCoupling(model, optimizer, form, **({"every": 2} if form == "average" else {}))
        x = torch.randn(32, 64, device=device)
        y = torch.randint(0, 10, (32,), device=device)

        def step(**agree):
            coupling.begin_step()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            return coupling.step(loss, **agree)

        step(agree=True)  # the optimizer's first step creates its state: decided on the host
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(10):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert bool(step(agree=True))  # read back: every step was applied
    finally:
        tdist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")
@pytest.mark.parametrize("name", ["tanh-overlapped", "linear", "average", "none"])
def test_cuda_trainer_plain_steps_make_no_synchronizing_call(tmp_path, monkeypatch, name):
    # The trainer's whole loop (data, forward, backward, coupling, the loop's own bookkeeping)
    # under sync debug mode "error" from the start of each plain step to the start of the next;
    # a batch of 256 ends the one replica's epoch of digits on plain steps, so the next epoch's
    # order goes to the GPU there too.
    import torch.distributed as tdist

    plain = set(range(2, STEPS + 1)) - LOGGED - CHECKPOINTED - EVALUATED
    begin = ReplicaCoupling.begin_step
    checked: list[int] = []

    def begin_in_mode(self, *args, **kwargs):
        step = self.step_count + 1
        torch.cuda.set_sync_debug_mode("error" if step in plain else "default")
        checked.extend([step] if step in plain else [])
        return begin(self, *args, **kwargs)

    monkeypatch.setattr(ReplicaCoupling, "begin_step", begin_in_mode)
    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        cfg, _ = load_config(
            [
                f"train.steps={STEPS}",
                "train.batch_size=256",
                "model.hidden=[32]",
                "log.every=100",
                "eval.every=100",
                "checkpoint.every=7",
                "dist.backend=nccl",
                f"hydra.run.dir={tmp_path / 'run'}",
                *FORMS[name],
            ]
        )
        summary = loop.train(cfg, tmp_path / "run", torch.device("cuda", 0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
        tdist.destroy_process_group()
    assert checked == sorted(plain) and summary["steps"] == STEPS
