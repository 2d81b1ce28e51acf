"""The trainer's step time now against a git ref: the same jobs, interleaved, in one run.

    python -m replica_dist.experiments.against --against REF [--steps 1000] [--rounds 3]
        [--variants tanh,ddp,none] [--work runs/against] [--report FILE.md] [--json FILE.json]
        [overrides...]
    launch/bench.sh --against REF ...    # the same

Every benchmark of bench.py compares variants of one commit, so a change that slows every
coupled step by the same few milliseconds shows in none of its ratios. This one runs REF's
trainer next to the working tree's (uncommitted changes included) on the same machine in the
same stretch of time:

1. REF's tree (`git archive` of its commit, under --work/<sha>/tree) gets a venv of its own
   (--work/<sha>/venv: `pip install -r requirements.txt -e .` from that tree); both are kept
   per commit, so a second run against the same commit starts at once.
2. For each round, for each variant: REF's job then the working tree's, the order swapped
   every other round (neither side always runs first, right after the other's job). Each job
   is a real `torchrun --standalone --nproc_per_node=2 -m replica_dist.train` of the
   benchmark's shape (the 1.1M-weight mlp 64-1024-1024-10 on digits, batch 64 per rank, no
   checkpoint, logging and evaluation only at the end), and its time is the `wall_seconds` of
   its summary.json: the training loop alone, not the process start, data load or the last
   evaluation's summary.
3. Per variant: each side's median, now / REF (ratio of the medians) and the spread of the
   rounds' paired ratios (each round's now / REF, min and max), as a markdown table.

Both sides get the same explicit overrides, keys that every commit since the coupling's
schedule existed accepts (the eta schedule changes the weights, not the step's work, but an
explicit one keeps both sides' runs the same). A key REF does not know fails its first job,
with the trainer's own message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from replica_dist.experiments.commands import REPO, run_job, shell_line, torchrun_command
from replica_dist.report import ReportError

NPROC = 2
VARIANTS = {
    "tanh": ["coupling=tanh", "dist.overlap=true", "coupling.every=1"],
    "tanh every 16": ["coupling=tanh", "dist.overlap=true", "coupling.every=16"],
    "linear": ["coupling=linear", "dist.overlap=true", "coupling.every=1"],
    "ddp": ["coupling=ddp"],
    "none": ["coupling=none"],
}
"""What each variant adds to SHAPE. tanh and linear are overlapped and couple every step."""
DEFAULT_VARIANTS = ("tanh", "ddp", "none")
SCHEDULE = ["coupling.eta=0.001", "coupling.eta_growth=0.004"]
"""The elastic variants' eta: REF may predate the run-relative default schedule."""
ELASTIC = ("tanh", "linear")
SHAPE = [
    "model.hidden=[1024,1024]",
    "data=digits",
    "train.batch_size=64",
    "checkpoint.every=0",
    "log.every=1000000",
    "eval.every=1000000",
]
"""The benchmark's job (docs/benchmark.md), without its length (--steps)."""
NOW, REF = "now", "ref"


@dataclass(frozen=True)
class Side:
    """One of the two trainers: its tree (the jobs' working directory, whose replica_dist they
    import) and the Python of its environment."""

    name: str
    label: str
    tree: Path
    python: str


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def resolve(ref: str) -> str | None:
    """The full commit sha of `ref`, or None if git knows no such commit."""
    try:
        return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError:
        return None


def environment_paths(work: Path, sha: str) -> tuple[Path, Path, Path]:
    """REF's tree, its venv and the file that says both are complete, under work/<sha>/."""
    home = work / sha
    return home / "tree", home / "venv", home / "ready"


def prepare(work: Path, sha: str, log=print) -> Path:
    """The Python of commit `sha`'s own environment, built once: its tree from `git archive`
    (the shared repository's worktree list is left alone) and a venv with its requirements
    and itself installed. A half-built one (no `ready` file) is built again from scratch."""
    tree, venv, ready = environment_paths(work, sha)
    python = venv / "bin" / "python"
    if ready.exists():
        log(f"reusing {tree.parent} (environment of {sha[:12]})")
        return python
    shutil.rmtree(tree.parent, ignore_errors=True)
    tree.mkdir(parents=True)
    log(f"building {tree.parent}: the tree of {sha[:12]} and a venv with its requirements")
    archive = subprocess.run(["git", "archive", sha], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "-r", "requirements.txt", "-e", "."],
    ]
    for command in steps:
        done = subprocess.run(command, cwd=tree, capture_output=True, text=True)
        if done.returncode != 0:
            raise ReportError(
                f"environment of {sha[:12]}: {shell_line(command)} failed\n{done.stderr[-2000:]}"
            )
    ready.write_text(sha + "\n")
    return python


def overrides(variant: str, steps: int, extra: list[str]) -> list[str]:
    """The trainer overrides of one job of `variant` (both sides get the same)."""
    schedule = SCHEDULE if VARIANTS[variant][0].split("=")[1] in ELASTIC else []
    return [*SHAPE, f"train.steps={steps}", *VARIANTS[variant], *schedule, *extra]


def schedule(variants: list[str], rounds: int) -> list[tuple[int, str, str]]:
    """(round, variant, side) in the order they run: in each round every variant, REF then
    now in even rounds and now then REF in odd ones."""
    order = []
    for round_ in range(rounds):
        sides = (REF, NOW) if round_ % 2 == 0 else (NOW, REF)
        order += [(round_, variant, side) for variant in variants for side in sides]
    return order


