"""ReplicaCoupling in a user's own loop is safe by default: a non-finite value ends the loop
within check_every steps on every rank with no agree/observe call (the README's loop under
torchrun, and in gloo worlds), finish() reads back the last steps, a GradScaler's overflow
skips only that replica's optimizer step (against PyTorch's own GradScaler on replicas in one
process), eta is constant unless asked, and misuse is one CouplingError naming the argument."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_runs import REPO, user_env
from worlds import run_world

from replica_dist import CouplingError, ReplicaCoupling, dist
from replica_dist.config import load_config
from replica_dist.coupling import DEFAULT_CHECK_EVERY, eta_at
from replica_dist.guard import NonFiniteError

# ---- the README's loop, through torchrun


def readme_loop() -> str:
    """The first python block of the README's section on the user's own loop."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Coupling for your own training loop") :]
    return section[section.index("```python\n") + len("```python\n") :].split("```", 1)[0]


NAN_LINE = "    x = torch.randn(32, 8); y = torch.sin(x.sum(1, keepdim=True))\n"

RECORD = """import sys as _sys


def _record(kind, value, traceback):
    # Where each rank's loop ended, and with what: written by the test, not part of the loop.
    with open(f"{_OUT}/rank{dist.get_rank()}.txt", "w") as out:
        out.write(f"{coupling.step_count}\\n{kind.__name__}: {value}\\n")
    _sys.__excepthook__(kind, value, traceback)


_sys.excepthook = _record
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_the_readmes_loop_stops_on_every_rank_within_check_every_steps_of_a_nan(tmp_path):
    loop = readme_loop()
    assert NAN_LINE in loop and "agree" not in loop and "observe" not in loop
    # One NaN in replica 1's batch at step 50 (the loop counts from 0).
    loop = loop.replace(
        NAN_LINE, NAN_LINE + "    if dist.get_rank() == 1 and step == 49:\n        x[0, 0] = float('nan')\n"
    )
    script = tmp_path / "readme_loop.py"
    script.write_text(f"_OUT = {str(tmp_path)!r}\n{RECORD}\n{loop}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    for rank in range(2):
        step, message = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert message.startswith("NonFiniteError: non-finite loss in replica 1 at step 50 "), (rank, message)
        assert 50 <= int(step) < 50 + DEFAULT_CHECK_EVERY, (rank, step)


# ---- the periodic read back and finish(), in gloo worlds


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1000 * step + rank))
    return x, x.sum(1, keepdim=True)


def _build(
    rank: int, form: str, **settings
) -> tuple[torch.nn.Module, torch.optim.Optimizer, ReplicaCoupling]:
    torch.manual_seed(rank)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    return model, optimizer, ReplicaCoupling(model, optimizer, form, **settings)


def _train(model, optimizer, coupling: ReplicaCoupling, rank: int, steps: int, nan_at: int = 0) -> None:
    """A plain loop (two calls a step, no agree or observe) up to step `steps`, with a NaN in
    replica 1's batch at step `nan_at`."""
    while coupling.step_count < steps:
        x, y = _batch(rank, coupling.step_count + 1)
        if rank == 1 and coupling.step_count + 1 == nan_at:
            x[0, 0] = float("nan")
        coupling.begin_step()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        coupling.step(loss)


def _loop(rank: int, form: str, steps: int, nan_at: int, finish: bool, **settings) -> tuple[int, str]:
    """_train and, with `finish`, finish(): where it ended (step_count) and how ("ok" or the
    error's type and message)."""
    model, optimizer, coupling = _build(rank, form, **settings)
    try:
        _train(model, optimizer, coupling, rank, steps, nan_at)
        if finish:
            coupling.finish()
    except NonFiniteError as err:
        return coupling.step_count, f"{type(err).__name__}: {err}"
    return coupling.step_count, f"ok, clean={coupling.clean}"


