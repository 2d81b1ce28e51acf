"""Does coupling help? The study of issue 6: its runs, tables, plots and results page.

    launch/study.sh [--runs DIR] [--docs DIR] [--quick] [--plot-only]

Every run is one torchrun job of 4 replicas (one process each, gloo, CPU) on digits, the
jobs one after the other, all with the same model, optimizer, batch size and number of steps
unless the part says otherwise. Three parts, in this order:

    sweep  tanh and linear across eta, schedule (scoping) and coupling period, on seeds 100
           and 101: other data splits and test sets than the main table's, so that choosing
           the defaults here does not tune them on the test sets they are then judged on
    main   none, ddp, tanh, linear (scoped), average; seeds 0-4; the local energy at
           sigma 0.05, 0.1, 0.2 of the center and of every replica at the end
    deep   an 8-layer tanh MLP: none, ddp, and tanh coupling with the old and the new
           default schedule; seeds 0-2; per-layer statistics every 25 steps

into DIR/<part>/<setting>/seed_<s> (DIR: --runs, else $STUDY_RUNS_DIR, else
runs/study/<timestamp>). A run directory that already holds summary.json is kept, so an
interrupted study continues where it stopped. Then it writes

    DIR/commands.sh        the exact torchrun commands
    DIR/walls.json         each torchrun job's wall time, process start to exit
    DIR/study.json         every run's numbers and their mean and standard deviation over seeds
    DIR/study_tables.md    the tables
    DOCS/study_main.png    test accuracy of center, replicas and ensemble; local energy; wall time
    DOCS/study_sweep.png   test accuracy and wall time across the sweep
    DOCS/study_deep.png    update ratio, grad and coupling steps of the first and last layers,
                           the first layer's norm, and the center's test accuracy over training
    DOCS/study.md          its tables and commands refreshed between the `<!-- study:NAME -->`
                           markers, the prose around them kept (a missing page is created)

(DOCS: --docs, else docs/). `--quick` checks the pipeline end to end in about two minutes: 40
steps, 2 replicas, 2 seeds of every main form, one seed of two sweep and two deep settings.
Its numbers mean nothing, and its DOCS default to DIR, never docs/.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from replica_dist.experiments.commands import (
    REPO,
    add_runs_argument,
    run_job,
    runs_directory,
    shell_line,
    torchrun_command,
)
from replica_dist.report import ReportError, layers, load_run, positive, pyplot, replicas

RUNS_ENV = "STUDY_RUNS_DIR"
NPROC = 4
"""Replicas (processes) of every run; --quick uses 2, which start in about half the time."""
SIGMAS = (0.05, 0.1, 0.2)
MAIN_SEEDS = (0, 1, 2, 3, 4)
SWEEP_SEEDS = (100, 101)
DEEP_SEEDS = (0, 1, 2)
STEPS = 1500
DEEP_HIDDEN = [64] * 7
"""Seven hidden layers of 64: eight linear layers, fc1 (input) to fc8 (output)."""

BASE = (
    "data=digits",
    "data.split=shard",
    "model=mlp",
    "model.hidden=[128]",
    "model.activation=relu",
    "optim=sgd",
    "optim.lr=0.05",
    "optim.momentum=0.9",
    "optim.weight_decay=0.0",
    "train.batch_size=32",
    "init=independent",
    "checkpoint.every=0",
    "dist.timeout_s=120",
)
"""Every run's setting, spelled out even where it is the default, so that the page stays true
when a default changes. No checkpoints: an unfinished run is started again from scratch."""

TANH = {"eta": 0.001, "eta_growth": 0.004, "every": 1}
"""The tanh coupling of the main table and the deep experiment, chosen from the sweep and the
deep experiment: eta grows from 0.001 by 0.4% a step, to 0.4 at step 1500."""
LINEAR = {"eta": 0.001, "eta_growth": 0.004, "every": 1}
"""The scoped linear coupling (replicated SGD) of the main table, chosen the same way."""
OLD_DEFAULT = {"eta": 0.05, "eta_growth": 0.0, "every": 1}
"""conf/coupling/{tanh,linear}.yaml before the study: a constant eta of 0.05 every step."""
AVERAGE_EVERY = 4
"""Local SGD's period: conf/coupling/average.yaml's, not swept."""


@dataclass(frozen=True)
class Setting:
    label: str
    """How the tables and plots name it."""
    slug: str
    """Its directory name."""
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    part: str
    setting: Setting
    seed: int
    nproc: int
    overrides: tuple[str, ...]
    """Every override of the torchrun command but hydra.run.dir."""

    @property
    def name(self) -> str:
        return f"{self.part}/{self.setting.slug}/seed_{self.seed}"


def coupling(form: str, eta: float = 0.0, eta_growth: float = 0.0, every: int = 1) -> tuple[str, ...]:
    """The overrides of one coupling, every field of the form given."""
    if form in ("none", "ddp"):
        return (f"coupling={form}",)
    if form == "average":
        return ("coupling=average", f"coupling.every={every}")
    if form == "diloco":  # DiLoCo's outer lr 0.7, Nesterov momentum 0.9 (the yaml's), H = every
        return ("coupling=diloco", f"coupling.every={every}")
    eta_max = 1.0
    extra = ("coupling.temperature=1.0",) if form == "tanh" else ()
    return (
        f"coupling={form}",
        f"coupling.eta={eta:g}",
        f"coupling.eta_growth={eta_growth:g}",
        f"coupling.eta_max={eta_max:g}",
        *extra,
        f"coupling.every={every}",
        "coupling.via_optimizer=false",
    )


def eta_last(eta: float, eta_growth: float, steps: int) -> float:
    return min(1.0, eta * (1 + eta_growth) ** (steps - 1))


def elastic(form: str, eta: float, eta_growth: float = 0.0, every: int = 1, steps: int = STEPS) -> Setting:
    """A tanh or linear setting, named by its schedule and period."""
    label, slug = f"{form} eta={eta:g}", f"{form}_eta{eta:g}"
    if eta_growth:
        label += f" growing {eta_growth:g}/step (to {eta_last(eta, eta_growth, steps):.2g})"
        slug += f"_growth{eta_growth:g}"
    if every != 1:
        label += f", every {every}"
        slug += f"_every{every}"
    return Setting(label, slug, coupling(form, eta, eta_growth, every))


def main_settings() -> list[Setting]:
    return [
        Setting("none", "none", coupling("none")),
        Setting("ddp", "ddp", coupling("ddp")),
        Setting("tanh", "tanh", coupling("tanh", **TANH)),
        Setting("linear", "linear", coupling("linear", **LINEAR)),
        Setting("average", "average", coupling("average", every=AVERAGE_EVERY)),
    ]


def sweep_settings(steps: int) -> list[Setting]:
    """Constant eta across two orders of magnitude, a period of 4, and the scoped schedule
    (at periods 1 and 4) for tanh; linear, which at temperature 1 differs from tanh only
    where |mean - w| is not small, at the old default and the scoped schedule."""
    return [
        *(elastic("tanh", eta, steps=steps) for eta in (0.005, 0.05, 0.2)),
        elastic("tanh", 0.2, every=4, steps=steps),
        elastic("tanh", steps=steps, **TANH),
        elastic("tanh", 0.004, 0.004, every=4, steps=steps),
        elastic("linear", 0.05, steps=steps),
        elastic("linear", steps=steps, **LINEAR),
    ]


def deep_settings(steps: int) -> list[Setting]:
    model = (f"model.hidden=[{','.join(map(str, DEEP_HIDDEN))}]", "model.activation=tanh")
    old, new = elastic("tanh", **OLD_DEFAULT, steps=steps), elastic("tanh", **TANH, steps=steps)
    return [
        Setting("none", "none", (*model, *coupling("none"))),
        Setting("ddp", "ddp", (*model, *coupling("ddp"))),
        Setting(f"{old.label} (old default)", old.slug, (*model, *old.overrides)),
        Setting(f"{new.label} (new default)", new.slug, (*model, *new.overrides)),
    ]


def plan(quick: bool) -> list[Run]:
    """Every run of the study, in the order they are trained."""
    steps = 40 if quick else STEPS
    every = 10 if quick else 100
    common = (*BASE, f"train.steps={steps}")
    main_extra = (
        f"log.every={every}",
        f"eval.every={steps // 2 if quick else 500}",
        f"flatness.sigmas=[{','.join(f'{s:g}' for s in SIGMAS)}]",
        f"flatness.samples={3 if quick else 20}",
    )
    sweep_extra = (f"log.every={every}", f"eval.every={steps // 2 if quick else 500}")
    deep_extra = (f"log.every={5 if quick else 25}", f"eval.every={steps // 2 if quick else 250}")
    sweep, deep = sweep_settings(steps), deep_settings(steps)
    parts = [
        (
            "sweep",
            [sweep[0], sweep[-1]] if quick else sweep,
            SWEEP_SEEDS[:1] if quick else SWEEP_SEEDS,
            sweep_extra,
        ),
        ("main", main_settings(), MAIN_SEEDS[:2] if quick else MAIN_SEEDS, main_extra),
        ("deep", [deep[0], deep[-1]] if quick else deep, DEEP_SEEDS[:1] if quick else DEEP_SEEDS, deep_extra),
    ]
    return [
        Run(part, setting, seed, 2 if quick else NPROC, (*common, *extra, *setting.overrides, f"seed={seed}"))
        for part, settings, seeds, extra in parts
        for setting in settings
        for seed in seeds
    ]


# ---- running


def run_command(run_dir: Path | str, run: Run) -> list[str]:
    return torchrun_command(run.nproc, [f"hydra.run.dir={run_dir}", *run.overrides])


def command_line(run: Run) -> str:
    """The run's command as a shell line, its run directory under "$DIR"."""
    return shell_line(run_command("@", run)).replace("hydra.run.dir=@", f'hydra.run.dir="$DIR/{run.name}"')


