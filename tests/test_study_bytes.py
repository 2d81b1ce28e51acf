"""The equal-bytes study (launch/study_bytes.sh): the budget -> period arithmetic against the
closed forms, the tables and the Pareto front on made-up summaries (no training), and the
--quick pipeline end to end, its bytes read back from the runs' summary.json."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from test_study import block, expected_cell
from trainer_runs import REPO

from replica_dist.config import load_config
from replica_dist.experiments import bytes_study as bs

DIGITS_N = 64 * 128 + 128 + 128 * 10 + 10
"""The study's MLP on digits: 8x8 pixels, 128 hidden, 10 classes, with biases."""
TEACHER_N = 20 * 128 + 128 + 128 * 4 + 4
"""On the teacher data (conf/data/teacher.yaml): 20 inputs, 4 classes."""


def smallest_fitting_period(budget: int, steps: int, per_exchange: int) -> int:
    """The plain search the closed form in period_for replaces."""
    return next(k for k in range(1, steps + 2) if (steps // k) * per_exchange <= budget)


def test_bytes_per_exchange_are_the_readmes_closed_forms():
    assert bs.bytes_per_exchange(DIGITS_N, 4, "none") == 4 * 9610 + 80 == 38520
    assert bs.bytes_per_exchange(DIGITS_N, 4, "int8") == 9610 + 4 * 10 + 80 == 9730
    assert bs.bytes_per_exchange(DIGITS_N, 4, "bf16") == 2 * 9610 + 80
    assert bs.bytes_per_exchange(1024, 2, "int8") == 1024 + 4 + 40
    assert bs.bytes_per_exchange(1025, 2, "int8") == 1025 + 8 + 40
    with pytest.raises(ValueError, match="fp8"):
        bs.bytes_per_exchange(10, 2, "fp8")


def test_the_weights_are_the_models_own_count():
    assert bs.weights("digits") == DIGITS_N == 9610
    assert bs.weights("teacher") == TEACHER_N == 3204


def test_period_for_is_the_smallest_period_that_fits():
    rng = np.random.default_rng(0)
    for _ in range(500):
        steps = int(rng.integers(1, 400))
        per_exchange = int(rng.integers(1, 1000))
        budget = int(rng.integers(per_exchange, per_exchange * (steps + 3)))
        k = bs.period_for(budget, steps, per_exchange)
        assert k == smallest_fitting_period(budget, steps, per_exchange), (budget, steps, per_exchange)
    # By hand: 1500 steps, digits, 4 replicas. fp32 every 64 is 23 exchanges, as every 63 is.
    budget = bs.budget_bytes(1500, 64, DIGITS_N, 4)
    assert budget == 23 * 38520
    assert bs.period_for(budget, 1500, 38520) == 63
    assert bs.period_for(budget, 1500, 9730) == 17  # 88 exchanges of 9730 fit 885960; 93 (every 16) do not
    assert (
        bs.period_for(bs.budget_bytes(1500, 4, DIGITS_N, 4), 1500, 9730) == 2
    )  # 1500 of 9730 > 375 of 38520
    with pytest.raises(ValueError, match="less than one exchange"):
        bs.period_for(99, 10, 100)


def test_the_full_plan_fits_every_budget_and_uses_it():
    runs = bs.plan(quick=False)
    settings = {(run.part, run.setting.label): run.setting for run in runs}
    assert {run.part for run in runs} == {"digits", "teacher"}
    assert {run.nproc for run in runs} == {4}
    assert len(bs.SEEDS) >= 3
    per_setting = {key: sorted(r.seed for r in runs if (r.part, r.setting.label) == key) for key in settings}
    assert all(seeds == list(bs.SEEDS) for seeds in per_setting.values())
    assert len(settings) == 2 * (2 + len(bs.BUDGET_PERIODS) * 4 * 2)
    steps = 1500
    for (dataset, _), v in settings.items():
        n = {"digits": DIGITS_N, "teacher": TEACHER_N}[dataset]
        if v.budget is None:
            assert v.form in ("none", "ddp") and v.expected_bytes == 0
            assert v.uncounted_bytes == (4 * n * steps if v.form == "ddp" else 0)
            continue
        per_exchange = 4 * n + 80 if v.compress == "none" else n + 4 * math.ceil(n / 1024) + 80
        budget = (steps // v.budget) * (4 * n + 80)
        assert v.budget_bytes == budget
        assert v.expected_bytes == (steps // v.period) * per_exchange <= budget
        assert v.period == 1 or (steps // (v.period - 1)) * per_exchange > budget  # no shorter one fits
        assert f"coupling.every={v.period}" in v.overrides and f"dist.compress={v.compress}" in v.overrides
    for (dataset, _), v in settings.items():  # int8 syncs at least as often as fp32 at the same budget
        if v.compress == "int8":
            fp32 = next(
                w
                for (d, _), w in settings.items()
                if d == dataset and (w.form, w.budget) == (v.form, v.budget)
            )
            assert v.period <= fp32.period


def test_every_planned_setting_is_a_config_the_trainer_accepts():
    """The trainer's own validation (load_config), without training: a key that does not apply
    (dist.compress_chunk without int8) would otherwise stop the study at its first such run."""
    runs = bs.plan(quick=False)
    one_each = {r.setting.label: r for r in runs if r.part == "digits" and r.seed == bs.SEEDS[0]}
    one_each["teacher ddp"] = next(r for r in runs if r.part == "teacher" and r.setting.form == "ddp")
    for run in one_each.values():
        cfg, _ = load_config([*run.overrides, "hydra.run.dir=/nonexistent"])
        assert cfg.dist.compress == run.setting.compress
        if run.setting.period is not None:
            assert (cfg.coupling.name, cfg.coupling.every) == (run.setting.form, run.setting.period)


def test_tanh_and_linear_scale_eta_by_the_period():
    assert "coupling.eta=0.016" in bs.elastic_overrides("tanh", 16)
    assert "coupling.eta_growth=0.004" in bs.elastic_overrides("linear", 16)
    assert "coupling.eta=1" in bs.elastic_overrides("linear", 2000)  # capped at eta_max


def test_pareto_front_keeps_what_nothing_beats():
    points = [(1.0, 50.0), (2.0, 40.0), (3.0, 60.0), (3.0, 55.0), (0.5, 50.0), (10.0, 60.0), (12.0, 70.0)]
    assert bs.pareto_front(points) == [(0.5, 50.0), (3.0, 60.0), (12.0, 70.0)]
    assert bs.pareto_front([]) == []


def fake_summary(accuracy: float, sent: int) -> dict:
    return {
        "center": {"test_accuracy": accuracy, "train_accuracy": accuracy},
        "replicas": [{"test_accuracy": accuracy - 0.01}, {"test_accuracy": accuracy - 0.03}],
        "ensemble": {"test_accuracy": accuracy},
        "wall_seconds": 1.0,
        "comm": {"compress": "none", "bytes_sent_per_rank": sent},
    }


def test_tables_figure_and_page_from_made_up_summaries(tmp_path):
    """The quick plan's runs, each given a made-up accuracy and its closed-form bytes, but one
    run 1 byte over its budget: the tables must carry their means, the paired differences per
    seed, the share of the budget and the overrun."""
    runs = bs.plan(quick=True)
    rng = np.random.default_rng(1)
    accuracy, sent = {}, {}
    over = next(r for r in runs if r.setting.form == "tanh")
    for run in runs:
        accuracy[run.name] = float(rng.uniform(0.5, 0.99))
        sent[run.name] = run.setting.budget_bytes + 1 if run is over else run.setting.expected_bytes
        (tmp_path / run.name).mkdir(parents=True)
        (tmp_path / run.name / "summary.json").write_text(
            json.dumps(fake_summary(accuracy[run.name], sent[run.name]))
        )
    docs = tmp_path / "docs"
    assert bs.main(["--runs", str(tmp_path), "--plot-only", "--quick", "--docs", str(docs)]) == 0
    page = (docs / "study_bytes.md").read_text()
    assert "## Conclusion" in page and "Not written yet" in page
    assert (docs / "study_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for dataset in bs.DATASETS:
        table = block(page, dataset)
        own = [r for r in runs if r.part == dataset]
        baseline = next(r.setting for r in own if (r.setting.form, r.setting.compress) == bs.BASELINE)
        for v in dict.fromkeys(r.setting for r in own):
            seeds = [r for r in own if r.setting is v]
            name = v.form if v.budget is None else f"{v.form} {'fp32' if v.compress == 'none' else 'int8'}"
            cells = row_by_setting(table, name)
            values = [accuracy[r.name] for r in seeds]
            assert cells[5] == "2" and cells[6] == expected_cell(values)
            assert cells[3].startswith(f"{np.mean([sent[r.name] for r in seeds]) / 1e6:.3g}")
            if v.budget is None:
                assert cells[4] == "-" and cells[7] == "-"
                continue
            assert cells[2] == str(v.period)
            share = max(sent[r.name] for r in seeds) / v.budget_bytes
            assert cells[4].startswith(f"{100 * share:.1f} %")
            assert ("OVER" in cells[4]) == (over in seeds)
            assert ("closed form" in cells[4]) == (over in seeds)
            base = [accuracy[f"{dataset}/{baseline.slug}/seed_{r.seed}"] for r in seeds]
            diffs = [a - b for a, b in zip(values, base)]
            assert cells[7] == ("-" if v is baseline else expected_cell(diffs))
    saved = json.loads((tmp_path / "study_bytes.json").read_text())
    assert {r["name"]: r["bytes"]["sent"] for r in saved["runs"]} == sent


def row_by_setting(table: str, setting: str) -> list[str]:
    """The cells of the row whose second cell (the setting) is `setting`."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 1 and cells[1] == setting:
            return cells
    raise AssertionError(f"no row {setting!r} in\n{table}")


def test_a_run_without_bytes_is_refused(tmp_path, capsys):
    runs = bs.plan(quick=True)
    for run in runs:
        summary = fake_summary(0.9, run.setting.expected_bytes)
        if run is runs[-1]:
            del summary["comm"]
        (tmp_path / run.name).mkdir(parents=True)
        (tmp_path / run.name / "summary.json").write_text(json.dumps(summary))
    assert bs.main(["--runs", str(tmp_path), "--plot-only", "--quick", "--docs", str(tmp_path)]) == 2
    assert "has no comm.bytes_sent_per_rank" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_quick_study_end_to_end_its_bytes_are_the_closed_form(tmp_path):
    runs_dir = tmp_path / "runs"
    done = subprocess.run(
        [str(REPO / "launch" / "study_bytes.sh"), "--quick", "--runs", str(runs_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    check_quick_outputs(runs_dir)


def check_quick_outputs(runs_dir) -> None:
    """What a finished --quick study in `runs_dir` must hold: each run's bytes (its summary.json)
    equal to the closed form with the hand-counted n, within its budget; the tables' accuracies
    the runs' own; the figure and one wall time per run."""
    runs = bs.plan(quick=True)
    page = (runs_dir / "study_bytes.md").read_text()
    for run in runs:
        summary = json.loads((runs_dir / run.name / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == 40
        n = {"digits": DIGITS_N, "teacher": TEACHER_N}[run.part]
        v = run.setting
        if v.budget is None:
            assert summary["comm"]["bytes_sent_per_rank"] == 0
            continue
        per_exchange = 4 * n + 40 if v.compress == "none" else n + 4 * math.ceil(n / 1024) + 40
        assert summary["comm"]["bytes_sent_per_rank"] == (40 // v.period) * per_exchange <= v.budget_bytes
    for dataset in bs.DATASETS:
        table = block(page, dataset)
        for v in dict.fromkeys(r.setting for r in runs if r.part == dataset):
            center = [
                json.loads((runs_dir / r.name / "summary.json").read_text())["center"]["test_accuracy"]
                for r in runs
                if r.setting is v
            ]
            name = v.form if v.budget is None else f"{v.form} {'fp32' if v.compress == 'none' else 'int8'}"
            assert row_by_setting(table, name)[6] == expected_cell(center)
    assert (runs_dir / "study_bytes.png").is_file()
    assert len(json.loads((runs_dir / "walls.json").read_text())) == len(runs)


def test_the_page_in_docs_has_every_block_and_a_conclusion():
    page = (REPO / "docs" / "study_bytes.md").read_text()
    for name in ("commands", "settings", *bs.DATASETS):
        block(page, name)
    assert "## Conclusion" in page and "study_bytes.png" in page
