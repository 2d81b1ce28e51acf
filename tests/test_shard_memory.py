"""The sharded-replica memory tool (experiments/shard_memory.py): its exact byte counts fall as
1/S against closed forms from the model's parameter count (its peaks and timings never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from worlds import COLLECTIVE_TIMEOUT_S, run_world

from replica_dist.experiments.shard_memory import HELD, rank_memory
from replica_dist.guard import Guard

HIDDEN = 33  # 33 rows over 2 shards: 17 and 16, an uneven split
STEPS = 3
SHAPES = [(HIDDEN, 64), (HIDDEN,), (10, HIDDEN), (10,)]  # digits: 8x8 images, 10 classes
NUMEL = sum(torch.Size(shape).numel() for shape in SHAPES)
FLOAT32 = 4


def _measure(rank: int, world_size: int, root: str, shard: int) -> None:
    run_dir = Path(root) / f"shard_{shard}"
    overrides = [
        f"model.hidden=[{HIDDEN}]",
        "train.batch_size=16",
        f"train.steps={STEPS}",
        "optim.momentum=0.9",  # one state tensor per parameter
        f"parallel.shard={shard}",
        f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
        f"hydra.run.dir={run_dir}",
    ]
    numbers = rank_memory(overrides, run_dir, torch.device("cpu"))
    (Path(root) / f"shard_{shard}_rank_{rank}.json").write_text(json.dumps(numbers))


def _row_bytes() -> int:
    """Bytes of one row (dim 0 slice) of every parameter together: FSDP2 splits each tensor
    by rows, so a rank's part of a tensor differs from 1/S of it by less than one row."""
    return FLOAT32 * sum(torch.Size(shape[1:]).numel() for shape in SHAPES)


def test_each_rank_holds_one_shard_of_params_grads_and_momentum(tmp_path):
    run_world(_measure, 2, str(tmp_path), 1)
    run_world(_measure, 4, str(tmp_path), 2)
    whole = FLOAT32 * NUMEL
    for shard, world in ((1, 2), (2, 4)):
        ranks = [json.loads((tmp_path / f"shard_{shard}_rank_{r}.json").read_text()) for r in range(world)]
        for numbers in ranks:
            # SGD with momentum: a gradient and a momentum buffer as large as each parameter shard.
            assert numbers["params"] == numbers["grads"] == numbers["optimizer"]
            assert numbers["sum"] == sum(numbers[kind] for kind in HELD)
            # A rank holds at most ceil(rows / S) rows of each tensor: 1/S of the model plus less
            # than (S-1)/S of a row per tensor; the S ranks of a replica together hold it all,
            # so with S = 2 a rank also holds at least 1/2 less that half row.
            slack = _row_bytes() * (shard - 1) / shard
            assert abs(numbers["params"] - whole / shard) <= slack
        for replica in range(world // shard):
            shards = ranks[replica * shard : (replica + 1) * shard]
            assert sum(numbers["params"] for numbers in shards) == whole
        if shard == 2:  # the uneven split: 17 and 16 rows of the first layer, 5 and 5 of the second
            assert ranks[0]["params"] == FLOAT32 * (17 * 64 + 17 + 5 * HIDDEN + 5)
            assert ranks[1]["params"] == FLOAT32 * (16 * 64 + 16 + 5 * HIDDEN + 5)
    # Sent per coupling step: the rank's shard of the weights and the guard's words (one row per replica).
    table = FLOAT32 * 2 * Guard.WORD_LENGTH
    unsharded = json.loads((tmp_path / "shard_1_rank_0.json").read_text())
    for rank in range(4):
        sharded = json.loads((tmp_path / f"shard_2_rank_{rank}.json").read_text())
        assert sharded["sent_per_step"] * (whole + table) == unsharded["sent_per_step"] * (
            sharded["params"] + table
        )