CASES = {
    # name: (form, steps, nan_at, finish, settings, expected end step, expected outcome)
    "none every 10": ("none", 30, 13, False, {"check_every": 10}, 20, "replica 1 at step 13"),
    "tanh every 10": ("tanh", 30, 13, False, {"check_every": 10}, 20, "replica 1 at step 13"),
    "tanh sync, NaN on a check step": (
        "tanh",
        30,
        20,
        False,
        {"check_every": 10, "overlap": False},
        20,
        "replica 1 at step 20",
    ),
    "average every 4, default check": ("average", 30, 3, True, {"every": 4}, 30, "replica 1 at step 3"),
    "finish after the last check": ("tanh", 25, 23, True, {"check_every": 10}, 25, "replica 1 at step 23"),
    "never by itself, finish": ("none", 25, 5, True, {"check_every": 0}, 25, "replica 1 at step 5"),
    "clean loop": ("tanh", 25, 0, True, {"check_every": 10}, 25, "ok, clean=True"),
}


def _periodic(rank: int, world_size: int, out: str) -> None:
    lines = []
    for name, (form, steps, nan_at, finish, settings, *_) in CASES.items():
        step, outcome = _loop(rank, form, steps, nan_at, finish, **settings)
        lines.append(f"{name}|{step}|{outcome}")
    Path(out, f"rank{rank}.txt").write_text("\n".join(lines))


def test_a_nan_ends_every_rank_at_the_next_check_or_at_finish(tmp_path):
    run_world(_periodic, 2, str(tmp_path))
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        for line, (name, (*_, end, outcome)) in zip(lines, CASES.items(), strict=True):
            got_name, step, message = line.split("|")
            assert (got_name, int(step)) == (name, end), (rank, line)
            if outcome.startswith("ok"):
                assert message == outcome, (rank, line)
            else:
                assert message.startswith(f"NonFiniteError: non-finite loss in {outcome} "), (rank, line)


# ---- GradScaler, against PyTorch's own on replicas in one process

SCALER_STEPS, OVERFLOW_STEP, ETA = 6, 3, 0.05


def _scaler_model(rank: int) -> torch.nn.Module:
    torch.manual_seed(rank)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _overflow(model: torch.nn.Module, replica: int, step: int) -> None:
    """An fp16 overflow, as the scaled gradients hold one: in replica 1 only, at OVERFLOW_STEP."""
    if replica == 1 and step == OVERFLOW_STEP:
        model[0].weight.grad[0, 0] = float("inf")


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _scaled_loop(rank: int, world_size: int, out: str) -> None:
    for policy in ("stop", "skip"):
        model = _scaler_model(rank)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        coupling = ReplicaCoupling(model, optimizer, "tanh", eta=ETA, nonfinite=policy)
        scaler = torch.amp.GradScaler("cpu")
        weights, scales, applied = [], [], []
        for step in range(1, SCALER_STEPS + 1):
            x, y = _batch(rank, step)
            coupling.begin_step()
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            _overflow(model, rank, step)
            applied.append(bool(coupling.step(loss, scaler=scaler)))
            scaler.update()
            weights.append(_flat(model))
            scales.append(scaler.get_scale())
        coupling.finish()  # raises if the guard had counted the overflow (stop)
        torch.save(
            {
                "weights": torch.stack(weights),
                "scales": scales,
                "applied": applied,
                "skipped": coupling.guard.skipped_steps,
                "clean": coupling.clean,
            },
            Path(out, f"{policy}.rank{rank}.pt"),
        )


