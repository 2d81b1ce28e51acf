"""Plots of one finished run, from its TensorBoard events.

    python -m replica_dist.report RUN_DIR [--out DIR]

writes into RUN_DIR/report/ (or DIR):

    loss.png            train loss per replica; test and training-set loss (and accuracy)
                        of the replicas, the center and the ensemble
    rate.png            per layer: rate = |mean(dw)| per replica and of the center (log y)
    steps.png           per layer: the optimizer's part (grad_step) and the coupling's part
                        (coupling_step) of each replica's move, as norms (log y)
    dist_to_center.png  per layer: |w - center| per replica (log y)
    overlap.png         per layer: replica-center and pairwise overlaps, if the run logged them

and prints the paths it wrote. Titles say what the run was (coupling, replicas, steps,
optimizer; from its config.yaml); each figure has one legend, outside its panels.
`load_scalars` and `load_run` read the events back as {tag: (steps, values)} for other
scripts (see note_figure.py).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from replica_dist.config import CouplingConfig
from replica_dist.forms import FORMS

Scalars = dict[str, tuple[np.ndarray, np.ndarray]]
"""{tag: (steps, values)} of one TensorBoard run, in the order the events were written."""


class ReportError(RuntimeError):
    """A run that cannot be reported on, or a missing plotting library; one line for the user."""


def load_scalars(event_dir: str | Path) -> Scalars:
    """Every scalar of one TensorBoard run directory (e.g. RUN/tb/replica_0), all events kept."""
    events = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        scalars[tag] = (
            np.array([p.step for p in points], dtype=np.int64),
            np.array([p.value for p in points], dtype=np.float64),
        )
    return scalars


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def load_run(run_dir: str | Path) -> dict[str, Scalars]:
    """The scalars of every TensorBoard run of a run directory: {"replica_0": ..., ...,
    "center": ..., "ensemble": ...}, replicas in numerical order; runs without scalars left out."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    tb = run_dir / "tb"
    subruns = (
        sorted((p for p in tb.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name))
        if tb.is_dir()
        else []
    )
    runs = {p.name: load_scalars(p) for p in subruns}
    runs = {name: scalars for name, scalars in runs.items() if scalars}
    if not any(name.startswith("replica_") for name in runs):
        raise ReportError(
            f"{run_dir} holds no TensorBoard scalars of any replica (expected {tb}/replica_<r>/)"
        )
    return runs


def _g(value: float) -> str:
    return f"{value:.3g}"


def coupling_text(coupling: dict, steps: int) -> str:
    """The coupling of a run's config.yaml in a few words, e.g. `tanh, eta 0.001 to 0.4, T 0.1`:
    the form's own words (replica_dist.forms), or a form of one's own by its class's name."""
    if coupling.get("_target_"):
        return _named(coupling)
    name = str(coupling.get("name", "?"))
    if name not in FORMS:  # a config.yaml from a newer trainer still titles
        return name
    # Only the schema's keys: a config.yaml from an older or newer trainer still titles.
    known = CouplingConfig.__dataclass_fields__
    cfg = CouplingConfig(**{k: v for k, v in coupling.items() if k in known})
    return ", ".join(FORMS[name].from_config(cfg, steps).words())


def _named(part: dict) -> str:
    """A model or data set as the config chose it: its _target_'s last name, else its preset."""
    target = part.get("_target_") or ""
    return target.rsplit(".", 1)[-1] if target else part["name"]


def run_title(run_dir: str | Path, runs: dict[str, Scalars]) -> str:
    """What the run was, from its config.yaml: coupling, replicas, steps, optimizer and lr,
    model and data; the directory's name when there is no readable config.yaml."""
    run_dir = Path(run_dir)
    count = len(replicas(runs))
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
        steps = int(cfg["train"]["steps"])
        optim, model, data = cfg["optim"], cfg["model"], cfg["data"]
        return (
            f"{coupling_text(cfg['coupling'], steps)}; {count} replicas, {steps} steps, "
            f"{optim['name']} lr {_g(optim['lr'])}; {_named(model)} on {_named(data)}"
        )
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return f"{run_dir.resolve().name} ({count} replicas)"


def replicas(runs: dict[str, Scalars]) -> dict[str, Scalars]:
    return {name: scalars for name, scalars in runs.items() if name.startswith("replica_")}


def layers(runs: dict[str, Scalars]) -> list[str]:
    """Parameter names with per-layer statistics (from the `rate/<name>` tags of the replicas)."""
    names = {
        tag.split("/", 1)[1]
        for scalars in replicas(runs).values()
        for tag in scalars
        if tag.startswith("rate/")
    }
    return sorted(names, key=_layer_key)


