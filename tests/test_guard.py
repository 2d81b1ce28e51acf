"""Non-finite values: never applied, and decided by every rank in the same step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from trainer_runs import events, replica_weights
from worlds import COLLECTIVE_TIMEOUT_S, run_world

from replica_dist import loop
from replica_dist.config import load_config
from replica_dist.coupling import ReplicaCoupling
from replica_dist.data import ReplicaBatches
from replica_dist.errors import RunError
from replica_dist.guard import Guard, NonFiniteError, SkipLimitError


def _words(*rows: list[float]) -> torch.Tensor:
    """A table of words: [first bad step, its kind, stop?, skips in a row, latest bad step]."""
    return torch.tensor([list(map(float, row)) for row in rows])


CLEAN = [0, 0, 0, 0, 0]
LOSS, WEIGHT, BUFFER, GRADIENT = 1, 2, 3, 4


def _decide(guard: Guard, step: int, words: torch.Tensor) -> bool:
    """The device decision on one exchange of words, read back as a logging or checkpoint
    step reads it (where the run ends, if it must)."""
    apply = guard.decide(step, words)
    guard.read_back(step)
    return bool(apply)


def test_decide_stop_names_what_every_bad_replica_saw_its_step_and_what_to_try():
    guard = Guard("stop")
    with pytest.raises(NonFiniteError) as caught:
        _decide(guard, 5, _words(CLEAN, [5, LOSS, 0, 1, 5], CLEAN, [4, GRADIENT, 0, 2, 5]))
    assert str(caught.value) == (
        "non-finite loss in replica 1 at step 5, non-finite gradient in replica 3 at step 4 "
        "(guard.nonfinite=stop); try a lower optim.lr, or set guard.nonfinite=skip to skip such steps"
    )
    assert isinstance(caught.value, RunError) and caught.value.exit_status == 1


def test_decide_skip_skips_only_a_bad_value_of_this_step():
    guard = Guard("skip")
    assert _decide(guard, 5, _words(CLEAN, [5, LOSS, 0, 1, 5])) is False
    assert not guard.all_clean
    assert (
        _decide(guard, 8, _words(CLEAN, [5, LOSS, 0, 1, 5])) is True
    )  # step 5 was skipped by replica 1 alone
    assert guard.all_clean
    # Replica 1 computed alone from step 5 on: its first bad step is old, its latest is this one.
    assert _decide(guard, 9, _words(CLEAN, [5, LOSS, 0, 2, 9])) is False
    assert _decide(guard, 10, _words(CLEAN, CLEAN)) is True
    assert not guard.stop_agreed
    _decide(guard, 11, _words(CLEAN, [0, 0, 1, 0, 0]))
    assert guard.stop_agreed


def test_a_second_exchange_in_a_step_adds_and_resets_nothing():
    guard = Guard("skip", max_consecutive_skips=3)
    assert _decide(guard, 4, _words(CLEAN, [4, LOSS, 0, 1, 4])) is False
    assert _decide(guard, 4, _words([0, 0, 0, 1, 0], [0, 0, 0, 1, 0])) is True  # nothing new
    assert not guard.all_clean  # still the step that saw a non-finite value: no checkpoint
    assert _decide(guard, 5, _words([0, 0, 0, 1, 0], [0, 0, 0, 2, 0])) is True
    assert guard.all_clean
    assert _decide(guard, 6, _words(CLEAN, [0, 0, 0, 2, 0])) is True  # what would have reset the old count
    with pytest.raises(SkipLimitError):
        _decide(guard, 6, _words(CLEAN, [6, LOSS, 0, 3, 6]))


def test_skip_stops_when_a_replica_has_skipped_the_limit_in_a_row():
    guard = Guard("skip", max_consecutive_skips=3)
    assert _decide(guard, 7, _words([0, 0, 0, 2, 0], [7, LOSS, 0, 2, 7])) is False
    with pytest.raises(SkipLimitError) as caught:
        _decide(guard, 8, _words([0, 0, 0, 2, 0], [7, BUFFER, 0, 3, 8]))
    assert str(caught.value) == (
        "replica 1 skipped 3 steps in a row for non-finite values (guard.max_consecutive_skips=3): "
        "non-finite buffer in replica 1 at step 7; training diverged: try a lower optim.lr"
    )
    assert isinstance(caught.value, RunError)


def test_skip_stops_on_a_count_alone_and_names_every_replica_at_the_limit():
    # Every bad value was reported already; the counts alone say the replicas stopped learning.
    guard = Guard("skip", max_consecutive_skips=2)
    with pytest.raises(SkipLimitError) as caught:
        _decide(guard, 9, _words([0, 0, 0, 2, 0], [0, 0, 0, 1, 0], [0, 0, 0, 5, 0]))
    assert str(caught.value) == (
        "replica 0 skipped 2 steps in a row, replica 2 skipped 5 steps in a row for non-finite values "
        "(guard.max_consecutive_skips=2); training diverged: try a lower optim.lr"
    )


def test_inspect_reports_the_first_non_finite_step_until_shared():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    assert guard.inspect(3, torch.tensor(1.0), layer.parameters(), [])
    layer.weight.grad[0, 0] = float("inf")
    assert not guard.inspect(4, torch.tensor(1.0), layer.parameters(), [])
    assert not guard.inspect(5, torch.tensor(float("nan")), layer.parameters(), [])
    word = guard.word()
    assert word.tolist() == [4.0, GRADIENT, 0.0, 2.0, 5.0]
    assert guard.word().tolist() == [0.0, 0.0, 0.0, 2.0, 0.0]  # reported once; the count stays
    assert not guard.inspect(6, torch.tensor(float("nan")), layer.parameters(), [])
    _decide(guard, 6, word[None])  # the decision on step 4 keeps step 6 for the next word
    assert guard.word().tolist() == [6.0, LOSS, 0.0, 3.0, 6.0]


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
    assert guard.word().tolist() == [9.0, BUFFER, 0.0, 2.0, 10.0]


def test_inspect_sees_a_non_finite_batchnorm_statistic():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    running_var = torch.tensor([1.0, float("inf")])
    assert not guard.inspect(7, torch.tensor(1.0), layer.parameters(), [running_var])
    assert guard.word().tolist() == [7.0, BUFFER, 0.0, 1.0, 7.0]


def test_inspect_names_a_non_finite_weight():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.bias[0] = float("inf")
    assert not guard.inspect(2, torch.tensor(1.0), layer.parameters(), [])
    assert guard.word().tolist()[:2] == [2.0, WEIGHT]


def test_inspect_reads_the_weights_only_when_asked_and_always_the_gradients():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    with torch.no_grad():
        layer.weight[0, 0] = float("inf")
    assert guard.inspect(1, torch.tensor(1.0), layer.parameters(), [], weights=False)
    assert not guard.inspect(2, torch.tensor(1.0), layer.parameters(), [], weights=True)
    layer.bias.grad[0] = float("nan")
    assert not guard.inspect(3, torch.tensor(1.0), layer.parameters(), [], weights=False)
    assert guard.word().tolist() == [2.0, WEIGHT, 0.0, 2.0, 3.0]


def _weights_checked_when_sent_shown_or_saved(rank: int, world_size: int, form: str) -> None:
    """Weights that turned non-finite with a finite loss and finite gradients (an overflow;
    here set by hand, in a parameter the loss does not use): a plain step does not read
    them, the next checkpoint step (agree=True) reports them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    model.unused = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    coupling = ReplicaCoupling(model, optimizer, form, **({"every": 3} if form == "average" else {}))

    def step(agree: bool = False) -> bool:
        coupling.begin_step()
        loss = model(torch.ones(2, 3)).sum()
        optimizer.zero_grad()
        loss.backward()
        return bool(coupling.step(loss.detach(), agree=agree))

    assert step()
    with torch.no_grad():
        model.unused.fill_(float("inf"))
    assert step()  # step 2: plain (average couples every 3), applied: its weights are not read
    with pytest.raises(NonFiniteError) as caught:
        step(agree=True)  # step 3: a checkpoint step
    assert str(caught.value).startswith("non-finite weight in replica 0 at step 3 (guard.nonfinite=stop)")


