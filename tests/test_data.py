"""Datasets, replica shards and minibatch order."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from trainer_runs import REPO

from replica_dist.config import ConfigError, DataConfig
from replica_dist.data import ReplicaBatches, load_dataset, load_digits, replica_indices

SEED_CFG = dict(name="seed", input_dim=1000, num_outputs=10, library_size=640, fixed_batch=64)
NUM_DIGITS = 1797  # scikit-learn's digits


# --- digits ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(), seed=0, dtype=torch.float32)


def test_digits_are_scikit_learns_own():
    from sklearn.datasets import load_digits as sklearn_load_digits

    reference = sklearn_load_digits()
    images, target = load_digits()
    assert images.dtype == reference.images.dtype and target.dtype == reference.target.dtype
    assert np.array_equal(images, reference.images) and np.array_equal(target, reference.target)


def test_digits_shapes_and_ranges(digits):
    n_train, n_test = len(digits.x_train), len(digits.x_test)
    assert n_train + n_test == NUM_DIGITS
    assert digits.x_train.shape == (n_train, 1, 8, 8)
    assert digits.x_test.shape == (n_test, 1, 8, 8)
    assert digits.input_shape == (1, 8, 8)
    assert digits.x_train.dtype == torch.float32
    for x in (digits.x_train, digits.x_test):
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert digits.x_train.max() == pytest.approx(1.0)  # 16/16 occurs
    assert digits.y_train.shape == (n_train,) and digits.y_test.shape == (n_test,)
    assert digits.y_train.dtype == torch.long
    assert set(digits.y_train.tolist()) == set(range(10))
    assert set(digits.y_test.tolist()) <= set(range(10))
    assert digits.task == "classification"
    assert digits.loss == "cross_entropy"
    assert digits.num_outputs == 10


def test_digits_test_fraction(digits):
    assert len(digits.x_test) / NUM_DIGITS == pytest.approx(0.2, abs=1 / NUM_DIGITS)
    half = load_dataset(DataConfig(test_fraction=0.5), seed=0, dtype=torch.float32)
    assert len(half.x_test) / NUM_DIGITS == pytest.approx(0.5, abs=1 / NUM_DIGITS)


def test_digits_split_is_a_partition(digits):
    """Train and test together are the whole dataset, each image once."""
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images / 16.0, dtype=torch.float32).reshape(NUM_DIGITS, -1)
    ours = torch.cat([digits.x_train, digits.x_test]).reshape(NUM_DIGITS, -1)

    def rows(t):
        return sorted(tuple(r) for r in t.tolist())

    assert rows(ours) == rows(raw)


def test_digits_same_seed_same_data(digits):
    again = load_dataset(DataConfig(), seed=0, dtype=torch.float32)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(digits, name), getattr(again, name))


def test_digits_other_seed_other_split(digits):
    other = load_dataset(DataConfig(), seed=1, dtype=torch.float32)
    assert other.x_train.shape == digits.x_train.shape
    assert not torch.equal(other.x_train, digits.x_train)
    assert not torch.equal(other.y_test, digits.y_test)


def test_digits_float64(digits):
    d64 = load_dataset(DataConfig(), seed=0, dtype=torch.float64)
    assert d64.x_train.dtype == torch.float64
    assert d64.y_train.dtype == torch.long
    assert torch.allclose(d64.x_train.float(), digits.x_train)


# --- replica_indices --------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_train", [1437, 10, 7])
def test_shards_partition_training_set(world_size, num_train):
    cfg = DataConfig(split="shard")
    shards = [replica_indices(cfg, num_train, 0, rank, world_size) for rank in range(world_size)]
    all_indices = torch.cat(shards).tolist()
    assert len(all_indices) == len(set(all_indices)), "shards overlap"
    assert sorted(all_indices) == list(range(num_train))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    again = [replica_indices(cfg, num_train, 0, rank, world_size) for rank in range(world_size)]
    for a, b in zip(shards, again):
        assert torch.equal(a, b)


def test_shards_depend_on_seed():
    cfg = DataConfig(split="shard")
    a = replica_indices(cfg, 100, 0, 0, 2)
    b = replica_indices(cfg, 100, 1, 0, 2)
    assert not torch.equal(torch.sort(a).values, torch.sort(b).values)


@pytest.mark.parametrize("world_size", [1, 3])
def test_full_split_gives_all_indices(world_size):
    cfg = DataConfig(split="full")
    for rank in range(world_size):
        idx = replica_indices(cfg, 50, 0, rank, world_size)
        assert sorted(idx.tolist()) == list(range(50))


def test_more_replicas_than_samples_raises():
    with pytest.raises(ConfigError, match=r"data\.split"):
        replica_indices(DataConfig(split="shard"), 3, 0, 0, 4)


def test_as_many_replicas_as_samples_is_fine():
    shards = [replica_indices(DataConfig(split="shard"), 4, 0, r, 4) for r in range(4)]
    assert sorted(torch.cat(shards).tolist()) == [0, 1, 2, 3]


# --- seed data (the note) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_data():
    return load_dataset(DataConfig(**SEED_CFG), seed=0, dtype=torch.float32)


def test_seed_library(seed_data):
    assert seed_data.x_train.shape == (640, 1000)
    assert seed_data.y_train.shape == (640, 10)
    assert seed_data.y_train.is_floating_point()
    assert seed_data.x_train.dtype == torch.float32
    assert seed_data.task == "regression"
    assert seed_data.loss == "sse"
    assert seed_data.num_outputs == 10
    # N(0, 1) entries
    assert abs(seed_data.x_train.mean().item()) < 0.01
    assert seed_data.x_train.std().item() == pytest.approx(1.0, abs=0.01)
    assert seed_data.y_train.std().item() == pytest.approx(1.0, abs=0.05)
    # The library doubles as the test set.
    assert torch.equal(seed_data.x_test, seed_data.x_train)
    assert torch.equal(seed_data.y_test, seed_data.y_train)


def test_seed_replica_fixed_batches(seed_data):
    cfg = DataConfig(**SEED_CFG)
    n = len(seed_data.x_train)
    batches = [replica_indices(cfg, n, 0, rank, 2) for rank in range(2)]
    for idx in batches:
        assert idx.shape == (64,)
        assert idx.dtype in (torch.int64, torch.int32)
        assert idx.min() >= 0 and idx.max() < 640
    assert not torch.equal(batches[0], batches[1])
    for rank, idx in enumerate(batches):
        assert torch.equal(replica_indices(cfg, n, 0, rank, 2), idx)
    # Independent of the world size: the note's batch of rank r is fixed by (seed, r).
    assert torch.equal(replica_indices(cfg, n, 0, 0, 4), batches[0])
    # Another seed, another batch.
    assert not torch.equal(replica_indices(cfg, n, 1, 0, 2), batches[0])


def test_seed_library_depends_on_seed(seed_data):
    other = load_dataset(DataConfig(**SEED_CFG), seed=1, dtype=torch.float32)
    assert not torch.equal(other.x_train, seed_data.x_train)


# --- teacher data ---------------------------------------------------------------------


def test_teacher_labels():
    cfg = DataConfig(name="teacher", num_samples=500, input_dim=20, num_outputs=4)
    data = load_dataset(cfg, seed=0, dtype=torch.float32)
    assert data.x_train.shape[1:] == (20,)
    assert len(data.x_train) + len(data.x_test) == 500
    assert len(data.x_test) == 100
    labels = torch.cat([data.y_train, data.y_test])
    assert labels.dtype == torch.long
    assert labels.min() >= 0 and labels.max() < 4
    assert len(set(labels.tolist())) > 1
    assert data.task == "classification" and data.loss == "cross_entropy"
    assert data.num_outputs <= 4
    again = load_dataset(cfg, seed=0, dtype=torch.float32)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_train, data.y_train)


# --- file data --------------------------------------------------------------------------


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_file_classification(tmp_path):
    rng = np.random.default_rng(0)
    path = _npz(
        tmp_path / "cls.npz",
        X_train=rng.standard_normal((30, 5)),
        y_train=np.array([0, 1, 2] * 10, dtype=np.int64),
        X_test=rng.standard_normal((6, 5)),
        y_test=np.array([2, 1, 0, 0, 2, 2], dtype=np.int32),
    )
    data = load_dataset(DataConfig(name="file", path=path), seed=0, dtype=torch.float32)
    assert data.task == "classification"
    assert data.loss == "cross_entropy"
    assert data.num_outputs == 3  # classes 0, 1, 2
    assert data.y_train.dtype == torch.long and data.y_test.dtype == torch.long
    assert data.x_train.shape == (30, 5) and data.x_test.shape == (6, 5)
    assert data.input_shape == (5,)
    assert data.y_test.tolist() == [2, 1, 0, 0, 2, 2]


def test_file_regression(tmp_path):
    rng = np.random.default_rng(1)
    y_train = rng.standard_normal(20)
    path = _npz(
        tmp_path / "reg.npz",
        X_train=rng.standard_normal((20, 3)),
        y_train=y_train,
        X_test=rng.standard_normal((4, 3)),
        y_test=rng.standard_normal(4).astype(np.float32),
    )
    data = load_dataset(DataConfig(name="file", path=path), seed=0, dtype=torch.float64)
    assert data.task == "regression"
    assert data.loss == "mse"
    assert data.y_train.shape == (20, 1) and data.y_test.shape == (4, 1)
    assert data.y_train.dtype == torch.float64
    assert data.num_outputs == 1
    assert np.allclose(data.y_train[:, 0].numpy(), y_train)


def test_file_regression_multi_output(tmp_path):
    rng = np.random.default_rng(2)
    path = _npz(
        tmp_path / "reg2.npz",
        X_train=rng.standard_normal((8, 3)),
        y_train=rng.standard_normal((8, 2)),
        X_test=rng.standard_normal((2, 3)),
        y_test=rng.standard_normal((2, 2)),
    )
    data = load_dataset(DataConfig(name="file", path=path), seed=0, dtype=torch.float32)
    assert data.y_train.shape == (8, 2)
    assert data.num_outputs == 2


def test_file_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_dataset(DataConfig(name="file", path=str(tmp_path / "nope.npz")), 0, torch.float32)


def test_file_lacking_y_test(tmp_path):
    path = _npz(
        tmp_path / "partial.npz",
        X_train=np.zeros((4, 2)),
        y_train=np.zeros(4, dtype=np.int64),
        X_test=np.zeros((2, 2)),
    )
    with pytest.raises(ConfigError, match=r"data\.path.*y_test"):
        load_dataset(DataConfig(name="file", path=path), 0, torch.float32)


def test_file_mismatched_lengths(tmp_path):
    path = _npz(
        tmp_path / "mismatch.npz",
        X_train=np.zeros((5, 2)),
        y_train=np.zeros(4, dtype=np.int64),
        X_test=np.zeros((2, 2)),
        y_test=np.zeros(2, dtype=np.int64),
    )
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_dataset(DataConfig(name="file", path=path), 0, torch.float32)


def test_file_not_an_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_dataset(DataConfig(name="file", path=str(path)), 0, torch.float32)


# --- ReplicaBatches ---------------------------------------------------------------------


def _labelled(n):
    """x holds each sample's own index, so a batch names the samples it contains."""
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(n)
    return x, y


