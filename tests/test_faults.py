"""Faults that must end in one clear error: a silent peer, unusable data, an unusable run dir."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from trainer_runs import REPO
from worlds import run_world

from replica_dist import dist
from replica_dist.config import ConfigError, DataConfig, ModelConfig
from replica_dist.data import load_dataset

HANG_TIMEOUT_S = 5.0


def _rank_one_goes_silent(rank: int, world_size: int, out: str) -> None:
    if rank == 1:
        time.sleep(3 * HANG_TIMEOUT_S)  # alive, but calls no collective
        return
    started = time.monotonic()
    try:
        dist.replica_mean(torch.ones(3), dist.Mesh(step=7))
    except dist.CollectiveError as err:
        with open(out, "w") as f:
            f.write(f"{time.monotonic() - started}\n{err}")


@pytest.mark.slow
def test_a_silent_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    out = tmp_path / "error.txt"
    run_world(_rank_one_goes_silent, 2, str(out), collective_timeout_s=HANG_TIMEOUT_S)
    waited, message = out.read_text().split("\n", 1)
    assert HANG_TIMEOUT_S - 0.5 <= float(waited) <= HANG_TIMEOUT_S + 5
    assert "all_reduce (replica mean) failed at step 7 on rank 0" in message


def test_a_failed_collective_is_one_line_naming_it_the_step_and_the_rank(monkeypatch):
    monkeypatch.setattr(dist, "rank", lambda: 3)
    with pytest.raises(dist.CollectiveError) as info, dist.collective("all_reduce (mine)", 12):
        raise RuntimeError("\nConnection closed by peer\nmore detail")
    assert str(info.value) == "all_reduce (mine) failed at step 12 on rank 3: Connection closed by peer"
    with pytest.raises(dist.CollectiveError, match=r"^broadcast failed at start-up on rank 3: RuntimeError$"):
        with dist.collective("broadcast"):
            raise RuntimeError()
    with pytest.raises(KeyError), dist.collective("barrier"):  # not the process group's: as it is
        raise KeyError("mine")


def _npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


GOOD = {
    "X_train": np.zeros((6, 3)),
    "y_train": np.arange(6) % 2,
    "X_test": np.zeros((2, 3)),
    "y_test": np.array([0, 1]),
}
FLOAT32_TARGET_BOUND = np.sqrt(np.finfo(np.float32).max) / 2**16
"""sqrt(max)/2^16: (2*bound)^2 summed over 2^30 errors is still finite in float32."""


def _refusal(path: str, task: str = "auto", dtype: torch.dtype = torch.float32) -> str:
    """The message load_dataset refuses `path` with, checked to be one line that never
    invites unpickling a user's file."""
    with pytest.raises(ConfigError) as err:
        load_dataset(DataConfig(name="file", path=path, task=task), 0, dtype)
    message = str(err.value)
    assert "\n" not in message and "pickle" not in message
    assert message.startswith(f"data.path {path}: ")
    return message


