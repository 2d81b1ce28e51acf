"""A coupling form of one's own, defined here and nowhere in the package: trained through
ReplicaCoupling in a 2-process gloo world and through the trainer (coupling._target_ under
torchrun), each equal to a plain one-process loop of its rule to 1e-6."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from replica_dist import CouplingError, ReplicaCoupling
from replica_dist.config import ConfigError, load_config
from replica_dist.data import ReplicaBatches, load_dataset, replica_indices
from replica_dist.evaluate import LOSSES
from replica_dist.forms import PullForm
from replica_dist.loop import build_optimizer, replica_seed
from replica_dist.model import build_model


class Clamped(PullForm):
    """Every k steps, a pull of `rate` times the gap to the mean, each weight's gap clamped to
    [-cap, cap]: a rule no built-in form has."""

    def __init__(self, k: int = 3, rate: float = 0.25, cap: float = 0.02):
        self.k, self.rate, self.cap = k, rate, cap

    def coupled_at(self, step: int) -> bool:
        return step % self.k == 0

    def pull(self, w: torch.Tensor, mean: torch.Tensor, step: int) -> torch.Tensor:
        return self.rate * torch.clamp(mean - w, -self.cap, self.cap)


RULE = {"k": 3, "rate": 0.25, "cap": 0.02}
COMMON = ["train.steps=16", "train.batch_size=16", "model.hidden=[32]", "seed=5"]
TARGET = [
    "coupling._target_=tests.test_own_form.Clamped",
    *(f"coupling.{key}={value}" for key, value in RULE.items()),
]


def _replica(cfg, rank: int, world_size: int):
    """A replica's model, optimizer and batches, built as the trainer builds them."""
    data = load_dataset(cfg.data, cfg.seed, torch.float32)
    model = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, rank))
    mine = replica_indices(cfg.data, len(data.x_train), cfg.seed, rank, world_size)
    batches = ReplicaBatches(data.x_train[mine], data.y_train[mine], cfg.train.batch_size, cfg.seed, rank)
    return model, build_optimizer(cfg.optim, model.parameters()), batches, LOSSES[data.loss]


def _weights(model) -> list[torch.Tensor]:
    return [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]


def one_process_reference(cfg, world_size: int) -> list[dict[str, torch.Tensor]]:
    """The rule by hand, every replica in this process: each step every replica takes its
    optimizer step, then on every k-th step moves by rate*clamp(mean - w) with w and the mean
    from before the step."""
    replicas = [_replica(cfg, r, world_size) for r in range(world_size)]
    for step in range(1, cfg.train.steps + 1):
        before = [[t.detach().clone() for t in _weights(model)] for model, *_ in replicas]
        mean = [torch.stack(ts).mean(0) for ts in zip(*before)]
        for model, optimizer, batches, loss_fn in replicas:
            x, y = batches.next()
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        if step % RULE["k"] == 0:
            with torch.no_grad():
                for (model, *_), own in zip(replicas, before):
                    for t, w, m in zip(_weights(model), own, mean):
                        t.add_(RULE["rate"] * torch.clamp(m - w, -RULE["cap"], RULE["cap"]))
    return [model.state_dict() for model, *_ in replicas]


def _assert_equal_to_reference(actual: list[dict], expected: list[dict]) -> None:
    for r, (got, want) in enumerate(zip(actual, expected)):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(
                got[name], want[name], atol=1e-6, rtol=0, msg=lambda m, r=r, n=name: f"{r} {n}: {m}"
            )


@pytest.fixture(scope="module")
def reference():
    cfg, _ = load_config(COMMON)
    return one_process_reference(cfg, 2)


def _user_loop(rank: int, world_size: int, root: str) -> None:
    cfg, _ = load_config(COMMON)
    model, optimizer, batches, loss_fn = _replica(cfg, rank, world_size)
    coupling = ReplicaCoupling(model, optimizer, Clamped(**RULE))
    for _ in range(cfg.train.steps):
        coupling.begin_step()
        x, y = batches.next()
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        coupling.step(loss)
    coupling.finish()
    torch.save(model.state_dict(), Path(root) / f"replica_{rank}.pt")