def write_commands(
    runs_dir: Path,
    runs: list[Run],
    quick: bool,
    launcher: str = "launch/study.sh",
    module: str = "replica_dist.experiments.study",
) -> None:
    lines = [
        "#!/usr/bin/env bash",
        f"# The study's {len(runs)} runs{' (--quick)' if quick else ''}, in the order {launcher} "
        "trains them; run from the repository root.",
        f"# Then: python -m {module} --runs DIR --plot-only" + (" --quick" if quick else ""),
        "set -euo pipefail",
        f'DIR="${{1:-{runs_dir}}}"',
    ]
    lines += [command_line(run) for run in runs]
    (runs_dir / "commands.sh").write_text("\n".join(lines) + "\n")


def train_all(runs_dir: Path, runs: list[Run]) -> None:
    """Train every run not yet finished, one torchrun job at a time; stop at the first that
    fails. Each job's wall time, process start to exit, goes to DIR/walls.json."""
    walls_path = runs_dir / "walls.json"
    walls = json.loads(walls_path.read_text()) if walls_path.exists() else {}
    for index, run in enumerate(runs, 1):
        run_dir = runs_dir / run.name
        if _has_results(run_dir):
            continue
        if run_dir.exists():  # an interrupted run: its events would mix with the new ones
            shutil.rmtree(run_dir)
        wall = run_job(run_command(run_dir, run), run.name)
        walls[run.name] = wall
        walls_path.write_text(json.dumps(walls, indent=2) + "\n")
        print(f"[{index}/{len(runs)}] {run.name} in {wall:.1f} s", flush=True)