# (change to GOOD, data.task, expected message after "data.path <path>: ")
ARRAY_CASES = {
    "nan-x-train": ({"X_train": np.full((6, 3), np.nan)}, "auto", r"X_train holds 18 NaN or infinite values"),
    "inf-x-test": (
        {"X_test": np.array([[np.inf, 0, 0], [0, 0, 0]])},
        "auto",
        r"X_test holds 1 NaN or infinite",
    ),
    "strings-x": (
        {"X_train": np.array(["a"] * 6)},
        "auto",
        r"X_train must be a 2-D or higher array of numbers",
    ),
    "1d-x": ({"X_train": np.zeros(6)}, "auto", r"X_train must be a 2-D or higher array of numbers"),
    "bool-x": (
        {"X_train": np.zeros((6, 3), bool)},
        "auto",
        r"X_train must be a 2-D or higher array of numbers",
    ),
    "no-samples": (
        {"X_train": np.zeros((0, 3)), "y_train": np.zeros(0, np.int64)},
        "auto",
        r"X_train holds no samples or samples of no values; got shape \(0, 3\)",
    ),
    "no-features": (
        {"X_train": np.zeros((6, 0)), "X_test": np.zeros((2, 0))},
        "auto",
        r"X_train holds no samples or samples of no values; got shape \(6, 0\)",
    ),
    "x-infinite-in-float32": (
        {"X_train": np.array([[1e300, 0, 0]] + [[0, 0, 0]] * 5)},
        "auto",
        r"X_train holds values up to 1e\+300 in magnitude, beyond the largest float32 \(3\.4e\+38; train\.dtype\)",
    ),
    "feature-shapes": ({"X_test": np.zeros((2, 4))}, "auto", r"X_train samples have shape \(3,\) but X_test"),
    "lengths": ({"y_train": np.arange(5)}, "auto", r"arrays disagree in length: X_train 6, y_train 5"),
    "mixed-y-kinds": (
        {"y_test": np.array([0.5, 1.5])},
        "auto",
        r"both be integer labels or both floating targets",
    ),
    "negative-labels": (
        {"y_train": np.array([0, 1, -1, 0, 1, 0])},
        "auto",
        r"y_train labels must be a 1-D array of integers >= 0; got shape \(6,\), min -1",
    ),
    "2d-labels": (
        {"y_train": np.zeros((6, 2), dtype=np.int64)},
        "auto",
        r"y_train labels must be a 1-D array",
    ),
    "string-labels": (
        {"y_train": np.array(["a"] * 6), "y_test": np.array(["b"] * 2)},
        "auto",
        r"both be integer labels",
    ),
    "nan-targets": (
        {"y_train": np.full(6, np.nan), "y_test": np.zeros(2)},
        "auto",
        r"y_train targets must be a finite",
    ),
    "target-widths": (
        {"y_train": np.zeros((6, 2)), "y_test": np.zeros((2, 3))},
        "auto",
        r"different target widths",
    ),
    "no-target-columns": (
        {"y_train": np.zeros((6, 0)), "y_test": np.zeros((2, 0))},
        "auto",
        r"y_train targets have no columns; got shape \(6, 0\)",
    ),
    "targets-1e38": (
        {"y_train": np.array([1e38, 0, 0, 0, 0, 0]), "y_test": np.zeros(2)},
        "auto",
        r"y_train targets reach 1e\+38 in magnitude; they must stay within 2\.81e\+14 "
        r"so that squared errors stay finite in float32 \(train\.dtype\)",
    ),
    "integer-targets-too-large": (
        {"y_train": np.array([1, 2, 3, 4, 5, 2**62]), "y_test": np.array([1, 2])},
        "regression",
        r"y_train targets reach 4\.61e\+18 in magnitude",
    ),
    "label-1e9": (
        {"y_train": np.array([0, 1, 0, 1, 0, 10**9])},
        "auto",
        r"y_train holds integers that do not look like class labels \(3 distinct values, min 0, max 1000000000\): "
        r"set data\.task=classification or data\.task=regression$",
    ),
    "label-1e9-classification": (
        {"y_train": np.array([0, 1, 0, 1, 0, 10**9])},
        "classification",
        r"y_train holds label 1000000000: class labels must be 0\.\.C-1 with C <= 100000",
    ),
    "label-uint64-max": (
        {"y_train": np.array([0, 1, 0, 1, 0, 2**64 - 1], np.uint64)},
        "auto",
        r"do not look like class labels \(3 distinct values, min 0, max 18446744073709551615\)",
    ),
    "label-uint64-max-classification": (
        {"y_train": np.array([0, 1, 0, 1, 0, 2**64 - 1], np.uint64)},
        "classification",
        r"y_train holds label 18446744073709551615: class labels must be 0\.\.C-1 with C <= 100000",
    ),
    "single-class": (
        {"y_train": np.zeros(6, np.int64), "y_test": np.zeros(2, np.int64)},
        "auto",
        r"y_train holds a single class \(0\): classification needs at least two$",
    ),
    "single-class-classification": (
        {"y_train": np.full(6, 3), "y_test": np.full(2, 3)},
        "classification",
        r"y_train holds a single class \(3\): classification needs at least two$",
    ),
    "y-test-class-unseen": (
        {"y_train": np.array([0, 1, 0, 1, 0, 3]), "y_test": np.array([2, 1])},
        "classification",
        r"y_test holds labels that are not classes of y_train \(2\); y_train has 3 classes in 0\.\.3$",
    ),
    "y-test-label-out-of-range": (
        {"y_test": np.array([7, 1])},
        "auto",
        r"y_test holds labels that are not classes of y_train \(7\); y_train has 2 classes in 0\.\.1$",
    ),
    "integer-targets-auto": (
        {"y_train": np.array([12, 980, 40, 300, 55, 12]), "y_test": np.array([12, 40])},
        "auto",
        r"y_train holds integers that do not look like class labels \(5 distinct values, min 12, max 980\): "
        r"set data\.task=classification or data\.task=regression$",
    ),
    "float-labels-classification": (
        {"y_train": np.arange(6) % 2 * 1.0, "y_test": np.array([0.0, 1.0])},
        "classification",
        r"data\.task=classification needs integer labels; y_train is float64$",
    ),
}


