"""Checkpoints in one process: round trip, choosing the newest complete step, skipping the
incomplete ones, refusing a mismatched world or config, atomic writes, cleaning, pruning."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from trainer_runs import REPO

from replica_dist import checkpoint
from replica_dist.checkpoint import (
    CheckpointMismatch,
    IncompleteCheckpoint,
    IncompleteCheckpointWarning,
    atomic_write_bytes,
    clean_temporaries,
    config_hash,
    find_resumable,
    load_replica,
    prune,
    save_replica,
    step_dir,
    write_manifest,
)

HASH = config_hash({"optim": {"momentum": 0.9}, "train": {"steps": 100}})


def _save_step(
    root: Path, step: int, world_size: int = 2, cfg_hash: str = HASH, manifest: bool = True
) -> None:
    """What the ranks do together: each saves its replica, then rank 0 the manifest."""
    for replica in range(world_size):
        save_replica(
            root, step, replica, {"step": step, "replica": replica, "w": torch.full((4,), float(step))}
        )
    if manifest:
        write_manifest(root, step, world_size, cfg_hash)


def _find(root: Path, world_size: int = 2, cfg_hash: str = HASH) -> tuple[int | None, list[str]]:
    """find_resumable's answer and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = find_resumable(root, world_size, cfg_hash)
    return step, [str(w.message) for w in caught if issubclass(w.category, IncompleteCheckpointWarning)]


# ---------------------------------------------------------------------------- round trip