@pytest.mark.parametrize("form", ["none", "average"])
def test_weights_are_checked_on_the_steps_that_send_show_or_save_them(form):
    run_world(_weights_checked_when_sent_shown_or_saved, 1, form)


def test_steps_in_a_row_count_own_and_agreed_skips_once_each_and_reset_on_an_applied_step():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    nan = torch.tensor(float("nan"))
    applied, skipped = torch.tensor(True), torch.tensor(False)
    guard.settle(1, applied)
    assert not guard.inspect(2, nan, layer.parameters(), [])
    assert guard.skips_in_row == 1  # known to be skipped before any word is sent
    guard.settle(2, skipped)
    guard.settle(3, skipped)  # finite here, skipped because another replica was not
    assert not guard.inspect(4, nan, layer.parameters(), [])
    guard.settle(4, skipped)
    assert (guard.skips_in_row, guard.skipped_steps) == (3, 3)
    guard.settle(5, applied)
    assert (guard.skips_in_row, guard.skipped_steps) == (0, 3)


def test_guard_state_survives_a_checkpoint():
    guard = Guard("skip")
    layer = torch.nn.Linear(2, 1)
    layer(torch.ones(1, 2)).sum().backward()
    nan = torch.tensor(float("nan"))
    guard.settle(8, torch.tensor(False))
    guard.inspect(9, nan, layer.parameters(), [])  # a 2nd skip in a row, reported as a loss
    guard.settle(9, torch.tensor(False))
    guard.settle(10, torch.tensor(True))
    guard.inspect(11, torch.tensor(1.0), [], [torch.tensor(float("inf"))])  # skipped since, not yet settled
    restored = Guard("skip")
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == {
        "unreported_bad_step": 9,
        "unreported_kind": LOSS,
        "latest_bad_step": 11,
        "skipped_steps": 2,
        "skips_in_row": 1,
    }
    assert restored.word().tolist() == [9.0, LOSS, 0.0, 1.0, 11.0]