def compare(walls: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Per variant, from {variant: {side: [seconds of round 0, 1, ...]}}: each side's median,
    now / REF of the medians, and the smallest and largest of the rounds' own now / REF."""
    results = {}
    for variant, by_side in walls.items():
        ref, now = by_side[REF], by_side[NOW]
        paired = [n / r for r, n in zip(ref, now, strict=True)]
        results[variant] = {
            "ref_s": ref,
            "now_s": now,
            "ref_median_s": statistics.median(ref),
            "now_median_s": statistics.median(now),
            "ratio": statistics.median(now) / statistics.median(ref),
            "paired_min": min(paired),
            "paired_max": max(paired),
        }
    return results


def table(results: dict[str, dict], ref_label: str, now_label: str) -> str:
    """The markdown table of compare()'s results, with tanh / ddp on each side when both ran."""
    lines = [
        f"| variant | {ref_label} (median s) | {now_label} (median s) | now / ref | per round, min-max |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant, r in results.items():
        lines.append(
            f"| `{variant}` | {r['ref_median_s']:.2f} | {r['now_median_s']:.2f} | **{r['ratio']:.3f}** | "
            f"{r['paired_min']:.3f}-{r['paired_max']:.3f} |"
        )
    if {"tanh", "ddp"} <= results.keys():
        tanh, ddp = results["tanh"], results["ddp"]
        lines.append(
            f"| tanh / ddp | {tanh['ref_median_s'] / ddp['ref_median_s']:.3f} | "
            f"{tanh['now_median_s'] / ddp['now_median_s']:.3f} | | |"
        )
    return "\n".join(lines)


def _torch_version(side: Side) -> str:
    command = [side.python, "-c", "import torch; print(torch.__version__)"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def report(args, sides: dict[str, Side], results: dict[str, dict], started: str, minutes: float) -> str:
    ref, now = sides[REF], sides[NOW]
    names = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    machine = f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"
    return "\n".join(
        [
            f"`launch/bench.sh --against {args.against} --steps {args.steps} --rounds {args.rounds} "
            f"--variants {','.join(args.variants)}`, {started}, {minutes:.1f} min; {machine}; "
            f"torch {_torch_version(ref)} (ref) and {_torch_version(now)} (now).",
            "",
            f"ref = {ref.label}, now = {now.label}. Each job: torchrun, {NPROC} gloo ranks, "
            f"{' '.join(SHAPE)} train.steps={args.steps}; the elastic variants with "
            f"{' '.join(SCHEDULE)}. Time: summary.json's wall_seconds (the training loop); "
            f"{args.rounds} round(s), the two sides alternating, medians.",
            "",
            table(results, f"ref {ref.label}", f"now {now.label}"),
            "",
        ]
    )


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="replica_dist.experiments.against", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--against", required=True, metavar="REF", help="a commit, tag or branch git knows")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every job")
    parser.add_argument("--rounds", type=int, default=3, help="passes through every variant, on both sides")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "against", help="environments and runs")
    parser.add_argument("--report", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--json", type=Path, help="also write every job's seconds (JSON) here")
    args, extra = parser.parse_known_args(argv)
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if args.steps < 1 or args.rounds < 1:
        parser.error(f"--steps and --rounds must be >= 1; got {args.steps} and {args.rounds}")
    bad = [o for o in extra if "=" not in o]
    if bad:
        parser.error(
            f"unknown arguments {bad}: extra arguments are trainer overrides key=value for both sides"
        )
    args.sha = resolve(args.against)
    if args.sha is None:
        parser.error(f"--against: git knows no commit {args.against!r} in {REPO}")
    return args, extra


def main(argv: list[str]) -> int:
    args, extra = _parse(argv)
    sha = args.sha
    try:
        work = args.work.resolve()
        sides = {
            REF: Side(REF, sha[:12], environment_paths(work, sha)[0], str(prepare(work, sha))),
            NOW: Side(NOW, _git("describe", "--always", "--dirty"), REPO, sys.executable),
        }
        runs = work / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
        walls = {variant: {REF: [], NOW: []} for variant in args.variants}
        started, began = time.strftime("%Y-%m-%d %H:%M"), time.perf_counter()
        for round_, variant, side_name in schedule(args.variants, args.rounds):
            side = sides[side_name]
            run_dir = runs / f"{side_name}_{variant.replace(' ', '_')}_{round_}"
            command = torchrun_command(
                NPROC,
                [f"hydra.run.dir={run_dir}", *overrides(variant, args.steps, extra)],
                python=side.python,
            )
            run_job(command, f"{side_name} ({side.label}) {variant}, round {round_ + 1}", cwd=side.tree)
            seconds = json.loads((run_dir / "summary.json").read_text())["wall_seconds"]
            walls[variant][side_name].append(seconds)
            print(f"round {round_ + 1}, {variant}, {side_name} ({side.label}): {seconds:.2f} s", flush=True)
        results = compare(walls)
        text = report(args, sides, results, started, (time.perf_counter() - began) / 60)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(text, end="")
    if args.report:
        args.report.write_text(text)
    if args.json:
        labels = {name: side.label for name, side in sides.items()}
        args.json.write_text(
            json.dumps({"sides": labels, "steps": args.steps, "results": results}, indent=2) + "\n"
        )
    shutil.rmtree(runs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
