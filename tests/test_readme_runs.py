"""Every command of README.md's "## Common runs" block, run through launch/run.sh itself.

Each line runs as written, shortened (fewer steps, no checkpoints, short collective timeout),
and its summary.json is read back: every run ends well above chance, and every coupled run's
center is within 2 points of its ensemble. A README line that stops training sensibly, or a
launcher that stops honouring NPROC / RUN_DIR / overrides, fails here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_runs import REPO, scalar
from worlds import COLLECTIVE_TIMEOUT_S

from replica_dist.config import load_config
from replica_dist.coupling import FORM_SETTINGS, eta_at, schedule_note

pytestmark = pytest.mark.e2e

SHORT_STEPS = 200
"""Runs longer than this are cut to it: every README line then costs seconds, not a minute."""
CENTER_BELOW_ENSEMBLE = 0.02
"""A coupled run's center may trail its ensemble by at most 2 points of test accuracy."""


def common_runs(readme: Path = REPO / "README.md") -> list[str]:
    """The command lines of the first code block under '## Common runs'."""
    text = readme.read_text()
    section = text.split("\n## Common runs\n", 1)
    assert len(section) == 2, "README.md has no '## Common runs' section"
    block = re.search(r"^```[^\n]*\n(.*?)^```", section[1], flags=re.S | re.M)
    assert block, "the '## Common runs' section has no code block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def parse(line: str) -> tuple[dict[str, str], list[str]]:
    """(environment assignments, Hydra overrides) of `[VAR=value ...] launch/run.sh override ...`."""
    words = shlex.split(line, comments=True)
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words and words[0] == "launch/run.sh", f"not a launch/run.sh command: {line}"
    return env, words[1:]


def shortening(overrides: list[str]) -> list[str]:
    """Overrides appended to a README line so that it runs in seconds with the same shape."""
    cfg, _ = load_config(overrides)
    extra = ["checkpoint.every=0", f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}"]
    if cfg.train.steps <= SHORT_STEPS:
        return extra
    extra += [f"train.steps={SHORT_STEPS}", "log.every=100", "eval.every=100"]
    c = cfg.coupling
    if "eta" in FORM_SETTINGS[c.name] and c.eta_end is None and c.eta_growth > 0:
        # A growth per step sized for the full run barely couples a short one (schedule_note says
        # so); ending at the full run's last eta keeps the schedule's shape over fewer steps.
        extra += [
            f"coupling.eta_final={eta_at(c, cfg.train.steps, cfg.train.steps)!r}",
            "coupling.eta_growth=null",
        ]
    return extra


def num_classes(run_dir: Path) -> int:
    """Outputs of the center network: the rows of its last weight matrix."""
    center = torch.load(run_dir / "weights" / "center.pt")
    return [t for name, t in center.items() if name.endswith("weight") and t.dim() == 2][-1].shape[0]


LINES = common_runs()


def test_the_common_runs_block_is_found():
    assert len(LINES) >= 5, LINES
    assert all(line.split("#")[0].split()[-1] != "\\" for line in LINES), "continued lines are not supported"


def test_shortening_keeps_the_scoped_shape():
    """A growth per step (0.001 growing 0.4%/step ends near 0.4 at step 1500) barely couples a
    shortened run: it is told to end where the full run ends, and then needs no schedule note.
    The default schedule is relative to the run already: shortened as it is, with no note."""
    full = ["coupling=tanh", "coupling.eta_growth=0.004", "train.steps=1500"]
    extra = shortening(full)
    final = [o for o in extra if o.startswith("coupling.eta_final=")]
    assert len(final) == 1 and float(final[0].split("=")[1]) == pytest.approx(0.001 * 1.004**1499)
    cfg, _ = load_config(["coupling=tanh", "train.steps=1500", *extra])
    assert schedule_note(cfg.coupling, cfg.train.steps) is None
    without, _ = load_config([*full[:2], f"train.steps={SHORT_STEPS}"])
    assert schedule_note(without.coupling, SHORT_STEPS) is not None
    default = shortening(["coupling=tanh", "train.steps=1500"])
    assert not [o for o in default if o.startswith("coupling.eta_final=")]
    short_default, _ = load_config(["coupling=tanh", *default])
    assert short_default.coupling.eta_end == 0.4
    assert schedule_note(short_default.coupling, short_default.train.steps) is None


@pytest.mark.parametrize("line", LINES, ids=[f"line{i}" for i in range(1, len(LINES) + 1)])
@pytest.mark.slow
def test_readme_line_trains(line, tmp_path):
    env_words, overrides = parse(line)
    run_dir = tmp_path / "run"
    extra = shortening(overrides)
    env = {
        **os.environ,
        "NPROC": "2",
        **env_words,
        "RUN_DIR": str(run_dir),
        # launch/run.sh finds torchrun (or python) on PATH: the interpreter running the tests.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(
        [str(REPO / "launch" / "run.sh"), *overrides, *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg, _ = load_config([*overrides, *extra])
    assert summary["steps"] == cfg.train.steps
    assert summary["world_size"] == int(env["NPROC"])
    assert summary["coupling"] == cfg.coupling.name
    coupled = cfg.coupling.name != "none"
    c = cfg.coupling
    if "eta" in FORM_SETTINGS[c.name] and c.eta_end is not None:
        # The run-relative schedule, read back as logged: eta * (end/eta)^((t-1)/(T-1)), end being
        # eta_final or, unset, min(0.4, eta_max) (never below eta).
        end = c.eta_final if c.eta_final is not None else max(c.eta, min(0.4, c.eta_max))
        logged = scalar(run_dir / "tb" / "replica_0", "coupling/eta")
        T = cfg.train.steps
        expected = {t: min(c.eta_max, c.eta * (end / c.eta) ** ((t - 1) / (T - 1))) for t in logged}
        assert logged == pytest.approx(expected, rel=1e-5) and T in logged, logged
    # The mean of independent replicas is no network anyone trained: judged only when coupled.
    judged = {f"replica {r['replica']}": r for r in summary["replicas"]}
    judged["ensemble"] = summary["ensemble"]
    if coupled:
        judged["center"] = summary["center"]

    if summary["task"] == "classification":
        chance = 1 / num_classes(run_dir)
        # "Better than chance" with room: at least halfway from chance to every test sample right.
        floor = chance + (1 - chance) / 2
        accuracy = {who: m["test_accuracy"] for who, m in judged.items()}
        assert all(a >= floor for a in accuracy.values()), f"{line}: {accuracy} (floor {floor:.3f})"
        if coupled:
            ensemble = summary["ensemble"]["test_accuracy"]
            assert summary["center"]["test_accuracy"] >= ensemble - CENTER_BELOW_ENSEMBLE, (
                f"{line}: {accuracy}"
            )
    else:
        # Regression (the note's random targets): no accuracy, but the test loss must be finite
        # and fall from the first evaluation to the last, for every replica and the center.
        for who, m in judged.items():
            assert math.isfinite(m["test_loss"]), f"{line}: {who} {m}"
        for tb in [f"replica_{r}" for r in range(summary["world_size"])] + (["center"] if coupled else []):
            losses = scalar(run_dir / "tb" / tb, "test/loss")
            first, last = losses[min(losses)], losses[max(losses)]
            assert max(losses) == cfg.train.steps and len(losses) >= 2, losses
            assert math.isfinite(last) and last < first, f"{line}: {tb} test/loss {losses}"
