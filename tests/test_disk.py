"""A full disk or a read-only folder ends a run with one line naming the file and the cause,
on every rank together; the newest complete checkpoint stays, and the same command resumes
from it once the disk takes writes again, ending bit for bit like a run never stopped.

The disk is a real one where the sandbox lets root mount: a size-limited tmpfs under the run
directory (checkpoints/, tb/, weights/) and a read-only bind mount of checkpoints/. Elsewhere
the same faults are injected into the workers (os.replace, os.mkdir, os.write raising the
errors a full or read-only disk gives); REPLICA_DIST_TEST_INJECT=1 forces that here too.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from tensorboard.compat.proto.event_pb2 import Event
from trainer_runs import events, replica_weights, run_sh, train_losses
from worlds import COLLECTIVE_TIMEOUT_S, run_world

from replica_dist import checkpoint, dist, loop
from replica_dist.checkpoint import cannot_write, discard_incomplete, find_resumable, newest_complete
from replica_dist.config import load_config
from replica_dist.errors import RunError
from replica_dist.metrics import TensorBoardLogger
from replica_dist.run_state import run_hash

OVERRIDES = [
    "train.steps=20",
    "train.batch_size=16",
    "model.hidden=[16]",
    "log.every=1",
    "eval.every=5",
    "checkpoint.every=5",
    "checkpoint.keep=3",
    "optim.momentum=0.9",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]
PAGE = 4096  # tmpfs counts whole pages per file


# ---------------------------------------------------------------------------- real mounts


def _sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, text=True)


@functools.cache
def _mounts_work() -> bool:
    """Whether this sandbox lets us mount a tmpfs and a read-only bind mount (root, no seccomp)."""
    if os.environ.get("REPLICA_DIST_TEST_INJECT") == "1":
        return False
    where = Path(tempfile.mkdtemp(prefix="replica_dist_mount_"))
    try:
        _sh("mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(where))
    except (OSError, subprocess.CalledProcessError):
        where.rmdir()
        return False
    try:
        _sh("mount", "--bind", str(where), str(where))
        try:
            _sh("mount", "-o", "remount,ro,bind", str(where))
            try:
                (where / "probe").write_bytes(b"")
            except OSError as err:
                return err.errno == errno.EROFS
            return False  # the remount did not make it read-only
        finally:
            _sh("umount", str(where))
    except subprocess.CalledProcessError:
        return False
    finally:
        _sh("umount", str(where))
        where.rmdir()


class Mounts:
    """The mounts a test made, undone (innermost first) at its end."""

    def __init__(self):
        self.points: list[Path] = []

    def tmpfs(self, where: Path, size: int) -> None:
        where.mkdir(parents=True, exist_ok=True)
        _sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        self.points.append(where)

    def resize(self, where: Path, size: int) -> None:
        _sh("mount", "-o", f"remount,size={size}", str(where))

    def read_only(self, where: Path) -> None:
        _sh("mount", "--bind", str(where), str(where))
        self.points.append(where)
        _sh("mount", "-o", "remount,ro,bind", str(where))

    def pop(self, where: Path) -> None:
        assert self.points[-1] == where
        _sh("umount", str(self.points.pop()))

    def undo(self) -> None:
        while self.points:
            subprocess.run(["umount", "-l", str(self.points.pop())], capture_output=True)


@pytest.fixture
def mounts():
    made = Mounts()
    yield made
    made.undo()


def _pages(folder: Path) -> int:
    """The bytes the files under `folder` take on a tmpfs."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- injected faults


def _error(code: int, filename=None) -> OSError:
    return OSError(code, os.strerror(code), *([str(filename)] if filename is not None else []))


