"""Checkpoints of a world of replicas: one file per replica, one manifest per step.

Unlike DDP, every replica holds different weights, so every rank saves its own state:

    <root>/step-00000040/replica-0.pt      rank 0's state (torch.save of the caller's dict)
    <root>/step-00000040/replica-1.pt      ...
    <root>/step-00000040/manifest.json     written last, by rank 0 only

The protocol, for step N (this module issues no collective; the caller agrees):

    1. every rank: save_replica(root, N, rank, state)
    2. every rank: agree that every rank wrote (dist.first_failure); if one could not, stop
       every rank, and rank 0 removes the step folder (discard_incomplete)
    3. rank 0:     write_manifest(root, N, world_size, config_hash(...)), then prune(root, keep)
    4. every rank: agree again, since step 3 can fail on rank 0 alone

So a manifest means "every replica of this step is on disk", and the previous complete
checkpoint is pruned only once a newer one is complete. A write that fails (a full disk, a
read-only folder) raises OSError; cannot_write turns it into the one line the run stops with. The manifest records each
file's size and sha256, which lets a loader tell a complete checkpoint from one whose file
was truncated, altered, or rewritten by a later run that died before its own manifest.

Every file is written to a `.tmp-*` file in the same folder, fsynced, renamed over its final
name with os.replace (atomic on POSIX), and the folder is fsynced, so a file under its final
name is whole. A killed writer leaves only a `.tmp-*` file; clean_temporaries removes those.

On resume, find_resumable returns the newest complete step and skips (with a warning) the
incomplete ones; it refuses (CheckpointMismatch) when that newest complete checkpoint was
written by another world size or another config, rather than silently falling back to an
older one. load_replica reads with torch.load(weights_only=True), so the saved state must
hold only plain types (see save_replica); save_replica checks that before writing, so a
checkpoint that could not be loaded back is refused at save time, not found at resume time.

Why one module of about 550 lines: every part is one side of the protocol above and is read
against it (the atomic writes make a final name mean a whole file, the manifest makes a step
complete, the reading trusts only what a manifest vouches for, pruning keeps the newest complete
one); split, each half would state the other's guarantees again.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from replica_dist.config import RESUMABLE_KEYS

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"

DEFAULT_IGNORE: tuple[str, ...] = RESUMABLE_KEYS
"""The config keys a checkpoint's config hash leaves out: those that may change on resume."""

_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 1 << 20


class CheckpointMismatch(ValueError):
    """The newest complete checkpoint was written by another world size or config."""


class IncompleteCheckpoint(ValueError):
    """A step folder is not a usable checkpoint: no or garbled manifest, or a replica file
    missing, truncated or altered."""


class IncompleteCheckpointWarning(UserWarning):
    """find_resumable skipped an incomplete step folder."""


# ---------------------------------------------------------------------------- layout


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """The folder of step `step`: <root>/step-<step:08d>."""
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    return Path(root) / f"step-{step:08d}"


def replica_name(replica: int) -> str:
    return f"replica-{replica}.pt"


def _steps(root: Path) -> list[tuple[int, Path]]:
    """Every step folder under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


# ---------------------------------------------------------------------------- atomic writes


def _fsync_dir(folder: Path) -> None:
    """Make a rename or creation inside `folder` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # a platform without directory file descriptors
    try:
        os.fsync(fd)
    except OSError as error:
        # Some filesystems (and network mounts) refuse fsync on a directory.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextmanager
def _atomic_open(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at `path`, whole, only if the block ends without error."""
    path = Path(path)
    # O_EXCL with a random name, rather than mkstemp: the file gets the usual umask-based
    # permissions (mkstemp's 0600 would hide a rank's replica from other users of a shared run).
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a SIGKILL skips this; clean_temporaries covers that
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`."""
    with _atomic_open(Path(path)) as file:
        file.write(data)


class _KeepsWriteError:
    """A file for torch.save that keeps the OSError of its first failed write."""

    def __init__(self, file: IO[bytes]):
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self._file.flush()


def _torch_save(obj: Any, file: IO[bytes]) -> None:
    """torch.save, raising a failed write as the OSError it is: torch's zip writer turns it
    into a RuntimeError without the cause ("unexpected pos 17024 vs 12856" on a full disk)."""
    kept = _KeepsWriteError(file)
    try:
        torch.save(obj, kept)
    except Exception:
        if kept.error is not None:
            raise kept.error from None
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` so that `path` holds either its old content or all of it."""
    with _atomic_open(Path(path)) as file:
        _torch_save(obj, file)


# ---------------------------------------------------------------------------- saving

_PLAIN_LEAVES = (int, float, bool, str, bytes, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(value: Any, where: str) -> None:
    """Refuse what torch.load(weights_only=True) would refuse, naming where it sits.

    Exact types on purpose: numpy scalars subclass float but are not loadable.
    """
    kind = type(value)
    if isinstance(value, torch.Tensor) or kind in _PLAIN_LEAVES:
        return
    if kind in (list, tuple):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        f"refuses; store tensors, ints, floats, str, bytes, lists, tuples and dicts only "
        f"(a numpy array: torch.from_numpy(a); a numpy Generator: rng.bit_generator.state)"
    )


def save_replica(root: str | os.PathLike, step: int, replica: int, state: dict) -> Path:
    """Write this replica's `state` to <root>/step-<step>/replica-<replica>.pt, atomically.

    `state` may hold tensors (any device; they load on CPU), ints, floats, bools, str, bytes,
    None, torch.Size/dtype/device, and lists, tuples and dicts of those: a model's and an
    optimizer's state_dict, torch.get_rng_state(), a numpy Generator's
    `bit_generator.state`. Anything else (a numpy array, e.g. the legacy
    np.random.get_state()) raises TypeError before anything is written.
    """
    if replica < 0:
        raise ValueError(f"replica must be >= 0; got {replica}")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict; got {type(state).__name__}")
    _check_plain(state, "state")
    folder = step_dir(root, step)
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_dir(folder.parent)
    path = folder / replica_name(replica)
    with _atomic_open(path) as file:
        _torch_save(state, file)
    return path


def _file_digest(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def write_manifest(root: str | os.PathLike, step: int, world_size: int, config_hash: str) -> Path:
    """Rank 0, after the barrier that follows every rank's save_replica: record the size and
    sha256 of replica-0..W-1 in manifest.json, written atomically and last.

    Raises ValueError if any of the W replica files is missing (a rank did not save).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    folder = step_dir(root, step)
    names = [replica_name(r) for r in range(world_size)]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ValueError(
            f"cannot write the manifest of {folder.name}: {len(missing)} of {world_size} replica "
            f"files missing ({', '.join(missing)})"
        )
    files = {}
    for name in names:
        size, sha256 = _file_digest(folder / name)
        files[name] = {"bytes": size, "sha256": sha256}
    manifest = {"step": step, "world_size": world_size, "config_hash": config_hash, "files": files}
    path = folder / MANIFEST
    atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


# ---------------------------------------------------------------------------- config hash


def config_hash(cfg_dict: dict, ignore: Iterable[str] = DEFAULT_IGNORE) -> str:
    """sha256 of the config as canonical JSON, without the dotted keys that match a pattern
    of `ignore` (fnmatch: `log.*` leaves out every key of log).

    `cfg_dict` is plain data (OmegaConf.to_container(cfg, resolve=True) or
    dataclasses.asdict(cfg)); a value JSON cannot encode raises TypeError rather than being
    hashed by its repr, which may not be stable. An ignored key that is absent is fine.
    """
    ignore = tuple(ignore)

    def prune(node: dict, prefix: str) -> dict:
        return {
            key: prune(value, f"{prefix}{key}.") if isinstance(value, dict) else value
            for key, value in node.items()
            if not any(fnmatch.fnmatchcase(f"{prefix}{key}", pattern) for pattern in ignore)
        }

    text = json.dumps(prune(cfg_dict, ""), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------- reading


def _read_manifest(folder: Path) -> dict:
    """The folder's manifest, checked for shape; IncompleteCheckpoint if absent or garbled."""
    path = folder / MANIFEST
    if not path.is_file():
        raise IncompleteCheckpoint(f"{folder.name} has no {MANIFEST} (a rank did not finish saving)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IncompleteCheckpoint(f"{folder.name}/{MANIFEST} is unreadable: {error}") from None

    def garbled(why: str) -> IncompleteCheckpoint:
        return IncompleteCheckpoint(f"{folder.name}/{MANIFEST} is garbled: {why}")

    if not isinstance(manifest, dict):
        raise garbled("not a JSON object")
    step, world_size = manifest.get("step"), manifest.get("world_size")
    if type(step) is not int or f"step-{step:08d}" != folder.name:
        raise garbled(f"its step {step!r} does not match the folder")
    if type(world_size) is not int or world_size < 1:
        raise garbled(f"world_size {world_size!r}")
    if not isinstance(manifest.get("config_hash"), str):
        raise garbled("no config_hash")
    files = manifest.get("files")
    expected = {replica_name(r) for r in range(world_size)}
    if not isinstance(files, dict) or set(files) != expected:
        raise garbled(f"files must list exactly replica-0..{world_size - 1}")
    for name, entry in files.items():
        if not (
            isinstance(entry, dict)
            and type(entry.get("bytes")) is int
            and isinstance(entry.get("sha256"), str)
        ):
            raise garbled(f"entry of {name}")
    return manifest


def _check_sizes(folder: Path, manifest: dict) -> None:
    """Every listed file exists with its recorded size (a stat, no reading)."""
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise IncompleteCheckpoint(f"{folder.name}/{name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IncompleteCheckpoint(
                f"{folder.name}/{name} has {size} bytes, the manifest says {entry['bytes']} (truncated?)"
            )


def _verify(folder: Path) -> dict:
    """The manifest of a complete checkpoint; IncompleteCheckpoint saying why otherwise."""
    manifest = _read_manifest(folder)
    _check_sizes(folder, manifest)
    for name, entry in manifest["files"].items():
        _, sha256 = _file_digest(folder / name)
        if sha256 != entry["sha256"]:
            raise IncompleteCheckpoint(
                f"{folder.name}/{name} does not match its sha256 in the manifest (altered)"
            )
    return manifest


def find_resumable(
    root: str | os.PathLike, world_size: int, config_hash: str, allow_other_world_size: bool = False
) -> int | None:
    """The newest step under `root` whose manifest is readable and whose every replica file
    has the recorded size and sha256; None if there is none.

    Incomplete folders are skipped with an IncompleteCheckpointWarning naming the folder and
    why. If the newest complete checkpoint was written by another world size or config,
    raises CheckpointMismatch (the caller decides: new root, or same settings) instead of
    falling back to an older one. Reads every replica file of the checkpoints it inspects.
    """
    for step, folder in reversed(_steps(Path(root))):
        try:
            manifest = _verify(folder)
        except IncompleteCheckpoint as why:
            warnings.warn(
                f"skipping incomplete checkpoint {folder}: {why}", IncompleteCheckpointWarning, stacklevel=2
            )
            continue
        differences = []
        if manifest["world_size"] != world_size and not allow_other_world_size:
            differences.append(
                f"checkpoint {folder.name} was written by {manifest['world_size']} replicas, "
                f"this run has {world_size}"
            )
        if manifest["config_hash"] != config_hash:
            differences.append(
                f"checkpoint {folder.name} was written with config hash {manifest['config_hash'][:12]}, "
                f"this run's is {config_hash[:12]} (a setting that may not change on resume differs)"
            )
        if differences:
            raise CheckpointMismatch(
                "; ".join(differences) + "; resume with the same settings, or checkpoint to a new folder"
            )
        return step
    return None


def saved_world_size(root: str | os.PathLike, step: int) -> int:
    """How many replicas wrote the checkpoint of `step` (from its manifest)."""
    return int(_read_manifest(step_dir(root, step))["world_size"])


def load_replica(root: str | os.PathLike, step: int, replica: int) -> dict:
    """This replica's state at `step`, on CPU, after checking the file against the manifest.

    Loaded with torch.load(weights_only=True): no code from the file runs, and save_replica
    accepts only states that load this way. Raises IncompleteCheckpoint if the step has no
    usable manifest or this replica's file does not match it.
    """
    folder = step_dir(root, step)
    manifest = _read_manifest(folder)
    name = replica_name(replica)
    entry = manifest["files"].get(name)
    if entry is None:
        raise IncompleteCheckpoint(
            f"{folder.name} holds replicas 0..{manifest['world_size'] - 1}; there is no replica {replica}"
        )
    path = folder / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{folder.name}/{name} is missing") from None
    # Hash the very bytes that are loaded, so a file changed between check and load is caught.
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise IncompleteCheckpoint(f"{folder.name}/{name} does not match its size and sha256 in the manifest")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- housekeeping


def clean_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove the `.tmp-*` files a killed writer left under root or in any step folder.

    Call it only while no rank is saving (at startup, on one rank, before a barrier): it
    would also remove another rank's file in flight.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [root] + [folder for _, folder in _steps(root)]
    removed = []
    for folder in folders:
        for path in sorted(folder.glob(f"{TMP_PREFIX}*")):
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _is_complete(folder: Path) -> bool:
    """A readable manifest whose files exist with their recorded sizes (a stat, no hashing)."""
    try:
        _check_sizes(folder, _read_manifest(folder))
    except IncompleteCheckpoint:
        return False
    return True


def newest_complete(root: str | os.PathLike) -> int | None:
    """The newest step under root that is complete by manifest and file sizes (no hashing;
    find_resumable checks the hashes); None if there is none."""
    return next((step for step, folder in reversed(_steps(Path(root))) if _is_complete(folder)), None)


def discard_incomplete(root: str | os.PathLike, step: int) -> None:
    """Remove the folder of `step` unless it is complete: what a failed save left, so that it
    takes no space the rerun needs. Call it only once every rank has stopped writing it.
    Best effort: on a read-only or otherwise failing disk, whatever cannot go stays, to be
    skipped on resume and pruned after the next complete save."""
    folder = step_dir(root, step)
    if folder.is_dir() and not _is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cannot_write(what: str, path: str | os.PathLike, error: OSError, root: str | os.PathLike) -> str:
    """One line for a write that failed: what and where, the cause, and how to go on from the
    newest complete checkpoint under `root`, e.g. "cannot write checkpoint
    /x/checkpoints/step-00000020/replica-1.pt: No space left on device (errno 28); free space
    and run the same command to resume from step 10"."""
    path = Path(path)
    cause = (
        f"{error.strerror} (errno {error.errno})" if error.strerror else str(error) or type(error).__name__
    )
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        remedy = "free space"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        remedy = f"make {_nearest_existing(path.parent)} writable"
    else:
        remedy = "fix the cause"
    step = newest_complete(root)
    if step is None:
        then = "run the same command to start the run over (no complete checkpoint to resume from)"
    else:
        then = f"run the same command to resume from step {step}"
    return f"cannot write {what} {path}: {cause}; {remedy} and {then}"


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints; delete older complete ones and every
    incomplete folder older than the newest complete one. Returns the folders deleted.

    Incomplete folders newer than the newest complete one are left alone: a rank may still
    be writing them. "Complete" here is a readable manifest whose files exist with their
    recorded sizes (a stat; no hashing on every save); find_resumable checks the hashes.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the newest complete checkpoint is never deleted); got {keep}")
    complete, incomplete = [], []
    for step, folder in _steps(Path(root)):
        (complete if _is_complete(folder) else incomplete).append((step, folder))
    if not complete:
        return []
    newest = complete[-1][0]
    doomed = complete[:-keep] + [(step, folder) for step, folder in incomplete if step < newest]
    removed = []
    for _, folder in sorted(doomed):
        # The manifest goes first, so a crash mid-delete leaves a folder that reads as
        # incomplete rather than a manifest that names missing files.
        manifest = folder / MANIFEST
        if manifest.exists():
            manifest.unlink()
            _fsync_dir(folder)
        shutil.rmtree(folder)
        removed.append(folder)
    if removed:
        _fsync_dir(Path(root))
    return removed


def newest_with_manifest(root: str | os.PathLike) -> int | None:
    """The newest step whose manifest exists, without reading any replica file (a quick
    answer for messages; find_resumable is the careful one)."""
    for step, folder in reversed(_steps(Path(root))):
        if (folder / MANIFEST).is_file():
            return step
    return None