def test_round_trip_restores_tensors_ints_and_both_rng_states(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    rng = np.random.default_rng([0, 7])
    rng.permutation(10)  # advance it, so the saved state is not the seed's
    torch.manual_seed(3)
    torch.randn(4)
    state = {
        "step": 40,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "history": [1, 2.5, None, "x", b"\x00\xff"],
        "half": torch.arange(6, dtype=torch.float16).reshape(2, 3),
    }
    save_replica(tmp_path, 40, 0, state)
    write_manifest(tmp_path, 40, 1, HASH)
    expected_numpy = rng.permutation(10)
    expected_torch = torch.rand(5)

    loaded = load_replica(tmp_path, 40, 0)

    assert loaded["step"] == 40 and type(loaded["step"]) is int
    assert loaded["history"] == [1, 2.5, None, "x", b"\x00\xff"]
    assert loaded["half"].dtype == torch.float16 and torch.equal(loaded["half"], state["half"])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model"][key], value)
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(loaded["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    # The restored RNGs continue exactly where the saved ones left off.
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded["numpy_rng"]
    assert restored.permutation(10).tolist() == expected_numpy.tolist()
    torch.set_rng_state(loaded["torch_rng"])
    assert torch.equal(torch.rand(5), expected_torch)


def test_layout_and_manifest_contents(tmp_path):
    _save_step(tmp_path, 40, world_size=2)
    folder = tmp_path / "step-00000040"
    assert step_dir(tmp_path, 40) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "replica-0.pt", "replica-1.pt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 40 and manifest["world_size"] == 2 and manifest["config_hash"] == HASH
    for name in ("replica-0.pt", "replica-1.pt"):
        assert manifest["files"][name]["bytes"] == (folder / name).stat().st_size
        assert len(manifest["files"][name]["sha256"]) == 64


def test_save_refuses_a_state_weights_only_load_would_refuse(tmp_path):
    with pytest.raises(TypeError, match=r"state\['numpy_rng'\]\[1\] is a numpy.ndarray"):
        save_replica(tmp_path, 1, 0, {"numpy_rng": np.random.get_state()})
    with pytest.raises(TypeError, match=r"state\['lr'\] is a numpy.float64"):
        save_replica(tmp_path, 1, 0, {"lr": np.float64(0.1)})
    assert not (step_dir(tmp_path, 1) / "replica-0.pt").exists()


def test_load_replica_refuses_a_file_that_no_longer_matches_the_manifest(tmp_path):
    _save_step(tmp_path, 10)
    save_replica(tmp_path, 10, 1, {"rewritten": True})  # e.g. a later run that died before its manifest
    with pytest.raises(IncompleteCheckpoint, match="replica-1.pt"):
        load_replica(tmp_path, 10, 1)
    assert load_replica(tmp_path, 10, 0)["replica"] == 0


# ---------------------------------------------------------------------------- find_resumable


def test_nothing_to_resume(tmp_path):
    assert find_resumable(tmp_path / "absent", 2, HASH) is None
    assert find_resumable(tmp_path, 2, HASH) is None


def test_newest_complete_checkpoint_is_chosen(tmp_path):
    for step in (10, 20, 30):
        _save_step(tmp_path, step)
    (tmp_path / "notes").mkdir()  # not a step folder: ignored
    step, warned = _find(tmp_path)
    assert step == 30 and warned == []
    assert load_replica(tmp_path, 30, 1)["w"].tolist() == [30.0] * 4


def test_steps_are_ordered_by_number_not_by_name(tmp_path):
    _save_step(tmp_path, 99_999_999)
    _save_step(tmp_path, 100_000_000)  # nine digits: sorts before as a string
    assert _find(tmp_path)[0] == 100_000_000


def test_folder_without_manifest_is_skipped_with_a_warning(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20, manifest=False)
    step, warned = _find(tmp_path)
    assert step == 10
    assert len(warned) == 1 and "step-00000020" in warned[0] and "manifest" in warned[0]


def test_truncated_replica_file_is_skipped(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20)
    victim = step_dir(tmp_path, 20) / "replica-1.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[:-100])
    step, warned = _find(tmp_path)
    assert step == 10
    assert (
        len(warned) == 1
        and "step-00000020" in warned[0]
        and "replica-1.pt" in warned[0]
        and "truncated" in warned[0]
    )


def test_altered_replica_file_of_the_same_size_is_skipped(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20)
    victim = step_dir(tmp_path, 20) / "replica-0.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    step, warned = _find(tmp_path)
    assert step == 10
    assert len(warned) == 1 and "replica-0.pt" in warned[0] and "sha256" in warned[0]


def test_missing_replica_file_is_skipped(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20)
    (step_dir(tmp_path, 20) / "replica-1.pt").unlink()
    step, warned = _find(tmp_path)
    assert step == 10 and "missing" in warned[0]


@pytest.mark.parametrize(
    "garble",
    [
        lambda text: text[: len(text) // 2],  # cut short
        lambda text: "",
        lambda text: "[1, 2]",
        lambda text: text.replace('"replica-1.pt"', '"replica-7.pt"'),
        lambda text: text.replace('"step": 20', '"step": 30'),
        lambda text: text.replace('"world_size": 2', '"world_size": "2"'),
    ],
    ids=["cut", "empty", "not-an-object", "wrong-files", "wrong-step", "string-world-size"],
)
def test_garbled_manifest_is_skipped(tmp_path, garble):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20)
    manifest = step_dir(tmp_path, 20) / "manifest.json"
    manifest.write_text(garble(manifest.read_text()))
    step, warned = _find(tmp_path)
    assert step == 10
    assert len(warned) == 1 and "step-00000020/manifest.json" in warned[0]


def test_world_size_mismatch_raises_naming_both_sizes(tmp_path):
    _save_step(tmp_path, 20, world_size=2)  # a compatible older one must not be used instead
    _save_step(tmp_path, 40, world_size=4)
    with pytest.raises(CheckpointMismatch) as raised:
        find_resumable(tmp_path, 2, HASH)
    message = str(raised.value)
    assert "step-00000040" in message and "4 replicas" in message and "this run has 2" in message
    assert "\n" not in message
    assert isinstance(raised.value, ValueError)


def test_config_hash_mismatch_raises_naming_both_hashes(tmp_path):
    other = config_hash({"optim": {"momentum": 0.5}, "train": {"steps": 100}})
    _save_step(tmp_path, 20, cfg_hash=HASH)
    _save_step(tmp_path, 40, cfg_hash=other)
    with pytest.raises(CheckpointMismatch) as raised:
        find_resumable(tmp_path, 2, HASH)
    message = str(raised.value)
    assert "step-00000040" in message and other[:12] in message and HASH[:12] in message
    assert "\n" not in message


def test_an_incomplete_mismatched_checkpoint_is_skipped_not_refused(tmp_path):
    _save_step(tmp_path, 20, world_size=2)
    _save_step(tmp_path, 40, world_size=4, manifest=False)
    assert _find(tmp_path)[0] == 20


# ---------------------------------------------------------------------------- config hash


CFG = {
    "model": {"name": "mlp", "hidden": [128]},
    "optim": {"name": "sgd", "lr": 0.05},
    "train": {"steps": 1500, "batch_size": 32},
    "log": {"every": 20},
    "eval": {"every": 100},
    "dist": {"backend": "auto", "timeout_s": 300.0},
    "checkpoint": {"every": 50, "keep": 3},
    "guard": {"nonfinite": "stop"},
    "seed": 0,
}


def _with(key: str, value) -> dict:
    cfg = json.loads(json.dumps(CFG))
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.steps", 3000),
        ("log.every", 1),
        ("eval.every", 7),
        ("checkpoint.every", 10),
        ("checkpoint.keep", 1),
        ("dist.timeout_s", 30.0),
        ("optim.lr", 0.1),
        ("guard.nonfinite", "skip"),
    ],
)
def test_config_hash_ignores_keys_that_may_change_on_resume(key, value):
    assert config_hash(_with(key, value)) == config_hash(CFG)


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.name", "adam"),
        ("train.batch_size", 64),
        ("model.hidden", [64]),
        ("seed", 1),
        ("dist.backend", "gloo"),
    ],
)
def test_config_hash_changes_for_other_keys(key, value):
    assert config_hash(_with(key, value)) != config_hash(CFG)


