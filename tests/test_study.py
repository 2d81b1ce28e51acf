"""The study pipeline (`launch/study.sh --quick`) end to end: its files, tables and plots agree
with what the runs themselves wrote. The numbers are not judged: --quick trains a few steps."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from trainer_runs import REPO, events

from replica_dist.experiments import study
from replica_dist.experiments.commands import torchrun_command

PNGS = ("study_main.png", "study_sweep.png", "study_deep.png")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The --quick study, trained once into a temporary directory (its page and PNGs too)."""
    runs_dir = tmp_path_factory.mktemp("study") / "runs"
    done = subprocess.run(
        [str(REPO / "launch" / "study.sh"), "--quick", "--runs", str(runs_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return runs_dir


def block(page: str, name: str) -> str:
    match = re.search(rf"<!-- study:{name} -->\n(.*?)<!-- /study:{name} -->", page, re.DOTALL)
    assert match, f"no {name} block"
    return match.group(1)


def row(table: str, first_cell: str) -> list[str]:
    """The cells of the table row that starts with `first_cell`."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{table}")


def summaries(runs_dir, part: str, slug: str) -> list[dict]:
    seeds = sorted((runs_dir / part / slug).glob("seed_*"))
    assert seeds, f"no runs of {part}/{slug}"
    return [json.loads((d / "summary.json").read_text()) for d in seeds]


def expected_cell(values: list[float], scale: float = 100.0) -> str:
    return f"{np.mean(values) * scale:.2f} ± {np.std(values, ddof=1) * scale:.2f}"


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_planned_run_finished_and_is_in_commands_sh(quick):
    runs = study.plan(quick=True)
    lines = [
        line for line in (quick / "commands.sh").read_text().splitlines() if "torch.distributed.run" in line
    ]
    assert len(lines) == len(runs)
    for run, line in zip(runs, lines):
        assert f'hydra.run.dir="$DIR/{run.name}"' in line and f"--nproc_per_node={run.nproc}" in line
        assert (quick / run.name / "summary.json").is_file()
    assert set(json.loads((quick / "walls.json").read_text())) == {run.name for run in runs}
    for name in PNGS:
        assert (quick / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_main_table_is_mean_and_std_of_the_runs_summaries(quick):
    page = (quick / "study.md").read_text()
    table = block(page, "main")
    aggregates = json.loads((quick / "study.json").read_text())["aggregates"]["main"]
    for setting in study.main_settings():
        runs = summaries(quick, "main", setting.slug)
        assert len(runs) == 2
        center = [s["center"]["test_accuracy"] for s in runs]
        replicas = [np.mean([r["test_accuracy"] for r in s["replicas"]]) for s in runs]
        ensemble = [s["ensemble"]["test_accuracy"] for s in runs]
        stats = aggregates[setting.label]
        assert stats["test_accuracy/center"]["mean"] == pytest.approx(np.mean(center), abs=1e-12)
        assert stats["test_accuracy/center"]["std"] == pytest.approx(np.std(center, ddof=1), abs=1e-12)
        cells = row(table, setting.label)
        assert cells[1:5] == ["2", expected_cell(center), expected_cell(replicas), expected_cell(ensemble)]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_paired_table_is_the_per_seed_difference_to_ddp_and_none(quick):
    table = block((quick / "study.md").read_text(), "paired")
    ddp = summaries(quick, "main", "ddp")
    none = summaries(quick, "main", "none")
    for setting in study.main_settings():
        center = [s["center"]["test_accuracy"] for s in summaries(quick, "main", setting.slug)]
        cells = row(table, setting.label)
        to_ddp = [c - d["center"]["test_accuracy"] for c, d in zip(center, ddp)]
        to_ensemble = [c - n["ensemble"]["test_accuracy"] for c, n in zip(center, none)]
        assert cells[2] == ("-" if setting.label == "ddp" else expected_cell(to_ddp))
        assert cells[3] == ("-" if setting.label == "none" else expected_cell(to_ensemble))


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_energy_table_is_the_runs_flatness_json(quick):
    table = block((quick / "study.md").read_text(), "energy")
    for setting in study.main_settings():
        flats = [
            json.loads((d / "flatness.json").read_text())
            for d in sorted((quick / "main" / setting.slug).iterdir())
        ]
        assert all(f["sigmas"] == list(study.SIGMAS) for f in flats)
        center = [[f["center"][k]["local_energy"] for f in flats] for k in range(len(study.SIGMAS))]
        replicas = [
            [np.mean([r[k]["local_energy"] for r in f["replicas"]]) for f in flats]
            for k in range(len(study.SIGMAS))
        ]
        rows = [line for line in table.splitlines() if line.startswith(f"| {setting.label} |")]
        assert [c.strip() for c in rows[0].strip("|").split("|")][2:] == [expected_cell(v) for v in center]
        assert [c.strip() for c in rows[1].strip("|").split("|")][2:] == [expected_cell(v) for v in replicas]


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deep_medians_are_the_first_and_last_layers_early_events(quick):
    deep = [run for run in study.plan(quick=True) if run.part == "deep"]
    records = {r["name"]: r["metrics"] for r in json.loads((quick / "study.json").read_text())["runs"]}
    for run in deep:
        tb = quick / run.name / "tb"
        summary = json.loads((quick / run.name / "summary.json").read_text())
        early = summary["steps"] // 6
        for position, layer in (("first", "fc1.weight"), ("last", "fc8.weight")):
            values = [
                e.value
                for r in range(summary["world_size"])
                for e in events(tb / f"replica_{r}").Scalars(f"update_ratio/{layer}")
                if e.step <= early
            ]
            assert len(values) >= summary["world_size"]
            assert records[run.name][f"update_ratio/{position}_early"] == pytest.approx(
                np.median(values), rel=1e-6
            )


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_plot_only_regenerates_the_same_tables_and_keeps_the_prose(quick, tmp_path):
    before = (quick / "study_tables.md").read_text()
    page = tmp_path / "study.md"
    page.write_text(
        "# Mine\n\nProse before.\n\n<!-- study:main -->\nstale\n<!-- /study:main -->\n\nProse after.\n"
    )
    assert study.main(["--runs", str(quick), "--quick", "--plot-only", "--docs", str(tmp_path)]) == 0
    assert (quick / "study_tables.md").read_text() == before
    text = page.read_text()
    assert text.startswith("# Mine\n\nProse before.\n") and "\nProse after.\n" in text and "stale" not in text
    assert block(text, "main") == study.main_table(
        json.loads((quick / "study.json").read_text())["aggregates"]
    )
    assert "<!-- study:deep -->" in text  # a block the page lacked is appended
    for name in PNGS:
        assert (tmp_path / name).is_file()


def test_main_forms_share_steps_optimizer_model_and_seeds():
    main = [run for run in study.plan(quick=False) if run.part == "main"]
    by_setting: dict[str, list] = {}
    for run in main:
        by_setting.setdefault(run.setting.label, []).append(run)
    assert list(by_setting) == ["none", "ddp", "tanh", "linear", "average"]
    assert all(sorted(r.seed for r in runs) == list(study.MAIN_SEEDS) for runs in by_setting.values())
    assert len(study.MAIN_SEEDS) >= 5
    common = {tuple(o for o in run.overrides if not o.startswith(("coupling", "seed="))) for run in main}
    assert len(common) == 1  # everything but the coupling and the seed is the same
    assert any(o.startswith("train.steps=") for o in common.pop())
    linear = next(r for r in main if r.setting.label == "linear")
    assert "coupling.eta_growth=0" not in linear.overrides  # replicated SGD: scoped


def test_no_run_is_a_hydra_multirun():
    assert not any("--multirun" in run.overrides or "-m" in run.overrides for run in study.plan(quick=False))


def test_a_single_seed_has_no_std_and_plot_only_needs_runs(capsys, monkeypatch):
    monkeypatch.delenv("STUDY_RUNS_DIR", raising=False)
    assert study.cell(study.mean_std([0.5])) == "0.50"
    assert study.cell(study.mean_std([0.5, 0.7]), 100) == "60.00 ± 14.14"
    assert study.main(["--plot-only"]) == 2
    assert "--plot-only needs --runs" in capsys.readouterr().err


def test_a_run_is_one_standalone_torchrun_job_of_the_trainer():
    run = study.plan(quick=True)[0]
    assert study.run_command("DIR/x", run) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "replica_dist.train", "hydra.run.dir=DIR/x", *run.overrides,
    ]  # fmt: skip
    assert torchrun_command(3, ["a=1"], module="pkg.mod", extra=["--max-restarts=1"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
        "--max-restarts=1", "-m", "pkg.mod", "a=1",
    ]  # fmt: skip
    line = study.command_line(run)
    assert line.startswith(
        "python -m torch.distributed.run --standalone --nproc_per_node=2 -m replica_dist.train "
    )
    assert f'hydra.run.dir="$DIR/{run.name}"' in line and "'model.hidden=[128]'" in line


def test_the_core_never_imports_the_experiments():
    imported = {}
    for path in sorted((REPO / "replica_dist").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported[path.name] = imported.get(path.name, []) + [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
                imported[path.name] = imported.get(path.name, []) + names
    assert "train.py" in imported and any(n.startswith("replica_dist.") for n in imported["train.py"])
    offending = {f: [n for n in names if "experiments" in n] for f, names in imported.items()}
    assert not any(offending.values()), offending
