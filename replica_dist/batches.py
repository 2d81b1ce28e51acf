"""Which samples each rank trains on, in which order (the one home of both), and the batches
that read them: from tensors on the device (in-memory data) or through a DataLoader over a
map-style Dataset, each deterministic from the seed and the rank, so that a resumed run reads
exactly the batches an uninterrupted one reads; and evaluation's streams over a dataset."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from replica_dist import streams
from replica_dist.errors import ConfigError, RunError

if TYPE_CHECKING:
    from replica_dist.config import DataConfig

log = logging.getLogger(__name__)


def replica_indices(cfg: DataConfig, num_train: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices into the training set that belong to replica `rank`."""
    if cfg.name == "seed":
        # The note: each replica's fixed batch is drawn with replacement from the library.
        return torch.as_tensor(
            streams.rng(seed, streams.SEED_BATCH, rank).integers(num_train, size=cfg.fixed_batch)
        )
    if cfg.split == "full":
        return torch.arange(num_train)
    if num_train < world_size:
        raise ConfigError(
            f"data.split=shard needs at least one training sample per replica: "
            f"{world_size} replicas but {num_train} training samples"
        )
    order = streams.rng(seed, streams.SHARD).permutation(num_train)
    return torch.as_tensor(np.array_split(order, world_size)[rank])


def rank_indices(
    cfg: DataConfig, num_train: int, seed: int, replica: int, num_replicas: int, dp_rank: int, dp: int
) -> torch.Tensor:
    """Indices into the training set of one rank: its replica's shard, split among the
    replica's `dp` ranks (parallel.dp)."""
    return replica_indices(cfg, num_train, seed, replica, num_replicas)[dp_rank::dp]


