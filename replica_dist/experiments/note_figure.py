"""The user's note, reproduced: its experiment under torchrun, its figure, and a table.

    launch/note_figure.sh [--runs DIR] [--seed N] [--out DIR] [--plot-only]

Trains, each with 2 replicas (one process each) and the same fixed seed, the note's
1000-100-10 ReLU net without biases (N(0,1) init, a fixed batch of 64 per replica from a
library of 640 random inputs, summed squared error, plain SGD at lr 1e-6, 50 steps, every
step logged):

    uncoupled   coupling=none
    coupled     coupling=tanh coupling.eta=1     (the note's rule)
    eta_0.1     coupling=tanh coupling.eta=0.1   (the eta sweep; eta=1 is `coupled`)
    eta_0.01    coupling=tanh coupling.eta=0.01

into DIR/<name> (DIR: --runs, else $NOTE_RUNS_DIR, else runs/note_figure/<timestamp>), then
reads their TensorBoard events back and writes into OUT (--out, else DIR itself)

    note_figure.png  per run (uncoupled left, coupled right): the cost, the rate |mean(dw)|
                     of layer 1 and layer 2, and the optimizer's and the coupling's parts of
                     each layer's move
    note_sweep.png   the same quantities across the eta sweep
    note_table.md    median rate per layer, coupled vs uncoupled, and their ratio

The tracked copies in docs/ change only when asked: `--out docs`. The table is also written
to DIR/note_table.md and printed; DIR/commands.sh holds the exact torchrun commands. With the
same seed a rerun gives the same table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from replica_dist.experiments.commands import (
    add_runs_argument,
    run_job,
    runs_directory,
    shell_line,
    torchrun_command,
)
from replica_dist.report import (
    ReportError,
    Scalars,
    layers,
    legend_outside,
    load_run,
    positive,
    pyplot,
    replicas,
)

RUNS_ENV = "NOTE_RUNS_DIR"
NPROC = 2
SWEEP_ETAS = (0.01, 0.1, 1.0)
NOTE = [
    "+experiment=note",
    "model.hidden=[100]",
    "model.bias=false",
    "model.init_std=1.0",
    "data.input_dim=1000",
    "data.num_outputs=10",
    "data.library_size=640",
    "data.fixed_batch=64",
    "optim.lr=1e-6",
    "optim.momentum=0.0",
    "train.steps=50",
    "log.every=1",
]
"""The note's setting, spelled out even where conf/experiment/note.yaml already says it."""

Run = dict[str, Scalars]
"""One run's scalars, as load_run returns them: {"replica_0": {tag: (steps, values)}, ...}."""


def run_name(eta: float) -> str:
    return "coupled" if eta == 1.0 else f"eta_{eta:g}"


def run_overrides(seed: int, etas=SWEEP_ETAS) -> dict[str, list[str]]:
    """The Hydra overrides of every run, by run name: uncoupled, coupled (eta 1), the sweep."""
    runs = {"uncoupled": [*NOTE, "coupling=none", f"seed={seed}"]}
    for eta in sorted(etas, key=lambda e: e != 1.0):  # coupled (eta 1) first
        runs[run_name(eta)] = [
            *NOTE,
            "coupling=tanh",
            f"coupling.eta={eta:g}",
            "coupling.temperature=1.0",
            f"seed={seed}",
        ]
    return runs


def train_all(runs_dir: Path, overrides: dict[str, list[str]]) -> None:
    """Train every run in turn, each one torchrun job; stop at the first that fails."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    commands = {
        name: torchrun_command(NPROC, [f"hydra.run.dir={runs_dir / name}", *args])
        for name, args in overrides.items()
    }
    script = "".join(f"# {name}\n{shell_line(command)}\n" for name, command in commands.items())
    (runs_dir / "commands.sh").write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + script)
    for name, command in commands.items():
        wall = run_job(command, f"the {name} run")
        print(f"trained {name:9s} in {wall:4.1f} s: {runs_dir / name}", flush=True)


# ---- the table


def pooled_median(run: Run, tag: str) -> float:
    """Median of a tag over every logged step of every replica."""
    values = [scalars[tag][1] for scalars in replicas(run).values() if tag in scalars]
    return float(np.median(np.concatenate(values))) if values else float("nan")


def rate_rows(uncoupled: Run, coupled: dict[str, Run], names: list[str], group: str = "rate") -> list[dict]:
    """Per coupled run and layer: the pooled median of `group/<layer>` without and with the
    coupling, and their ratio (coupled / uncoupled)."""
    rows = []
    for label, run in coupled.items():
        for index, name in enumerate(names):
            before, after = pooled_median(uncoupled, f"{group}/{name}"), pooled_median(run, f"{group}/{name}")
            rows.append(
                {
                    "run": label,
                    "layer": f"layer {index + 1} ({name})",
                    "uncoupled": before,
                    "coupled": after,
                    "ratio": after / before if before > 0 else float("inf"),
                }
            )
    return rows


def _number(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value:.3g}" if 1e-2 <= abs(value) < 1e4 else f"{value:.2e}"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| run | layer | median rate, uncoupled | median rate, coupled | ratio coupled / uncoupled |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['layer']} | {_number(row['uncoupled'])} | {_number(row['coupled'])} "
            f"| {_number(row['ratio'])} |"
        )
    return "\n".join(lines) + "\n"


def _last(run: Run, tag: str) -> float:
    """Mean over the replicas of a tag's value at its last logged step."""
    return float(np.mean([s[tag][1][-1] for s in replicas(run).values() if tag in s]))


