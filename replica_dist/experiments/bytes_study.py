"""Which coupling gives the best model for the bytes a replica may send? The equal-bytes part
of the study (issue 14): its runs, tables, Pareto figure and results page.

    launch/study_bytes.sh [--runs DIR] [--docs DIR] [--quick] [--plot-only]

The same runs as docs/study.md's main table (4 replicas, one process each, gloo, CPU; the
64-128-out ReLU MLP, SGD lr 0.05 momentum 0.9, batch 32, 1500 steps, shards), on two data
sets, digits and the teacher data (data=teacher: 20 inputs, 4 classes from a fixed random
network), seeds 0-2. Per data set:

    none     independent replicas: the coupling sends nothing (0 bytes)
    ddp      DistributedDataParallel: 4n bytes of gradients every step, which the coupling does
             not count (DDP's own all_reduce); shown at that nominal figure
    average, tanh, linear, diloco, each with dist.compress=none and int8, at three byte
             budgets per replica: the bytes that syncing the whole fp32 model every 4, 16 and
             64 steps sends over the run. At each budget a variant's period k is the smallest
             whose bytes fit: (steps // k) exchanges of bytes_per_exchange (the README's closed
             form, for the model's n weights and R replicas). int8 therefore syncs about four
             times as often as fp32 at the same budget.

tanh and linear use the main table's scoped schedule (eta 0.001 growing 0.4 % a step) with eta
multiplied by the period, as the study's sweep did for every 4: the same pull per step on
average, capped at 1. diloco uses DiLoCo's outer optimizer (lr 0.7, Nesterov momentum 0.9).

Runs go to DIR/<data>/<setting>/seed_<s> (DIR: --runs, else $STUDY_BYTES_RUNS_DIR, else
runs/study_bytes/<timestamp>); a run that holds summary.json is kept. Then it writes
DIR/commands.sh, DIR/walls.json, DIR/study_bytes.json (every run's numbers and bytes; mean and
std over seeds; paired differences), DIR/study_bytes_tables.md, DOCS/study_bytes.png (center
test accuracy against bytes sent, log x, per data set) and DOCS/study_bytes.md (its marked
blocks refreshed, the prose kept). Each run's bytes are read back from its summary.json
(comm.bytes_sent_per_rank) and checked against its budget in the table.

How long: 2 data sets x 26 settings x 3 seeds = 156 torchrun jobs. Measured here, one job of
1500 steps and 4 processes took 88-98 s on this 2-core machine under a load of 5-12 (diloco
every 2 int8 on digits and on teacher, none on teacher); docs/study.md's 53 jobs of the same
size took 23 s each on the idle machine. The full part ran in 81 minutes on 2 cores
(2026-11-28; 24-42 s a job, with tests running beside it at times), and takes up to 4 hours
on a loaded machine. `--quick` (2 replicas, 2 seeds, 40 steps,
the fp32/4 budget only, 7 settings that cover every form, both compressions and both
reference points: 14 jobs) checks the pipeline in about 2 minutes on idle cores (10 s a
job); its numbers mean nothing and its DOCS default to DIR.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from replica_dist.config import ConfigError, load_config, parameter_count
from replica_dist.experiments import study
from replica_dist.experiments.commands import REPO, add_runs_argument, runs_directory
from replica_dist.report import ReportError, pyplot

RUNS_ENV = "STUDY_BYTES_RUNS_DIR"
DATASETS = ("digits", "teacher")
SEEDS = (0, 1, 2)
BUDGET_PERIODS = (4, 16, 64)
"""Each budget: the bytes that syncing the whole model in fp32 every p steps sends over the run."""
QUICK_BUDGET_PERIODS = (4,)
FORMS = ("average", "tanh", "linear", "diloco")
COMPRESSIONS = ("none", "int8")
COMPRESS_CHUNK = 1024
"""dist.compress_chunk: the default, spelled out in every int8 run (the only ones it applies to)."""
BASELINE = ("average", "none")
"""The paired differences' reference at each budget: local SGD in fp32."""
QUICK_VARIANTS = {
    "digits": ("none", ("average", "none"), ("tanh", "int8"), ("diloco", "none")),
    "teacher": ("ddp", ("average", "none"), ("linear", "int8")),
}
"""--quick: every form, both compressions and both reference points once over the two data sets,
the paired baseline on both (7 settings, 14 short runs)."""