def _layer_key(name: str) -> tuple:
    """Modules in numerical order (fc2 before fc10), a module's weight before its bias."""
    module, _, leaf = name.rpartition(".")
    return _natural_key(module), leaf != "weight", leaf


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError('plots need matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def positive(values: np.ndarray) -> np.ndarray:
    """Values for a log axis: zeros and negatives become gaps instead of being clipped."""
    return np.where(values > 0, values, np.nan)


def _grid(plt, num_panels: int, title: str, width: float = 4.6, height: float = 3.4):
    columns = min(num_panels, 3)
    rows = -(-num_panels // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat[num_panels:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:num_panels])


def _finish(ax, ylabel: str, log: bool) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if log and any(np.isfinite(line.get_ydata()).any() for line in ax.get_lines()):
        ax.set_yscale("log")


def legend_outside(fig, columns: int = 4):
    """One legend for the whole figure, below its panels, so that no curve is hidden: every
    panel's labelled lines, each label once. None when nothing is labelled."""
    handles: dict[str, object] = {}
    for ax in fig.axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(text, handle)
    if not handles:
        return None
    return fig.legend(
        list(handles.values()),
        list(handles),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(columns, len(handles)),
        fontsize="small",
        frameon=False,
    )


def _colors(plt, count: int) -> list:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(count)]


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    legend_outside(fig)
    # "tight" grows the canvas to hold the legend hanging below the panels.
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    written.append(path)


TRAIN_ACCURACY = ("train_set/accuracy",)
"""Tags of the accuracy on training data, whichever the run logged."""


def _loss_figure(plt, runs, title, out, written):
    """Train loss per replica; then test (solid) and train-set (dotted) loss and, for
    classification, accuracy of the replicas, the center and the ensemble."""
    reps = replicas(runs)
    looks = {name: dict(color=color) for name, color in zip(reps, _colors(plt, len(reps)))}
    looks |= {"center": dict(color="black", lw=2), "ensemble": dict(color="gray", lw=2)}
    has_accuracy = any(tag in s for s in runs.values() for tag in ("test/accuracy", *TRAIN_ACCURACY))
    fig, axes = _grid(plt, 3 if has_accuracy else 2, f"loss\n{title}")

    ax = axes[0]
    for name, scalars in reps.items():
        if "train/loss" in scalars:
            ax.plot(*scalars["train/loss"], label=name, **looks[name])
    ax.set_title("train loss (own minibatch)")
    _finish(ax, "train/loss", log=True)

    panels = [(axes[1], "loss", "test/loss", ("train_set/loss",), True)]
    if has_accuracy:
        panels.append((axes[2], "accuracy", "test/accuracy", TRAIN_ACCURACY, False))
    for ax, metric, test_tag, train_tags, log in panels:
        for name, scalars in runs.items():
            if name not in looks:
                continue
            if test_tag in scalars:
                ax.plot(*scalars[test_tag], marker=".", label=f"{name} test", **looks[name])
            for tag in train_tags:
                if tag in scalars:
                    ax.plot(*scalars[tag], ls=":", label=f"{name} train set", **looks[name])
                    break
        ax.set_title(f"{metric}: test (solid), training set (dotted)")
        _finish(ax, metric, log=log)
    _save(fig, out / "loss.png", written)


def _per_layer_figure(plt, runs, names, groups, title, ylabel, path, written, log=True, center_group=None):
    """One panel per layer; per replica one line per tag group (solid, dashed, ...)."""
    reps = replicas(runs)
    colors = _colors(plt, len(reps))
    fig, axes = _grid(plt, len(names), title)
    for ax, name in zip(axes, names):
        for (replica, scalars), color in zip(reps.items(), colors):
            for group, style in zip(groups, ("-", "--", ":")):
                tag = f"{group}/{name}"
                if tag in scalars:
                    steps, values = scalars[tag]
                    label = replica if len(groups) == 1 else f"{replica} {group}"
                    if log and not (values > 0).any():
                        label += " (all 0)"
                    ax.plot(steps, positive(values) if log else values, color=color, ls=style, label=label)
        if center_group and f"{center_group}/{name}" in runs.get("center", {}):
            steps, values = runs["center"][f"{center_group}/{name}"]
            ax.plot(
                steps,
                positive(values) if log else values,
                color="black",
                lw=2,
                alpha=0.7,
                label=f"center {center_group}" if center_group not in groups else "center",
            )
        ax.set_title(name)
        _finish(ax, ylabel, log=log)
    _save(fig, path, written)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw the run's PNGs into `out` (default RUN_DIR/report); return the paths written."""
    runs = load_run(run_dir)
    plt = pyplot()
    out = Path(out) if out is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    title = run_title(run_dir, runs)
    names = layers(runs)
    written: list[Path] = []
    _loss_figure(plt, runs, title, out, written)
    if names:
        _per_layer_figure(
            plt,
            runs,
            names,
            ["rate"],
            f"rate = |mean(dw)| per step\n{title}",
            "|mean(dw)|",
            out / "rate.png",
            written,
            center_group="rate",
        )
        _per_layer_figure(
            plt,
            runs,
            names,
            ["grad_step", "coupling_step"],
            f"optimizer part (solid) and coupling part (dashed) of dw\n{title}",
            "norm of the part",
            out / "steps.png",
            written,
        )
        _per_layer_figure(
            plt,
            runs,
            names,
            ["dist_to_center"],
            f"distance to the center\n{title}",
            "|w - center|",
            out / "dist_to_center.png",
            written,
        )
    has_overlap = any(tag.startswith(("overlap/", "pairwise_overlap/")) for s in runs.values() for tag in s)
    if has_overlap:
        overlap_names = sorted(
            {
                tag.split("/", 1)[1]
                for s in runs.values()
                for tag in s
                if tag.startswith(("overlap/", "pairwise_overlap/"))
            },
            key=_layer_key,
        )
        _per_layer_figure(
            plt,
            runs,
            overlap_names,
            ["overlap"],
            f"replica-center overlap; center: mean pairwise overlap\n{title}",
            "overlap",
            out / "overlap.png",
            written,
            log=False,
            center_group="pairwise_overlap",
        )
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replica_dist.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("run_dir", help="a run directory (the one holding tb/ and summary.json)")
    parser.add_argument("--out", help="where to write the PNGs (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.run_dir, args.out)
    except ReportError as err:
        print(f"replica_dist.report: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
