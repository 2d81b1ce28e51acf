"""python -m replica_dist.experiments.startup: it finds the lines it times in a real launch
(no timing is asserted: only that each number was measured and the order of events holds)."""

from __future__ import annotations

import pytest

from replica_dist.experiments import startup


@pytest.mark.e2e
@pytest.mark.slow
def test_the_startup_tool_times_a_launch_and_a_restart(tmp_path):
    first = startup.first_step(2, ["model.hidden=[8]"], tmp_path / "first")
    assert 0 < first["first_step_s"] <= first["exit_s"]
    assert first["cpu_s"] > 0  # the launcher's and the workers' CPU time came back
    assert (tmp_path / "first" / "summary.json").exists()
    assert startup.restart(2, ["model.hidden=[8]"], tmp_path / "restart") > 0
    assert (tmp_path / "restart" / "summary.json").exists()  # the resumed run went on to its end
