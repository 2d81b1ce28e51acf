"""The coupling object in a plain user loop (two calls a step), in real gloo worlds of 2 and 4
processes, against the single-process reference of replica_dist/reference.py; its state_dict resumes
a loop bit for bit; misuse is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from worlds import run_world

from replica_dist import CouplingError, ReplicaCoupling
from replica_dist.config import load_config
from replica_dist.coupling import FORM_SETTINGS
from replica_dist.data import ReplicaBatches, load_dataset, replica_indices
from replica_dist.evaluate import LOSSES
from replica_dist.loop import build_optimizer, replica_seed
from replica_dist.model import build_model
from replica_dist.reference import reference_weights

COMMON = ["train.steps=16", "train.batch_size=16", "model.hidden=[32]", "seed=5"]
CASES = {
    "tanh": ["coupling=tanh", "coupling.eta=0.05"],
    "tanh_sync": ["coupling=tanh", "coupling.eta=0.05", "dist.overlap=false"],
    "tanh_scoped_T_every_3": [
        "coupling=tanh",
        "coupling.eta=0.02",
        "coupling.eta_final=0.3",
        "coupling.eta_max=0.3",
        "coupling.temperature=0.5",
        "coupling.every=3",
    ],
    "linear_every_2": ["coupling=linear", "coupling.eta=0.2", "coupling.every=2"],
    "linear_every_2_sync": ["coupling=linear", "coupling.eta=0.2", "coupling.every=2", "dist.overlap=false"],
    "linear_via_optimizer": [
        "coupling=linear",
        "coupling.eta=0.5",
        "coupling.via_optimizer=true",
        "optim.weight_decay=0.01",
    ],
    "average_every_4": ["coupling=average", "coupling.every=4"],
    "diloco_every_3": ["coupling=diloco", "coupling.every=3"],
    # The MLP's four tensors (2048, 32, 320 and 10 weights): 2 fragments are [W1] and [b1, W2, b2].
    "tanh_2_fragments_every_4": [
        "coupling=tanh",
        "coupling.eta=0.05",
        "coupling.every=4",
        "coupling.fragments=2",
    ],
    "linear_4_fragments_every_4": [
        "coupling=linear",
        "coupling.eta=0.2",
        "coupling.every=4",
        "coupling.fragments=4",
    ],
    "average_2_fragments_every_2": ["coupling=average", "coupling.every=2", "coupling.fragments=2"],
    "diloco_2_fragments_every_4": ["coupling=diloco", "coupling.every=4", "coupling.fragments=2"],
    # float64, as in test_distributed: BatchNorm amplifies summation-order differences.
    "tanh_cnn_batchnorm": [
        "coupling=tanh",
        "coupling.eta=0.1",
        "model=cnn",
        "model.hidden=[4,4]",
        "model.batch_norm=true",
        "train.dtype=float64",
    ],
}
SCHEDULE = (
    "eta",
    "eta_growth",
    "eta_final",
    "eta_max",
    "temperature",
    "every",
    "via_optimizer",
    "outer_lr",
    "outer_momentum",
    "outer_nesterov",
    "fragments",
)


def config(case: str):
    cfg, _ = load_config(COMMON + CASES[case])
    return cfg


class UserRun:
    """What a user's script holds: a model, an optimizer, a data stream and the coupling, built
    the way the reference builds them (so that both see the same weights and batches)."""

    def __init__(self, cfg, rank: int, world_size: int):
        dtype = getattr(torch, cfg.train.dtype)
        data = load_dataset(cfg.data, cfg.seed, dtype)
        self.loss_fn = LOSSES[data.loss]
        self.model = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, rank))
        self.model.to(dtype)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        mine = replica_indices(cfg.data, len(data.x_train), cfg.seed, rank, world_size)
        self.batches = ReplicaBatches(
            data.x_train[mine], data.y_train[mine], cfg.train.batch_size, cfg.seed, rank
        )
        c = cfg.coupling
        self.coupling = ReplicaCoupling(
            self.model,
            self.optimizer,
            c.name,
            steps=cfg.train.steps,
            overlap=cfg.dist.overlap,
            **{key: getattr(c, key) for key in SCHEDULE if key in FORM_SETTINGS[c.name]},
        )

    def train(self, until: int) -> None:
        """The user's loop: the coupling's two calls around forward and backward."""
        model, optimizer, coupling = self.model, self.optimizer, self.coupling
        while coupling.step_count < until:
            coupling.begin_step()
            x, y = self.batches.next()
            loss = self.loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            coupling.step(loss)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "coupling": self.coupling.state_dict(),
            "data": self.batches.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.coupling.load_state_dict(state["coupling"])
        self.batches.load_state_dict(state["data"])


def _plain_loops(rank: int, world_size: int, root: str) -> None:
    torch.manual_seed(1234 + rank)  # the loop must not depend on the global RNG
    for case in CASES:
        cfg = config(case)
        run = UserRun(cfg, rank, world_size)
        run.train(cfg.train.steps)
        torch.save(run.model.state_dict(), Path(root) / f"{case}.replica_{rank}.pt")


# A world of 4 is the slow tier's: the world of 2 already takes every case through the fast tier.
@pytest.fixture(
    scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=lambda n: f"world{n}"
)
def trained(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"plain{request.param}")
    run_world(_plain_loops, request.param, str(root))
    return request.param, root


@pytest.mark.parametrize("case", list(CASES))
def test_a_plain_loop_matches_the_single_process_reference(trained, case):
    world_size, root = trained
    expected = reference_weights(config(case), world_size)
    for r in range(world_size):
        actual = torch.load(root / f"{case}.replica_{r}.pt")
        assert actual.keys() == expected[r].keys()
        for name in expected[r]:
            torch.testing.assert_close(
                actual[name], expected[r][name], atol=1e-6, rtol=0, msg=lambda m, r=r, n=name: f"{r} {n}: {m}"
            )


def _stop_and_resume(rank: int, world_size: int, root: str) -> None:
    for case in ("tanh", "average_every_4", "tanh_scoped_T_every_3", "diloco_2_fragments_every_4"):
        cfg = config(case)
        straight = UserRun(cfg, rank, world_size)
        straight.train(cfg.train.steps)
        first = UserRun(cfg, rank, world_size)
        first.train(7)
        saved = first.state_dict()
        torch.save(saved, Path(root) / f"{case}.{rank}.pt")
        del first
        resumed = UserRun(cfg, rank, world_size)  # a new process would build the same objects
        resumed.load_state_dict(torch.load(Path(root) / f"{case}.{rank}.pt"))
        assert resumed.coupling.step_count == 7
        resumed.train(cfg.train.steps)
        for name, value in straight.model.state_dict().items():
            assert torch.equal(value, resumed.model.state_dict()[name]), (case, name)


def test_a_loop_stopped_and_resumed_from_the_state_dict_ends_bit_for_bit_equal(tmp_path):
    run_world(_stop_and_resume, 2, str(tmp_path))


def _misuse(rank: int, world_size: int, out: str) -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    coupling = ReplicaCoupling(model, optimizer, "linear", eta=0.1)
    loss = model(torch.ones(2, 4)).sum()
    messages = []
    try:
        coupling.step(loss)
    except CouplingError as err:
        messages.append(str(err))
    coupling.begin_step()
    try:
        coupling.begin_step()
    except CouplingError as err:
        messages.append(str(err))
    loss.backward()
    coupling.step(loss)
    # A replica whose model differs: refused on every rank, at construction.
    other = torch.nn.Linear(4, 3 if rank == 0 else 2)
    try:
        ReplicaCoupling(other, torch.optim.SGD(other.parameters(), lr=0.1), "tanh")
    except CouplingError as err:
        messages.append(str(err))
    try:
        ReplicaCoupling(model, optimizer, "tanh", eta_final=0.4)
    except CouplingError as err:
        messages.append(str(err))
    try:
        ReplicaCoupling(model, optimizer, "tanh", nonfinite="ignore")
    except CouplingError as err:
        messages.append(str(err))
    # A group this rank is not in (new_group is itself a collective of the whole world).
    only_rank_0 = tdist.new_group([0])
    if rank == 1:
        try:
            ReplicaCoupling(model, optimizer, "tanh", process_group=only_rank_0)
        except CouplingError as err:
            messages.append(str(err))
    Path(out, f"rank{rank}.txt").write_text("\n".join(messages))
    tdist.barrier()


def test_misuse_is_one_clear_error_on_every_rank(tmp_path):
    run_world(_misuse, 2, str(tmp_path))
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        if rank == 1:
            assert lines.pop() == (
                "rank 1 is not in process_group: pass a group that holds one rank per replica, this one among them"
            )
        assert lines == [
            "step() called without begin_step(): call begin_step() before the forward pass",
            "begin_step() called twice: call step() after the backward pass first",
            "the replicas' models differ: 10 to 15 weights in 2 to 2 tensors; every replica must build the "
            "same model",
            "eta_final needs steps=, the run's length",
            "nonfinite= must be one of stop, skip; got 'ignore'",
        ]
