"""Real gloo worlds of 2 and 4 processes against the single-process reference."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from trainer_runs import events, replica_weights, scalar
from worlds import COLLECTIVE_TIMEOUT_S, run_world

from replica_dist import loop
from replica_dist.config import load_config
from replica_dist.coupling import ReplicaCoupling, is_coupling_step
from replica_dist.reference import reference_weights

COMMON = [
    "train.steps=20",
    "train.batch_size=16",
    "model.hidden=[32]",
    "log.every=7",
    "eval.every=10",
    "seed=3",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]

CASES = {
    "tanh": ["coupling=tanh", "coupling.eta=0.05"],
    "tanh_scoped_T": [
        "coupling=tanh",
        "coupling.eta=0.02",
        "coupling.eta_growth=0.1",
        "coupling.eta_max=0.3",
        "coupling.temperature=0.5",
        "coupling.every=3",
    ],
    # float64: Adam divides by sqrt(v) and so amplifies the one-ulp differences between the ring
    # all_reduce's summation order (which moves with the buffer's length) and the reference's
    # stack().mean() to ~1.6e-6 in float32 in 4 processes; the algorithm is what is compared.
    "tanh_same_init_adam": [
        "coupling=tanh",
        "init=same",
        "optim=adam",
        "optim.lr=0.01",
        "train.dtype=float64",
    ],
    # float64: in float32, BatchNorm's division by the batch std amplifies the different
    # summation order of one-thread workers and the multi-threaded reference to ~2e-6.
    "tanh_cnn_batchnorm": [
        "coupling=tanh",
        "coupling.eta=0.1",
        "model=cnn",
        "model.hidden=[4,4]",
        "model.batch_norm=true",
        "train.dtype=float64",
    ],
    "linear": ["coupling=linear", "coupling.eta=0.2", "coupling.every=2"],
    "linear_via_optimizer": [
        "coupling=linear",
        "coupling.eta=0.5",
        "coupling.via_optimizer=true",
        "optim.momentum=0.9",
        "optim.weight_decay=0.01",
    ],
    "average": ["coupling=average", "coupling.every=4"],
    "none": ["coupling=none"],
    "ddp": ["coupling=ddp", "optim.nesterov=true"],
}


def config(case: str, run_dir: Path):
    cfg, _ = load_config(COMMON + CASES[case] + [f"hydra.run.dir={run_dir}"])
    return cfg


def _train_cases(rank: int, world_size: int, root: str) -> None:
    for case in CASES:
        loop.train(config(case, Path(root) / case), Path(root) / case, torch.device("cpu"))


# A world of 4 is the slow tier's: the world of 2 already takes every case through the fast tier.
@pytest.fixture(
    scope="module", params=[2, pytest.param(4, marks=pytest.mark.slow)], ids=lambda n: f"world{n}"
)
def trained(request, tmp_path_factory):
    world_size = request.param
    root = tmp_path_factory.mktemp(f"world{world_size}")
    run_world(_train_cases, world_size, str(root))
    return world_size, root


@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_process_reference(trained, case):
    world_size, root = trained
    expected = reference_weights(config(case, root / case), world_size)
    actual = replica_weights(root / case, world_size)
    for r in range(world_size):
        assert actual[r].keys() == expected[r].keys()
        for name in expected[r]:
            torch.testing.assert_close(
                actual[r][name],
                expected[r][name],
                atol=1e-6,
                rtol=0,
                msg=lambda m, r=r, name=name: f"replica {r} {name}: {m}",
            )


@pytest.mark.parametrize("case", ["tanh", "linear", "none"])
def test_coupled_replicas_stay_different(trained, case):
    """Independent inits and shards: the elastic forms pull but do not collapse replicas."""
    world_size, root = trained
    weights = replica_weights(root / case, world_size)
    assert not torch.equal(weights[0]["fc1.weight"], weights[1]["fc1.weight"])


@pytest.mark.parametrize("case", ["average", "ddp"])
def test_average_and_ddp_end_with_identical_replicas(trained, case):
    world_size, root = trained  # 20 steps: a multiple of average's every=4
    weights = replica_weights(root / case, world_size)
    for r in range(1, world_size):
        for name in weights[0]:
            assert torch.equal(weights[r][name], weights[0][name]), (case, r, name)


def test_summary_and_center_weights(trained):
    world_size, root = trained
    summary = json.loads((root / "tanh" / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["steps"] == 20
    assert [r["replica"] for r in summary["replicas"]] == list(range(world_size))
    weights = replica_weights(root / "tanh", world_size)
    center = torch.load(root / "tanh" / "weights" / "center.pt")
    for name in center:
        torch.testing.assert_close(center[name], torch.stack([w[name] for w in weights]).mean(0))


# ---- overlapped communication changes when the all_reduce runs, not what it computes

COMM_MODES = {
    "sync": ["dist.overlap=false"],
    "overlap": ["dist.overlap=true"],
    "overlap_small_buckets": ["dist.overlap=true", "dist.bucket_mb=0.001"],  # 1 KiB: 10 buckets here
}
OVERLAPPED_CASES = ("tanh", "tanh_scoped_T", "tanh_cnn_batchnorm", "linear_via_optimizer", "average")


def _train_each_comm_mode(rank: int, world_size: int, root: str) -> None:
    for case in OVERLAPPED_CASES:
        for mode, overrides in COMM_MODES.items():
            run_dir = Path(root) / case / mode
            cfg, _ = load_config(COMMON + CASES[case] + overrides + [f"hydra.run.dir={run_dir}"])
            loop.train(cfg, run_dir, torch.device("cpu"))


@pytest.mark.slow
def test_overlapped_and_bucketed_equal_synchronous_bit_for_bit(tmp_path):
    run_world(_train_each_comm_mode, 2, str(tmp_path))
    for case in OVERLAPPED_CASES:
        synchronous = replica_weights(tmp_path / case / "sync", 2)
        for mode in ("overlap", "overlap_small_buckets"):
            for r, weights in enumerate(replica_weights(tmp_path / case / mode, 2)):
                for name, value in weights.items():
                    assert torch.equal(value, synchronous[r][name]), (case, mode, r, name)
            for run in ("replica_1", "center"):  # every logged number too
                logged, expected = (events(tmp_path / case / m / "tb" / run) for m in (mode, "sync"))
                tags = expected.Tags()["scalars"]
                assert logged.Tags()["scalars"] == tags and len(tags) > 10
                for tag in tags:
                    assert [e.value for e in logged.Scalars(tag)] == [e.value for e in expected.Scalars(tag)]


# ---- memory: no full-size tensor is made on a training step that does not log


def _largest_new_tensor_per_step(rank: int, world_size: int, root: str) -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    from replica_dist.timing import StepTimer

    largest = []

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (list, tuple)) else [out]
            fresh = [  # outputs that do not share memory with an input: new allocations
                t.numel()
                for t in outs
                if isinstance(t, torch.Tensor)
                and not any(
                    isinstance(a, torch.Tensor)
                    and a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                    for a in args
                )
            ]
            largest[-1] = max([largest[-1], *fresh])
            return out

    class Watch(StepTimer):
        def start_step(self):
            largest.append(0)
            self.mode = Largest()
            self.mode.__enter__()

        def end_step(self):
            self.mode.__exit__(None, None, None)

    for case in ("tanh", "linear_sync", "average"):
        overrides = {"tanh": ["coupling=tanh"], "linear_sync": ["coupling=linear", "dist.overlap=false"]}
        overrides["average"] = ["coupling=average", "coupling.every=2"]
        run_dir = Path(root) / case
        cfg, _ = load_config(
            COMMON
            + overrides[case]
            + ["train.steps=8", "log.every=1000", "eval.every=1000", f"hydra.run.dir={run_dir}"]
        )
        largest.clear()
        loop.train(cfg, run_dir, torch.device("cpu"), timer=Watch(torch.device("cpu")))
        (run_dir / f"largest.rank{rank}.json").write_text(json.dumps(largest))


@pytest.mark.slow
def test_training_steps_that_do_not_log_allocate_nothing_model_sized(tmp_path):
    run_world(_largest_new_tensor_per_step, 2, str(tmp_path))
    numel = 64 * 32 + 32 + 32 * 10 + 10  # the mlp of COMMON on digits
    largest_parameter = 64 * 32
    for case in ("tanh", "linear_sync", "average"):
        for rank in range(2):
            largest = json.loads((tmp_path / case / f"largest.rank{rank}.json").read_text())
            assert largest[0] >= numel  # step 1 logs: it copies the weights (the probe sees them)
            assert max(largest[1:-1]) <= largest_parameter, (case, rank, largest)  # a gradient at most


# ---- replicas x data parallel: a (2, 2) mesh of 4 processes

MESH_CASES = {
    "tanh": ["coupling=tanh", "coupling.eta=0.1"],
    "linear_sync": ["coupling=linear", "coupling.eta=0.2", "dist.overlap=false"],
    "average": ["coupling=average", "coupling.every=4"],
}


def _train_on_a_mesh(rank: int, world_size: int, root: str) -> None:
    for case, overrides in MESH_CASES.items():
        run_dir = Path(root) / case
        cfg, _ = load_config(
            COMMON + overrides + ["parallel.dp=2", "checkpoint.every=10", f"hydra.run.dir={run_dir}"]
        )
        loop.train(cfg, run_dir, torch.device("cpu"))


@pytest.mark.slow
def test_replicas_times_data_parallel_ranks_of_a_replica_stay_identical_and_replicas_couple(tmp_path):
    run_world(_train_on_a_mesh, 4, str(tmp_path))
    for case, overrides in MESH_CASES.items():
        run_dir = tmp_path / case
        # Every rank's own state at step 10: ranks 0, 1 train replica 0; ranks 2, 3 replica 1.
        at_10 = [
            torch.load(run_dir / "checkpoints" / "step-00000010" / f"replica-{rank}.pt")["model"]
            for rank in range(4)
        ]
        for name in at_10[0]:
            assert torch.equal(at_10[0][name], at_10[1][name]), (case, name)
            assert torch.equal(at_10[2][name], at_10[3][name]), (case, name)
        assert not torch.equal(at_10[0]["fc1.weight"], at_10[2]["fc1.weight"])  # step 10: no average
        # Each replica is the reference's: the mean gradient of its two ranks, coupled across.
        cfg, _ = load_config(COMMON + overrides + ["parallel.dp=2", f"hydra.run.dir={run_dir}"])
        expected = reference_weights(cfg, 4)
        actual = replica_weights(run_dir, 2)
        for r in range(2):
            for name in expected[r]:
                torch.testing.assert_close(actual[r][name], expected[r][name], atol=1e-6, rtol=0)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["dp"] == 2
        assert sorted(p.name for p in (run_dir / "tb").iterdir()) == [
            "center",
            "ensemble",
            "replica_0",
            "replica_1",
        ]


def _stop_requested_on_one_rank_of_a_mesh(rank: int, world_size: int, root: str) -> None:
    from replica_dist.data import ReplicaBatches
    from replica_dist.guard import Guard, StopRequested

    guard = Guard("stop")
    if rank == 3:  # replica 1's second rank alone, as if SIGTERM reached only it before its 5th batch
        original, calls = ReplicaBatches.next, [0]

        def next_then_ask_to_stop(self):
            calls[0] += 1
            if calls[0] == 5:
                guard.stop_requested = True
            return original(self)

        ReplicaBatches.next = next_then_ask_to_stop
    cfg, _ = load_config(COMMON + ["coupling=tanh", "parallel.dp=2", f"hydra.run.dir={root}"])
    try:
        loop.train(cfg, Path(root), torch.device("cpu"), guard)
    except StopRequested as stop:
        (Path(root) / f"stopped.rank{rank}").write_text(str(stop.step))


@pytest.mark.slow
def test_a_stop_seen_by_one_rank_of_a_mesh_stops_every_rank_at_the_same_step(tmp_path):
    # Rank 3 shares its mesh column with rank 1 only; its word reaches ranks 0 and 2 through
    # the max over each replica's ranks. Overlapped, the word leaves with step 6's all_reduce;
    # the device's decision is read back at the next logging step, 7 (log.every=7).
    run_world(_stop_requested_on_one_rank_of_a_mesh, 4, str(tmp_path))
    assert [(tmp_path / f"stopped.rank{r}").read_text() for r in range(4)] == ["7"] * 4
    saved = sorted(p.name for p in (tmp_path / "checkpoints" / "step-00000007").glob("replica-*.pt"))
    assert saved == [f"replica-{r}.pt" for r in range(4)]


# ---- the replicas' spread step by step, read back from TensorBoard


def _train_logging_every_step(rank: int, world_size: int, root: str) -> None:
    for case in ("average", "ddp"):
        run_dir = Path(root) / case
        cfg, _ = load_config(
            COMMON + CASES[case] + ["train.steps=12", "log.every=1", f"hydra.run.dir={run_dir}"]
        )
        loop.train(cfg, run_dir, torch.device("cpu"))


@pytest.mark.slow
def test_average_every_k_and_ddp_every_step_leave_replicas_together(tmp_path):
    run_world(_train_logging_every_step, 2, str(tmp_path))
    for case, together_steps in (("average", {4, 8, 12}), ("ddp", set(range(1, 13)))):
        for r in range(2):
            spread = scalar(tmp_path / case / "tb" / f"replica_{r}", "dist_to_center/fc1.weight")
            norm = scalar(tmp_path / case / "tb" / f"replica_{r}", "weight_norm/fc1.weight")
            assert sorted(spread) == list(range(1, 13))
            for step, distance in spread.items():
                if step in together_steps:
                    assert distance <= 1e-6 * norm[step], (case, r, step, distance)
                else:
                    assert distance > 1e-3 * norm[step], (case, r, step, distance)


# ---- communication: collectives counted on every training step

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "gather",
    "scatter",
    "barrier",
    "monitored_barrier",
    "all_to_all",
    "all_to_all_single",
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)
COUNTED_CASES = {
    "tanh": ["coupling=tanh", "coupling.every=2"],
    "tanh_sync": ["coupling=tanh", "coupling.every=2", "dist.overlap=false"],
    # 2410 weights + a 2x5 table of guard words, 1000 floats a bucket: 3 all_reduces a step.
    "linear_3_buckets": ["coupling=linear", f"dist.bucket_mb={4000 / 2**20}"],
    "linear": ["coupling=linear"],
    "average": ["coupling=average", "coupling.every=3"],
    "none": ["coupling=none"],
    "tanh_cnn_batchnorm": CASES["tanh_cnn_batchnorm"],
}


def _count_collectives(rank: int, world_size: int, root: str) -> None:
    calls = defaultdict(int)
    current_step = [0]

    def counted(original):
        def wrapper(*args, **kwargs):
            calls[current_step[0]] += 1
            return original(*args, **kwargs)

        return wrapper

    for name in COLLECTIVES:
        setattr(tdist, name, counted(getattr(tdist, name)))

    begin = ReplicaCoupling.begin_step

    def spy(self, *args, **kwargs):  # the coupling begins every step
        current_step[0] = self.step_count + 1
        return begin(self, *args, **kwargs)

    ReplicaCoupling.begin_step = spy
    for case, overrides in COUNTED_CASES.items():
        calls.clear()
        current_step[0] = 0
        run_dir = Path(root) / case
        cfg, _ = load_config(
            COMMON
            + overrides
            + ["train.steps=12", "log.every=1000", "eval.every=1000", f"hydra.run.dir={run_dir}"]
        )
        loop.train(cfg, run_dir, torch.device("cpu"))
        (Path(root) / f"{case}.rank{rank}.json").write_text(json.dumps(calls))


def test_one_collective_per_coupling_step_and_none_for_independent_replicas(tmp_path):
    run_world(_count_collectives, 2, str(tmp_path))
    for case, overrides in COUNTED_CASES.items():
        cfg, _ = load_config(COMMON + overrides + [f"hydra.run.dir={tmp_path}"])
        for rank in range(2):
            calls = {
                int(k): v for k, v in json.loads((tmp_path / f"{case}.rank{rank}.json").read_text()).items()
            }
            # Steps 1 and 12 log and evaluate; steps 2..11 only train.
            per_step = [calls.get(step, 0) for step in range(2, 12)]
            buckets = 3 if case == "linear_3_buckets" else 1
            expected = [buckets * int(is_coupling_step(cfg.coupling, step)) for step in range(2, 12)]
            assert per_step == expected, (case, rank, per_step)
            assert calls[1] > 0 and calls[12] > 0  # diagnostics do communicate
    assert (
        sum(int(is_coupling_step(load_config(COUNTED_CASES["none"])[0].coupling, s)) for s in range(12)) == 0
    )


# ---- center and ensemble, recomputed in one process from the saved replica weights


def _recompute(cfg, weights: list[dict[str, torch.Tensor]]):
    from replica_dist.data import load_dataset
    from replica_dist.model import build_model

    dtype = getattr(torch, cfg.train.dtype)
    data = load_dataset(cfg.data, cfg.seed, dtype)
    model = build_model(cfg.model, data.input_shape, data.num_outputs, 0).to(dtype).eval()
    center = {
        k: (torch.stack([w[k] for w in weights]).mean(0) if v.is_floating_point() else v)
        for k, v in weights[0].items()
    }
    results = {"center": {}, "ensemble": {}}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        with torch.no_grad():
            model.load_state_dict(center)
            center_probs = model(x).softmax(1)
            replica_probs = []
            for w in weights:
                model.load_state_dict(w)
                replica_probs.append(model(x).softmax(1))
        ensemble_probs = torch.stack(replica_probs).mean(0)
        for name, probs in (("center", center_probs), ("ensemble", ensemble_probs)):
            results[name][f"{split}_loss"] = -probs[torch.arange(len(y)), y].log().mean().item()
            results[name][f"{split}_accuracy"] = (probs.argmax(1) == y).double().mean().item()
    return results


@pytest.mark.parametrize("case", ["tanh", "tanh_cnn_batchnorm", "none"])
def test_center_and_ensemble_equal_a_single_process_recomputation(trained, case):
    world_size, root = trained
    cfg = config(case, root / case)
    expected = _recompute(cfg, replica_weights(root / case, world_size))
    summary = json.loads((root / case / "summary.json").read_text())
    for model in ("center", "ensemble"):
        assert summary[model] == pytest.approx(expected[model], rel=1e-5, abs=1e-6), model


# ---- overlaps: the formula from the center alone against brute-force pairwise products


def _train_for_overlaps(rank: int, world_size: int, root: str) -> None:
    run_dir = Path(root)
    cfg, _ = load_config(
        COMMON + ["coupling=tanh", "train.steps=6", "log.every=1", f"hydra.run.dir={run_dir}"]
    )
    loop.train(cfg, run_dir, torch.device("cpu"))


@pytest.mark.parametrize("world_size", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_overlaps_equal_brute_force_pairwise_products(tmp_path, world_size):
    run_world(_train_for_overlaps, world_size, str(tmp_path))
    weights = replica_weights(tmp_path, world_size)
    center_run = events(tmp_path / "tb" / "center")
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        w = [weights[a][name].double().flatten() for a in range(world_size)]
        pair_dots = [w[a] @ w[b] for a in range(world_size) for b in range(world_size) if a != b]
        mean_square = sum(wa @ wa for wa in w) / world_size
        expected_pairwise = (sum(pair_dots) / len(pair_dots) / mean_square).item()
        logged = {e.step: e.value for e in center_run.Scalars(f"pairwise_overlap/{name}")}
        assert logged[6] == pytest.approx(expected_pairwise, rel=1e-5, abs=1e-6), name
        mean = sum(w) / world_size
        for a in range(world_size):
            expected_q = (w[a] @ mean / (w[a].norm() * mean.norm())).item()
            logged_q = scalar(tmp_path / "tb" / f"replica_{a}", f"overlap/{name}")
            assert logged_q[6] == pytest.approx(expected_q, rel=1e-5, abs=1e-6), (name, a)
