"""Non-finite values: never applied, and decided by every rank in the same step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from worlds import COLLECTIVE_TIMEOUT_S, run_world

from replica_dist import dist, loop
from replica_dist.data import ReplicaBatches
from replica_dist.guard import Guard
from replica_dist.config import load_config
from runs import events, replica_weights


def test_decide_stop_names_every_bad_replica_and_its_step():
    guard = Guard("stop")
    with pytest.raises(FloatingPointError, match=r"replica 1 at step 5, replica 3 at step 4"):
        guard.decide(5, torch.tensor([[0.0, 0], [5, 0], [0, 0], [4, 0]]))


def test_decide_skip_skips_only_a_bad_value_of_this_step():
    guard = Guard("skip")
    assert guard.decide(5, torch.tensor([[0.0, 0], [5, 0]])) is False
    assert guard.decide(8, torch.tensor([[0.0, 0], [5, 0]])) is True  # step 5 was skipped by replica 1 alone
    assert guard.decide(9, torch.tensor([[0.0, 0], [0, 0]])) is True
    assert not guard.stop_agreed
    guard.decide(10, torch.tensor([[0.0, 0], [0, 1]]))
    assert guard.stop_agreed


def test_inspect_reports_the_first_non_finite_step_until_shared():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    assert guard.inspect(3, torch.tensor(1.0), layer.parameters(), [])
    layer.weight.grad[0, 0] = float("inf")
    assert not guard.inspect(4, torch.tensor(1.0), layer.parameters(), [])
    assert not guard.inspect(5, torch.tensor(float("nan")), layer.parameters(), [])
    word = guard.word()
    assert word == [4.0, 0.0]
    assert guard.word() == [0.0, 0.0]  # reported once: the exchange that carries it decides
    assert not guard.inspect(6, torch.tensor(float("nan")), layer.parameters(), [])
    guard.decide(6, torch.tensor([word]))  # the decision on step 4 keeps step 6 for the next word
    assert guard.word() == [6.0, 0.0]


def test_inspect_is_exact_when_a_sum_of_finite_values_overflows():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    large = torch.full((4,), 3e38)  # each finite; their float32 sum is inf
    assert guard.inspect(8, torch.tensor(1.0), layer.parameters(), [large])
    large[2] = float("-inf")
    assert not guard.inspect(9, torch.tensor(1.0), layer.parameters(), [large])
    with torch.no_grad():
        layer.weight[0, 1] = float("nan")
    assert not guard.inspect(10, torch.tensor(1.0), layer.parameters(), [])
    assert guard.word() == [9.0, 0.0]


def test_inspect_sees_a_non_finite_batchnorm_statistic():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    running_var = torch.tensor([1.0, float("inf")])
    assert not guard.inspect(7, torch.tensor(1.0), layer.parameters(), [running_var])
    assert guard.word() == [7.0, 0.0]


def test_skip_gives_up_after_too_many_bad_steps_in_a_row():
    guard = Guard("skip", max_consecutive_skips=3)
    bad = torch.tensor([[0.0, 0], [1, 0]])
    assert guard.decide(1, bad) is False
    assert guard.decide(1, torch.tensor([[0.0, 0], [0, 0]])) is True  # a second exchange in step 1
    guard.decide(2, torch.tensor([[0.0, 0], [0, 0]]))  # a good step resets the count
    guard.decide(3, torch.tensor([[0.0, 0], [3, 0]]))
    guard.decide(4, torch.tensor([[0.0, 0], [4, 0]]))
    with pytest.raises(FloatingPointError, match=r"3 communicating steps in a row.*replica 1 at step 5"):
        guard.decide(5, torch.tensor([[0.0, 0], [5, 0]]))


def test_guard_state_survives_a_checkpoint():
    guard = Guard("skip")
    guard.unreported_bad_step, guard.skipped_steps, guard.consecutive_skips = 9, 2, 1
    restored = Guard("skip")
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == {"unreported_bad_step": 9, "skipped_steps": 2, "consecutive_skips": 1}


# ---- a NaN injected into replica 1's batch at step 5, in a real 2-process world

COMMON = [
    "train.steps=12",
    "train.batch_size=16",
    "model.hidden=[16]",
    "eval.every=100",
    "checkpoint.every=2",
    "checkpoint.keep=10",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]


def _train_with_nan(rank: int, world_size: int, run_dir: str, overrides: list[str]) -> None:
    if rank == 1:
        original, calls = ReplicaBatches.next, [0]

        def poisoned_next(self):
            calls[0] += 1
            x, y = original(self)
            return (x * float("nan"), y) if calls[0] == 5 else (x, y)

        ReplicaBatches.next = poisoned_next
    cfg, _ = load_config(COMMON + overrides + [f"hydra.run.dir={run_dir}"])
    try:
        loop.train(cfg, Path(run_dir), torch.device("cpu"))
    except FloatingPointError as err:
        (Path(run_dir) / f"error.rank{rank}.json").write_text(
            json.dumps({"step": dist._step, "message": str(err)})
        )


def _errors(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"error.rank{r}.json").read_text()) for r in range(2)]


def _checkpoints_finite(run_dir: Path) -> list[int]:
    steps = []
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        for r in range(2):
            state = torch.load(folder / f"replica-{r}.pt", weights_only=True)
            assert all(torch.isfinite(t).all() for t in state["model"].values()), folder
        steps.append(int(folder.name.split("-")[1]))
    return steps


SYNC, OVERLAP = "dist.overlap=false", "dist.overlap=true"


# Overlapped, step 5's all_reduce started before its NaN existed: step 6's carries the news.
@pytest.mark.parametrize(("mode", "stop_step"), [(SYNC, 5), (OVERLAP, 6)])
def test_stop_every_rank_stops_in_the_same_step_naming_the_replica(tmp_path, mode, stop_step):
    run_world(_train_with_nan, 2, str(tmp_path), ["coupling=tanh", "guard.nonfinite=stop", mode])
    errors = _errors(tmp_path)
    assert errors[0] == errors[1]
    assert errors[0]["step"] == stop_step and "replica 1 at step 5" in errors[0]["message"]
    assert _checkpoints_finite(tmp_path) == [2, 4]
    assert not (tmp_path / "summary.json").exists()


def _skipped_and_rates(run_dir: Path, replica: int) -> tuple[list[float], dict[int, float]]:
    tb = events(run_dir / "tb" / f"replica_{replica}")
    skipped = {e.step: e.value for e in tb.Scalars("guard/skipped_steps")}
    return [skipped[s] for s in range(1, 13)], {e.step: e.value for e in tb.Scalars("rate/fc1.weight")}


def test_skip_every_rank_skips_the_same_step(tmp_path):
    run_world(
        _train_with_nan, 2, str(tmp_path), ["coupling=tanh", "guard.nonfinite=skip", "log.every=1", SYNC]
    )
    for r in range(2):
        skipped, rate = _skipped_and_rates(tmp_path, r)
        assert skipped == [0] * 4 + [1] * 8
        assert rate[5] == 0.0 and rate[4] > 0 and rate[6] > 0  # no update of any kind at step 5
    assert _checkpoints_finite(tmp_path) == [2, 4, 6, 8, 10]
    for weights in replica_weights(tmp_path, 2):
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_overlapped_skip_only_the_replica_that_saw_it_skips(tmp_path):
    run_world(
        _train_with_nan, 2, str(tmp_path), ["coupling=tanh", "guard.nonfinite=skip", "log.every=1", OVERLAP]
    )
    skipped, rate = _skipped_and_rates(tmp_path, 1)
    assert skipped == [0] * 4 + [1] * 8
    assert rate[5] == 0.0 and rate[4] > 0 and rate[6] > 0
    skipped, rate = _skipped_and_rates(tmp_path, 0)
    assert skipped == [0] * 12 and rate[5] > 0  # replica 0 had applied step 5 before it knew
    assert _checkpoints_finite(tmp_path) == [2, 4, 6, 8, 10]
    for weights in replica_weights(tmp_path, 2):
        assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_independent_replicas_decide_at_the_next_communicating_step(tmp_path, policy):
    # coupling=none talks only on logging (every 4) and checkpoint (every 2) steps: step 6 here.
    run_world(
        _train_with_nan, 2, str(tmp_path), ["coupling=none", f"guard.nonfinite={policy}", "log.every=4"]
    )
    if policy == "stop":
        errors = _errors(tmp_path)
        assert errors[0] == errors[1] and errors[0]["step"] == 6
        assert "replica 1 at step 5" in errors[0]["message"]
        assert _checkpoints_finite(tmp_path) == [2, 4]
    else:
        skipped = [
            {e.step: e.value for e in events(tmp_path / "tb" / f"replica_{r}").Scalars("guard/skipped_steps")}
            for r in range(2)
        ]
        assert skipped[0][12] == 0 and skipped[1][12] == 1  # only replica 1 skipped its own step 5
        assert _checkpoints_finite(tmp_path) == [2, 4, 6, 8, 10]


@pytest.mark.parametrize("mode", [SYNC, OVERLAP])
def test_no_checkpoint_is_written_at_a_step_that_saw_a_non_finite_value(tmp_path, mode):
    # The NaN reaches replica 1 at its 5th batch; with checkpoint.every=5 that step is skipped
    # everywhere and its checkpoint is not written, while the ones around it are.
    run_world(
        _train_with_nan,
        2,
        str(tmp_path),
        ["coupling=tanh", "guard.nonfinite=skip", "checkpoint.every=5", "log.every=100", mode],
    )
    assert _checkpoints_finite(tmp_path) == [10]
    assert not (tmp_path / "checkpoints" / "step-00000005").exists()