def test_guard_state_of_an_older_checkpoint_loads():
    restored = Guard("skip")
    restored.load_state_dict({"unreported_bad_step": 0, "skipped_steps": 2, "consecutive_skips": 0})
    assert restored.word().tolist() == [0.0, 0.0, 0.0, 0.0, 0.0] and restored.skipped_steps == 2


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


def _track_steps() -> list[int]:
    """Records the step each coupling begins (where a run that raises stopped) in this process."""
    seen = [0]
    begin = ReplicaCoupling.begin_step

    def recording(self, *args, **kwargs):
        seen[0] = self.step_count + 1
        return begin(self, *args, **kwargs)

    ReplicaCoupling.begin_step = recording
    return seen


def _train_with_nan(rank: int, world_size: int, run_dir: str, overrides: list[str]) -> None:
    step = _track_steps()
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
    except RunError as err:
        (Path(run_dir) / f"error.rank{rank}.json").write_text(
            json.dumps({"step": step[0], "message": str(err)})
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


# Synchronous, step 5's all_reduce decides on the device; overlapped, step 5's started before
# its NaN existed and step 6's carries the news. Either way the run ends at the read back of
# the checkpoint step 6, and nothing was applied in between.
@pytest.mark.parametrize(("mode", "stop_step"), [(SYNC, 6), (OVERLAP, 6)])
def test_stop_every_rank_stops_in_the_same_step_naming_the_replica(tmp_path, mode, stop_step):
    run_world(_train_with_nan, 2, str(tmp_path), ["coupling=tanh", "guard.nonfinite=stop", mode])
    errors = _errors(tmp_path)
    assert errors[0] == errors[1]
    assert errors[0]["step"] == stop_step and "replica 1 at step 5" in errors[0]["message"]
    assert _checkpoints_finite(tmp_path) == [2, 4]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


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
    assert _checkpoints_finite(tmp_path) == [2, 4, 6, 8, 10, 12]  # and the last step's
    for weights in replica_weights(tmp_path, 2):
        assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_overlapped_skip_only_the_replica_that_saw_it_skips(tmp_path):
    run_world(
        _train_with_nan, 2, str(tmp_path), ["coupling=tanh", "guard.nonfinite=skip", "log.every=1", OVERLAP]
    )
    skipped, rate = _skipped_and_rates(tmp_path, 1)
    assert skipped == [0] * 4 + [1] * 8
    assert rate[5] == 0.0 and rate[4] > 0 and rate[6] > 0
    skipped, rate = _skipped_and_rates(tmp_path, 0)
    assert skipped == [0] * 12 and rate[5] > 0  # replica 0 had applied step 5 before it knew
    assert _checkpoints_finite(tmp_path) == [2, 4, 6, 8, 10, 12]  # and the last step's
    for weights in replica_weights(tmp_path, 2):
        assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize("policy", ["stop", "skip"])
@pytest.mark.slow
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
        assert _checkpoints_finite(tmp_path) == [2, 4, 6, 8, 10, 12]  # and the last step's


@pytest.mark.parametrize("mode", [SYNC, OVERLAP])
@pytest.mark.slow
def test_no_checkpoint_is_written_at_a_step_that_saw_a_non_finite_value(tmp_path, mode):
    # The NaN reaches replica 1 at its 5th batch; with checkpoint.every=5 that step is skipped
    # everywhere and its checkpoint is not written, while the ones around it are.
    run_world(
        _train_with_nan,
        2,
        str(tmp_path),
        ["coupling=tanh", "guard.nonfinite=skip", "checkpoint.every=5", "log.every=100", mode],
    )
    assert _checkpoints_finite(tmp_path) == [10, 12]  # and the last step's
    assert not (tmp_path / "checkpoints" / "step-00000005").exists()


# ---- replica 1 diverges for good from its 5th batch on: every coupling form, both policies

FORMS = ("tanh", "linear", "average", "none", "ddp")
TABLE_COMMON = [*COMMON, "log.every=4"]
SKIP_LIMIT = ["guard.max_consecutive_skips=3"]  # only meaningful (and only accepted) with skip


def _train_runs(rank: int, world_size: int, root: str, runs: dict[str, list[str]]) -> None:
    """Each run in turn, in one world; replica 1's batches are NaN from its 5th on (except in
    runs named clean-*). Writes what every rank saw: the error (class, message, step) and its
    guard's counts."""
    original = ReplicaBatches.next
    poisoned = [True]

    def diverging_next(self):
        self.calls = getattr(self, "calls", 0) + 1
        x, y = original(self)
        return (x * float("nan"), y) if poisoned[0] and rank == 1 and self.calls >= 5 else (x, y)

    ReplicaBatches.next = diverging_next
    step = _track_steps()
    for name, overrides in runs.items():
        poisoned[0] = not name.startswith("clean")
        run_dir = Path(root) / name
        limit = SKIP_LIMIT if "guard.nonfinite=skip" in overrides else []
        cfg, _ = load_config(TABLE_COMMON + limit + overrides + [f"hydra.run.dir={run_dir}"])
        guard = Guard(cfg.guard.nonfinite, cfg.guard.max_consecutive_skips)
        outcome = {"error": None}
        try:
            loop.train(cfg, run_dir, torch.device("cpu"), guard)
        except RunError as err:
            outcome = {"error": type(err).__name__, "message": str(err), "step": step[0]}
        outcome |= {"skipped": guard.skipped_steps, "in_row": guard.skips_in_row}
        (run_dir / f"outcome.rank{rank}.json").write_text(json.dumps(outcome))


def _outcomes(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"outcome.rank{r}.json").read_text()) for r in range(2)]