def detail_table(runs: dict[str, Run], names: list[str]) -> str:
    """Per run and layer: the median rate of each replica and of the center (the mean of the
    replicas' moves), the medians of the optimizer's and the coupling's parts of each move
    (norms), and the distance to the center after the last step."""
    replica_names = list(replicas(next(iter(runs.values()))))
    lines = [
        "| run | layer | "
        + " | ".join(f"median rate, {r}" for r in replica_names)
        + " | median rate, center | median grad_step | median coupling_step | dist_to_center, last step |",
        "|---|---|" + "---:|" * (len(replica_names) + 4),
    ]
    for label, run in runs.items():
        for index, name in enumerate(names):
            rates = [_number(float(np.median(run[r][f"rate/{name}"][1]))) for r in replica_names]
            center = run.get("center", {}).get(f"rate/{name}")
            lines.append(
                f"| {label} | layer {index + 1} | "
                + " | ".join(rates)
                + f" | {_number(float(np.median(center[1]))) if center is not None else '-'}"
                f" | {_number(pooled_median(run, f'grad_step/{name}'))}"
                f" | {_number(pooled_median(run, f'coupling_step/{name}'))}"
                f" | {_number(_last(run, f'dist_to_center/{name}'))} |"
            )
    return "\n".join(lines) + "\n"