@pytest.mark.parametrize("change, task, message", ARRAY_CASES.values(), ids=ARRAY_CASES.keys())
def test_unusable_data_files_give_one_clear_error(tmp_path, change, task, message):
    path = _npz(tmp_path / "data.npz", **(GOOD | change))
    assert re.search(message, _refusal(path, task))


def _write_good(tmp_path) -> bytes:
    np.savez(tmp_path / "good.npz", **GOOD)
    return (tmp_path / "good.npz").read_bytes()


def _flip_a_byte_of_x_train(tmp_path) -> bytes:
    data = bytearray(_write_good(tmp_path))
    data[data.index(b"\x93NUMPY") + 200] ^= 0xFF  # inside X_train's values, after its header
    return bytes(data)


def _zip(**members: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _corrupt_compressed(tmp_path) -> bytes:
    np.savez_compressed(tmp_path / "packed.npz", **(GOOD | {"X_train": np.arange(600.0).reshape(200, 3)}))
    data = bytearray((tmp_path / "packed.npz").read_bytes())
    start = data.index(b"X_train.npy") + len("X_train.npy")  # the deflated stream follows the name
    for i in range(start + 20, start + 60):
        data[i] ^= 0x5A
    return bytes(data)


_ARRAYS = {key: _npy(value) for key, value in GOOD.items()}

# (bytes of data.npz from tmp_path, expected message after "data.path <path>: ")
FILE_CASES = {
    "empty": (lambda tmp: b"", r"the file is empty; it needs a \.npz archive of arrays X_train, y_train"),
    "truncated": (
        lambda tmp: _write_good(tmp)[:200],
        r"is a damaged or truncated \.npz archive \(File is not a zip file\)$",
    ),
    "bad-crc": (
        _flip_a_byte_of_x_train,
        r"is a damaged or truncated \.npz archive \(Bad CRC-32 for file 'X_train\.npy'\)$",
    ),
    "corrupt-deflate": (_corrupt_compressed, r"is a damaged or truncated \.npz archive \("),
    "npy-renamed": (
        lambda tmp: _npy(np.zeros((6, 3))),
        r"is a single \.npy array, not a \.npz archive; write one with numpy\.savez\(path, X_train=",
    ),
    "text-renamed": (
        lambda tmp: b"x1,x2,y\n0.5,1.5,0\n",
        r"is not a \.npz archive \(it is not a zip file\); write one with numpy\.savez$",
    ),
    "members-not-npy": (
        lambda tmp: _zip(**{f"{key}.npy": b"1,2,3\n" for key in GOOD}),
        r"X_train\.npy is not a readable \.npy array \(",
    ),
    "members-not-named-npy": (
        lambda tmp: _zip(**{f"{key}.csv": b"1,2,3\n" for key in GOOD}),
        r"lacks arrays \['X_train', 'y_train', 'X_test', 'y_test'\]; .*\(it holds X_train\.csv, y_train\.csv",
    ),
    "empty-zip": (lambda tmp: _zip(), r"lacks arrays .*\(it holds nothing\)$"),
    "object-array": (
        lambda tmp: _zip(
            **{f"{key}.npy": value for key, value in _ARRAYS.items()}
            | {"y_train.npy": _npy(np.array([0, 1, 0, 1, 0, None], dtype=object))}
        ),
        r"y_train holds Python objects, which are never loaded; store numbers$",
    ),
}


@pytest.mark.parametrize("content, message", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_unreadable_data_files_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "data.npz"
    path.write_bytes(content(tmp_path))
    assert re.search(message, _refusal(str(path)))


def test_a_zip_of_npy_members_written_by_hand_loads(tmp_path):
    """The reader takes any zip of .npy members, not only numpy.savez's, so the refusals above
    are about the content."""
    path = tmp_path / "data.npz"
    path.write_bytes(_zip(**{f"{key}.npy": value for key, value in _ARRAYS.items()}))
    data = load_dataset(DataConfig(name="file", path=str(path)), 0, torch.float32)
    assert data.y_train.tolist() == GOOD["y_train"].tolist() and data.num_outputs == 2


def test_the_good_file_loads(tmp_path):
    data = load_dataset(DataConfig(name="file", path=_npz(tmp_path / "data.npz", **GOOD)), 0, torch.float32)
    assert data.task == "classification" and data.num_outputs == 2 and data.input_shape == (3,)


def test_values_are_checked_against_the_training_dtype(tmp_path):
    """What float32 cannot hold, float64 can: the same file loads with train.dtype=float64."""
    path = _npz(
        tmp_path / "data.npz",
        **(GOOD | {"X_train": np.full((6, 3), 1e300), "y_train": np.full(6, 1e38), "y_test": np.zeros(2)}),
    )
    assert "X_train holds values up to 1e+300" in _refusal(path)
    data = load_dataset(DataConfig(name="file", path=path), 0, torch.float64)
    assert data.x_train.max().item() == 1e300 and data.y_train.max().item() == 1e38


def test_targets_at_the_bound_keep_a_finite_squared_error_in_float32(tmp_path):
    """Within the bound, the sum of 2^30 squared errors of predictions as far off as
    the target is large stays finite; just beyond it, the file is refused."""
    inside = np.float32(FLOAT32_TARGET_BOUND * 0.999)
    assert np.isfinite(np.float32(2 * inside) ** 2 * np.float32(2**30))
    path = _npz(
        tmp_path / "in.npz", **(GOOD | {"y_train": np.full(6, inside, np.float64), "y_test": np.zeros(2)})
    )
    data = load_dataset(DataConfig(name="file", path=path), 0, torch.float32)
    assert torch.isfinite(torch.nn.functional.mse_loss(-data.y_train, data.y_train))
    outside = _npz(
        tmp_path / "out.npz",
        **(GOOD | {"y_train": np.full(6, FLOAT32_TARGET_BOUND * 1.01), "y_test": np.zeros(2)}),
    )
    assert "y_train targets reach" in _refusal(outside)


def test_a_cnn_on_flat_inputs_is_refused_naming_the_model_and_the_file(tmp_path):
    path = _npz(tmp_path / "data.npz", **GOOD)
    data = load_dataset(DataConfig(name="file", path=path), 0, torch.float32)
    with pytest.raises(ConfigError) as err:
        data.check_model(ModelConfig(name="cnn"))
    assert str(err.value) == (
        f"model.name=cnn needs image-shaped inputs (N, C, H, W); X_train of data.path {path} has shape (6, 3)"
    )
    data.check_model(ModelConfig(name="mlp"))  # an mlp flattens whatever it gets
    images = _npz(
        tmp_path / "images.npz",
        **(GOOD | {"X_train": np.zeros((6, 1, 4, 4)), "X_test": np.zeros((2, 1, 4, 4))}),
    )
    load_dataset(DataConfig(name="file", path=images), 0, torch.float32).check_model(ModelConfig(name="cnn"))


def test_a_cnn_on_flat_inputs_exits_2_with_one_line(tmp_path):
    path = _npz(tmp_path / "data.npz", **GOOD)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "replica_dist.train",
            f"hydra.run.dir={tmp_path}/run",
            "data=file",
            f"data.path={path}",
            "model=cnn",
            "train.steps=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"replica_dist: error: model.name=cnn needs image-shaped inputs (N, C, H, W); "
        f"X_train of data.path {path} has shape (6, 3)"
    ]


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