def test_config_hash_is_stable_and_takes_its_own_ignore_list():
    reordered = dict(reversed(list(CFG.items())))
    assert config_hash(reordered) == config_hash(CFG)
    assert config_hash(CFG) == config_hash(json.loads(json.dumps(CFG)))
    assert len(config_hash(CFG)) == 64
    assert config_hash(_with("optim.lr", 0.1), ignore=()) != config_hash(CFG, ignore=())
    assert config_hash(_with("seed", 1), ignore=("se*",)) == config_hash(CFG, ignore=("se*",))
    assert config_hash(_with("train.steps", 1), ignore=()) != config_hash(CFG, ignore=())
    assert CFG["train"]["steps"] == 1500  # the caller's dict is left alone
    with pytest.raises(TypeError):
        config_hash({"path": Path("x")})


# ---------------------------------------------------------------------------- write_manifest


def test_write_manifest_refuses_when_a_replica_file_is_missing(tmp_path):
    save_replica(tmp_path, 30, 0, {"w": torch.zeros(2)})
    save_replica(tmp_path, 30, 2, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="replica-1.pt"):
        write_manifest(tmp_path, 30, 3, HASH)
    assert not (step_dir(tmp_path, 30) / "manifest.json").exists()


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_the_old_content_when_the_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old content")
    fresh = tmp_path / "fresh.bin"

    def dies(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(checkpoint.os, "replace", dies)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"new content that never lands")
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(fresh, b"never lands")
    with pytest.raises(OSError, match="simulated"):
        save_replica(tmp_path, 5, 0, {"w": torch.zeros(3)})

    assert target.read_bytes() == b"old content"
    assert not fresh.exists()
    assert not (step_dir(tmp_path, 5) / "replica-0.pt").exists()
    leftovers = [p.name for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []


def test_a_writer_killed_mid_write_leaves_only_a_temporary_that_is_cleaned(tmp_path):
    target = tmp_path / "step-00000005" / "replica-0.pt"
    target.parent.mkdir()
    target.write_bytes(b"old content")
    # A real process dies (os._exit skips every except and finally) after writing its data
    # and before the rename, as under SIGKILL.
    script = textwrap.dedent(
        f"""
        import os
        from replica_dist import checkpoint
        checkpoint.os.replace = lambda *args: os._exit(9)
        checkpoint.atomic_write_bytes({str(target)!r}, b"new content" * 1000)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == 9, result.stderr.decode()
    assert target.read_bytes() == b"old content"
    stray = list(target.parent.glob(".tmp-*"))
    assert len(stray) == 1

    assert clean_temporaries(tmp_path) == stray
    assert list(tmp_path.rglob(".tmp-*")) == []
    assert target.read_bytes() == b"old content"


def test_clean_temporaries_removes_strays_in_every_step_folder_and_nothing_else(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20, manifest=False)
    strays = [
        step_dir(tmp_path, 10) / ".tmp-replica-1.pt.abc",
        step_dir(tmp_path, 20) / ".tmp-replica-0.pt.def",
        step_dir(tmp_path, 20) / ".tmp-manifest.json.123",
    ]
    for path in strays:
        path.write_bytes(b"partial")
    before = sorted(p for p in tmp_path.rglob("*") if not p.name.startswith(".tmp-"))

    assert sorted(clean_temporaries(tmp_path)) == sorted(strays)
    assert sorted(tmp_path.rglob("*")) == before
    assert clean_temporaries(tmp_path) == []
    assert clean_temporaries(tmp_path / "absent") == []
    assert _find(tmp_path)[0] == 10


# ---------------------------------------------------------------------------- prune


def _steps_on_disk(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_prune_keeps_the_newest_complete_and_the_one_in_progress(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20, manifest=False)  # died long ago: deleted
    _save_step(tmp_path, 30)
    _save_step(tmp_path, 40)
    _save_step(tmp_path, 50)
    _save_step(tmp_path, 60, manifest=False)  # still being written: kept
    save_replica(tmp_path, 70, 0, {"w": torch.zeros(1)})  # ditto, one rank ahead

    removed = prune(tmp_path, keep=2)

    assert sorted(p.name for p in removed) == ["step-00000010", "step-00000020", "step-00000030"]
    assert _steps_on_disk(tmp_path) == ["step-00000040", "step-00000050", "step-00000060", "step-00000070"]
    assert _find(tmp_path)[0] == 50
    assert prune(tmp_path, keep=2) == []


def test_prune_with_keep_one_never_deletes_the_newest_complete(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20)
    _save_step(tmp_path, 30, manifest=False)
    prune(tmp_path, keep=1)
    assert _steps_on_disk(tmp_path) == ["step-00000020", "step-00000030"]
    with pytest.raises(ValueError, match="keep"):
        prune(tmp_path, keep=0)


def test_prune_treats_a_truncated_checkpoint_as_incomplete(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 20)
    victim = step_dir(tmp_path, 20) / "replica-0.pt"
    victim.write_bytes(victim.read_bytes()[:-1])
    prune(tmp_path, keep=1)  # step 10 is the newest complete one: kept
    assert _steps_on_disk(tmp_path) == ["step-00000010", "step-00000020"]
    assert _find(tmp_path)[0] == 10


def test_prune_without_any_complete_checkpoint_deletes_nothing(tmp_path):
    _save_step(tmp_path, 10, manifest=False)
    _save_step(tmp_path, 20, manifest=False)
    assert prune(tmp_path, keep=1) == []
    assert _steps_on_disk(tmp_path) == ["step-00000010", "step-00000020"]


def test_atomic_write_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        assert Path(src).name.startswith(".tmp-") and Path(src).parent == Path(dst).parent
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    atomic_write_bytes(tmp_path / "file.bin", b"data")
    assert events == ["fsync-file", "replace", "fsync-dir"]
