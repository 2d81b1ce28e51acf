"""The report CLI on a real torchrun run; note_figure's table on scalars made up by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from trainer_runs import REPO, events, torchrun

from replica_dist import report
from replica_dist.config import Config, CouplingConfig, DataConfig, ModelConfig, OptimConfig, TrainConfig
from replica_dist.experiments import note_figure
from replica_dist.experiments.note_figure import markdown_table, pooled_median, rate_rows, tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASE_PNGS = {"loss.png", "rate.png", "steps.png", "dist_to_center.png"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    done = torchrun(
        2, f"hydra.run.dir={run}", "train.steps=12", "log.every=3", "model.hidden=[8]", timeout_s=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE) and data[:8] == PNG_SIGNATURE, path


@pytest.mark.e2e
@pytest.mark.slow
def test_report_cli_writes_valid_pngs(run_dir):
    done = subprocess.run(
        [sys.executable, "-m", "replica_dist.report", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written = [Path(line) for line in done.stdout.split()]
    logged_overlaps = any(
        tag.startswith(("overlap/", "pairwise_overlap/"))
        for scalars in report.load_run(run_dir).values()
        for tag in scalars
    )
    assert {p.name for p in written} == BASE_PNGS | ({"overlap.png"} if logged_overlaps else set())
    for path in written:
        assert path.parent == run_dir / "report"
        assert_png(path)


@pytest.mark.e2e
@pytest.mark.slow
def test_title_reads_the_runs_config(run_dir):
    # The default tanh schedule, relative to the run: from 0.001 to 0.4 at its last step.
    assert report.run_title(run_dir, report.load_run(run_dir)) == (
        "tanh, eta 0.001 to 0.4; 2 replicas, 12 steps, sgd lr 0.05; mlp on digits"
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_loader_returns_what_event_accumulator_reads(run_dir):
    direct = events(run_dir / "tb" / "replica_1").Scalars("rate/fc1.weight")
    steps, values = report.load_scalars(run_dir / "tb" / "replica_1")["rate/fc1.weight"]
    assert steps.tolist() == [e.step for e in direct] == [1, 3, 6, 9, 12]
    assert values.tolist() == [e.value for e in direct]
    runs = report.load_run(run_dir)
    assert list(runs) == ["center", "ensemble", "replica_0", "replica_1"]
    assert report.layers(runs) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.mark.parametrize("make", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_a_missing_or_empty_run_dir_is_one_error_line_and_exit_2(tmp_path, capsys, make):
    assert report.main([str(make(tmp_path))]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("replica_dist.report: error:")


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(report.ReportError, match=r'pip install -e "\.\[plot\]"'):
        report.pyplot()


def write_fake_run(run_dir: Path, overlaps: bool) -> None:
    """Two replicas and a center over 3 steps with the per-layer tags of one parameter `w`."""
    for r in range(2):
        with SummaryWriter(str(run_dir / "tb" / f"replica_{r}")) as writer:
            for step in (1, 2, 3):
                for group in ("rate", "grad_step", "coupling_step", "dist_to_center"):
                    writer.add_scalar(f"{group}/w", 0.1 * step + r, step)
                writer.add_scalar("train/loss", 10.0 / step, step)
                if overlaps:
                    writer.add_scalar("overlap/w", 0.5 + 0.1 * step, step)
    with SummaryWriter(str(run_dir / "tb" / "center")) as writer:
        for step in (1, 2, 3):
            writer.add_scalar("rate/w", 0.05 * step, step)
            if overlaps:
                writer.add_scalar("pairwise_overlap/w", 0.4 + 0.1 * step, step)


@pytest.mark.parametrize("overlaps", [False, True])
def test_overlaps_are_plotted_only_when_logged(tmp_path, overlaps):
    write_fake_run(tmp_path / "run", overlaps)
    written = report.write_report(tmp_path / "run", tmp_path / "out")
    assert {p.name for p in written} == BASE_PNGS | ({"overlap.png"} if overlaps else set())
    for path in written:
        assert_png(path)


def write_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (
            # 0.001 * 1.004^1499 = 0.40 is capped at 0.05
            Config(coupling=CouplingConfig(name="tanh", temperature=0.1, eta_max=0.05)),
            "tanh, eta 0.001 to 0.05, T 0.1; 2 replicas, 1500 steps, sgd lr 0.05; mlp on digits",
        ),
        (
            Config(
                coupling=CouplingConfig(name="linear", eta=0.1, eta_growth=0.0, via_optimizer=True),
                optim=OptimConfig(name="adam", lr=0.001),
                train=TrainConfig(steps=300),
            ),
            "linear, eta 0.1, via optimizer; 2 replicas, 300 steps, adam lr 0.001; mlp on digits",
        ),
        (
            Config(coupling=CouplingConfig(name="linear", eta_final=0.4), train=TrainConfig(steps=200)),
            "linear, eta 0.001 to 0.4; 2 replicas, 200 steps, sgd lr 0.05; mlp on digits",
        ),
        (
            Config(coupling=CouplingConfig(name="average", every=8)),
            "average, every 8; 2 replicas, 1500 steps, sgd lr 0.05; mlp on digits",
        ),
        (
            Config(coupling=CouplingConfig(name="none")),
            "none; 2 replicas, 1500 steps, sgd lr 0.05; mlp on digits",
        ),
        (
            Config(
                model=ModelConfig(_target_="torchvision.models.resnet18"),
                data=DataConfig(_target_="my_pkg.data.Photos"),
            ),
            "tanh, eta 0.001 to 0.4; 2 replicas, 1500 steps, sgd lr 0.05; resnet18 on Photos",
        ),
    ],
)
def test_title_says_what_the_run_was(tmp_path, cfg, expected):
    write_fake_run(tmp_path / "run", overlaps=False)
    write_config(tmp_path / "run", cfg)
    assert report.run_title(tmp_path / "run", report.load_run(tmp_path / "run")) == expected


def test_title_without_a_config_is_the_directory(tmp_path):
    write_fake_run(tmp_path / "run_b", overlaps=False)
    assert report.run_title(tmp_path / "run_b", report.load_run(tmp_path / "run_b")) == "run_b (2 replicas)"


def test_every_figure_has_one_legend_outside_its_panels(tmp_path, monkeypatch):
    """The figures as write_report draws them, kept open: no legend over any curve."""
    plt = report.pyplot()
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda fig=None: None)
    write_fake_run(tmp_path / "run", overlaps=True)
    written = report.write_report(tmp_path / "run", tmp_path / "out")
    figures = [plt.figure(n) for n in plt.get_fignums()]
    assert len(figures) == len(written) == 5
    for fig in figures:
        fig.canvas.draw()
        assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert len(texts) == len(set(texts)) and "replica_0" in " ".join(texts)
        box = fig.legends[0].get_window_extent()
        for ax in fig.axes:
            if ax.get_visible():
                assert not box.overlaps(ax.get_window_extent()), (fig.texts, box, ax.get_window_extent())
    monkeypatch.undo()
    plt.close("all")


def fake_run(rates: dict[str, list[list[float]]]) -> dict:
    """A run as load_run returns it, from {layer: [values of replica 0, values of replica 1]}."""
    run = {}
    for layer, per_replica in rates.items():
        for r, values in enumerate(per_replica):
            steps = np.arange(1, len(values) + 1)
            scalars = run.setdefault(f"replica_{r}", {})
            for group in ("rate", "grad_step", "coupling_step", "dist_to_center"):
                scalars[f"{group}/{layer}"] = (steps, np.array(values, dtype=float))
            scalars["train/loss"] = (steps, np.full(len(values), 5.0))
            scalars["test/loss"] = (steps, np.full(len(values), 6.0))
    return run


def test_rate_table_medians_and_ratios_by_hand():
    uncoupled = fake_run({"fc1.weight": [[1, 2, 3], [4, 5, 100]], "fc2.weight": [[10, 20, 0], [30, 40, 25]]})
    coupled = fake_run({"fc1.weight": [[7, 7, 7], [7, 8, 9]], "fc2.weight": [[50, 50, 50], [50, 50, 50]]})
    # pooled over both replicas and all steps: median(1, 2, 3, 4, 5, 100) = 3.5, median(0, ..., 40) = 22.5
    assert pooled_median(uncoupled, "rate/fc1.weight") == 3.5
    rows = rate_rows(uncoupled, {"eta=1": coupled}, ["fc1.weight", "fc2.weight"])
    assert rows == [
        {"run": "eta=1", "layer": "layer 1 (fc1.weight)", "uncoupled": 3.5, "coupled": 7.0, "ratio": 2.0},
        {
            "run": "eta=1",
            "layer": "layer 2 (fc2.weight)",
            "uncoupled": 22.5,
            "coupled": 50.0,
            "ratio": 50 / 22.5,
        },
    ]
    table = markdown_table(rows)
    assert "| eta=1 | layer 1 (fc1.weight) | 3.5 | 7 | 2 |" in table
    assert "| eta=1 | layer 2 (fc2.weight) | 22.5 | 50 | 2.22 |" in table


def test_a_layer_that_never_moved_uncoupled_has_an_infinite_ratio():
    rows = rate_rows(fake_run({"w": [[0, 0], [0, 0]]}), {"c": fake_run({"w": [[1, 1], [1, 1]]})}, ["w"])
    assert rows[0]["ratio"] == float("inf")


def test_the_whole_table_text():
    runs = {
        "uncoupled": fake_run({"fc1.weight": [[1, 2, 3], [4, 5, 6]]}),
        "coupled": fake_run({"fc1.weight": [[2, 4, 6], [8, 10, 12]]}),
    }
    text = tables(runs, seed=7)
    assert text.startswith("Seed 7; 2 replicas; medians over both replicas and all 3 steps.")
    assert "| tanh, eta=1 | layer 1 (fc1.weight) | 3.5 | 7 | 2 |" in text
    assert "| uncoupled | 5 | 5 | 6 | - | - |" in text  # cost table: no center or ensemble here


def write_note_runs(runs_dir: Path) -> None:
    """The four runs note_figure trains, as TensorBoard events: two layers, two replicas, 3 steps."""
    for name in note_figure.run_overrides(seed=0):
        coupled = name != "uncoupled"
        for r in range(2):
            with SummaryWriter(str(runs_dir / name / "tb" / f"replica_{r}")) as writer:
                for step in (1, 2, 3):
                    writer.add_scalar("train/loss", 100.0 / step + r, step)
                    writer.add_scalar("test/loss", 200.0 / step, step)
                    for layer in ("fc1.weight", "fc2.weight"):
                        writer.add_scalar(f"rate/{layer}", 0.01 * step + r, step)
                        writer.add_scalar(f"grad_step/{layer}", 0.1 * step, step)
                        writer.add_scalar(f"coupling_step/{layer}", 0.05 * step if coupled else 0.0, step)
                        writer.add_scalar(f"dist_to_center/{layer}", 1.0 / step, step)
        with SummaryWriter(str(runs_dir / name / "tb" / "center")) as writer:
            for step in (1, 2, 3):
                writer.add_scalar("rate/fc1.weight", 0.02 * step, step)
                writer.add_scalar("rate/fc2.weight", 0.03 * step, step)


NOTE_FILES = ("note_figure.png", "note_sweep.png", "note_table.md")


def test_note_figure_writes_beside_the_runs_and_leaves_docs_alone(tmp_path, monkeypatch):
    docs = {path: path.read_bytes() for path in (REPO / "docs").iterdir() if path.name in NOTE_FILES}
    assert len(docs) == 3
    plt = report.pyplot()
    plt.close("all")
    monkeypatch.setattr(plt, "close", lambda fig=None: None)  # keep the figures to look at them
    write_note_runs(tmp_path / "runs")
    assert note_figure.main(["--runs", str(tmp_path / "runs"), "--plot-only"]) == 0
    for name in NOTE_FILES:
        assert (tmp_path / "runs" / name).stat().st_size > 0
    assert_png(tmp_path / "runs" / "note_figure.png")
    assert {path: path.read_bytes() for path in docs} == docs
    figures = [plt.figure(n) for n in plt.get_fignums()]
    assert len(figures) == 2
    for fig in figures:  # one legend, below the panels, over no curve
        fig.canvas.draw()
        assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
        box = fig.legends[0].get_window_extent()
        assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    monkeypatch.undo()
    plt.close("all")

    assert (
        note_figure.main(["--runs", str(tmp_path / "runs"), "--plot-only", "--out", str(tmp_path / "out")])
        == 0
    )
    for name in NOTE_FILES:
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert (tmp_path / "out" / "note_table.md").read_text() == (
        tmp_path / "runs" / "note_table.md"
    ).read_text()
