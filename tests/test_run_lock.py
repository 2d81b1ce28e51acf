"""One writer per run directory: a live holder refuses others; a dead one holds nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from trainer_runs import REPO

from replica_dist import run_lock
from replica_dist.config import ConfigError

HOLDER = """
import sys, time
from pathlib import Path
from replica_dist import run_lock
run_lock.acquire(Path(sys.argv[1]))
run_lock.record(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "held\n"
    yield process
    process.kill()
    process.wait()


def test_a_live_holder_refuses_another_process_naming_itself(tmp_path, holder):
    with pytest.raises(ConfigError) as refused:
        run_lock.acquire(tmp_path)
    message = str(refused.value)
    assert message.startswith(f"hydra.run.dir={tmp_path} is in use by another run (pid {holder.pid} on ")
    assert "\n" not in message
    # Refusing wrote nothing: the holder's record is intact.
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == holder.pid


def test_the_lock_of_a_killed_holder_is_free_and_tells_who_wrote_last(tmp_path, holder, monkeypatch):
    holder.kill()
    holder.wait()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    try:
        last_writer = run_lock.acquire(tmp_path)
        assert last_writer["pid"] == holder.pid and last_writer["job"] == ""
        run_lock.record(tmp_path)
        mine = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
        assert mine["pid"] == os.getpid() and mine["job"] == "job-b"
        assert run_lock.acquire(tmp_path) == mine  # the same process keeps its lock
    finally:
        run_lock.release()


def test_release_lets_another_process_in(tmp_path):
    run_lock.acquire(tmp_path)
    run_lock.release()
    done = subprocess.run(
        [sys.executable, "-c", HOLDER.replace("time.sleep(120)", ""), str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout == "held\n", done.stderr


FORKING_HOLDER = """
import os, sys, time
from pathlib import Path
from replica_dist import run_lock
run_lock.acquire(Path(sys.argv[1]))
run_lock.record(Path(sys.argv[1]))
child = os.fork()  # as a rank forks its DataLoader workers
if child == 0:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1), os.dup2(devnull, 2)  # let the test's pipes close with the holder
    time.sleep(60)
    os._exit(0)
print(os.getpid(), child, flush=True)
os._exit(0)  # the holder dies; its forked child lives on, with the lock file open
"""


def test_a_forked_child_of_a_dead_holder_does_not_keep_the_lock(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", FORKING_HOLDER, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    holder_pid, child = (int(word) for word in done.stdout.split())
    try:
        os.kill(child, 0)  # raises if the child were gone: it must still be alive here
        last_writer = run_lock.acquire(tmp_path)  # a restarted rank 0 gets in at once
        assert last_writer["pid"] == holder_pid
    finally:
        run_lock.release()
        os.kill(child, 9)