@pytest.mark.parametrize(("n", "batch_size"), [(100, 10), (103, 10), (37, 5), (10, 3)])
def test_batches_one_pass_without_repeats(n, batch_size):
    x, y = _labelled(n)
    batches = ReplicaBatches(x, y, batch_size, seed=0, rank=0)
    seen = []
    for _ in range(n // batch_size):
        xb, yb = batches.next()
        assert xb.shape == (batch_size, 1) and yb.shape == (batch_size,)
        assert torch.equal(xb[:, 0].long(), yb), "x and y rows must stay paired"
        seen.extend(yb.tolist())
    assert len(seen) == len(set(seen))
    assert set(seen) <= set(range(n))


def test_batches_cover_data_and_reshuffle():
    n, batch_size = 20, 5
    x, y = _labelled(n)
    batches = ReplicaBatches(x, y, batch_size, seed=0, rank=0)
    passes = []
    for _ in range(3):
        order = torch.cat([batches.next()[1] for _ in range(n // batch_size)])
        assert sorted(order.tolist()) == list(range(n))
        passes.append(order)
    assert not (torch.equal(passes[0], passes[1]) and torch.equal(passes[1], passes[2]))


@pytest.mark.parametrize("batch_size", [8, 9, 1000])
def test_batch_size_at_least_data_returns_all(batch_size):
    x, y = _labelled(8)
    batches = ReplicaBatches(x, y, batch_size, seed=0, rank=0)
    for _ in range(3):
        xb, yb = batches.next()
        assert torch.equal(xb, x) and torch.equal(yb, y)


def test_batches_reproducible_per_rank():
    x, y = _labelled(50)

    def draws(seed, rank):
        b = ReplicaBatches(x, y, 7, seed=seed, rank=rank)
        return [b.next()[1] for _ in range(15)]

    same_a, same_b = draws(0, 1), draws(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(same_a, same_b))
    other_rank = draws(0, 2)
    assert not all(torch.equal(a, b) for a, b in zip(same_a, other_rank))
    other_seed = draws(1, 1)
    assert not all(torch.equal(a, b) for a, b in zip(same_a, other_seed))


def test_generated_data_too_small_names_its_own_keys():
    with pytest.raises(ConfigError, match=r"data\.num_samples and data\.test_fraction") as err:
        load_dataset(DataConfig(name="teacher", num_samples=1, input_dim=3, num_outputs=2), 0, torch.float32)
    assert "data.path" not in str(err.value)


def test_replica_batches_continue_identically_from_their_state():
    x = torch.arange(50, dtype=torch.float32)[:, None]
    y = torch.arange(50)
    first = ReplicaBatches(x, y, batch_size=8, seed=1, rank=2)
    for _ in range(9):  # into the second pass
        first.next()
    resumed = ReplicaBatches(x, y, batch_size=8, seed=1, rank=2)
    resumed.load_state_dict(first.state_dict())
    for _ in range(20):
        assert torch.equal(first.next()[1], resumed.next()[1])


def test_batch_size_larger_than_the_data_is_said_once(caplog):
    x, y = _labelled(8)
    with caplog.at_level(logging.INFO, logger="replica_dist.batches"):
        ReplicaBatches(x, y, 100000000, seed=0, rank=0)
        ReplicaBatches(x, y, 8, seed=0, rank=0)  # the whole shard by choice: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        "train.batch_size=100000000 is larger than this replica's 8 training samples: every step uses all of them"
    ]
    assert caplog.records[0].levelno == logging.INFO  # so ranks other than 0 (at WARNING) stay quiet


# --- data.task ---------------------------------------------------------------------------


def _integer_targets(path, n_train=200, n_test=50):
    """Integer-valued targets of a linear function of the inputs, all >= 1 (not class labels)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n_train + n_test, 4))
    y = np.clip(np.rint(10 + 3 * x[:, 0] + 2 * x[:, 1]), 1, None).astype(np.int64)
    return _npz(path, X_train=x[:n_train], y_train=y[:n_train], X_test=x[n_train:], y_test=y[n_train:]), y


def test_integer_targets_are_refused_by_auto_and_taken_by_task_regression(tmp_path):
    path, y = _integer_targets(tmp_path / "counts.npz")
    distinct = len(np.unique(y[:200]))
    with pytest.raises(ConfigError) as err:
        load_dataset(DataConfig(name="file", path=path), 0, torch.float32)
    assert str(err.value) == (
        f"data.path {path}: y_train holds integers that do not look like class labels ({distinct} distinct "
        f"values, min {y[:200].min()}, max {y[:200].max()}): set data.task=classification or data.task=regression"
    )
    data = load_dataset(DataConfig(name="file", path=path, task="regression"), 0, torch.float32)
    assert data.task == "regression" and data.loss == "mse" and data.num_outputs == 1
    assert data.y_train.dtype == torch.float32 and data.y_train.shape == (200, 1)
    assert data.y_train[:, 0].tolist() == y[:200].tolist()


def test_task_classification_takes_labels_with_gaps(tmp_path):
    """auto refuses labels 0, 2, 5 (not every class occurs); asked for, they are 6 classes."""
    path = _npz(
        tmp_path / "gaps.npz",
        X_train=np.zeros((6, 2)),
        y_train=np.array([0, 2, 5, 0, 2, 5]),
        X_test=np.zeros((2, 2)),
        y_test=np.array([5, 0]),
    )
    with pytest.raises(
        ConfigError, match=r"do not look like class labels \(3 distinct values, min 0, max 5\)"
    ):
        load_dataset(DataConfig(name="file", path=path), 0, torch.float32)
    data = load_dataset(DataConfig(name="file", path=path, task="classification"), 0, torch.float32)
    assert data.task == "classification" and data.num_outputs == 6 and data.y_test.tolist() == [5, 0]


def test_task_regression_takes_float_targets_as_auto_does(tmp_path):
    rng = np.random.default_rng(4)
    path = _npz(
        tmp_path / "reg.npz",
        X_train=rng.standard_normal((8, 3)),
        y_train=rng.standard_normal(8),
        X_test=rng.standard_normal((2, 3)),
        y_test=rng.standard_normal(2),
    )
    auto = load_dataset(DataConfig(name="file", path=path), 0, torch.float64)
    explicit = load_dataset(DataConfig(name="file", path=path, task="regression"), 0, torch.float64)
    assert auto.task == explicit.task == "regression"
    assert torch.equal(auto.y_train, explicit.y_train) and torch.equal(auto.y_test, explicit.y_test)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_integer_regression_targets_train_to_a_finite_mse_below_the_constant_guess(tmp_path):
    path, y = _integer_targets(tmp_path / "counts.npz")
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "replica_dist.train",
            f"hydra.run.dir={run_dir}",
            "data=file",
            f"data.path={path}",
            "data.task=regression",
            "model.hidden=[32]",
            "optim=adam",
            "optim.lr=0.01",
            "train.steps=300",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "regression"
    test_mse = summary["replicas"][0]["test_loss"]
    # Predicting the test mean is the best constant; a net fit to a linear target beats it.
    constant_mse = float(np.var(y[200:]))
    assert np.isfinite(test_mse) and test_mse < 0.5 * constant_mse