def _has_results(run_dir: Path) -> bool:
    """Whether the run ended with its final evaluation (a summary.json of a stopped run, or of
    one the guard stopped, has none: it is trained again)."""
    try:
        return "replicas" in json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False


# ---- reading the runs back


def run_metrics(run_dir: Path, part: str) -> dict[str, float]:
    """The numbers of one finished run, as flat "group/name" keys."""
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = {
        "test_accuracy/center": summary["center"]["test_accuracy"],
        "test_accuracy/replicas": float(np.mean([r["test_accuracy"] for r in summary["replicas"]])),
        "test_accuracy/ensemble": summary["ensemble"]["test_accuracy"],
        "train_accuracy/center": summary["center"]["train_accuracy"],
        "wall_seconds/train": summary["wall_seconds"],
    }
    if "comm" in summary:  # bytes the coupling sent (bytes_study's axis); older runs lack it
        metrics["comm/bytes_sent_per_rank"] = float(summary["comm"]["bytes_sent_per_rank"])
    if (run_dir / "flatness.json").exists():
        flat = json.loads((run_dir / "flatness.json").read_text())
        for k, sigma in enumerate(flat["sigmas"]):
            metrics[f"local_energy/center/sigma_{sigma:g}"] = flat["center"][k]["local_energy"]
            metrics[f"local_energy/replicas/sigma_{sigma:g}"] = float(
                np.mean([replica[k]["local_energy"] for replica in flat["replicas"]])
            )
    if part == "deep":
        events = load_run(run_dir)
        first, last = first_last(events)
        early = early_steps(summary["steps"])
        for group in ("update_ratio", "grad_step", "coupling_step"):
            for position, layer in (("first", first), ("last", last)):
                metrics[f"{group}/{position}_early"] = early_median(events, f"{group}/{layer}", early)
    return metrics


