"""coupling.fragments=k: the model split into k contiguous groups of whole tensors, coupled in
turn, each every H = coupling.every steps and one every H/k steps (Streaming DiLoCo's
schedule). The weights each form reaches with fragments are checked against the plain
single-process reference in tests/test_public_api.py; here: the split, the schedule, the
collectives and bytes each step really sends, a resumed trainer, and the bad settings."""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException
from trainer_runs import replica_weights, train_losses
from worlds import fail_at_batch, run_world

from replica_dist import ReplicaCoupling, loop
from replica_dist.config import ConfigError, CouplingConfig, load_config
from replica_dist.coupling import CouplingError, fragment_at, fragment_bounds
from replica_dist.data import ReplicaBatches
from replica_dist.guard import Guard

# ---- the split and the schedule


def test_the_split_is_contiguous_whole_tensors_covering_all_and_about_equal():
    rng = random.Random(3)
    for _ in range(300):
        sizes = [rng.choice([1, 10, 100, 1000, 5000]) for _ in range(rng.randint(1, 12))]
        k = rng.randint(1, len(sizes))
        bounds = fragment_bounds(sizes, k)
        assert len(bounds) == k
        assert bounds[0][0] == 0 and bounds[-1][1] == len(sizes)
        assert all(first < end for first, end in bounds)  # none empty
        assert all(bounds[g][1] == bounds[g + 1][0] for g in range(k - 1))  # contiguous
        # Each group ends at the first tensor that reaches its share, so it overshoots the
        # share by less than one tensor.
        total = sum(sizes)
        for g, (first, end) in enumerate(bounds[:-1]):
            assert sum(sizes[:end]) < total * (g + 1) / k + max(sizes) or end == first + 1