STOP_ADVICE = "(guard.nonfinite=stop); try a lower optim.lr, or set guard.nonfinite=skip to skip such steps"
LOSS_AT_5 = "non-finite loss in replica 1 at step 5"
# Where each form first exchanges words after step 5's NaN: in step 5 when it communicates
# after the gradient (a synchronous pull, average's exchange after the step), else at the
# checkpoint of step 6. The decision is taken on the device there; the run ends at the next
# read back, a logging (every 4) or checkpoint (every 2) step: step 6 for every form. DDP
# averages replica 1's NaN into replica 0's gradient.
STOP_EXPECTED = {
    "tanh-sync": (6, LOSS_AT_5),
    "tanh-overlap": (6, LOSS_AT_5),
    "linear-sync": (6, LOSS_AT_5),
    "linear-overlap": (6, LOSS_AT_5),
    "average-sync": (6, LOSS_AT_5),
    "average-overlap": (6, LOSS_AT_5),
    "none-sync": (6, LOSS_AT_5),
    "none-overlap": (6, LOSS_AT_5),
    "ddp-sync": (6, "non-finite gradient in replica 0 at step 5, " + LOSS_AT_5),
    "ddp-overlap": (6, "non-finite gradient in replica 0 at step 5, " + LOSS_AT_5),
}


