"""The A/B check against a git ref (replica_dist.experiments.against): its plan, environments and
arithmetic, from given numbers. Nothing here is timed; the jobs themselves are faked."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_runs import REPO

from replica_dist.experiments import against


def test_schedule_runs_every_variant_on_both_sides_and_swaps_who_goes_first_each_round():
    order = against.schedule(["tanh", "ddp"], rounds=3)
    assert order == [
        (0, "tanh", "ref"), (0, "tanh", "now"), (0, "ddp", "ref"), (0, "ddp", "now"),
        (1, "tanh", "now"), (1, "tanh", "ref"), (1, "ddp", "now"), (1, "ddp", "ref"),
        (2, "tanh", "ref"), (2, "tanh", "now"), (2, "ddp", "ref"), (2, "ddp", "now"),
    ]  # fmt: skip


def test_compare_gives_medians_their_ratio_and_the_spread_of_each_rounds_own_ratio():
    walls = {"tanh": {"ref": [20.0, 24.0, 22.0], "now": [23.0, 25.0, 33.0]}}
    result = against.compare(walls)["tanh"]
    assert result["ref_median_s"] == 22.0 and result["now_median_s"] == 25.0
    assert result["ratio"] == pytest.approx(25.0 / 22.0)
    # Rounds paired as they ran: 23/20, 25/24, 33/22; the ratio of medians is not one of them.
    assert result["paired_min"] == pytest.approx(25.0 / 24.0)
    assert result["paired_max"] == pytest.approx(1.5)


def test_table_has_a_row_per_variant_and_tanh_over_ddp_on_each_side():
    walls = {
        "tanh": {"ref": [23.44], "now": [26.49]},
        "ddp": {"ref": [21.39], "now": [21.33]},
        "none": {"ref": [10.29], "now": [9.88]},
    }
    lines = against.table(against.compare(walls), "ref 6ddab97", "now main").splitlines()
    assert "ref 6ddab97" in lines[0] and "now main" in lines[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert rows["`tanh`"] == [
        "23.44",
        "26.49",
        f"**{26.49 / 23.44:.3f}**",
        f"{26.49 / 23.44:.3f}-{26.49 / 23.44:.3f}",
    ]
    assert rows["`none`"][2] == f"**{9.88 / 10.29:.3f}**"
    assert rows["tanh / ddp"][:2] == [
        f"{23.44 / 21.39:.3f}",
        f"{26.49 / 21.33:.3f}",
    ]  # the issue's 1.096, 1.242
    no_ddp = against.table(against.compare({"tanh": walls["tanh"]}), "ref", "now")
    assert "tanh / ddp" not in no_ddp


def test_both_sides_get_the_benchmark_shape_and_an_explicit_schedule_for_elastic_forms():
    tanh = against.overrides("tanh", 300, ["dist.bucket_mb=8"])
    assert tanh[: len(against.SHAPE)] == against.SHAPE
    assert "train.steps=300" in tanh and "coupling=tanh" in tanh and "coupling.every=1" in tanh
    assert "coupling.eta=0.001" in tanh and "coupling.eta_growth=0.004" in tanh
    assert tanh[-1] == "dist.bucket_mb=8"  # the user's own overrides last: they win
    ddp = against.overrides("ddp", 300, [])
    assert not any(o.startswith("coupling.eta") for o in ddp)  # ddp has no eta: the trainer refuses it


@pytest.fixture
def fake_jobs(monkeypatch, tmp_path):
    """against.main with its environment and its jobs faked: prepare() returns a made-up REF
    python (whose torch is "2.x-ref"), and each job writes the summary.json a trainer would, with wall_seconds taken
    from SECONDS by (side, coupling form, round). Returns the jobs' (side, cwd, overrides)."""
    ref_python = "/made/up/ref/venv/bin/python"
    seconds = {  # side: form: one per round
        "ref": {"tanh": [20.0, 22.0, 24.0], "ddp": [18.0, 18.0, 19.0]},
        "now": {"tanh": [23.0, 26.0, 25.0], "ddp": [18.0, 18.5, 17.0]},
    }
    prepared, jobs = [], []

    def prepare(work, sha, log=print):
        prepared.append((work, sha))
        return Path(ref_python)

    def run_job(command, name, cwd=REPO):
        side = "ref" if command[0] == ref_python else "now"
        assert command[0] == (ref_python if side == "ref" else sys.executable)
        overrides = command[command.index("replica_dist.train") + 1 :]
        run_dir = Path(overrides[0].removeprefix("hydra.run.dir="))
        form = next(o for o in overrides if o.startswith("coupling=")).split("=")[1]
        round_ = int(run_dir.name.rsplit("_", 1)[1])
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps({"wall_seconds": seconds[side][form][round_]}))
        jobs.append((side, Path(cwd), overrides[1:]))
        return 1.0

    monkeypatch.setattr(against, "prepare", prepare)
    monkeypatch.setattr(against, "run_job", run_job)
    real_version = against._torch_version
    monkeypatch.setattr(
        against, "_torch_version", lambda side: "2.x-ref" if side.name == "ref" else real_version(side)
    )
    return {"jobs": jobs, "prepared": prepared, "seconds": seconds}