def test_the_split_of_known_models():
    assert fragment_bounds([2048, 32, 320, 10], 1) == [(0, 4)]
    assert fragment_bounds([2048, 32, 320, 10], 2) == [(0, 1), (1, 4)]
    assert fragment_bounds([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert fragment_bounds([1, 1, 1, 100], 2) == [(0, 3), (3, 4)]
    assert fragment_bounds([1, 1, 1, 100], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(CouplingError, match="a model of 4 tensors splits into 1 to 4"):
        fragment_bounds([1, 1, 1, 100], 5)


@pytest.mark.parametrize(("every", "k"), [(1, 1), (4, 1), (4, 2), (4, 4), (6, 3), (12, 4)])
def test_each_fragment_couples_once_every_h_steps_one_every_h_over_k(every, k):
    cfg = CouplingConfig(name="tanh", every=every, fragments=k)
    schedule = {step: fragment_at(cfg, step) for step in range(1, 5 * every + 1)}
    coupled = [step for step, f in schedule.items() if f is not None]
    assert coupled == list(range(every // k, 5 * every + 1, every // k))
    for f in range(k):
        steps = [step for step, g in schedule.items() if g == f]
        assert steps == list(range((f + 1) * every // k, 5 * every + 1, every))
    assert all(fragment_at(CouplingConfig(name=name, every=every), 4) is None for name in ("none", "ddp"))


# ---- what each step sends, counted in a real world

MODEL_SIZES = [8 * 6, 8, 8 * 8, 8, 3 * 8, 3]  # three Linear layers' weights and biases
"""fragment_bounds(MODEL_SIZES, 3) == [(0, 2), (2, 3), (3, 6)]: 56, 64 and 35 weights."""
FRAGMENT_NUMELS = [56, 64, 35]


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    )


@contextlib.contextmanager
def _counting_collectives(calls: dict[int, list[list]], current: list[int]):
    """torch.distributed's all_reduce and all_gather, each call recorded as [name, numel] under
    calls[current[0]] (the step under way)."""
    originals = {name: getattr(tdist, name) for name in ("all_reduce", "all_gather")}

    def counting(name, original):
        def wrapper(tensor, *args, **kwargs):
            numel = sum(t.numel() for t in tensor) if isinstance(tensor, list) else tensor.numel()
            calls.setdefault(current[0], []).append([name, numel])
            return original(tensor, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(tdist, name, counting(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(tdist, name, original)


def _count_sends(rank: int, world_size: int, root: str) -> None:
    results = {}
    for form, compress in (("tanh", "none"), ("average", "none"), ("diloco", "none"), ("linear", "int8")):
        torch.manual_seed(rank)
        model = _model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
        eta = {"eta": 0.1} if form in ("tanh", "linear") else {}
        coupling = ReplicaCoupling(
            model, optimizer, form, every=6, fragments=3, compress=compress, compress_chunk=16, **eta
        )
        sent: dict[int, list[list]] = {}
        current = [0]  # the step under way
        bytes_per_step = []
        with _counting_collectives(sent, current):
            for step in range(1, 13):
                before, current[0] = coupling.bytes_sent, step
                coupling.begin_step()
                x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))
                loss = model(x).square().mean()
                optimizer.zero_grad()
                loss.backward()
                coupling.step(loss)
                bytes_per_step.append(coupling.bytes_sent - before)
        results[f"{form}-{compress}"] = {"sent": sent, "bytes": bytes_per_step}
    Path(root, f"rank{rank}.json").write_text(json.dumps(results))


def test_every_tensor_is_exchanged_once_per_h_steps_and_the_bytes_are_the_closed_form(tmp_path):
    assert fragment_bounds(MODEL_SIZES, 3) == [(0, 2), (2, 3), (3, 6)]
    run_world(_count_sends, 2, str(tmp_path))
    table = 2 * Guard.WORD_LENGTH  # float32 entries: one row of words per replica
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, result in results.items():
            sent = {int(step): calls for step, calls in result["sent"].items()}
            compressed = case.endswith("int8")
            # Steps 2, 4, ..., 12 couple fragments 0, 1, 2, 0, 1, 2; the others send nothing.
            assert sorted(sent) == [2, 4, 6, 8, 10, 12], (case, sorted(sent))
            for step, calls in sent.items():
                numel = FRAGMENT_NUMELS[(step // 2 - 1) % 3]
                if compressed:  # the scales agreed on (MAX), the payloads gathered, the words summed
                    scales = math.ceil(numel / 16)
                    assert calls == [["all_reduce", scales], ["all_gather", 2 * numel], ["all_reduce", table]]
                    expected_bytes = numel + 4 * scales + 4 * table
                else:
                    assert calls == [["all_reduce", numel + table]], (case, step, calls)
                    expected_bytes = 4 * (numel + table)
                assert result["bytes"][step - 1] == expected_bytes, (case, step)
            # Every tensor exactly once in any H = 6 steps, and the whole model no more.
            for window in (range(1, 7), range(7, 13), range(4, 10)):
                exchanged = sorted(FRAGMENT_NUMELS[(s // 2 - 1) % 3] for s in window if s in sent)
                assert exchanged == sorted(FRAGMENT_NUMELS), (case, window)
            assert all(b == 0 for step, b in enumerate(result["bytes"], 1) if step % 2), case


# ---- error feedback: each fragment's own residual, also on a logging step

EF_CHUNK = 16
OBSERVED = (3, 4)
"""Steps begun with observe=True: 3 couples nothing, 4 pulls fragment 1 (of 3, every 6)."""


def _feedback_world(rank: int, world_size: int, root: str) -> None:
    torch.manual_seed(rank)
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, fused=True)
    coupling = ReplicaCoupling(
        model,
        optimizer,
        "linear",
        every=6,
        fragments=3,
        compress="int8",
        compress_chunk=EF_CHUNK,
        error_feedback=True,
        eta=0.1,
    )
    record, calls, current = [], {}, [0]
    with _counting_collectives(calls, current):
        for step in range(1, 13):
            current[0] = step
            before = {"w": coupling.state.pack(), "residual": coupling.state_dict()["residual"].clone()}
            sent_before = coupling.bytes_sent
            coupling.begin_step(observe=step in OBSERVED)
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * step + rank))
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            coupling.step(loss)
            after = coupling.state_dict()["residual"].clone()
            record.append(before | {"after": after, "bytes": coupling.bytes_sent - sent_before})
    torch.save({"record": record, "calls": calls}, Path(root, f"rank{rank}.pt"))


def _int8_residual(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """What each rank's send of xs[rank] leaves as its residual, written here from the rule:
    one scale per chunk of EF_CHUNK, the largest magnitude over all ranks / 127."""
    n = xs[0].numel()
    chunks = math.ceil(n / EF_CHUNK)
    padded = [torch.cat([x, x.new_zeros(chunks * EF_CHUNK - n)]).view(chunks, EF_CHUNK) for x in xs]
    scale = torch.stack(padded).abs().amax(dim=(0, 2))[:, None] / 127
    return [
        (x - torch.where(scale > 0, torch.round(x / scale), 0.0).clamp(-127, 127) * scale).flatten()[:n]
        for x in padded
    ]


def test_error_feedback_keeps_a_residual_per_fragment_and_a_logging_step_sends_both(tmp_path):
    run_world(_feedback_world, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    offsets = [0, 56, 120]
    whole, table = sum(FRAGMENT_NUMELS), 2 * Guard.WORD_LENGTH
    for step in range(1, 13):
        rows = [rank["record"][step - 1] for rank in ranks]
        coupled = step // 2 - 1 if step % 2 == 0 else None
        expected = [row["residual"].clone() for row in rows]
        if coupled is not None:
            first, n = offsets[coupled % 3], FRAGMENT_NUMELS[coupled % 3]
            span = slice(first, first + n)
            sends = [row["w"][span] + row["residual"][span] for row in rows]
            for mine, residual in zip(expected, _int8_residual(sends)):
                mine[span] = residual
        for r, row in enumerate(rows):
            # The coupled fragment's residual, and nothing else, moved: on step 4 too, which
            # also sent the whole model exactly for the diagnostics.
            torch.testing.assert_close(row["after"], expected[r], atol=1e-7, rtol=0)
            assert row["after"].numel() == whole
            if coupled is not None:
                n = FRAGMENT_NUMELS[coupled % 3]
                assert row["bytes"] == n + 4 * math.ceil(n / EF_CHUNK) + 4 * table, step
            else:
                assert row["bytes"] == 0, step
    for rank in ranks:  # every fragment rounded something: the residual is not all zeros
        residual = rank["record"][-1]["after"]
        assert all(residual[o : o + n].abs().sum() > 0 for o, n in zip(offsets, FRAGMENT_NUMELS))
        calls = {int(step): c for step, c in rank["calls"].items()}
        int8_fragment_1 = [
            ["all_reduce", math.ceil(64 / EF_CHUNK)],
            ["all_gather", 2 * 64],
            ["all_reduce", table],
        ]
        assert calls[3] == [["all_reduce", whole + table]]  # the diagnostics' exchange only, exact
        assert calls[4] == [["all_reduce", whole + table], *int8_fragment_1]
        assert calls[10] == int8_fragment_1


# ---- the trainer resumes bit for bit

TRAINER = [
    "coupling.every=4",
    "coupling.fragments=2",
    "train.steps=14",
    "train.batch_size=16",
    "model.hidden=[32]",
    "log.every=5",
    "eval.every=7",
    "checkpoint.every=4",
]
TRAINER_CASES = {
    "diloco_bf16": ["coupling=diloco", "dist.compress=bf16"],
    # logging steps 10 and 14 pull a fragment too: both exchanges, the residuals checkpointed
    "tanh_int8_feedback": [
        "coupling=tanh",
        "coupling.eta=0.05",
        "dist.compress=int8",
        "dist.error_feedback=true",
    ],
}


def _trainer(rank: int, world_size: int, case: str, run_dir: str, fail_at_step: int | None = None) -> None:
    if fail_at_step:
        fail_at_batch(ReplicaBatches, fail_at_step)
    cfg, _ = load_config(TRAINER + TRAINER_CASES[case] + [f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


@pytest.mark.parametrize("case", TRAINER_CASES)
@pytest.mark.slow
def test_the_trainer_with_fragments_and_compression_resumes_bit_for_bit(tmp_path, case):
    reference, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_world(_trainer, 2, case, str(reference))
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_trainer, 2, case, str(resumed), 10)
    assert (resumed / "checkpoints" / "step-00000008" / "manifest.json").exists()
    run_world(_trainer, 2, case, str(resumed))
    for got, expected in zip(replica_weights(resumed, 2), replica_weights(reference, 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    for replica in range(2):
        losses = train_losses(resumed, replica)
        assert losses == train_losses(reference, replica)
        assert [step for step, _ in losses] == [1, 5, 10, 14] and all(math.isfinite(v) for _, v in losses)


# ---- bad settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["coupling.fragments=0"], "coupling.fragments must be >= 1; got 0"),
        (
            ["coupling=tanh", "coupling.every=4", "coupling.fragments=3"],
            "coupling.fragments must divide coupling.every (4)",
        ),
        (
            ["coupling=none", "coupling.fragments=2"],
            "coupling.fragments is only for coupling.name=tanh, linear, average or diloco; got none",
        ),
    ],
)
def test_a_bad_fragments_setting_is_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_more_fragments_than_tensors_is_refused_naming_the_key():
    """Before any collective: the trainer's workers refuse it alike, with the key."""
    cfg, _ = load_config(["coupling=average", "coupling.every=8", "coupling.fragments=8"])
    model = torch.nn.Linear(4, 2)  # two tensors
    with pytest.raises(ConfigError) as caught:
        ReplicaCoupling.from_config(cfg, None, model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert str(caught.value) == (
        "coupling.fragments must be at most the model's number of tensors (2: parameters and floating "
        "buffers; a fragment holds whole tensors); got 8"
    )