def _form_runs(policy: str) -> dict[str, list[str]]:
    # average on every step: with its default, every 4, it talks like none between couplings.
    every = {"average": ["coupling.every=1"]}
    return {
        f"{form}-{mode}": [
            f"coupling={form}",
            *every.get(form, []),
            f"guard.nonfinite={policy}",
            f"dist.overlap={mode == 'overlap'}",
        ]
        for form in FORMS
        for mode in ("sync", "overlap")
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stop_ends_every_form_with_one_line_naming_what_where_and_what_to_try(tmp_path):
    more = {
        "clean-tanh": ["coupling=tanh", "dist.overlap=false"],
        # A real divergence: weights near 1e20 after step 1, logits that overflow at step 2.
        "clean-lr": ["coupling=tanh", "dist.overlap=false", "optim.lr=1e20"],
    }
    run_world(_train_runs, 2, str(tmp_path), _form_runs("stop") | more, timeout_s=600)
    for name, (step, where) in STOP_EXPECTED.items():
        outcomes = _outcomes(tmp_path / name)
        assert [o["error"] for o in outcomes] == ["NonFiniteError"] * 2, name
        assert outcomes[0]["message"] == outcomes[1]["message"] and outcomes[0]["step"] == outcomes[1]["step"]
        assert (outcomes[0]["step"], outcomes[0]["message"]) == (step, f"{where} {STOP_ADVICE}"), name
        assert "\n" not in outcomes[0]["message"]
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "diverged"
        assert _checkpoints_finite(tmp_path / name) == [2, 4]
    outcomes = _outcomes(tmp_path / "clean-lr")
    assert [(o["error"], o["step"]) for o in outcomes] == [("NonFiniteError", 2)] * 2
    where = "non-finite loss in replica 0 at step 2, non-finite loss in replica 1 at step 2"
    assert outcomes[0]["message"] == outcomes[1]["message"] == f"{where} {STOP_ADVICE}"
    # The same world without the NaN: an ordinary run that says it went well.
    assert _outcomes(tmp_path / "clean-tanh")[0]["error"] is None
    summary = _summary_checked(tmp_path / "clean-tanh")
    assert summary["status"] == "ok" and "reason" not in summary and isinstance(summary["warnings"], list)


def _limit_message(counts: dict[int, int], seen: str) -> str:
    who = ", ".join(f"replica {r} skipped {n} steps in a row" for r, n in counts.items())
    return (
        f"{who} for non-finite values (guard.max_consecutive_skips=3): {seen}; "
        "training diverged: try a lower optim.lr"
    )


LOSS_AT_7 = "non-finite loss in replica 1 at step 7"
# (step of the stop, replicas at or over the limit with their counts, what the last words
# reported, steps replica 0 and replica 1 skipped, the stop's step included). Replica 1 is NaN
# from step 5 on, so it skips 5 to 8. The limit is reached on the device at:
#  - step 7 when every step communicates after the gradient (sync pulls, average): the 3rd
#    skip in a row. A sync pull makes replica 0 skip 5, 6 and 7 with it; average only the
#    checkpoint step 6 (agreed before its update);
#  - step 8 with overlapped pulls: step 7's word tells of step 6 (count 2), step 8's of 7 (3).
#    Replica 0 skips 6 (checkpoint) only;
#  - none/ddp exchange words at checkpoint (even) and logging (1, 4, 8) steps only: at step 8,
#    overlapped, through step 7 (3); synchronous, through step 8 (4). With ddp replica 0 is
#    NaN too.
# The run ends at the next read back, step 8 (logging and checkpoint), and every replica skips
# every step from the decision to there.
SKIP_EXPECTED = {
    "tanh-sync": (8, {1: 3}, LOSS_AT_7, 4, 4),
    "tanh-overlap": (8, {1: 3}, LOSS_AT_7, 2, 4),
    "linear-sync": (8, {1: 3}, LOSS_AT_7, 4, 4),
    "linear-overlap": (8, {1: 3}, LOSS_AT_7, 2, 4),
    "average-sync": (8, {1: 3}, LOSS_AT_7, 2, 4),
    "average-overlap": (8, {1: 3}, LOSS_AT_7, 2, 4),
    "none-sync": (8, {1: 4}, LOSS_AT_7, 2, 4),
    "none-overlap": (8, {1: 3}, LOSS_AT_7, 2, 4),
    "ddp-sync": (8, {0: 4, 1: 4}, "non-finite gradient in replica 0 at step 7, " + LOSS_AT_7, 4, 4),
    "ddp-overlap": (8, {0: 3, 1: 3}, "non-finite gradient in replica 0 at step 7, " + LOSS_AT_7, 4, 4),
    "average-every-4": (8, {1: 4}, LOSS_AT_7, 2, 4),  # like none-sync: words at 6 and 8 only
    # Words on every step (a checkpoint each): no lag; the limit holds exactly whatever the form.
    "none-every-step": (7, {1: 3}, LOSS_AT_7, 3, 3),
    "cnn-batchnorm": (8, {1: 3}, LOSS_AT_7, 4, 4),
}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_skip_stops_every_form_at_the_limit_and_never_applies_or_saves_a_bad_step(tmp_path):
    runs = _form_runs("skip") | {
        "average-every-4": ["coupling=average", "guard.nonfinite=skip", "dist.overlap=false"],
        "none-every-step": [
            "coupling=none",
            "guard.nonfinite=skip",
            "checkpoint.every=1",
            "dist.overlap=false",
        ],
        "real-lr": [
            "coupling=tanh",
            "guard.nonfinite=skip",
            "optim.lr=1e20",
            "guard.max_consecutive_skips=1000",
        ],
        "cnn-batchnorm": [
            "coupling=tanh",
            "guard.nonfinite=skip",
            "dist.overlap=false",
            "model=cnn",
            "model.hidden=[4]",
            "model.batch_norm=true",
        ],
    }
    run_world(_train_runs, 2, str(tmp_path), runs, timeout_s=900)
    for name, (step, counts, seen, skipped_0, skipped_1) in SKIP_EXPECTED.items():
        outcomes = _outcomes(tmp_path / name)
        assert [o["error"] for o in outcomes] == ["SkipLimitError"] * 2, name
        assert outcomes[0]["message"] == outcomes[1]["message"] == _limit_message(counts, seen), name
        assert outcomes[0]["step"] == outcomes[1]["step"] == step, name
        assert (outcomes[0]["skipped"], outcomes[1]["skipped"]) == (skipped_0, skipped_1), name
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "diverged"
        saved = _checkpoints_finite(tmp_path / name)
        assert saved == ([1, 2, 3, 4] if name == "none-every-step" else [2, 4]), name

    # Replica 0 diverges for real (finite, ever larger weights: its loss is inf or NaN from
    # step 2 on) and the limit is out of reach: the run ends, and says what diverged.
    outcomes = _outcomes(tmp_path / "real-lr")
    assert [o["error"] for o in outcomes] == ["DivergedError"] * 2
    assert outcomes[0]["message"] == outcomes[1]["message"]
    summary = _summary_checked(tmp_path / "real-lr")
    assert summary["status"] == "diverged"
    assert outcomes[0]["message"] == f"{summary['reason']}; training diverged: try a lower optim.lr"
    assert summary["reason"].startswith("the final evaluation is not finite: ")


def _summary_checked(run_dir: Path) -> dict:
    """summary.json, read back; a non-finite number in it only with a status that says so."""
    summary = json.loads((run_dir / "summary.json").read_text())
    numbers = [v for part in ("center", "ensemble") for v in summary[part].values()]
    numbers += [v for replica in summary["replicas"] for v in replica.values()]
    if summary["status"] == "ok":
        assert all(math.isfinite(v) for v in numbers)
    else:
        assert summary["reason"] and not all(math.isfinite(v) for v in numbers)
    return summary


def _step_by_step(guard: Guard, step: int, loss, params, buffers) -> bool:
    """A plain step's bookkeeping done at once: the reference for inspect_and_settle."""
    apply = guard.inspect(step, loss, params, buffers, weights=False) & guard.may_apply()
    guard.settle(step, apply)
    return bool(apply)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_plain_steps_settled_in_a_window_leave_what_step_by_step_bookkeeping_leaves(policy):
    # Two guards see the same values: one settles every plain step at once, the other leaves
    # them to its window. Between plain steps come exchange steps (a word, a decision on it)
    # and read backs; runs of plain steps are longer than the window, and some values are
    # non-finite in the loss, a gradient or a buffer, alone or several steps in a row.
    generator = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(3, 2)
    layer(torch.ones(1, 3)).sum().backward()
    params = list(layer.parameters())
    reference, windowed = Guard(policy, max_consecutive_skips=6), Guard(policy, max_consecutive_skips=6)
    exchanges = {9, 10, 40, 41, 120, 156, 200, 203, 204, 290}
    ended = {}
    for step in range(1, 300):
        draw = torch.rand(2, generator=generator).tolist()
        bad_run = 60 <= step < 64 or 150 <= step < 158  # several in a row, past the skip limit
        loss = torch.tensor(float("nan") if draw[0] < 0.03 or bad_run else 1.0)
        buffer = torch.tensor([float("inf") if draw[1] < 0.03 else 0.5])
        layer.weight.grad[0, 0] = float("nan") if 0.03 <= draw[0] < 0.05 else 0.1
        if step in exchanges:
            for name, guard in (("reference", reference), ("windowed", windowed)):
                own = guard.inspect(step, loss, params, [buffer])
                apply = guard.decide(step, guard.word()[None]) & own
                guard.settle(step, apply)
                try:
                    guard.read_back(step)
                except NonFiniteError as err:
                    ended.setdefault(name, (step, str(err)))
            assert reference.state_dict() == windowed.state_dict(), step
            continue
        expected = _step_by_step(reference, step, loss, params, [buffer])
        assert bool(windowed.inspect_and_settle(step, loss, params, [buffer])) == expected, step
        if step % 37 == 0:  # what a checkpoint reads, at any point of a window
            assert reference.state_dict() == windowed.state_dict(), step
            assert (reference.skipped_steps, reference.skips_in_row) == (
                windowed.skipped_steps,
                windowed.skips_in_row,
            )
    assert reference.word().tolist() == windowed.word().tolist()
    assert reference.state_dict() == windowed.state_dict()
    assert ended["reference"] == ended["windowed"]  # both runs end, at the same step, saying the same
    assert reference.state_dict()["skipped_steps"] > 10