def cost_table(runs: dict[str, Run]) -> str:
    """Per run: the replicas' mean train loss (summed squared error on their own batch of 64)
    at the first and the last step, and the test loss on the whole library at the last step."""
    lines = [
        "| run | train loss, step 1 | train loss, last step | test loss (library), replicas | "
        "test loss, center | test loss, ensemble |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, run in runs.items():
        losses = np.array([s["train/loss"][1] for s in replicas(run).values()]).mean(axis=0)
        test = {
            name: _number(run[name]["test/loss"][1][-1]) if "test/loss" in run.get(name, {}) else "-"
            for name in ("center", "ensemble")
        }
        lines.append(
            f"| {label} | {_number(losses[0])} | {_number(losses[-1])} | {_number(_last(run, 'test/loss'))} "
            f"| {test['center']} | {test['ensemble']} |"
        )
    return "\n".join(lines) + "\n"


def label(name: str) -> str:
    return {"uncoupled": "uncoupled", "coupled": "tanh, eta=1"}.get(name, name.replace("eta_", "tanh, eta="))


def tables(runs: dict[str, Run], seed: int) -> str:
    names = layers(runs["uncoupled"])
    labelled = {label(name): run for name, run in runs.items()}
    coupled = {name: run for name, run in labelled.items() if name != "uncoupled"}
    return (
        f"Seed {seed}; {NPROC} replicas; medians over both replicas and all "
        f"{len(runs['uncoupled']['replica_0']['train/loss'][0])} steps. rate = |mean(dw)| of the layer's "
        "weights over one step, coupling's motion included.\n\n"
        + markdown_table(rate_rows(runs["uncoupled"], coupled, names))
        + "\nPer replica and for the center (mean weights); the optimizer's and the coupling's parts of "
        "each step as norms over the layer:\n\n"
        + detail_table(labelled, names)
        + "\nThe cost (summed squared error; test = the whole library of 640, training batches included):\n\n"
        + cost_table(labelled)
    )


# ---- the figures

COLORS = {"cost": "tab:orange", 1: "tab:red", 2: "tab:blue"}


def _layer_lines(
    ax, run: Run, names: list[str], group: str, style: str, both_replicas: bool, center: bool = False
) -> None:
    """Layer 1 red, layer 2 blue: replica_0 solid (or `style`), replica_1 dotted, the center
    thick and pale; series that are zero throughout (no coupling) are left out."""
    for index, name in enumerate(names[:2]):
        tag = f"{group}/{name}"
        sources = [(r, s) for r, s in replicas(run).items() if both_replicas or r == "replica_0"]
        if center and "center" in run:
            sources.append(("center", run["center"]))
        for source, scalars in sources:
            if tag not in scalars or not (scalars[tag][1] > 0).any():
                continue
            look = {"replica_0": dict(ls=style, lw=1.6), "center": dict(ls="-", lw=3.5, alpha=0.3)}
            ax.plot(
                scalars[tag][0],
                positive(scalars[tag][1]),
                color=COLORS[index + 1],
                label=f"layer {index + 1} {group}, {source}",
                **look.get(source, dict(ls=":", lw=1.0)),
            )


def note_figure(runs: dict[str, Run], path: Path) -> None:
    """Uncoupled left, coupled right: cost; rate of layers 1 and 2; grad and coupling parts."""
    plt = pyplot()
    names = layers(runs["uncoupled"])
    fig, axes = plt.subplots(3, 2, figsize=(12, 11), sharex=True, sharey="row")
    for column, name in enumerate(("uncoupled", "coupled")):
        run = runs[name]
        ax = axes[0, column]
        for replica, scalars in replicas(run).items():
            first = replica == "replica_0"
            ax.plot(
                *scalars["train/loss"],
                color=COLORS["cost"],
                ls="-" if first else ":",
                lw=1.6 if first else 1.0,
                label=f"cost, {replica}",
            )
        ax.set_title(
            f"{'uncoupled (coupling=none)' if name == 'uncoupled' else 'coupled (tanh, eta=1)'}\ncost"
        )
        ax.set_ylabel("summed squared error on its batch")

        ax = axes[1, column]
        _layer_lines(ax, run, names, "rate", "-", both_replicas=True, center=True)
        ax.set_title('rate |mean(dw)| (the note\'s "learning rate" of a layer)')
        ax.set_ylabel("|mean(dw)|")

        ax = axes[2, column]
        _layer_lines(ax, run, names, "grad_step", "-", both_replicas=False)
        _layer_lines(ax, run, names, "coupling_step", "--", both_replicas=False)
        ax.set_title("the two parts of dw: lr*grad (solid), coupling (dashed)")
        ax.set_ylabel("norm over the layer")
        if name == "uncoupled":
            ax.text(0.97, 0.6, "no coupling: coupling_step = 0", transform=ax.transAxes, ha="right")
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    fig.suptitle("The note's experiment: 2 replicas of a 1000-100-10 ReLU net, lr 1e-6, 50 steps, same seed")
    fig.tight_layout()
    # One legend below the panels: in a panel it hid the curves it named.
    legend_outside(fig, columns=3)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def sweep_figure(runs: dict[str, Run], path: Path) -> None:
    """The eta sweep beside the uncoupled run: cost, distance to the center, rate per layer."""
    plt = pyplot()
    names = layers(runs["uncoupled"])
    panels = [
        ("train/loss", "cost (mean of the replicas)"),
        (f"dist_to_center/{names[0]}", "layer 1: |w - center|"),
    ]
    panels += [(f"rate/{name}", f"layer {i + 1}: rate |mean(dw)|") for i, name in enumerate(names[:2])]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    coupled = sorted(
        (name for name in runs if name != "uncoupled"),
        key=lambda name: 1.0 if name == "coupled" else float(name.removeprefix("eta_")),
    )
    runs = {"uncoupled": runs["uncoupled"]} | {name: runs[name] for name in coupled}
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(coupled)))
    styles = {"uncoupled": dict(color="black", lw=2)} | {
        name: dict(color=color, lw=1.5) for name, color in zip(coupled, colors)
    }
    for ax, (tag, title) in zip(axes.flat, panels):
        for name, run in runs.items():
            values = [s[tag] for s in replicas(run).values() if tag in s]
            if not values:
                continue
            ax.plot(
                values[0][0],
                positive(np.mean([v for _, v in values], axis=0)),
                label=label(name),
                **styles[name],
            )
        ax.set_title(title + " (mean of the replicas)" if not tag.startswith("train/") else title)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle("The note's experiment across the coupling strength eta (tanh coupling)")
    fig.tight_layout()
    legend_outside(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/note_figure.sh", description=__doc__.split("\n\n")[0])
    add_runs_argument(parser, "note_figure", RUNS_ENV)
    parser.add_argument("--seed", type=int, default=0, help="the seed of every run (default 0)")
    parser.add_argument(
        "--out",
        "--docs",
        dest="out",
        type=Path,
        help="where the PNGs and the table go (default: the runs directory; `--out docs` updates docs/)",
    )
    parser.add_argument(
        "--plot-only", action="store_true", help="do not train; plot the runs already in --runs"
    )
    args = parser.parse_args(argv)
    overrides = run_overrides(args.seed)
    try:
        runs_dir = runs_directory(args, "note_figure", RUNS_ENV)
        if not args.plot_only:
            train_all(runs_dir, overrides)
        runs = {name: load_run(runs_dir / name) for name in overrides}
    except ReportError as err:
        print(f"note_figure: error: {err}", file=sys.stderr)
        return 2
    table = tables(runs, args.seed)
    out = args.out if args.out is not None else runs_dir
    out.mkdir(parents=True, exist_ok=True)
    for path in {out / "note_table.md", runs_dir / "note_table.md"}:
        path.write_text(table)
    note_figure(runs, out / "note_figure.png")
    sweep_figure(runs, out / "note_sweep.png")
    print()
    print(table)
    for path in ("note_figure.png", "note_sweep.png", "note_table.md"):
        print(out / path)
    print(f"runs: {runs_dir} (commands in {runs_dir / 'commands.sh'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