def early_steps(steps: int) -> int:
    """The end of the learning phase the deep table looks at: the first sixth of training
    (250 of 1500 steps), before the uncoupled replicas have fit their shards and every
    update shrinks."""
    return steps // 6


def early_median(events, tag: str, last_step: int) -> float:
    """Median of a tag over every replica's logged steps up to `last_step`."""
    series = (scalars[tag] for scalars in replicas(events).values())
    values = [vals[steps <= last_step] for steps, vals in series]
    return float(np.median(np.concatenate(values)))


def first_last(events) -> tuple[str, str]:
    """The weight matrices of the network's first and last layers."""
    weights = [name for name in layers(events) if name.endswith("weight")]
    return weights[0], weights[-1]


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single seed) over seeds."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else math.nan
    return {"mean": float(array.mean()), "std": std, "n": len(array)}


def collect(runs_dir: Path, runs: list[Run]) -> dict:
    """Every run's numbers, and per part and setting their mean and std over seeds."""
    walls_path = runs_dir / "walls.json"
    walls = json.loads(walls_path.read_text()) if walls_path.exists() else {}
    records, aggregates = [], {}
    for run in runs:
        run_dir = runs_dir / run.name
        if not (run_dir / "summary.json").exists():
            raise ReportError(f"{run_dir} is not a finished run (no summary.json)")
        metrics = run_metrics(run_dir, run.part)
        if run.name in walls:
            metrics["wall_seconds/process"] = walls[run.name]
        records.append(
            {
                "name": run.name,
                "part": run.part,
                "setting": run.setting.label,
                "seed": run.seed,
                "command": command_line(run),
                "metrics": metrics,
            }
        )
    for record in records:
        aggregates.setdefault(record["part"], {}).setdefault(record["setting"], []).append(record["metrics"])
    for settings in aggregates.values():
        for setting, per_seed in settings.items():
            keys = [k for k in per_seed[0] if all(k in m for m in per_seed)]
            settings[setting] = {k: mean_std([m[k] for m in per_seed]) for k in keys}
    return {
        "nproc": runs[0].nproc,
        "total_process_wall_seconds": sum(walls.get(run.name, 0.0) for run in runs),
        "runs": records,
        "aggregates": aggregates,
        "paired": paired(records),
    }


PAIRS = (
    ("center − ddp", "ddp", "test_accuracy/center"),
    ("center − ensemble of none", "none", "test_accuracy/ensemble"),
    ("center − mean of none's replicas", "none", "test_accuracy/replicas"),
)
"""Paired comparisons of the main table: (column, reference form, reference metric)."""


def paired(records: list[dict]) -> dict[str, dict[str, dict]]:
    """Per main form, its center's test accuracy minus a reference's on the same seed (the same
    data split and test set), as mean and std over seeds: the seed-to-seed spread of the
    split, which the main table's std carries, cancels."""
    main = {(r["setting"], r["seed"]): r["metrics"] for r in records if r["part"] == "main"}
    forms = list(dict.fromkeys(setting for setting, _ in main))
    table = {}
    for form in forms:
        seeds = [seed for setting, seed in main if setting == form]
        table[form] = {
            column: mean_std(
                [main[form, seed]["test_accuracy/center"] - main[reference, seed][metric] for seed in seeds]
            )
            for column, reference, metric in PAIRS
            if reference != form and all((reference, seed) in main for seed in seeds)
        }
    return table


# ---- tables


