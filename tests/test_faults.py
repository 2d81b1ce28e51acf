"""Faults that must end in one clear error: a silent peer, unusable data, an unusable run dir."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from worlds import run_world

from replica_dist import dist
from replica_dist.config import ConfigError, DataConfig
from replica_dist.data import load_dataset
from runs import REPO

HANG_TIMEOUT_S = 5.0


def _rank_one_goes_silent(rank: int, world_size: int, out: str) -> None:
    dist.set_step(7)
    if rank == 1:
        time.sleep(3 * HANG_TIMEOUT_S)  # alive, but calls no collective
        return
    started = time.monotonic()
    try:
        dist.replica_mean(torch.ones(3))
    except dist.CollectiveError as err:
        with open(out, "w") as f:
            f.write(f"{time.monotonic() - started}\n{err}")


def test_a_silent_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    out = tmp_path / "error.txt"
    run_world(_rank_one_goes_silent, 2, str(out), collective_timeout_s=HANG_TIMEOUT_S)
    waited, message = out.read_text().split("\n", 1)
    assert HANG_TIMEOUT_S - 0.5 <= float(waited) <= HANG_TIMEOUT_S + 5
    assert "all_reduce (replica mean) failed at step 7 on rank 0" in message


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


GOOD = {
    "X_train": np.zeros((6, 3)),
    "y_train": np.arange(6) % 2,
    "X_test": np.zeros((2, 3)),
    "y_test": np.array([0, 1]),
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"X_train": np.full((6, 3), np.nan)}, r"X_train holds 18 NaN or infinite values"),
        ({"X_test": np.array([[np.inf, 0, 0], [0, 0, 0]])}, r"X_test holds 1 NaN or infinite values"),
        ({"X_train": np.array(["a"] * 6)}, r"X_train must be a 2-D or higher array of numbers"),
        ({"X_train": np.zeros(6)}, r"X_train must be a 2-D or higher array of numbers"),
        ({"X_test": np.zeros((2, 4))}, r"X_train samples have shape \(3,\) but X_test samples \(4,\)"),
        ({"y_train": np.arange(5)}, r"arrays disagree in length: X_train 6, y_train 5"),
        ({"y_test": np.array([0.5, 1.5])}, r"both be integer labels or both floating targets"),
        ({"y_train": np.array([0, 1, -1, 0, 1, 0])}, r"y_train labels must be a 1-D array of integers >= 0"),
        ({"y_train": np.zeros((6, 2), dtype=np.int64)}, r"y_train labels must be a 1-D array"),
        ({"y_train": np.array(["a"] * 6), "y_test": np.array(["b"] * 2)}, r"both be integer labels"),
        ({"y_train": np.full(6, np.nan), "y_test": np.zeros(2)}, r"y_train targets must be a finite"),
        ({"y_train": np.zeros((6, 2)), "y_test": np.zeros((2, 3))}, r"different target widths"),
    ],
    ids=[
        "nan-x-train",
        "inf-x-test",
        "strings-x",
        "1d-x",
        "feature-shapes",
        "lengths",
        "mixed-y-kinds",
        "negative-labels",
        "2d-labels",
        "string-labels",
        "nan-targets",
        "target-widths",
    ],
)
def test_unusable_data_files_give_one_clear_error(tmp_path, change, message):
    path = _npz(tmp_path / "data.npz", **(GOOD | change))
    with pytest.raises(ConfigError, match=r"^data\.path \S+: .*" + message) as err:
        load_dataset(DataConfig(name="file", path=path), 0, torch.float32)
    assert "\n" not in str(err.value)


def test_the_good_file_loads(tmp_path):
    data = load_dataset(DataConfig(name="file", path=_npz(tmp_path / "data.npz", **GOOD)), 0, torch.float32)
    assert data.task == "classification" and data.num_outputs == 2 and data.input_shape == (3,)


def test_an_unwritable_run_dir_exits_2_and_touches_nothing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    done = subprocess.run(
        [sys.executable, "-m", "replica_dist.train", f"hydra.run.dir={blocker}/run", "train.steps=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"replica_dist: error: hydra.run.dir={blocker}/run cannot be written: Not a directory"
    ]
    assert blocker.read_text() == "keep me\n"
