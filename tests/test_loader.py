"""Any map-style Dataset (data._target_): each rank's sampler, its DataLoader, resume, streaming evaluation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from trainer_runs import REPO, replica_weights, train_losses, user_env
from worlds import COLLECTIVE_TIMEOUT_S, fail_at_batch, run_world

from replica_dist import loop
from replica_dist.batches import (
    DatasetStream,
    LoaderBatches,
    ReplicaBatches,
    ReplicaSampler,
    TensorStream,
    rank_indices,
)
from replica_dist.config import ConfigError, DataConfig, load_config
from replica_dist.data import build_datasets
from replica_dist.evaluate import predict, score, stream_score
from replica_dist.model import build_model


class MyDataset(torch.utils.data.Dataset):
    """Three classes of a fixed linear teacher; `noise` adds a random transform (torch's global
    generator, as torchvision's transforms use), so the order of draws matters."""

    classes = ["a", "b", "c"]

    def __init__(self, size: int = 96, dim: int = 6, noise: float = 0.0, train: bool = True):
        generator = torch.Generator().manual_seed(0 if train else 1)
        self.x = torch.randn(size, dim, generator=generator)
        teacher = torch.randn(dim, 3, generator=torch.Generator().manual_seed(2))
        self.y = (self.x @ teacher).argmax(1)
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        x = self.x[index]
        if self.noise:
            x = x + self.noise * torch.randn(x.shape)
        return x, int(self.y[index])


def _shards(n: int, replicas: int, dp: int = 1) -> list[list[set[int]]]:
    cfg = DataConfig(name="dataset", _target_="x.Y")
    return [
        [set(rank_indices(cfg, n, 0, r, replicas, d, dp).tolist()) for d in range(dp)]
        for r in range(replicas)
    ]


@pytest.mark.parametrize("replicas", [2, 4])
def test_replica_shards_are_disjoint_and_cover_the_data(replicas):
    shards = [parts[0] for parts in _shards(10, replicas)]
    assert set().union(*shards) == set(range(10))
    assert sum(len(s) for s in shards) == 10  # disjoint
    assert sorted(len(s) for s in shards) == ([5, 5] if replicas == 2 else [2, 2, 3, 3])


def test_dp_ranks_split_their_replicas_shard():
    whole = _shards(11, 2)
    split = _shards(11, 2, dp=2)
    for r in range(2):
        first, second = split[r]
        assert not first & second
        assert first | second == whole[r][0]
        assert len(first) - len(second) in (0, 1)
    assert set().union(*split[0], *split[1]) == set(range(11))


def test_split_full_gives_every_replica_all_the_data_in_its_own_order():
    cfg = DataConfig(name="dataset", _target_="x.Y", split="full")
    firsts = []
    for r in range(2):
        mine = rank_indices(cfg, 12, 0, r, 2, 0, 1)
        assert sorted(mine.tolist()) == list(range(12))
        sampler = ReplicaSampler(mine, 4, 0, r)
        epoch = [i for batch, _ in zip(sampler, range(3)) for _, i in batch]
        assert sorted(epoch) == list(range(12))  # one epoch: each sample once
        firsts.append(epoch)
    assert firsts[0] != firsts[1]


def test_each_epoch_visits_the_shard_once_in_a_new_order():
    mine = torch.tensor([3, 8, 13, 21, 34, 55])
    sampler = ReplicaSampler(mine, 2, 0, 0)
    batches = [[i for _, i in batch] for batch, _ in zip(sampler, range(9))]
    epochs = [sum(batches[k : k + 3], []) for k in (0, 3, 6)]
    for epoch in epochs:
        assert sorted(epoch) == mine.tolist()
    assert len({tuple(e) for e in epochs}) == 3


def _loader_batches(num_workers: int, noise: float = 0.1) -> LoaderBatches:
    dataset = MyDataset(size=40, noise=noise)
    cfg = DataConfig(name="dataset", _target_="x.Y", num_workers=num_workers)
    sampler = ReplicaSampler(torch.arange(40), 8, 0, 1)
    return LoaderBatches(dataset, sampler, cfg, torch.device("cpu"), torch.float32)


def _draw(batches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batches.next() for _ in range(n)]


def _assert_same(got, expected) -> None:
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_the_position_round_trips_mid_epoch_with_workers():
    uninterrupted = _draw(_loader_batches(0), 17)
    interrupted = _loader_batches(2)
    _assert_same(_draw(interrupted, 7), uninterrupted[:7])  # two workers, one: the same batches
    state = interrupted.state_dict()
    # 5 batches per epoch: 7 taken is epoch 1, batch 2, however far the workers read ahead.
    assert state == {"epoch": 1, "batch": 2}
    resumed = _loader_batches(2)
    resumed.load_state_dict(state)
    _assert_same(_draw(resumed, 10), uninterrupted[7:])
    _assert_same(_draw(interrupted, 10), uninterrupted[7:])


def test_a_dataset_and_in_memory_tensors_give_the_same_batches():
    loader = _loader_batches(0, noise=0.0)
    dataset = MyDataset(size=40)
    in_memory = ReplicaBatches(dataset.x, dataset.y, 8, 0, 1)
    _assert_same(_draw(loader, 12), _draw(in_memory, 12))
    assert loader.state_dict() == in_memory.state_dict() == {"epoch": 2, "batch": 2}


def test_streaming_evaluation_equals_whole_tensor_evaluation():
    dataset = MyDataset(size=50, noise=0.0)
    model = build_model(load_config([])[0].model, (6,), 3, 0)
    whole = score(predict(model, dataset.x, "classification"), dataset.y, "classification", "cross_entropy")
    cfg = DataConfig(name="dataset", _target_="x.Y", num_workers=2)
    for batches in (
        TensorStream(dataset.x, dataset.y, 7),
        DatasetStream(dataset, 7, cfg, torch.device("cpu"), torch.float32, 0),
    ):
        streamed = stream_score(model, batches, "classification", "cross_entropy")
        assert streamed["accuracy"] == whole["accuracy"]
        assert streamed["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    targets = torch.randn(50, 2)
    regression = build_model(load_config([])[0].model, (6,), 2, 0)
    for loss in ("mse", "sse"):
        expected = score(predict(regression, dataset.x, "regression"), targets, "regression", loss)
        streamed = stream_score(regression, TensorStream(dataset.x, targets, 7), "regression", loss)
        assert streamed["loss"] == pytest.approx(expected["loss"], rel=1e-6)


class WholeDataset(MyDataset):
    """One set, no `train` argument: split by data.test_fraction."""

    def __init__(self, size: int = 96):
        super().__init__(size)


def test_a_target_with_train_gives_both_sets_and_one_without_is_split():
    cfg = DataConfig(name="dataset", _target_="tests.test_loader.MyDataset", kwargs={"size": 30})
    train_set, test_set, info = build_datasets(cfg, 0, torch.float32)
    assert (len(train_set), len(test_set)) == (30, 30)
    assert not torch.equal(train_set.x, test_set.x)  # built with train=True, then train=False
    assert (info.task, info.loss, info.num_outputs, info.input_shape) == (
        "classification",
        "cross_entropy",
        3,
        (6,),
    )
    cfg = DataConfig(name="dataset", _target_="tests.test_loader.WholeDataset", kwargs={"size": 30})
    train_set, test_set, _ = build_datasets(cfg, 0, torch.float32)
    assert (len(train_set), len(test_set)) == (24, 6)
    assert sorted(train_set.indices + test_set.indices) == list(range(30))


# ---- end to end: two gloo processes, data._target_ in this module, resumed bit for bit

OVERRIDES = [
    "data._target_=tests.test_loader.MyDataset",
    "+data.kwargs.noise=0.1",
    "data.num_workers=2",
    "train.steps=12",
    "train.batch_size=8",
    "model.hidden=[16]",
    "log.every=1",
    "eval.every=4",
    "eval.batch_size=20",
    "checkpoint.every=4",
    "optim.momentum=0.9",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]


def _train(rank: int, world_size: int, run_dir: str, fail_at_step: int = 0) -> None:
    # Under torchrun a rank's DataLoader workers are forked (Linux's default); these ranks come
    # from a forkserver, whose start method their workers would inherit, each importing torch
    # and this module again.
    torch.multiprocessing.set_start_method("fork", force=True)
    if fail_at_step:
        fail_at_batch(LoaderBatches, fail_at_step)
    cfg, _ = load_config(OVERRIDES + [f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


@pytest.mark.slow
def test_a_dataset_target_trains_and_resumes_bit_for_bit_with_workers(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_world(_train, 2, str(reference))
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_train, 2, str(resumed), 10)
    assert (resumed / "checkpoints" / "step-00000008" / "manifest.json").exists()
    assert not (resumed / "summary.json").exists()
    run_world(_train, 2, str(resumed))
    expected_weights = replica_weights(reference, 2)
    assert not torch.equal(expected_weights[0]["fc1.weight"], expected_weights[1]["fc1.weight"])
    for got, expected in zip(replica_weights(resumed, 2), expected_weights):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    for replica in range(2):
        losses = train_losses(resumed, replica)
        assert [step for step, _ in losses] == list(range(1, 13))
        assert losses == train_losses(reference, replica)


# ---- bad inputs: one line naming the key, exit 2, nothing written


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data._target_=no_such_module.Data", "data._target_=no_such_module.Data: cannot import it"),
        (
            "data._target_=tests.test_loader.NoSuchClass",
            "data._target_=tests.test_loader.NoSuchClass: cannot import it: tests.test_loader has no attribute",
        ),
        ("data._target_=tests.test_loader.MyDataset +data.kwargs.sise=3", "cannot be built"),
        (
            "data._target_=tests.test_loader.MyDataset data.num_workers=-1",
            "data.num_workers must be >= 0; got -1",
        ),
    ],
)
@pytest.mark.slow
def test_bad_inputs_are_one_line_naming_the_key(tmp_path, override, expected):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "replica_dist.train", *override.split(), f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=user_env(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}"),  # this module imports runs
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("replica_dist: error: "), result.stderr
    assert expected in lines[0]
    assert not run_dir.exists()


def test_num_workers_without_a_dataset_is_refused():
    with pytest.raises(ConfigError, match="data.num_workers is only used with data=dataset"):
        load_config(["data.num_workers=2"])


def test_a_checkpoint_of_the_older_data_order_is_refused_in_one_line():
    from replica_dist.batches import EpochOrder
    from replica_dist.errors import RunError

    order = EpochOrder(10, 3, 0, 0)
    with pytest.raises(RunError, match=r"^this checkpoint was written by replica_dist 0\.1 before"):
        order.load_state_dict({"rng": {}, "order": [0, 1], "position": 2})