def cell(stat: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' over seeds; the std left out for a single seed."""
    if stat is None:
        return "-"
    mean = f"{stat['mean'] * scale:.{digits}f}"
    return mean if math.isnan(stat["std"]) else f"{mean} ± {stat['std'] * scale:.{digits}f}"


def _seeds(stats: dict) -> int:
    return next(iter(stats.values()))["n"]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


Column = tuple[str, str, float, int]
"""(header, metric key, scale, decimals) of one table column."""

ACCURACY: list[Column] = [
    ("test acc. % center", "test_accuracy/center", 100, 2),
    ("test acc. % mean of replicas", "test_accuracy/replicas", 100, 2),
    ("test acc. % ensemble", "test_accuracy/ensemble", 100, 2),
]
TRAINING_WALL: Column = ("training wall s", "wall_seconds/train", 1, 1)


def stats_table(first: str, by_row: dict[str, dict], columns: list[Column]) -> str:
    """One row per setting: its name, its number of seeds, and 'mean ± std' per column."""
    rows = [
        [name, str(_seeds(stats))]
        + [cell(stats.get(key), scale, digits) for _, key, scale, digits in columns]
        for name, stats in by_row.items()
    ]
    return _table([first, "seeds"] + [column[0] for column in columns], rows)


def main_table(aggregates: dict) -> str:
    process: Column = ("torchrun wall s", "wall_seconds/process", 1, 1)
    return stats_table("form", aggregates["main"], [*ACCURACY, TRAINING_WALL, process])


def paired_table(pairs: dict) -> str:
    columns: list[Column] = [(f"{column}, points", column, 100, 2) for column, _, _ in PAIRS]
    return stats_table("form", {form: stats for form, stats in pairs.items() if stats}, columns)


def energy_table(aggregates: dict) -> str:
    rows = []
    for form, s in aggregates["main"].items():
        for model in ("center", "replicas"):
            keys = [f"local_energy/{model}/sigma_{sigma:g}" for sigma in SIGMAS]
            if all(k in s for k in keys):
                name = "center" if model == "center" else "mean of replicas"
                rows.append([form, name] + [cell(s[k], 100) for k in keys])
    return _table(["form", "model"] + [f"δE % at σ={sigma:g}" for sigma in SIGMAS], rows)


def sweep_table(aggregates: dict) -> str:
    train: Column = ("train-set acc. % center", "train_accuracy/center", 100, 2)
    return stats_table("setting", aggregates["sweep"], [*ACCURACY, train, TRAINING_WALL])


def deep_table(aggregates: dict) -> str:
    per_layer: list[Column] = [
        (f"{group} ×1e3, {position} layer", f"{group}/{position}_early", 1e3, 2)
        for group in ("update_ratio", "grad_step", "coupling_step")
        for position in ("first", "last")
    ]
    return stats_table("setting", aggregates["deep"], [*ACCURACY, *per_layer])


def _shared(overrides: list[tuple[str, ...]]) -> list[str]:
    """The overrides every one of `overrides` holds, in the order of the first."""
    return [o for o in overrides[0] if all(o in other for other in overrides[1:])]


def settings_text(runs: list[Run]) -> str:
    """What every run shares, what each part adds, and each setting's own overrides."""
    common = _shared([run.overrides for run in runs])
    lines = [
        f"Every run, {runs[0].nproc} replicas: `{' '.join(common)}`; then its part's and its setting's "
        "overrides, and `seed=`. Where a key comes twice the later wins (the deep runs' `model.*`).",
        "",
    ]
    for part, title in (("main", "Main table"), ("sweep", "Sweep"), ("deep", "Deep experiment")):
        own = [run for run in runs if run.part == part]
        extra = [
            o
            for o in _shared([tuple(o for o in r.overrides if o not in r.setting.overrides) for r in own])
            if o not in common
        ]
        seeds = sorted({run.seed for run in own})
        lines += [f"{title}, seeds {', '.join(map(str, seeds))}, also `{' '.join(extra)}`:", ""]
        settings = {run.setting.label: run.setting.overrides for run in own}
        lines += [f"- {label}: `{' '.join(overrides)}`" for label, overrides in settings.items()]
        lines.append("")
    return "\n".join(lines)


def blocks(study: dict, runs: list[Run], runs_dir: Path, quick: bool) -> dict[str, str]:
    """The generated parts of the results page, by marker name."""
    aggregates = study["aggregates"]
    total = study["total_process_wall_seconds"]
    flags = " --quick" if quick else ""
    commands = "\n".join(command_line(run) for run in runs)
    return {
        "main": main_table(aggregates),
        "paired": paired_table(study["paired"]),
        "energy": energy_table(aggregates),
        "sweep": sweep_table(aggregates),
        "deep": deep_table(aggregates),
        "settings": settings_text(runs),
        "commands": (
            "```\n"
            f"launch/study.sh{flags} --runs runs/study    # trains every run, then writes the tables and plots\n"
            f"launch/study.sh{flags} --runs runs/study --plot-only    # tables and plots again, no training\n"
            "```\n\n"
            f"{len(runs)} torchrun jobs, one after the other; together they took {total / 60:.1f} min "
            f"(process start to exit, summed){' in --quick mode' if quick else ''}. "
            "`runs/study/commands.sh` holds them; they are, with `DIR=runs/study`:\n\n"
            f"<details><summary>the {len(runs)} commands</summary>\n\n```\n{commands}\n```\n\n</details>\n"
        ),
    }


MARKER = re.compile(r"<!-- study:(\w+) -->\n.*?<!-- /study:\1 -->", re.DOTALL)


def fill_page(text: str, generated: dict[str, str]) -> str:
    """The page with every marked block replaced by its generated text; blocks that the page
    lacks are appended at its end."""
    found = set()

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in generated:
            return match.group(0)
        found.add(name)
        return f"<!-- study:{name} -->\n{generated[name]}<!-- /study:{name} -->"

    text = MARKER.sub(replace, text)
    for name, body in generated.items():
        if name not in found:
            text += f"\n<!-- study:{name} -->\n{body}<!-- /study:{name} -->\n"
    return text


def skeleton() -> str:
    """A page for a study without one (e.g. --quick): its blocks under plain headings."""
    parts = ["# Does coupling help? (generated page; no conclusions written)\n"]
    for name in ("commands", "settings", "main", "paired", "energy", "sweep", "deep"):
        parts.append(f"\n## {name}\n\n<!-- study:{name} -->\n<!-- /study:{name} -->\n")
    parts.append("\n![main](study_main.png)\n\n![sweep](study_sweep.png)\n\n![deep](study_deep.png)\n")
    return "".join(parts)


# ---- plots


def _errorbar(
    ax, positions, stats: list[dict], scale: float = 1.0, horizontal: bool = False, **style
) -> None:
    """Means over seeds at `positions`, bars of one standard deviation (none for one seed)."""
    means = np.array([s["mean"] for s in stats]) * scale
    stds = np.nan_to_num(np.array([s["std"] for s in stats]) * scale)
    if horizontal:
        ax.errorbar(means, positions, xerr=stds, capsize=3, **style)
    else:
        ax.errorbar(positions, means, yerr=stds, capsize=3, **style)


def main_figure(aggregates: dict, nproc: int, path: Path) -> None:
    """Test accuracy of center, replicas and ensemble; the local energy of the center and of
    the replicas against sigma; wall time. Mean over seeds, bars one standard deviation."""
    plt = pyplot()
    main = aggregates["main"]
    forms = list(main)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    x = np.arange(len(forms))
    shown = []
    for offset, (model, marker) in zip(
        (-0.2, 0.0, 0.2), (("center", "o"), ("replicas", "s"), ("ensemble", "^"))
    ):
        stats = [main[f][f"test_accuracy/{model}"] for f in forms]
        _errorbar(
            ax, x + offset, stats, 100, fmt=marker, label=model if model != "replicas" else "mean of replicas"
        )
        shown += [(100 * s["mean"], 100 * (s["mean"] - np.nan_to_num(s["std"]))) for s in stats]
    # The center of independent replicas (none) can be an average of unrelated networks, far
    # below the rest (at chance in a deep net): the axis shows the rest and says where it is.
    kept = [low for mean, low in shown if mean >= 80.0] or [low for _, low in shown]
    floor = min(kept) - 1
    ax.set_ylim(floor, 100.2)
    for i, form in enumerate(forms):
        value = 100 * main[form]["test_accuracy/center"]["mean"]
        if value < floor:
            ax.annotate(
                f"center {value:.0f}%",
                (i - 0.2, floor),
                xytext=(0, 8),
                textcoords="offset points",
                ha="center",
                fontsize="small",
                arrowprops=dict(arrowstyle="->"),
            )
    ax.set_xticks(x, forms)
    ax.set_ylabel("test accuracy %")
    ax.set_title("test accuracy (mean ± std over seeds)")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)

    ax = axes[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for form, color in zip(forms, colors):
        for model, style in (("center", "-"), ("replicas", ":")):
            keys = [f"local_energy/{model}/sigma_{sigma:g}" for sigma in SIGMAS]
            if all(k in main[form] for k in keys) and (model == "replicas" or form != "none"):
                _errorbar(
                    ax,
                    SIGMAS,
                    [main[form][k] for k in keys],
                    100,
                    color=color,
                    ls=style,
                    marker=".",
                    label=f"{form} {model if model == 'center' else 'replicas'}",
                )
    ax.set_xlabel("σ (relative weight noise)")
    ax.set_ylabel("δE: train error increase %")
    ax.set_title("local energy (lower = flatter); center solid, replicas dotted")
    ax.legend(fontsize="x-small", ncol=2)
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    _errorbar(ax, x, [main[f]["wall_seconds/train"] for f in forms], fmt="o", label="training loop")
    if all("wall_seconds/process" in main[f] for f in forms):
        _errorbar(
            ax, x, [main[f]["wall_seconds/process"] for f in forms], fmt="s", label="torchrun, start to exit"
        )
    ax.set_xticks(x, forms)
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.set_title(f"wall time, {nproc} processes on this machine")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    fig.suptitle(f"{nproc} replicas on digits, the same steps and optimizer for every form")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_figure(aggregates: dict, path: Path) -> None:
    """Per sweep setting: the test accuracy of the center and the mean of the replicas, and the
    wall time of the training loop."""
    plt = pyplot()
    sweep = aggregates["sweep"]
    labels = list(sweep)
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 0.4 * len(labels) + 1.8), sharey=True, gridspec_kw={"width_ratios": [2, 1]}
    )
    y = np.arange(len(labels))[::-1]
    for offset, (model, marker) in zip((0.12, -0.12), (("center", "o"), ("replicas", "s"))):
        stats = [sweep[label][f"test_accuracy/{model}"] for label in labels]
        name = "center" if model == "center" else "mean of replicas"
        _errorbar(axes[0], y + offset, stats, 100, horizontal=True, fmt=marker, label=name)
    walls = [sweep[label]["wall_seconds/train"] for label in labels]
    _errorbar(axes[1], y, walls, horizontal=True, fmt="s")
    axes[0].set_yticks(y, labels)
    axes[0].set_xlabel("test accuracy % (mean ± std over seeds)")
    axes[0].set_title(f"sweep of tanh and linear coupling, {_seeds(sweep[labels[0]])} seeds each")
    axes[0].legend(fontsize="small")
    axes[1].set_xlabel("seconds")
    axes[1].set_xlim(0, 1.1 * max(w["mean"] + np.nan_to_num(w["std"]) for w in walls))
    axes[1].set_title("wall time of the training loop")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _series(loaded: dict[Run, dict], setting: str, source: str, tag: str):
    """(steps, per-seed values) of one tag: the mean over the replicas, or the center's."""
    steps, per_seed = None, []
    for run, events in loaded.items():
        if run.setting.label != setting:
            continue
        if source == "center":
            steps, values = events["center"][tag]
        else:
            series = [s[tag] for s in replicas(events).values()]
            steps, values = series[0][0], np.mean([v for _, v in series], axis=0)
        per_seed.append(values)
    return steps, np.array(per_seed)