def test_main_runs_ref_jobs_in_refs_tree_with_its_python_interleaved_and_reports_ratios(
    fake_jobs, tmp_path, capsys
):
    work = tmp_path / "against"
    argv = [
        "--against",
        "HEAD",
        "--steps",
        "50",
        "--rounds",
        "3",
        "--variants",
        "tanh,ddp",
        "--work",
        str(work),
    ]
    argv += ["--json", str(tmp_path / "ab.json"), "--report", str(tmp_path / "ab.md")]
    assert against.main(argv) == 0
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert fake_jobs["prepared"] == [(work.resolve(), sha)]
    jobs = fake_jobs["jobs"]
    assert [side for side, _, _ in jobs] == [s for _, _, s in against.schedule(["tanh", "ddp"], 3)]
    ref_tree = against.environment_paths(work.resolve(), sha)[0]
    assert {cwd for side, cwd, _ in jobs if side == "ref"} == {ref_tree}
    assert {cwd for side, cwd, _ in jobs if side == "now"} == {REPO}
    for side in ("ref", "now"):  # both sides ran the very same jobs
        assert [o for s, _, o in jobs if s == side] == [
            against.overrides(v, 50, []) for v in ["tanh", "ddp"] * 3
        ]
    results = json.loads((tmp_path / "ab.json").read_text())["results"]
    seconds = fake_jobs["seconds"]
    for form in ("tanh", "ddp"):
        ref, now = seconds["ref"][form], seconds["now"][form]
        assert results[form]["ratio"] == pytest.approx(statistics.median(now) / statistics.median(ref))
        assert results[form]["paired_min"] == pytest.approx(min(n / r for n, r in zip(now, ref)))
        assert results[form]["paired_max"] == pytest.approx(max(n / r for n, r in zip(now, ref)))
    report = (tmp_path / "ab.md").read_text()
    assert capsys.readouterr().out.endswith(report)  # printed, as written
    assert f"| `tanh` | 22.00 | 25.00 | **{25 / 22:.3f}** | {25 / 24:.3f}-{26 / 22:.3f} |" in report
    assert f"ref = {sha[:12]}" in report and "torch 2.x-ref (ref)" in report
    assert not (work / "runs").exists() or not any((work / "runs").iterdir())  # the runs are scratch


def test_prepare_builds_a_commits_environment_once_and_reuses_it(monkeypatch, tmp_path):
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    real_run, made = subprocess.run, []

    def run(command, *args, **kwargs):  # git archive and tar for real; venv and pip only noted
        if command[0] in ("git", "tar"):
            return real_run(command, *args, **kwargs)
        made.append((command, kwargs.get("cwd")))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(against.subprocess, "run", run)
    python = against.prepare(tmp_path, sha, log=lambda line: None)
    tree, venv, ready = against.environment_paths(tmp_path, sha)
    assert python == venv / "bin" / "python" and ready.read_text().strip() == sha
    assert (tree / "replica_dist" / "coupling.py").read_bytes() == subprocess.run(
        ["git", "show", f"{sha}:replica_dist/coupling.py"], cwd=REPO, capture_output=True
    ).stdout  # the commit's own files
    assert made == [
        ([sys.executable, "-m", "venv", str(venv)], tree),
        ([str(python), "-m", "pip", "install", "-q", "-r", "requirements.txt", "-e", "."], tree),
    ]
    (tree / "marker").write_text("kept")
    assert against.prepare(tmp_path, sha, log=lambda line: None) == python
    assert len(made) == 2 and (tree / "marker").exists()  # nothing built again
    ready.unlink()  # a half-built environment is built again from scratch
    against.prepare(tmp_path, sha, log=lambda line: None)
    assert len(made) == 4 and not (tree / "marker").exists()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--against", "no-such-ref-anywhere"], "--against"),
        (["--against", "HEAD", "--variants", "tanh,gelu"], "--variants"),
        (["--against", "HEAD", "--rounds", "0"], "--rounds"),
        (["--against", "HEAD", "--stepz", "3"], "unknown arguments"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_naming_them(argv, named, capsys):
    with pytest.raises(SystemExit) as stopped:
        against.main(argv)
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err.strip().splitlines()[-1]


def test_bench_sh_hands_against_to_the_ab_module():
    done = subprocess.run(
        ["bash", "launch/bench.sh", "--against", "HEAD", "--variants", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert done.returncode == 2
    assert "replica_dist.experiments.against" in done.stderr and "--variants" in done.stderr
