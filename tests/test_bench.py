"""The benchmark runs end to end (its numbers are not checked here: timings are never tested)."""

from __future__ import annotations

import json
import subprocess

import pytest
from runs import REPO
from worlds import COLLECTIVE_TIMEOUT_S

from replica_dist.experiments.bench import AVERAGER, PLAIN, VARIANTS, _step_stats
from replica_dist.experiments.commands import torchrun_command


def test_step_stats_from_known_step_times():
    steps = [{"compute": i * 1e-3, "communication": i * 2e-3} for i in range(2, 11)]  # 6, 9, ..., 30 ms
    stats = _step_stats(steps, [100 + i for i in range(2, 11)], samples_per_step=8)
    assert stats["p50_ms"] == pytest.approx(18.0)  # median of 6, 9, ..., 30
    assert stats["p90_ms"] == pytest.approx(27.0)  # the 8th of 9, rounding the rank down
    assert stats["mean_ms"] == pytest.approx(18.0)
    assert stats["samples_per_s"] == pytest.approx(8 / 0.018)
    assert stats["compute_ms"] == pytest.approx(6.0) and stats["communication_ms"] == pytest.approx(12.0)
    assert stats["update_ms"] == 0.0
    assert stats["peak_bytes"] == 110


def test_benchmark_runs_every_variant_under_torchrun(tmp_path):
    arguments = [
        "--steps=12", "--warmup=2", "--hidden=32", "--rounds=1", "--bandwidth-iterations=3",
        f"--work={tmp_path / 'work'}", f"--report={tmp_path / 'report.md'}", f"--json={tmp_path / 'bench.json'}",
        f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]  # fmt: skip
    command = torchrun_command(2, arguments, module="replica_dist.experiments.bench")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = json.loads((tmp_path / "bench.json").read_text())
    assert list(numbers["steps"]) == [PLAIN, *VARIANTS, AVERAGER]
    for name, r in numbers["steps"].items():
        assert 0 < r["p50_ms"] <= r["p90_ms"], name
        sections = r["compute_ms"] + r["communication_ms"] + r["update_ms"]
        assert sections == pytest.approx(r["mean_ms"], rel=1e-9), name
        assert r["peak_bytes"] > 0
    assert (
        numbers["steps"]["independent"]["communication_ms"]
        < numbers["steps"]["coupled sync"]["communication_ms"]
    )
    for name in ("raw all_reduce", "coupling exchange"):
        b = numbers["all_reduce"][name]
        assert b["busbw_GBps"] == pytest.approx(b["algbw_GBps"])  # 2(n-1)/n = 1 for 2 ranks
    report = (tmp_path / "report.md").read_text()
    assert report == done.stdout[done.stdout.index("Machine:") :]
    for name in (PLAIN, *VARIANTS, AVERAGER, "coupling / raw all_reduce bus bandwidth"):
        assert f"| {name} |" in report
    # Every variant against the plain loop and against DDP, from the same run's means.
    means = {name: r["mean_ms"] for name, r in numbers["steps"].items()}
    for name, mean in means.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[4:6] == [f"{mean / means[PLAIN]:.3f}", f"{mean / means['ddp']:.3f}"], row
    assert (
        f"| independent / plain loop step time | {means['independent'] / means[PLAIN]:.3f} | <= 1.03 |"
        in report
    )
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # scratch runs removed
