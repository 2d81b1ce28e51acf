"""One writer per run directory, and which job wrote it last.

Rank 0 holds an exclusive lock on `<run_dir>/.lock` (a POSIX record lock, lockf) for its whole
life, taken before anything in the directory is written. The kernel drops the lock when the
process ends, however it ends, so a lock is never stale; and it belongs to the process, not to
the open file, so the DataLoader workers rank 0 forks do not inherit it (with flock they did,
and a restart of a killed rank 0 was refused until they noticed and exited, up to 5 s later). A second launch into a directory in use is refused with one
line naming the directory and the holder.

The file also tells which job wrote the directory last (torchrun's run id): a worker group that
torchrun restarts (`--max-restarts`) is the same job, and may start over a run that died before
its first checkpoint, or report a run that had already finished; a different job may not.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

from replica_dist.errors import ConfigError

LOCK_NAME = ".lock"
_held: dict[Path, IO[str]] = {}
"""The open lock files of this process, by path: closing any descriptor of one would release
its lock (POSIX), so the file is opened once, here, and read and written through it."""


def current_job() -> str:
    """torchrun's run id, the same for every restart of one torchrun job ('' without torchrun)."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def _read(handle: IO[str]) -> dict:
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def acquire(run_dir: Path) -> dict:
    """Lock `run_dir` for this process's life and return what its last writer recorded
    ({} if nothing). Raises ConfigError if another live process holds the lock. Nothing is
    written into the file until `record` is called. A process that holds the lock already
    (a run that stopped with an error, started again in the same process) keeps it."""
    path = (run_dir / LOCK_NAME).resolve()
    if path in _held:
        return _read(_held[path])
    handle = open(path, "a+")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # the whole file, from byte 0
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        holder = _read(handle)
        handle.close()
        raise ConfigError(
            f"hydra.run.dir={run_dir} is in use by another run ({_describe(holder)}); "
            f"wait for it to end or choose another hydra.run.dir"
        ) from None
    _held[path] = handle
    return _read(handle)


def record(run_dir: Path) -> None:
    """Write this process and job into the held lock file: from here on the directory is ours."""
    handle = _held[(run_dir / LOCK_NAME).resolve()]
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "job": current_job(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(holder) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def release() -> None:
    """Give back every lock this process holds (the process's end does the same)."""
    while _held:
        _held.popitem()[1].close()