def deep_figure(runs_dir: Path, runs: list[Run], path: Path) -> None:
    """Per setting (color), over training: the update ratio of the first and the last layer;
    the optimizer's (solid) and the coupling's (dashed) parts of their steps; the first
    layer's weight norm; the center's test accuracy. Mean over replicas and seeds (line),
    min to max over seeds (band)."""
    plt = pyplot()
    loaded = {run: load_run(runs_dir / run.name) for run in runs if run.part == "deep"}
    settings = list(dict.fromkeys(run.setting.label for run in loaded))
    first, last = first_last(next(iter(loaded.values())))
    some_replica = next(iter(replicas(next(iter(loaded.values()))).values()))
    early = early_steps(int(some_replica["train/loss"][0][-1]))
    panels = [
        (f"first layer ({first}): update ratio ‖Δw‖/‖w‖", True, [(f"update_ratio/{first}", "-")]),
        (f"last layer ({last}): update ratio ‖Δw‖/‖w‖", True, [(f"update_ratio/{last}", "-")]),
        (
            "test accuracy: center (solid), mean of replicas (dashed)",
            False,
            [("center:test/accuracy", "-"), ("test/accuracy", "--")],
        ),
        (
            "first layer: grad_step (solid), coupling_step (dashed)",
            True,
            [(f"grad_step/{first}", "-"), (f"coupling_step/{first}", "--")],
        ),
        (
            "last layer: grad_step (solid), coupling_step (dashed)",
            True,
            [(f"grad_step/{last}", "-"), (f"coupling_step/{last}", "--")],
        ),
        ("first layer: weight norm ‖w‖", False, [(f"weight_norm/{first}", "-")]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, log, series) in zip(axes.flat, panels):
        for setting, color in zip(settings, colors):
            for tag, style in series:
                source, _, name = tag.rpartition(":")
                steps, values = _series(loaded, setting, source or "replicas", name)
                if log and not (values > 0).any():
                    continue  # no coupling: coupling_step is 0 throughout
                show = positive if log else np.asarray
                label = setting if style == "-" else None
                ax.plot(steps, show(values.mean(axis=0)), color=color, ls=style, label=label)
                if len(values) > 1:
                    low, high = show(values.min(axis=0)), show(values.max(axis=0))
                    ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
        ax.axvline(early, color="gray", ls=":", lw=1)
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(
        f"8-layer tanh MLP ({'-'.join(map(str, [64, *DEEP_HIDDEN, 10]))}) on digits, "
        f"{runs[0].nproc} replicas: mean over replicas and seeds, band = min..max over seeds; "
        f"the table's medians are over steps 1-{early} (dotted line)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line


def write_outputs(runs_dir: Path, docs: Path, runs: list[Run], quick: bool) -> str:
    """study.json, the tables, the PNGs and the page; returns the tables' text."""
    study = collect(runs_dir, runs)
    (runs_dir / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    generated = blocks(study, runs, runs_dir, quick)
    tables = "".join(
        f"## {name}\n\n{generated[name]}\n" for name in ("main", "paired", "energy", "sweep", "deep")
    )
    (runs_dir / "study_tables.md").write_text(tables)
    docs.mkdir(parents=True, exist_ok=True)
    main_figure(study["aggregates"], study["nproc"], docs / "study_main.png")
    sweep_figure(study["aggregates"], docs / "study_sweep.png")
    deep_figure(runs_dir, runs, docs / "study_deep.png")
    page = docs / "study.md"
    page.write_text(fill_page(page.read_text() if page.exists() else skeleton(), generated))
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/study.sh", description=__doc__.split("\n\n")[0])
    add_runs_argument(parser, "study", RUNS_ENV)
    parser.add_argument(
        "--docs", type=Path, help="where the page and PNGs go (default docs/; DIR with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps of a reduced plan: checks the pipeline"
    )
    parser.add_argument("--plot-only", action="store_true", help="do not train; tables and plots of --runs")
    args = parser.parse_args(argv)
    runs = plan(args.quick)
    started = time.perf_counter()
    try:
        runs_dir = runs_directory(args, "study", RUNS_ENV)
        docs = args.docs or (runs_dir if args.quick else REPO / "docs")
        if not args.plot_only:
            runs_dir.mkdir(parents=True, exist_ok=True)
            write_commands(runs_dir, runs, args.quick)
            train_all(runs_dir, runs)
        tables = write_outputs(runs_dir, docs, runs, args.quick)
    except ReportError as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 2
    print()
    print(tables)
    for name in ("study.md", "study_main.png", "study_sweep.png", "study_deep.png"):
        print(docs / name)
    print(f"runs: {runs_dir} (commands in {runs_dir / 'commands.sh'}, numbers in {runs_dir / 'study.json'})")
    print(f"study wall time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