def bytes_per_exchange(n: int, replicas: int, compress: str, chunk: int = COMPRESS_CHUNK) -> int:
    """Bytes one rank hands to the coupling's collectives per exchange of n weights among R
    replicas (README, "Less communication"): the payload and the guard's R x 5 float32 table."""
    table = 20 * replicas
    if compress == "none":
        return 4 * n + table
    if compress == "bf16":
        return 2 * n + table
    if compress == "int8":
        return n + 4 * math.ceil(n / chunk) + table
    raise ValueError(f"unknown compression {compress!r}")


def run_bytes(steps: int, period: int, per_exchange: int) -> int:
    """Bytes of a run of `steps` steps that exchanges every `period` steps (at steps k, 2k, ...)."""
    return (steps // period) * per_exchange


def budget_bytes(steps: int, fp32_period: int, n: int, replicas: int) -> int:
    """The budget named by `fp32_period`: syncing the whole model in fp32 every that many steps."""
    return run_bytes(steps, fp32_period, bytes_per_exchange(n, replicas, "none"))


def period_for(budget: int, steps: int, per_exchange: int) -> int:
    """The smallest period k >= 1 whose run fits: (steps // k) * per_exchange <= budget. With m
    = budget // per_exchange exchanges affordable, steps // k <= m holds from k = steps // (m+1)
    + 1 on. A budget below one exchange fits only a period longer than the run, which couples
    nothing: refused."""
    affordable = budget // per_exchange
    if affordable < 1:
        raise ValueError(f"a budget of {budget} bytes is less than one exchange ({per_exchange} bytes)")
    return steps // (affordable + 1) + 1


@dataclass(frozen=True)
class Variant(study.Setting):
    form: str
    compress: str
    """dist.compress; "none" for the reference points too."""
    budget: int | None
    """The fp32 period that names its budget; None for none and ddp."""
    budget_bytes: int | None
    period: int | None
    expected_bytes: int
    """The coupling's bytes per rank over the run, by the closed form."""
    weights: int
    """n: the model's weights, which each exchange carries."""
    uncounted_bytes: int = 0
    """Bytes per rank over the run outside the coupling's count: ddp's gradients, 4n a step."""


def _base(steps: int, quick: bool) -> tuple[str, ...]:
    every = 10 if quick else 100
    return (
        *(o for o in study.BASE if not o.startswith("data=")),
        f"train.steps={steps}",
        f"log.every={every}",
        f"eval.every={steps // 2 if quick else 500}",
    )


@functools.cache
def weights(dataset: str) -> int:
    """n: the number of weights the study's model has on `dataset`, as the trainer's config
    counts them (the MLP has no floating buffers, which the exchange would carry too)."""
    try:
        cfg, _ = load_config([f"data={dataset}", *study.BASE[1:]])
    except ConfigError as err:
        raise ReportError(f"cannot count the weights for data={dataset}: {err}") from None
    return parameter_count(cfg)


def elastic_overrides(form: str, period: int) -> tuple[str, ...]:
    """tanh or linear every `period`: the main table's schedule, eta times the period."""
    schedule = study.TANH if form == "tanh" else study.LINEAR
    eta = min(1.0, schedule["eta"] * period)
    return study.coupling(form, eta, schedule["eta_growth"], every=period)


def variants(n: int, replicas: int, steps: int, budgets: tuple[int, ...]) -> list[Variant]:
    """The reference points, then per budget every form in every compression."""
    out = [
        Variant("none", "none", study.coupling("none"), "none", "none", None, None, None, 0, n),
        Variant("ddp", "ddp", study.coupling("ddp"), "ddp", "none", None, None, None, 0, n, 4 * n * steps),
    ]
    for fp32_period in budgets:
        budget = budget_bytes(steps, fp32_period, n, replicas)
        for form in FORMS:
            for compress in COMPRESSIONS:
                per_exchange = bytes_per_exchange(n, replicas, compress)
                k = period_for(budget, steps, per_exchange)
                name = "fp32" if compress == "none" else compress
                coupled = (
                    elastic_overrides(form, k)
                    if form in ("tanh", "linear")
                    else study.coupling(form, every=k)
                )
                chunk = (f"dist.compress_chunk={COMPRESS_CHUNK}",) if compress == "int8" else ()
                overrides = (*coupled, f"dist.compress={compress}", *chunk)
                out.append(
                    Variant(
                        f"{form} {name} every {k} (budget fp32/{fp32_period})",
                        f"b{fp32_period}_{form}_{name}",
                        overrides,
                        form,
                        compress,
                        fp32_period,
                        budget,
                        k,
                        run_bytes(steps, k, per_exchange),
                        n,
                    )
                )
    return out


def plan(quick: bool) -> list[study.Run]:
    """Every run, in the order they are trained: per data set, per setting, per seed."""
    steps = 40 if quick else study.STEPS
    nproc = 2 if quick else study.NPROC
    seeds = SEEDS[:2] if quick else SEEDS
    runs = []
    for dataset in DATASETS:
        n = weights(dataset)
        every = variants(n, nproc, steps, QUICK_BUDGET_PERIODS if quick else BUDGET_PERIODS)
        if quick:
            keep = QUICK_VARIANTS[dataset]
            every = [v for v in every if v.form in keep or (v.form, v.compress) in keep]
        for variant in every:
            for seed in seeds:
                overrides = (f"data={dataset}", *_base(steps, quick), *variant.overrides, f"seed={seed}")
                runs.append(study.Run(dataset, variant, seed, nproc, overrides))
    return runs


# ---- reading the runs back


def paired(records: list[dict], runs: list[study.Run]) -> dict[str, dict[str, dict]]:
    """Per data set and setting: its center's test accuracy minus, on the same seed, that of
    the baseline (average, fp32) at the same budget and that of ddp."""
    variant = {(run.part, run.setting.label): run.setting for run in runs}
    center = {(r["part"], r["setting"], r["seed"]): r["metrics"]["test_accuracy/center"] for r in records}
    baseline = {
        (v.budget, part): label
        for (part, label), v in variant.items()
        if (v.form, v.compress) == BASELINE and v.budget is not None
    }
    out: dict[str, dict[str, dict]] = {}
    for (part, label), v in variant.items():
        seeds = [seed for (p, s, seed) in center if (p, s) == (part, label)]
        row = {}
        references = {"minus_baseline": baseline.get((v.budget, part)), "minus_ddp": "ddp"}
        for column, reference in references.items():
            if reference is None or reference == label:
                continue
            if all((part, reference, seed) in center for seed in seeds):
                diffs = [center[part, label, seed] - center[part, reference, seed] for seed in seeds]
                row[column] = study.mean_std(diffs)
        out.setdefault(part, {})[label] = row
    return out


def collect(runs_dir: Path, runs: list[study.Run]) -> dict:
    """The study's numbers (study.collect: per run, and per setting over seeds, the bytes
    among them) and the paired differences; each run's record holds its bytes sent, the
    closed form's and its budget."""
    result = study.collect(runs_dir, runs)
    for record, run in zip(result["runs"], runs):
        v: Variant = run.setting
        if "comm/bytes_sent_per_rank" not in record["metrics"]:
            raise ReportError(f"{runs_dir / run.name}/summary.json has no comm.bytes_sent_per_rank")
        record["bytes"] = {
            "sent": int(record["metrics"]["comm/bytes_sent_per_rank"]),
            "expected": v.expected_bytes,
            "budget": v.budget_bytes,
        }
    result["paired"] = paired(result["runs"], runs)
    return result


# ---- tables


def megabytes(value: float) -> str:
    return f"{value / 1e6:.3g}"


def _variants(runs: list[study.Run], dataset: str) -> list[Variant]:
    return list({run.setting.label: run.setting for run in runs if run.part == dataset}.values())


def fits(records: list[dict], dataset: str, label: str) -> str:
    """The largest share of its budget any seed's run sent, as a cell; OVER when above it, and
    a mismatch with the closed form said too (the budget arithmetic would then be wrong)."""
    own = [r["bytes"] for r in records if (r["part"], r["setting"]) == (dataset, label)]
    if own[0]["budget"] is None:
        return "-"
    share = max(b["sent"] / b["budget"] for b in own)
    text = f"{100 * share:.1f} %" + (" OVER" if share > 1 else "")
    if any(b["sent"] != b["expected"] for b in own):
        text += f" (closed form {megabytes(own[0]['expected'])} MB)"
    return text


def dataset_table(result: dict, runs: list[study.Run], dataset: str) -> str:
    """One row per setting: its budget, period, bytes sent per rank (mean over seeds, read from
    summary.json) and their share of the budget, the center's test accuracy (mean ± std) and
    its paired differences."""
    aggregates, pairs = result["aggregates"][dataset], result["paired"][dataset]
    rows = []
    for v in _variants(runs, dataset):
        stats = aggregates[v.label]
        sent = stats["comm/bytes_sent_per_rank"]["mean"]
        if v.uncounted_bytes:
            sent_cell = f"{megabytes(sent)} (+ {megabytes(v.uncounted_bytes)} of gradients)"
        else:
            sent_cell = megabytes(sent)
        rows.append(
            [
                "-" if v.budget is None else f"fp32/{v.budget} = {megabytes(v.budget_bytes)} MB",
                f"{v.form} {'fp32' if v.compress == 'none' else v.compress}" if v.budget else v.form,
                "-" if v.period is None else str(v.period),
                sent_cell,
                fits(result["runs"], dataset, v.label),
                str(stats["test_accuracy/center"]["n"]),
                study.cell(stats["test_accuracy/center"], 100),
                study.cell(pairs[v.label].get("minus_baseline"), 100),
                study.cell(pairs[v.label].get("minus_ddp"), 100),
            ]
        )
    header = [
        "budget per rank",
        "setting",
        "period k",
        "MB sent per rank",
        "of budget",
        "seeds",
        "test acc. % center",
        f"− {BASELINE[0]} fp32 same budget, points",
        "− ddp, points",
    ]
    return study._table(header, rows)


def settings_text(runs: list[study.Run]) -> str:
    """The shared overrides, the model's size and the closed form's numbers per data set, and
    each coupled setting's own overrides."""
    common = study._shared([run.overrides for run in runs])
    steps, nproc = int(next(o for o in common if o.startswith("train.steps=")).split("=")[1]), runs[0].nproc
    seeds = sorted({run.seed for run in runs})
    lines = [
        f"Every run, {nproc} replicas, seeds {', '.join(map(str, seeds))}: `{' '.join(common)}`, then "
        "`data=`, the setting's overrides and `seed=`. Per data set, n weights, the bytes of one "
        "exchange (fp32: 4n + 20R, int8: n + 4⌈n/1024⌉ + 20R, R replicas), and the period each "
        f"budget gives (the smallest k with ({steps} // k) · bytes per exchange ≤ budget):",
        "",
    ]
    header = ["data", "n", "fp32 B/exchange", "int8 B/exchange", "budget", "MB", "fp32 k", "int8 k"]
    rows = []
    for dataset in dict.fromkeys(run.part for run in runs):
        coupled = [v for v in _variants(runs, dataset) if v.budget is not None]
        n = coupled[0].weights
        for fp32_period in dict.fromkeys(v.budget for v in coupled):
            at = {v.compress: v.period for v in coupled if v.budget == fp32_period}
            rows.append(
                [
                    dataset,
                    str(n),
                    str(bytes_per_exchange(n, nproc, "none")),
                    str(bytes_per_exchange(n, nproc, "int8")),
                    f"fp32 every {fp32_period}",
                    megabytes(budget_bytes(steps, fp32_period, n, nproc)),
                    str(at.get("none", "-")),
                    str(at.get("int8", "-")),
                ]
            )
    lines += [study._table(header, rows)]
    one = [run for run in runs if run.part == runs[0].part and run.seed == runs[0].seed]
    lines += [f"- {run.setting.label}: `{' '.join(run.setting.overrides)}`" for run in one]
    return "\n".join(lines) + "\n"


# ---- the Pareto figure


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats: none with at most as many bytes and at least as high an
    accuracy, one of them strictly. In increasing bytes (and so increasing accuracy)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


STYLE = {"average": "C0", "tanh": "C1", "linear": "C2", "diloco": "C3", "ddp": "k"}
MARKER = {"none": "o", "int8": "s"}


def figure(result: dict, runs: list[study.Run], path: Path) -> None:
    """Per data set: the center's test accuracy (mean ± std over seeds) against the bytes each
    rank sent (log x): a line per form and compression across the budgets, ddp at the bytes
    of its gradients (not the coupling's), independent replicas (0 bytes) as a band, and the
    Pareto front of all of them as a gray step line."""
    plt = pyplot()
    datasets = list(dict.fromkeys(run.part for run in runs))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.2 * len(datasets), 5.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        aggregates = result["aggregates"][dataset]
        every = _variants(runs, dataset)
        points = []
        for form in FORMS:
            for compress in COMPRESSIONS:
                line = [v for v in every if (v.form, v.compress) == (form, compress)]
                if not line:
                    continue
                xs = [aggregates[v.label]["comm/bytes_sent_per_rank"]["mean"] for v in line]
                stats = [aggregates[v.label]["test_accuracy/center"] for v in line]
                style = dict(
                    color=STYLE[form], marker=MARKER[compress], ls="-" if compress == "none" else "--"
                )
                if compress != "none":
                    style["mfc"] = "white"
                name = f"{form} {'fp32' if compress == 'none' else compress}"
                study._errorbar(ax, xs, stats, 100, label=name, **style)
                points += [(x, 100 * s["mean"]) for x, s in zip(xs, stats)]
        for v in every:
            stats = aggregates[v.label]["test_accuracy/center"]
            if v.form == "ddp":
                x = v.uncounted_bytes
                study._errorbar(
                    ax, [x], [stats], 100, color="k", marker="*", ms=11, label="ddp (its gradients)"
                )
                points.append((x, 100 * stats["mean"]))
            elif v.form == "none":
                mean, std = 100 * stats["mean"], 100 * np.nan_to_num(stats["std"])
                ax.axhline(mean, color="gray", ls=":", label="none (0 bytes)")
                ax.axhspan(mean - std, mean + std, color="gray", alpha=0.12, lw=0)
        front = pareto_front(points)
        if front:
            xs, ys = zip(*front)
            ax.step(xs, ys, where="post", color="k", lw=6, alpha=0.18, zorder=0, label="Pareto front")
        for v in every:
            if v.budget is not None and v.form == FORMS[0] and v.compress == "none":
                ax.axvline(v.budget_bytes, color="gray", lw=0.6, ls="-.")
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per rank over the run (log; dash-dot: the budgets)")
        ax.set_ylabel("center test accuracy % (mean ± std over seeds)")
        ax.set_title(f"{dataset}, {runs[0].nproc} replicas")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize="x-small", ncol=2)
    fig.suptitle("Which coupling gives the best model for the bytes? (fp32 solid, int8 dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- the page


def blocks(result: dict, runs: list[study.Run], quick: bool) -> dict[str, str]:
    """The generated parts of the results page, by marker name."""
    flags = " --quick" if quick else ""
    total = result["total_process_wall_seconds"]
    commands = "\n".join(study.command_line(run) for run in runs)
    out = {
        "commands": (
            "```\n"
            f"launch/study_bytes.sh{flags} --runs runs/study_bytes    # trains every run, then the tables and figure\n"
            f"launch/study_bytes.sh{flags} --runs runs/study_bytes --plot-only    # tables and figure again\n"
            "```\n\n"
            f"{len(runs)} torchrun jobs, one after the other; together they took {total / 60:.1f} min "
            f"(process start to exit, summed){' in --quick mode' if quick else ''}.\n\n"
            f"<details><summary>the {len(runs)} commands</summary>\n\n```\n{commands}\n```\n\n</details>\n"
        ),
        "settings": settings_text(runs),
    }
    for dataset in dict.fromkeys(run.part for run in runs):
        out[dataset] = dataset_table(result, runs, dataset)
    return out


def skeleton() -> str:
    """The page before any prose: its blocks under plain headings, the conclusion to be written."""
    parts = [
        "# Which coupling wins at equal bytes? (generated page)\n\n"
        "## Conclusion\n\n"
        "_Not written yet: the lead fills this in after the full run (`launch/study_bytes.sh`). It "
        "says which coupling gives the best center for the bytes at each budget, on each data set, "
        "whether int8 helps at equal bytes, and where nothing beats independent replicas or ddp._\n"
    ]
    for name, title in (
        ("commands", "Regenerate it"),
        ("settings", "Settings and budgets"),
        *((dataset, f"{dataset}: center test accuracy at equal bytes") for dataset in DATASETS),
    ):
        parts.append(f"\n## {title}\n\n<!-- study:{name} -->\n<!-- /study:{name} -->\n")
    parts.append("\n![Pareto](study_bytes.png)\n")
    return "".join(parts)


# ---- command line


def write_outputs(runs_dir: Path, docs: Path, runs: list[study.Run], quick: bool) -> str:
    """study_bytes.json, the tables, the PNG and the page; returns the tables' text."""
    result = collect(runs_dir, runs)
    (runs_dir / "study_bytes.json").write_text(json.dumps(result, indent=2) + "\n")
    generated = blocks(result, runs, quick)
    tables = "".join(f"## {name}\n\n{generated[name]}\n" for name in ("settings", *DATASETS))
    (runs_dir / "study_bytes_tables.md").write_text(tables)
    docs.mkdir(parents=True, exist_ok=True)
    figure(result, runs, docs / "study_bytes.png")
    page = docs / "study_bytes.md"
    page.write_text(study.fill_page(page.read_text() if page.exists() else skeleton(), generated))
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/study_bytes.sh", description=__doc__.split("\n\n")[0])
    add_runs_argument(parser, "study_bytes", RUNS_ENV)
    parser.add_argument(
        "--docs", type=Path, help="where the page and PNG go (default docs/; DIR with --quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few steps of a reduced plan: checks the pipeline"
    )
    parser.add_argument("--plot-only", action="store_true", help="do not train; tables and plots of --runs")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        runs = plan(args.quick)
        runs_dir = runs_directory(args, "study_bytes", RUNS_ENV)
        docs = args.docs or (runs_dir if args.quick else REPO / "docs")
        if not args.plot_only:
            runs_dir.mkdir(parents=True, exist_ok=True)
            study.write_commands(
                runs_dir, runs, args.quick, "launch/study_bytes.sh", "replica_dist.experiments.bytes_study"
            )
            study.train_all(runs_dir, runs)
        tables = write_outputs(runs_dir, docs, runs, args.quick)
    except ReportError as err:
        print(f"study_bytes: error: {err}", file=sys.stderr)
        return 2
    print()
    print(tables)
    print(docs / "study_bytes.md")
    print(docs / "study_bytes.png")
    print(
        f"runs: {runs_dir} (commands in {runs_dir / 'commands.sh'}, numbers in {runs_dir / 'study_bytes.json'})"
    )
    print(f"wall time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
