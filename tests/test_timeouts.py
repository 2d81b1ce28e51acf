"""The timeout every test runs under (pyproject's `timeout`) fails a hung test, the session goes
on, and what the hung test started does not survive it (tests/conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from test_launch import _alive

HUNG_TEST = """
import json, os, subprocess, sys, time

def test_hangs_with_children():
    child = subprocess.Popen(["sleep", "600"])
    # as torchrun starts its workers: a session of their own, out of reach of the parent's group
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(os.environ["PIDS_FILE"], "w") as pids:
        json.dump([child.pid, worker.pid], pids)
    time.sleep(600)

def test_after_the_hung_one_runs():
    pass
"""


def test_a_hung_test_fails_at_its_timeout_and_its_processes_end_with_it(pytester, request, monkeypatch):
    assert request.config.getini("timeout"), "pyproject sets no timeout for every test"
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_hung=HUNG_TEST)
    pids_file = pytester.path / "pids.json"
    monkeypatch.setenv("PIDS_FILE", str(pids_file))
    method = request.config.getini("timeout_method")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "timeout=3", "-o", f"timeout_method={method}", timeout=120
    )
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])
    pids = json.loads(pids_file.read_text())
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if _alive(pid)] == [], "the hung test's processes outlived it"
