"""The benchmark runs end to end; its byte counts are checked against closed forms (timings never are)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from trainer_runs import REPO
from worlds import COLLECTIVE_TIMEOUT_S

from replica_dist import timing
from replica_dist.experiments.bench import AVERAGER, FRAGMENTED, PLAIN, VARIANTS, _step_stats
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


def _run_benchmark(tmp_path, arguments: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """The benchmark on two ranks under torchrun, with its JSON written to tmp_path/bench.json."""
    command = torchrun_command(2, arguments, module="replica_dist.experiments.bench")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads((tmp_path / "bench.json").read_text())


def test_pipelined_timer_charges_each_step_the_wall_time_since_the_last_one_ended(monkeypatch):
    # A fake clock: the step's own work and the loop's work between steps both count, and
    # nothing is cut into sections.
    clock = [100.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    timer = timing.StepTimer(torch.device("cpu"), pipelined=True)
    for own, between in ((0.010, 0.002), (0.020, 0.0), (0.005, 0.001)):
        timer.start_step()
        with timer.section("compute"):
            clock[0] += own
        timer.end_step()
        clock[0] += between
    assert [s.keys() for s in timer.steps] == [{"step"}] * 3
    assert [s["step"] for s in timer.steps] == pytest.approx([0.010, 0.022, 0.005])
    sectioned = timing.StepTimer(torch.device("cpu"))
    sectioned.start_step()
    with sectioned.section("compute"):
        clock[0] += 0.003
    sectioned.end_step()
    assert sectioned.steps == [{"compute": pytest.approx(0.003)}]


@pytest.mark.slow
def test_pipelined_benchmark_reports_whole_steps(tmp_path):
    arguments = [
        "--steps=12", "--warmup=2", "--hidden=32", "--rounds=1", "--bandwidth-iterations=2", "--pipelined",
        f"--variants={PLAIN},independent,ddp", f"--work={tmp_path / 'work'}", f"--json={tmp_path / 'bench.json'}",
        f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]  # fmt: skip
    done, numbers = _run_benchmark(tmp_path, arguments)
    assert numbers["timing"] == "pipelined" and list(numbers["steps"]) == [PLAIN, "independent", "ddp"]
    assert "Timing: pipelined." in done.stdout
    for name, r in numbers["steps"].items():
        assert r["mean_ms"] > 0 and r["compute_ms"] == r["communication_ms"] == r["update_ms"] == 0, name
        row = next(line for line in done.stdout.splitlines() if line.startswith(f"| {name} |"))
        assert [c.strip() for c in row.split("|")[1:-1]][7:10] == ["-", "-", "-"], row


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_benchmark_runs_every_variant_under_torchrun(tmp_path):
    arguments = [
        "--steps=32", "--warmup=2", "--hidden=32", "--rounds=1", "--bandwidth-iterations=3",
        f"--work={tmp_path / 'work'}", f"--report={tmp_path / 'report.md'}", f"--json={tmp_path / 'bench.json'}",
        f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]  # fmt: skip
    done, numbers = _run_benchmark(tmp_path, arguments)
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
    bandwidth = numbers["all_reduce"]
    for name in ("raw all_reduce", "coupling exchange", *(f"{c} exchange" for c in ("bf16", "int8"))):
        b = bandwidth[name]
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
    # Bytes per step and per sample: the table's cells are the run's own counts.
    for name, r in numbers["steps"].items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[12:14] == [f"{r['bytes_per_step']:,.0f}", f"{r['bytes_per_sample']:,.1f}"], row
        assert r["bytes_per_sample"] == r["bytes_per_step"] / 64, name  # the mlp's batch per rank
    # ... and equal the closed forms: n weights of the mlp [32] on digits (64 inputs, 10 classes),
    # R ranks, each exchange's guard table R x 5 float32; 32 steps hold 8 periods of 4, 2 of 16.
    n, R = 64 * 32 + 32 + 32 * 10 + 10, 2
    assert numbers["model"]["numel"] == n
    full = 4 * n + 20 * R
    per_step = {name: r["bytes_per_step"] for name, r in numbers["steps"].items()}
    assert per_step[PLAIN] == per_step["independent"] == 0
    for name in ("coupled sync", "coupled overlapped", "linear overlapped"):
        assert per_step[name] == full, name
    assert per_step["coupled every 4"] == per_step["average every 4"] == full / 4
    assert per_step["coupled every 16"] == per_step["diloco every 16"] == full / 16
    assert per_step["coupled every 4 int8"] == (n + 4 * math.ceil(n / 1024) + 20 * R) / 4
    assert per_step[FRAGMENTED] == (4 * n + 4 * 20 * R) / 16  # 4 fragments, each with its own table
    assert per_step["ddp"] == 4 * n  # every gradient, each step (DDP's buckets, counted by a hook)
    assert per_step[AVERAGER] == 4 * n / 4  # the parameters, every 4 steps, no guard words
    # The compressed exchanges next to a raw all_reduce of exactly the bytes they send.
    assert bandwidth["coupling exchange"]["bytes"] == bandwidth["raw all_reduce"]["bytes"] == full
    for compress, nbytes in (("bf16", 2 * n + 20 * R), ("int8", n + 4 * math.ceil(n / 1024) + 20 * R)):
        assert bandwidth[f"{compress} exchange"]["bytes"] == nbytes, compress
        assert bandwidth[f"raw all_reduce, {compress} exchange's bytes"]["bytes"] == nbytes, compress
        assert f"| {compress} exchange | {nbytes:,} |" in report
        ratio = (
            bandwidth[f"{compress} exchange"]["algbw_GBps"]
            / bandwidth[f"raw all_reduce, {compress} exchange's bytes"]["algbw_GBps"]
        )
        assert (
            f"| {compress} exchange / raw all_reduce of its bytes, bus bandwidth | {ratio:.3f} | - |"
            in report
        )
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # scratch runs removed


def test_step_overhead_times_the_four_loops_against_the_plain_one():
    command = [
        sys.executable,
        "-m",
        "replica_dist.experiments.step_overhead",
        "--rounds=2",
        "--steps=2",
        "--hidden=16",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines()[1:]:
        name, numbers = line[:24].strip(), line[24:].split()
        rows[name] = (float(numbers[0]), float(numbers[2]), float(numbers[4].lstrip("x")))
    assert list(rows) == ["plain loop", "plain loop + one read", "ReplicaCoupling none", "... check_every=0"]
    plain = rows["plain loop"][0]
    assert rows["plain loop"][1:] == (0.0, 1.0)
    for ms, extra, ratio in rows.values():  # each row's columns agree with each other (to print precision)
        # Each printed number is off by up to 5e-4: so is ms / plain, by the rounding of both.
        ratio_rounding = 5e-4 + 5e-4 * (1 / plain + ms / plain**2)
        assert (
            ms > 0
            and extra == pytest.approx(ms - plain, abs=2e-3)
            and ratio == pytest.approx(ms / plain, abs=ratio_rounding)
        )