def _reference() -> tuple[list[torch.Tensor], list[list[float]]]:
    """Two replicas in one process, each with PyTorch's GradScaler.step (which leaves out the
    step of an overflow), pulled by eta*tanh(mean - w) from the weights before every step:
    per replica, its weights after each step and its scale."""
    models = [_scaler_model(r) for r in range(2)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    scalers = [torch.amp.GradScaler("cpu") for _ in models]
    weights, scales = [[], []], [[], []]
    for step in range(1, SCALER_STEPS + 1):
        before = [_flat(m).clone() for m in models]
        mean = (before[0] + before[1]) / 2
        for r, (model, optimizer, scaler) in enumerate(zip(models, optimizers, scalers)):
            x, y = _batch(r, step)
            optimizer.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            _overflow(model, r, step)
            scaler.step(optimizer)
            scaler.update()
            scales[r].append(scaler.get_scale())
        for r, model in enumerate(models):
            pull = ETA * torch.tanh(mean - before[r])
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(_flat(model) + pull, model.parameters())
            weights[r].append(_flat(model).clone())
    return [torch.stack(w) for w in weights], scales


def test_a_gradscaler_overflow_skips_that_replicas_optimizer_step_only(tmp_path):
    run_world(_scaled_loop, 2, str(tmp_path))
    expected_weights, expected_scales = _reference()
    # The reference itself: the scale halves on replica 1 at the overflow only.
    assert expected_scales[0] == [65536.0] * SCALER_STEPS
    assert expected_scales[1] == [65536.0] * (OVERFLOW_STEP - 1) + [32768.0] * (
        SCALER_STEPS - OVERFLOW_STEP + 1
    )
    for policy in ("stop", "skip"):
        for rank in range(2):
            got = torch.load(tmp_path / f"{policy}.rank{rank}.pt")
            assert got["scales"] == expected_scales[rank], (policy, rank)
            # The guard let every step through and counted none.
            assert got["applied"] == [True] * SCALER_STEPS, (policy, rank)
            assert (got["skipped"], got["clean"]) == (0, True), (policy, rank)
            torch.testing.assert_close(got["weights"], expected_weights[rank], atol=1e-6, rtol=0)
    # Replica 1's step 3 is the pull alone: its weights moved by exactly eta*tanh(mean - w).
    ref = [torch.load(tmp_path / f"stop.rank{r}.pt")["weights"] for r in range(2)]
    before = [ref[0][OVERFLOW_STEP - 2], ref[1][OVERFLOW_STEP - 2]]
    pull = ETA * torch.tanh((before[0] + before[1]) / 2 - before[1])
    torch.testing.assert_close(ref[1][OVERFLOW_STEP - 1], before[1] + pull, atol=1e-7, rtol=0)
    assert not torch.allclose(
        ref[0][OVERFLOW_STEP - 1], before[0] + ETA * torch.tanh((before[0] + before[1]) / 2 - before[0])
    )


# ---- defaults and misuse


def _eta_of_the_object(rank: int, world_size: int, out: str) -> None:
    results = []
    for settings in (
        {"eta": 0.02},
        {"eta": 0.02, "eta_growth": 0.004},
        {"eta": 0.02, "eta_final": 0.4, "steps": 200},
    ):
        model, optimizer, coupling = _build(rank, "tanh", **settings)
        _train(model, optimizer, coupling, rank, 100)
        results.append(coupling.eta)
    torch.save(results, Path(out, "eta.pt"))


def test_eta_is_constant_unless_a_schedule_is_asked_for(tmp_path):
    run_world(_eta_of_the_object, 1, str(tmp_path))
    constant, growing, to_final = torch.load(tmp_path / "eta.pt")
    assert constant == 0.02
    assert growing == pytest.approx(0.02 * 1.004**99, rel=1e-12)
    assert to_final == pytest.approx(0.02 * (0.4 / 0.02) ** (99 / 199), rel=1e-12)


BAD_ARGUMENTS = [
    (("linear",), {"temperature": 0.5}, "temperature="),
    (("average",), {"eta": 0.1}, "eta="),
    (("diloco",), {"via_optimizer": True}, "via_optimizer="),
    (("tanh",), {"outer_lr": 0.5}, "outer_lr="),
    (("none",), {"every": 3}, "every="),
    (("tanh",), {"eta": -1.0}, "eta="),
    (("tanh",), {"eta": 0.5, "eta_max": 0.1}, "eta_max="),
    (("linear",), {"eta_max": 2.0}, "eta_max="),
    (("tanh",), {"eta_final": 5.0, "steps": 10}, "eta_final="),
    (("tanh",), {"eta_growth": -0.1}, "eta_growth="),
    (("tanh",), {"temperature": 0.0}, "temperature="),
    (("tanh",), {"every": 0}, "every="),
    (("tanh",), {"every": 4, "fragments": 3}, "fragments="),
    (("diloco",), {"outer_momentum": 1.0}, "outer_momentum="),
    (("tanh",), {"nonfinite": "ignore"}, "nonfinite"),
    (("tanh",), {"max_consecutive_skips": 0}, "max_consecutive_skips="),
    (("tanh",), {"check_every": -5}, "check_every="),
    (("tanh",), {"compress": "zip"}, "compress="),
    (("none",), {"compress": "int8"}, "compress="),
    (("tanh",), {"compress": "int8", "compress_chunk": 0}, "compress_chunk="),
    (("tanh",), {"error_feedback": True}, "error_feedback="),
    (("tanh",), {"etta": 0.1}, "etta"),
    (("elastic",), {}, "form"),
]


@pytest.mark.parametrize(("args", "kwargs", "argument"), BAD_ARGUMENTS, ids=lambda v: str(v))
def test_each_bad_argument_is_a_coupling_error_naming_it(args, kwargs, argument):
    # Refused before anything communicates: no process group is needed.
    model = torch.nn.Linear(4, 1)
    with pytest.raises(CouplingError) as caught:
        ReplicaCoupling(model, torch.optim.SGD(model.parameters(), lr=0.1), *args, **kwargs)
    message = str(caught.value)
    assert re.search(rf"(^|[ (]){re.escape(argument)}", message), message
    assert "coupling." not in message and "guard." not in message and "dist." not in message, message
    assert "\n" not in message


def _misuse_of_the_end_and_the_scaler(rank: int, world_size: int, out: str) -> None:
    model, optimizer, coupling = _build(rank, "tanh", eta=0.1)
    scaler = torch.amp.GradScaler("cpu")
    messages = []
    for forgets_update in (False, True, False):
        coupling.begin_step()
        loss = torch.nn.functional.mse_loss(model(_batch(rank, 1)[0]), _batch(rank, 1)[1])
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        try:
            coupling.finish()
        except CouplingError as err:
            messages.append(str(err))
        try:
            coupling.step(loss, scaler=scaler)
        except CouplingError as err:
            messages.append(str(err))
        if not forgets_update:
            scaler.update()
    messages.append(f"{coupling.step_count} steps taken")  # the refused one is not counted
    Path(out, "messages.txt").write_text("\n".join(messages))


def test_finish_inside_a_step_and_a_scaler_never_updated_are_coupling_errors(tmp_path):
    run_world(_misuse_of_the_end_and_the_scaler, 1, str(tmp_path))
    assert (tmp_path / "messages.txt").read_text().splitlines() == [
        "finish() called between begin_step() and step(): call step() first",
        "finish() called between begin_step() and step(): call step() first",
        "finish() called between begin_step() and step(): call step() first",
        "step(loss, scaler=) again before scaler.update(): call scaler.update() after each step",
        "2 steps taken",
    ]


def _trainers_coupling(rank: int, world_size: int, out: str) -> None:
    cfg, _ = load_config(["coupling=tanh", "coupling.eta=0.1", "train.steps=300"])
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    coupling = ReplicaCoupling.from_config(cfg, dist.init_mesh(1, torch.device("cpu")), model, optimizer)
    same = [coupling.form.scale(t) for t in (1, 150, 300)] == [
        eta_at(cfg.coupling, t, 300) for t in (1, 150, 300)
    ]
    torch.save({"check_every": coupling.check_every, "same": same}, Path(out, "t.pt"))


def test_the_trainers_coupling_keeps_its_schedule_and_its_own_read_backs(tmp_path):
    # The trainer reads back on its logging and checkpoint steps (log.every bounds the lag) and
    # its eta grows by coupling.eta_growth: from_config adds no read back and keeps the schedule.
    run_world(_trainers_coupling, 1, str(tmp_path))
    assert torch.load(tmp_path / "t.pt") == {"check_every": 0, "same": True}