def _inject(rank: int, fault: tuple) -> None:
    """Make this worker's file system fail as a full or read-only disk would (test side only)."""
    kind, *args = fault
    if kind == "full_on_replace":  # the rename that completes a file, on one rank
        fault_rank, suffix = args
        original_replace = os.replace

        def replace(src, dst, **kwargs):
            if rank == fault_rank and str(dst).endswith(suffix):
                raise _error(errno.ENOSPC)
            return original_replace(src, dst, **kwargs)

        os.replace = replace
    elif kind == "read_only":  # every rank: no folder or file may be created under `folder`
        (folder,) = args
        original_mkdir, original_open = os.mkdir, os.open
        writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def under(path) -> bool:
            return Path(path).resolve().is_relative_to(Path(folder).resolve())

        def mkdir(path, *a, **k):
            if under(path):
                raise _error(errno.EROFS, path)
            return original_mkdir(path, *a, **k)

        def open_(path, flags, *a, **k):
            if flags & writing and under(path):
                raise _error(errno.EROFS, path)
            return original_open(path, flags, *a, **k)

        os.mkdir, os.open = mkdir, open_
    elif kind == "full_on_events":  # one rank's nth write of TensorBoard events: half goes in
        fault_rank, nth = args
        original_write, count = os.write, [0]

        def write(fd, data):
            if rank != fault_rank or "tfevents" not in os.readlink(f"/proc/self/fd/{fd}"):
                return original_write(fd, data)
            count[0] += 1
            if count[0] == nth:
                return original_write(fd, bytes(data)[: len(data) // 2])
            if count[0] > nth:
                raise _error(errno.ENOSPC)
            return original_write(fd, data)

        os.write = write
    else:
        raise ValueError(kind)


# ---------------------------------------------------------------------------- runs


def _train(rank: int, world_size: int, run_dir: str, out_dir: str, fault: tuple | None) -> None:
    """Train; a RunError is written to <out_dir>/rank<r>.txt (every rank must raise one)."""
    if fault:
        _inject(rank, fault)
    cfg, _ = load_config(OVERRIDES + [f"hydra.run.dir={run_dir}"])
    try:
        loop.train(cfg, Path(run_dir), torch.device("cpu"))
    except RunError as err:
        Path(out_dir, f"rank{rank}.txt").write_text(str(err))


def _run(run_dir: Path, fault: tuple | None = None) -> str | None:
    """One attempt of the run: None if it finished, else the one-line message every rank raised."""
    out = Path(tempfile.mkdtemp(prefix="replica_dist_errors_"))
    run_world(_train, 2, str(run_dir), str(out), fault)
    messages = [p.read_text() for p in sorted(out.glob("rank*.txt"))]
    shutil.rmtree(out)
    if not messages:
        return None
    assert len(messages) == 2, f"only {len(messages)} rank raised RunError: {messages}"
    assert messages[0] == messages[1]
    assert "\n" not in messages[0]
    return messages[0]


def _resumable(run_dir: Path) -> int | None:
    cfg, _ = load_config(OVERRIDES + [f"hydra.run.dir={run_dir}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", checkpoint.IncompleteCheckpointWarning)
        return find_resumable(run_dir / "checkpoints", 2, run_hash(cfg))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert _run(run_dir) is None
    return run_dir


@pytest.mark.slow
def test_full_and_read_only_disks_stop_every_rank_and_the_run_resumes_bit_for_bit(
    tmp_path, mounts, uninterrupted
):
    """One run meets, in turn: checkpoints/ full, checkpoints/ read-only, tb/ full, weights/
    full; each time every rank stops with the same line, and the next attempt resumes."""
    real = _mounts_work()
    run_dir = tmp_path / "run"
    ckpt, tb, weights = run_dir / "checkpoints", run_dir / "tb", run_dir / "weights"
    full = r"No space left on device \(errno 28\); free space"
    if real:
        # Room for the checkpoints of steps 5 and 10 and half of step 15's; final weights do
        # not fit in one page. A fresh run accepts both folders (it refuses only an old tb/).
        step_bytes = _pages(uninterrupted / "checkpoints" / "step-00000010")  # kept: 10, 15, 20
        mounts.tmpfs(ckpt, 2 * step_bytes + step_bytes // 2 // PAGE * PAGE)
        assert (uninterrupted / "weights" / "replica_0.pt").stat().st_size > PAGE
        mounts.tmpfs(weights, PAGE)

    # 1. checkpoints/ fills at step 15: steps 5 and 10 stay, nothing of 15 is left.
    message = _run(run_dir, None if real else ("full_on_replace", 1, "step-00000015/replica-1.pt"))
    step_15 = re.escape(str(ckpt / "step-00000015"))
    assert re.fullmatch(
        rf"cannot write checkpoint {step_15}/replica-[01]\.pt: {full} and run the same command to "
        r"resume from step 10",
        message,
    ), message
    assert _resumable(run_dir) == 10 and not (ckpt / "step-00000015").exists()

    # 2. checkpoints/ read-only (space again, but no writes): step 15 cannot be saved.
    if real:
        mounts.resize(ckpt, 64 * step_bytes)
        mounts.read_only(ckpt)
    message = _run(run_dir, None if real else ("read_only", str(ckpt)))
    assert message == (
        f"cannot write checkpoint {ckpt / 'step-00000015' / 'replica-0.pt'}: Read-only file system "
        f"(errno 30); make {ckpt} writable and run the same command to resume from step 10"
    )
    assert _resumable(run_dir) == 10
    if real:
        mounts.pop(ckpt)

    # 3. tb/ fills a few steps after the restart, with log.every=1.
    if real:
        kept = tmp_path / "tb-so-far"
        shutil.copytree(tb, kept)
        # The old event files, a first page for each of the 4 new ones, and 3 pages more.
        mounts.tmpfs(tb, _pages(kept) + 7 * PAGE)
        shutil.copytree(kept, tb, dirs_exist_ok=True)
    message = _run(run_dir, None if real else ("full_on_events", 1, 8))
    resumable = _resumable(run_dir)
    assert resumable in (10, 15)
    assert re.fullmatch(
        rf"cannot write TensorBoard events {re.escape(str(tb))}/(replica_[01]|center|ensemble)/"
        rf"events\.out\.tfevents\.[^ ]+: {full} and run the same command to resume from step {resumable}",
        message,
    ), message
    for log_dir in tb.iterdir():  # every event file still ends with a whole record
        for path in log_dir.iterdir():
            _records(path.read_bytes())

    # 4. weights/ is full at the very end: no result is written, the run is not marked finished.
    if real:
        mounts.resize(tb, 1 << 20)
    message = _run(run_dir, None if real else ("full_on_replace", 1, "weights/replica_1.pt"))
    assert re.fullmatch(
        rf"cannot write final weights {re.escape(str(weights))}/replica_[01]\.pt: {full} and run the "
        r"same command to resume from step 20",
        message,
    ), message
    assert not (run_dir / "summary.json").exists()
    assert not any(p.name.startswith(".tmp-") for p in weights.iterdir())
    assert _resumable(run_dir) == 20  # the last step's checkpoint: the next attempt only writes the results

    # 5. Space again: the same command finishes the run as if it had never stopped.
    if real:
        mounts.resize(weights, 1 << 20)
    assert _run(run_dir) is None
    for got, expected in zip(replica_weights(run_dir, 2), replica_weights(uninterrupted, 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    for replica in range(2):
        assert train_losses(run_dir, replica) == train_losses(
            uninterrupted, replica
        )  # no step twice, same values


# ---------------------------------------------------------------------------- the pieces


def _records(data: bytes) -> list[Event]:
    """The events of a TFRecord file; fails unless it ends exactly after a whole record."""
    found, at = [], 0
    while at < len(data):
        assert len(data) - at >= 12, "a record header cut short"
        (length,) = struct.unpack("<Q", data[at : at + 8])
        assert len(data) - at >= 16 + length, "a record cut short"
        found.append(Event.FromString(data[at + 12 : at + 12 + length]))
        at += 16 + length
    return found


def _fill_until_full(logger: TensorBoardLogger) -> int:
    """Log and flush steps until a flush fails; the last step that was written whole."""
    for step in range(1, 10_000):
        logger.log({f"tag{k}": step + k / 10 for k in range(10)}, step)
        try:
            logger.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC and err.filename == str(logger.path)
            return step - 1
    raise AssertionError("the disk never filled")


def _assert_ends_at(logger: TensorBoardLogger, last_step: int) -> None:
    logger.close()  # nothing pending after a failed flush: the close writes nothing
    scalars = [e for e in _records(logger.path.read_bytes()) if e.HasField("summary")]
    assert len(scalars) == 10 * last_step and scalars[-1].step == last_step
    assert [e.summary.value[0].simple_value for e in scalars[-10:]] == pytest.approx(
        [last_step + k / 10 for k in range(10)]
    )


def test_a_failed_event_write_raises_at_flush_and_leaves_whole_records(tmp_path, monkeypatch):
    original_write, calls = os.write, [0]

    def write(fd, data):  # a disk that takes half of the 4th write, then nothing
        calls[0] += 1
        if calls[0] == 4:
            return original_write(fd, bytes(data)[: len(data) // 2])
        if calls[0] > 4:
            raise _error(errno.ENOSPC)
        return original_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    logger = TensorBoardLogger(tmp_path / "tb")
    assert _fill_until_full(logger) == 2  # the header was write 1; steps 1 and 2 writes 2 and 3
    _assert_ends_at(logger, 2)


@pytest.mark.skipif(not _mounts_work(), reason="this sandbox cannot mount a tmpfs")
def test_a_full_tmpfs_raises_at_flush_and_leaves_whole_records(tmp_path, mounts):
    mounts.tmpfs(tmp_path / "disk", 2 * PAGE)
    logger = TensorBoardLogger(tmp_path / "disk" / "tb")
    last = _fill_until_full(logger)
    assert last > 0
    _assert_ends_at(logger, last)
    assert events(tmp_path / "disk" / "tb").Scalars("tag9")[-1].step == last


def _save_step(root: Path, step: int, manifest: bool = True) -> None:
    for replica in range(2):
        checkpoint.save_replica(root, step, replica, {"w": torch.full((3,), float(step))})
    if manifest:
        checkpoint.write_manifest(root, step, 2, "hash")


def test_cannot_write_names_the_file_the_cause_and_the_step_to_resume_from(tmp_path):
    root = tmp_path / "checkpoints"
    target = root / "step-00000015" / "replica-1.pt"
    assert cannot_write("checkpoint", target, _error(errno.ENOSPC), root) == (
        f"cannot write checkpoint {target}: No space left on device (errno 28); free space and "
        "run the same command to start the run over (no complete checkpoint to resume from)"
    )
    _save_step(root, 5)
    _save_step(root, 10)
    _save_step(root, 15, manifest=False)
    assert newest_complete(root) == 10
    assert cannot_write("checkpoint", target, _error(errno.EROFS, target.parent), root) == (
        f"cannot write checkpoint {target}: Read-only file system (errno 30); make {root / 'step-00000015'} "
        "writable and run the same command to resume from step 10"
    )
    absent = root / "step-00000020" / "replica-0.pt"  # the nearest folder that exists is named
    assert f"make {root} writable" in cannot_write("checkpoint", absent, _error(errno.EACCES), root)
    assert "fix the cause and run" in cannot_write("checkpoint", absent, _error(errno.EIO), root)


def test_discard_incomplete_removes_a_failed_step_and_never_a_complete_one(tmp_path):
    _save_step(tmp_path, 10)
    _save_step(tmp_path, 15, manifest=False)
    discard_incomplete(tmp_path, 10)
    discard_incomplete(tmp_path, 15)
    discard_incomplete(tmp_path, 20)  # nothing there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]
    assert checkpoint.load_replica(tmp_path, 10, 1)["w"].tolist() == [10.0] * 3


def _agree(rank: int, world_size: int, out: str) -> None:
    answers = [
        dist.first_failure(None),
        dist.first_failure("rank 1 failed" if rank == 1 else None),
        dist.first_failure(f"rank {rank} failed"),
    ]
    Path(out, f"rank{rank}.txt").write_text(repr(answers))


def test_first_failure_gives_every_rank_the_lowest_failing_ranks_message(tmp_path):
    run_world(_agree, 3, str(tmp_path))
    for rank in range(3):
        assert (tmp_path / f"rank{rank}.txt").read_text() == repr([None, "rank 1 failed", "rank 0 failed"])


class _FullAfter(io.BytesIO):
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise _error(errno.ENOSPC)
        return super().write(data)


def test_torch_save_on_a_full_disk_raises_the_oserror_not_torchs_runtimeerror():
    # torch.save alone reports this as "RuntimeError: ... unexpected pos"; the cause is lost.
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save({"w": torch.zeros(1000)}, _FullAfter(1000))
    with pytest.raises(OSError) as caught:
        checkpoint._torch_save({"w": torch.zeros(1000)}, _FullAfter(1000))
    assert caught.value.errno == errno.ENOSPC


@pytest.mark.skipif(not _mounts_work(), reason="this sandbox cannot mount a tmpfs")
def test_a_checkpoint_too_big_for_the_disk_raises_enospc_and_leaves_nothing(tmp_path, mounts):
    mounts.tmpfs(tmp_path / "disk", 2 * PAGE)
    with pytest.raises(OSError) as caught:
        checkpoint.save_replica(tmp_path / "disk", 5, 0, {"w": torch.zeros(4 * PAGE)})
    assert caught.value.errno == errno.ENOSPC
    assert [p.name for p in (tmp_path / "disk").rglob("*")] == ["step-00000005"]


# ---------------------------------------------------------------------------- through launch/run.sh


@pytest.mark.e2e
@pytest.mark.slow
def test_a_full_checkpoint_disk_through_the_launcher_is_one_line_and_resumes(tmp_path, mounts):
    """As a user meets it: launch/run.sh on a run directory whose checkpoints/ fills up."""
    if not _mounts_work():
        pytest.skip("this sandbox does not let root mount a tmpfs (the injected tests cover the rest)")
    args = ("--nproc", "2", "hydra.run.dir=run", *OVERRIDES, "train.steps=60", "model.hidden=[256]")
    reference = run_sh(*[a.replace("hydra.run.dir=run", "hydra.run.dir=alone") for a in args], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    one_checkpoint = _pages(tmp_path / "alone" / "checkpoints" / "step-00000055")
    # Room for two checkpoints and a few pages more (what a tmpfs counts besides the files' own
    # pages can vary by kernel; once it left step 10's manifest no room): never for a third.
    slack = 8 * PAGE
    assert slack < one_checkpoint
    mounts.tmpfs(tmp_path / "run" / "checkpoints", size=2 * one_checkpoint + slack)

    full = run_sh(*args, cwd=tmp_path)
    assert full.returncode == 1
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in full.stdout + full.stderr, full.stderr[-2000:]
    assert re.fullmatch(
        r"replica_dist: error: cannot write checkpoint \S+/checkpoints/step-00000015/replica-\d\.pt: "
        r"No space left on device \(errno 28\); free space and run the same command to resume from step 10",
        lines[0],
    ), lines[0]

    mounts.resize(tmp_path / "run" / "checkpoints", size=64 * one_checkpoint)
    again = run_sh(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout and "step-00000010" in again.stdout
    for mine, alone in zip(replica_weights(tmp_path / "run", 2), replica_weights(tmp_path / "alone", 2)):
        assert all(torch.equal(mine[k], alone[k]) for k in mine)