def test_a_form_of_ones_own_through_replica_coupling_equals_its_rule_by_hand(tmp_path, reference):
    from worlds import run_world  # here: the trainer's workers import this module for its form alone

    run_world(_user_loop, 2, str(tmp_path))
    actual = [torch.load(tmp_path / f"replica_{r}.pt") for r in range(2)]
    _assert_equal_to_reference(actual, reference)
    # The pull moved the replicas: they are not where plain training leaves them.
    cfg, _ = load_config(COMMON)
    apart = one_process_reference_without_coupling(cfg)
    assert any(not torch.allclose(actual[0][n], apart[0][n]) for n in apart[0])


def one_process_reference_without_coupling(cfg) -> list[dict[str, torch.Tensor]]:
    replicas = [_replica(cfg, r, 2) for r in range(2)]
    for _ in range(cfg.train.steps):
        for model, optimizer, batches, loss_fn in replicas:
            x, y = batches.next()
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
    return [model.state_dict() for model, *_ in replicas]


@pytest.mark.e2e
def test_a_form_of_ones_own_through_the_trainer_equals_its_rule_by_hand(tmp_path, reference):
    from trainer_runs import replica_weights, torchrun

    run_dir = tmp_path / "run"
    done = torchrun(2, *COMMON, *TARGET, "log.every=8", "eval.every=8", f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_equal_to_reference(replica_weights(run_dir, 2), reference)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["coupling"] == "Clamped"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [*TARGET, "coupling.eta=0.1"],
            "coupling.eta is a setting of the built-in forms, not of coupling._target_=",
        ),
        ([*TARGET, "coupling.kk=2"], "got an unexpected keyword argument 'kk'"),
        (["coupling._target_=tests.test_own_form.RULE"], "not a class or function"),
        (
            [*TARGET, "dist.compress=int8", "coupling=none"],
            "coupling=none is a setting of the built-in forms",
        ),
    ],
)
def test_a_bad_form_of_ones_own_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_form_object_takes_no_schedule_arguments():
    model = torch.nn.Linear(2, 1)
    with pytest.raises(CouplingError, match=r"^eta= is a setting of a built-in form by name; Clamped takes"):
        ReplicaCoupling(model, torch.optim.SGD(model.parameters(), lr=0.1), Clamped(), eta=0.1)


def test_the_package_names_no_form_of_its_own_outside_its_forms():
    """The form modules, reference.py and the configs may name the built-in forms; the rest
    of the package looks them up (replica_dist.forms.FORMS) and never compares a name."""
    import re

    from replica_dist.forms import FORMS

    names = "|".join(name for name in FORMS if name != "none")  # "none" is also a dist.compress value
    quoted = re.compile(rf"""["']({names})["']""")
    allowed = {"reference.py"}
    offenders = []
    package = Path(__file__).resolve().parent.parent / "replica_dist"
    for path in package.rglob("*.py"):
        relative = path.relative_to(package)
        if relative.parts[0] in ("forms", "experiments") or path.name in allowed:
            continue
        offenders += [
            f"{relative}:{n}"
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if quoted.search(line)
            and "Activation" not in line
            and "nn.Tanh" not in line  # tanh, the activation
        ]
    assert offenders == []


@pytest.mark.e2e
def test_the_readmes_form_trains_through_the_console_command_from_the_users_directory(tmp_path):
    """The README's form, saved as my_forms.py in the directory a user launches from, named on
    the installed command's line as the README shows."""
    import re
    import subprocess
    import sys

    from worlds import COLLECTIVE_TIMEOUT_S

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### A coupling form of your own", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(
        r"\nlaunch/run\.sh (--nproc 2 coupling\._target_=my_forms\.Clamped[^\n]*)\n", section
    ).group(1)
    (tmp_path / "my_forms.py").write_text(code)
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "replica-dist"),
            *command.split(),
            "train.steps=12",
            "log.every=6",
            f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = tmp_path.glob("runs/*/summary.json")
    assert json.loads(summary.read_text())["coupling"] == "Clamped"