class EpochOrder:
    """A rank's position in its endless sequence of minibatches over `n` samples: epoch e
    visits them in the e-th permutation of the rank's own stream, n // batch_size batches
    (the rest waits for a later epoch's order). With batch_size >= n every batch is all n
    samples in their own order (the note's fixed batch) and the position does not move."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int):
        self.n, self.whole = n, batch_size >= n
        self.batch_size = min(batch_size, n)
        self.per_epoch = n // self.batch_size
        self.seed, self.rank = seed, rank
        self.epoch, self.batch = 0, 0  # of the next batch
        self._rng, self._drawn = streams.rng(seed, streams.ORDER, rank), -1

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order: the stream replayed from its start when asked to go back."""
        if epoch < self._drawn or self._drawn < 0:
            self._rng, self._drawn = streams.rng(self.seed, streams.ORDER, self.rank), -1
        while self._drawn < epoch:
            self._permutation = self._rng.permutation(self.n)
            self._drawn += 1
        return self._permutation

    def advance(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, batch = position
        if self.whole:
            return position
        return (epoch + 1, 0) if batch + 1 == self.per_epoch else (epoch, batch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        if "epoch" not in state:  # {"rng", "order", "position"}: a shuffle this version cannot continue
            raise RunError(
                "this checkpoint was written by replica_dist 0.1 before its data order became "
                "(epoch, batch): resume it with the version that wrote it, or start over in a new run directory"
            )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class ReplicaSampler:
    """A batch sampler (for DataLoader's `batch_sampler`) of one rank's training indices:
    endless, deterministic from the seed and the rank, starting from `order`'s position.
    Iterating does not move that position: the consumer advances it per batch it used, so
    batches a DataLoader prefetched and never handed out do not count."""

    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int, rank: int):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.order = EpochOrder(len(self.indices), batch_size, seed, rank)
        self.seed, self.rank = seed, rank

    def batch_indices(self, position: tuple[int, int]) -> np.ndarray:
        """The dataset indices of the batch at `position` (epoch, batch within the epoch)."""
        order = self.order
        if order.whole:
            return self.indices
        epoch, batch = position
        chosen = order.permutation(epoch)[batch * order.batch_size : (batch + 1) * order.batch_size]
        return self.indices[chosen]

    def __iter__(self):
        position = (self.order.epoch, self.order.batch)
        while True:
            base = streams.sample_seed(self.seed, streams.AUGMENT, self.rank, *position)
            yield [((base + j) % 2**63, int(i)) for j, i in enumerate(self.batch_indices(position))]
            position = self.order.advance(position)


class _SeededSamples(TorchDataset):
    """Reads item `index` of `dataset` for a key (seed, index), under torch's random state set
    to `seed`: a random transform then draws the same numbers whichever process (worker or
    not) reads the sample, and whatever was read before, so resume is bit for bit."""

    def __init__(self, dataset: TorchDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        seed, index = key
        with torch.random.fork_rng(devices=[]):  # the training process's own stream is left alone
            torch.manual_seed(seed)
            return self.dataset[index]


def _loader(
    dataset: TorchDataset, batch_sampler, cfg: DataConfig, device: torch.device, seed: int
) -> DataLoader:
    return DataLoader(
        _SeededSamples(dataset),
        batch_sampler=batch_sampler,
        num_workers=cfg.num_workers,
        pin_memory=cfg.pin_memory and device.type == "cuda",
        persistent_workers=cfg.persistent_workers,
        generator=torch.Generator().manual_seed(seed),  # the workers' base seed
    )


def to_device(x, y, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A collated batch on `device`: inputs in the run's dtype; integer labels as int64, float
    targets in the run's dtype as (batch, outputs)."""
    x = torch.as_tensor(x).to(device=device, dtype=dtype, non_blocking=True)
    y = torch.as_tensor(y)
    if y.is_floating_point():
        y = y.to(device=device, dtype=dtype, non_blocking=True).reshape(len(y), -1)
    else:
        y = y.to(device=device, dtype=torch.long, non_blocking=True)
    return x, y


class TensorStream:
    """(x, y) in consecutive slices of tensors already on the device: evaluation's batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.x), self.batch_size):
            yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]


class _InOrder:
    """Batch sampler: every index once, in order, each under its own seed."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        for start in range(0, self.n, self.batch_size):
            yield [
                (streams.sample_seed(self.seed, streams.EVAL, i), i)
                for i in range(start, min(start + self.batch_size, self.n))
            ]


class DatasetStream:
    """(x, y) batches of a map-style Dataset read in order through a DataLoader, on the device."""

    def __init__(
        self, dataset: TorchDataset, batch_size: int, cfg: DataConfig, device: torch.device, dtype, seed: int
    ):
        self.dataset, self.device, self.dtype = dataset, device, dtype
        self.loader = _loader(dataset, _InOrder(len(dataset), batch_size, seed), cfg, device, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.loader:
            yield to_device(x, y, self.device, self.dtype)


def stream(
    dataset: TorchDataset, batch_size: int, cfg: DataConfig, device: torch.device, dtype, seed: int
) -> TensorStream | DatasetStream:
    """Evaluation's batches of a dataset: slices of device tensors for in-memory data."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        return TensorStream(x.to(device), y.to(device), batch_size)
    return DatasetStream(dataset, batch_size, cfg, device, dtype, seed)


class ReplicaBatches:
    """Minibatches of one rank from tensors it holds on the device (its part of in-memory
    data), in ReplicaSampler's order: the permutation of an epoch goes to the device once, and
    each step slices it there.

    A rank whose data is not larger than the batch size trains on all of it every step
    (the note's fixed batch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, rank: int):
        self.x, self.y = x, y
        if batch_size > len(x):
            log.info(
                "train.batch_size=%d is larger than this replica's %d training samples: "
                "every step uses all of them",
                batch_size,
                len(x),
            )
        self.sampler = ReplicaSampler(torch.arange(len(x)), batch_size, seed, rank)
        self.batch_size = self.sampler.order.batch_size
        self._order, self._order_epoch = None, -1

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.sampler.order
        if order.whole:
            return self.x, self.y
        if self._order_epoch != order.epoch:
            permutation = torch.as_tensor(order.permutation(order.epoch))
            if self.x.is_cuda:  # from pinned memory the copy is queued; from pageable it waits for the GPU
                permutation = permutation.pin_memory()
            self._order = permutation.to(self.x.device, non_blocking=True)
            self._order_epoch = order.epoch
        start = order.batch * self.batch_size
        chosen = self._order[start : start + self.batch_size]
        order.epoch, order.batch = order.advance((order.epoch, order.batch))
        return self.x[chosen], self.y[chosen]

    def own_data(self, batch_size: int) -> TensorStream:
        """This rank's training data, for evaluation."""
        return TensorStream(self.x, self.y, batch_size)

    def state_dict(self) -> dict:
        """Where this rank is in its data order (epoch, batch within it): enough to continue bit
        for bit."""
        return self.sampler.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.order.load_state_dict(state)
        self._order_epoch = -1


class LoaderBatches:
    """Minibatches of one rank from a map-style Dataset, through one DataLoader over its
    ReplicaSampler. The position advances per batch the loop takes, not per batch the
    loader's workers prepared, and resuming rebuilds the loader's iterator from it."""

    def __init__(
        self,
        dataset: TorchDataset,
        sampler: ReplicaSampler,
        cfg: DataConfig,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.dataset, self.sampler, self.cfg = dataset, sampler, cfg
        self.device, self.dtype = device, dtype
        self.batch_size = sampler.order.batch_size
        seed = streams.sample_seed(sampler.seed, streams.WORKERS, sampler.rank)
        self.loader = _loader(dataset, sampler, cfg, device, seed)
        self._batches = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.loader)
        x, y = next(self._batches)
        order = self.sampler.order
        order.epoch, order.batch = order.advance((order.epoch, order.batch))
        return to_device(x, y, self.device, self.dtype)

    def own_data(self, batch_size: int) -> DatasetStream:
        """This rank's training data, for evaluation."""
        subset = Subset(self.dataset, self.sampler.indices.tolist())
        return DatasetStream(subset, batch_size, self.cfg, self.device, self.dtype, self.sampler.seed)

    def state_dict(self) -> dict:
        return self.sampler.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.order.load_state_dict(state)
        self._batches = None  # the next batch comes from a fresh iterator, from this position
