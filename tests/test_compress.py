"""dist.compress (bf16, int8) and dist.error_feedback: the round trip, the exchange in real gloo
worlds against a single-process reference written here, the bytes sent against their closed
form, the trainer's comm/bytes_sent, bad configs, and a bit-for-bit resume with the residual."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from trainer_runs import replica_weights, scalar
from worlds import COLLECTIVE_TIMEOUT_S, run_world

from replica_dist import dist, loop
from replica_dist.config import ConfigError, load_config
from replica_dist.coupling import ReplicaCoupling
from replica_dist.guard import Guard

CHUNK = 64
NUMEL = 5 * CHUNK + 37  # a shorter last chunk
ROW_LEN = 5
FP32 = 4


def _inputs(numel: int, world_size: int) -> list[torch.Tensor]:
    """Every replica's vector: chunks of very different magnitudes, exact zeros, an all-zero chunk."""
    g = torch.Generator().manual_seed(7)
    xs = []
    for _ in range(world_size):
        x = torch.randn(numel, generator=g)
        magnitudes = torch.tensor([1e-6, 1.0, 0.0, 1e3, 3e-2, 17.0])  # chunk 2 all zeros
        x *= magnitudes.repeat_interleave(CHUNK)[:numel]
        x[::11] = 0.0
        xs.append(x)
    return xs


# ---- 1. the int8 round trip


def test_int8_round_trip_is_off_by_at_most_half_a_step():
    x = _inputs(NUMEL, 1)[0]
    chunks = math.ceil(NUMEL / CHUNK)
    padded = torch.cat([x, x.new_zeros(chunks * CHUNK - NUMEL)]).view(chunks, CHUNK)
    scale = padded.abs().amax(1) / 127  # computed here, not by the code under test
    q = dist.quantize_int8(x, scale, CHUNK, out=torch.empty(NUMEL, dtype=torch.int8))
    back = dist.dequantize_int8(q, scale, CHUNK, out=torch.empty(NUMEL))
    step = scale.repeat_interleave(CHUNK)[:NUMEL].double()
    err = (back.double() - x.double()).abs()
    # Half a step, plus the one float32 rounding of the dequantised product.
    assert (err <= step / 2 + x.abs().double() * torch.finfo(torch.float32).eps).all()
    assert (err[step > 0] / step[step > 0]).max() > 0.45  # the bound is nearly reached: not vacuous
    assert torch.equal(back[x == 0], x[x == 0])  # zeros, and the all-zero chunk, come back exact
    assert torch.equal(back[2 * CHUNK : 3 * CHUNK], torch.zeros(CHUNK))
    assert q.abs().max() == 127


def test_a_non_finite_value_never_comes_back_finite():
    x = _inputs(NUMEL, 1)[0]
    x[CHUNK + 3], x[3 * CHUNK + 1] = math.nan, math.inf
    scale = dist.chunk_absmax(x, CHUNK) / 127
    q = dist.quantize_int8(x, scale, CHUNK, out=torch.empty(NUMEL, dtype=torch.int8))
    back = dist.dequantize_int8(q, scale, CHUNK, out=torch.empty(NUMEL))
    bad_chunks = torch.zeros(NUMEL, dtype=torch.bool)
    bad_chunks[CHUNK : 2 * CHUNK] = bad_chunks[3 * CHUNK : 4 * CHUNK] = True
    assert not back[bad_chunks].isfinite().any()
    assert back[~bad_chunks].isfinite().all()


# ---- 2 and 4. the exchange in real worlds: against a reference, identical on all ranks, bytes


def _reference_mean(xs: list[torch.Tensor], compress: str) -> torch.Tensor:
    """Quantise as the exchange should, written independently of it."""
    if compress == "bf16":
        terms = [x.to(torch.bfloat16).to(torch.float32) for x in xs]
    else:
        numel = xs[0].numel()
        chunks = math.ceil(numel / CHUNK)
        padded = [torch.cat([x, x.new_zeros(chunks * CHUNK - numel)]).view(chunks, CHUNK) for x in xs]
        scale = torch.stack(padded).abs().amax(dim=(0, 2)) / 127  # max over ranks per chunk
        terms = []
        for x in padded:
            q = torch.where(scale[:, None] > 0, torch.round(x / scale[:, None]), 0.0).clamp(-127, 127)
            terms.append((q * scale[:, None]).flatten()[:numel])
    total = terms[0]
    for term in terms[1:]:  # in replica order
        total = total + term
    return total / len(xs)


def _words(rank: int) -> torch.Tensor:
    # 2**24 - 3 - rank: exact in float32, not in bf16 (8 bits of mantissa): the table is not quantised.
    return torch.tensor([rank + 1.0, 0.0, 2.0**24 - 3 - rank, 7.0, 3.0])


def _exchange_world(rank: int, world_size: int, out: str) -> None:
    mine = _inputs(NUMEL, world_size)[rank]
    results = {}
    for compress in ("none", "bf16", "int8"):
        exchange = dist.ReplicaExchange(
            NUMEL,
            ROW_LEN,
            torch.float32,
            torch.device("cpu"),
            100.0,
            dist.Mesh(),
            compress=compress,
            chunk=CHUNK,
        )
        sizes = []
        for _ in range(2):
            exchange.flat.copy_(mine)
            exchange.start(_words(rank))
            mean, words = (t.clone() for t in exchange.wait())  # views of the buffer reused below
            sizes.append(exchange.last_bytes)
        exchange.flat.copy_(mine)
        exchange.start(_words(rank), exact=True)
        exact_mean, _ = exchange.wait()
        results[compress] = {
            "mean": mean,
            "words": words,
            "sizes": sizes,
            "bytes_sent": exchange.bytes_sent,
            "exact_mean": exact_mean.clone(),
            "buckets": len(exchange._spans) if compress != "none" else len(exchange.buckets),
        }
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("world_size", [2, 3])
def test_compressed_mean_equals_a_single_process_reference_on_every_rank(tmp_path, world_size):
    run_world(_exchange_world, world_size, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    xs = _inputs(NUMEL, world_size)
    table_bytes = world_size * ROW_LEN * FP32
    closed_form = {
        "none": NUMEL * FP32 + table_bytes,
        "bf16": NUMEL * 2 + table_bytes,
        "int8": NUMEL * 1 + math.ceil(NUMEL / CHUNK) * FP32 + table_bytes,
    }
    for compress in ("bf16", "int8"):
        expected = _reference_mean(xs, compress)
        assert not torch.equal(expected, torch.stack(xs).sum(0) / world_size)  # compression did something
        for r, result in enumerate(results):
            assert torch.equal(result[compress]["mean"], expected), (compress, r)
            assert result[compress]["buckets"] > 1  # bucketed all_gather
    for compress in ("none", "bf16", "int8"):
        for r, result in enumerate(results):
            got = result[compress]
            # bit-identical on every rank
            assert torch.equal(got["mean"], results[0][compress]["mean"]), (compress, r)
            assert torch.equal(got["words"], torch.stack([_words(i) for i in range(world_size)]))
            assert got["sizes"] == [closed_form[compress]] * 2
            # the exact start (diagnostics) sends the whole float32 buffer
            assert got["bytes_sent"] == 2 * closed_form[compress] + closed_form["none"]
            assert torch.equal(got["exact_mean"], results[r]["none"]["mean"])
    torch.testing.assert_close(results[0]["none"]["mean"], torch.stack(xs).mean(0), rtol=1e-6, atol=1e-6)


# ---- 3. error feedback


EF_NUMEL, EF_CHUNK, EXCHANGES = 32, 8, 8
STEP = 2.0**-10


def _dyadic_inputs(world_size: int) -> list[torch.Tensor]:
    """Every value a multiple of STEP/4, so that all sums below are exact in float32; each chunk
    holds 127*STEP in replica 0 and the rest stays under 100*STEP even with a residual
    added, so the int8 step is STEP at every exchange."""
    g = torch.Generator().manual_seed(11)
    xs = []
    for r in range(world_size):
        x = torch.randint(-400, 400, (EF_NUMEL,), generator=g).float() * (STEP / 4)
        if r == 0:
            x[::EF_CHUNK] = 127 * STEP
        xs.append(x)
    return xs


def _error_feedback_world(rank: int, world_size: int, out: str) -> None:
    mine = _dyadic_inputs(world_size)[rank]
    results = {}
    for feedback in (True, False):
        exchange = dist.ReplicaExchange(
            EF_NUMEL,
            ROW_LEN,
            torch.float32,
            torch.device("cpu"),
            1e6,
            dist.Mesh(),
            compress="int8",
            chunk=EF_CHUNK,
            error_feedback=feedback,
        )
        sums = torch.zeros(EF_NUMEL)
        for _ in range(EXCHANGES):
            exchange.flat.copy_(mine)
            exchange.start(_words(rank))
            total, _ = exchange.wait(divide=False)
            sums += total
        residuals = exchange.residual.clone() if feedback else torch.zeros(EF_NUMEL)
        tdist.all_reduce(residuals)  # the last residual of every replica, summed
        results[feedback] = {"sums": sums, "residuals": residuals}
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_error_feedback_carries_the_rounding_so_the_sum_of_sends_is_exact(tmp_path):
    world_size = 2
    run_world(_error_feedback_world, world_size, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    truth = torch.stack(_dyadic_inputs(world_size)).sum(0) * EXCHANGES
    for result in results:
        fed, plain = result[True], result[False]
        # Σ_t Σ_r decompressed = Σ_t Σ_r x_r - Σ_r (last residual), exactly (all values dyadic)
        assert torch.equal(fed["sums"] + fed["residuals"], truth)
        assert (fed["residuals"].abs() <= world_size * STEP / 2).all()
        # The running mean converges: off by at most the last residual over the exchanges...
        assert ((fed["sums"] - truth).abs() / EXCHANGES <= world_size * STEP / 2 / EXCHANGES).all()
        # ...where without feedback the same rounding repeats at every exchange.
        assert ((plain["sums"] - truth).abs() / EXCHANGES).max() >= STEP / 4
        assert torch.equal(fed["sums"], results[0][True]["sums"])


# ---- 5. through the trainer: it trains, and comm/bytes_sent is the closed form


TRAIN = [
    "train.steps=6",
    "train.batch_size=16",
    "model.hidden=[32]",
    "log.every=2",
    "eval.every=6",
    "seed=3",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]
TRAIN_CASES = {
    "tanh_int8": ["coupling=tanh", "coupling.eta=0.05", "dist.compress=int8"],
    # every=2: the logging step 1 exchanges for the diagnostics only, exact and not counted
    "linear_bf16_feedback_every2": [
        "coupling=linear",
        "coupling.eta=0.2",
        "coupling.every=2",
        "dist.compress=bf16",
        "dist.error_feedback=true",
    ],
    "average_int8_chunk100": [
        "coupling=average",
        "coupling.every=3",
        "dist.compress=int8",
        "dist.compress_chunk=100",
    ],
}


def _train_world(rank: int, world_size: int, root: str) -> None:
    for case, overrides in TRAIN_CASES.items():
        run_dir = Path(root) / case
        cfg, _ = load_config(TRAIN + overrides + [f"hydra.run.dir={run_dir}"])
        loop.train(cfg, run_dir, torch.device("cpu"))


def test_trainer_with_compression_trains_and_logs_the_bytes_it_sends(tmp_path):
    world_size = 2
    run_world(_train_world, world_size, str(tmp_path))
    for case in TRAIN_CASES:
        run_dir = tmp_path / case
        numel = sum(t.numel() for t in replica_weights(run_dir, world_size)[0].values())
        table = world_size * Guard.WORD_LENGTH * FP32
        if case == "tanh_int8":
            per_exchange, steps_with_exchange = numel + math.ceil(numel / 1024) * FP32 + table, lambda s: s
        elif case == "average_int8_chunk100":
            per_exchange, steps_with_exchange = (
                numel + math.ceil(numel / 100) * FP32 + table,
                lambda s: s // 3,
            )
        else:
            per_exchange, steps_with_exchange = numel * 2 + table, lambda s: s // 2
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "ok", case
        assert summary["comm"]["bytes_sent_per_rank"] == steps_with_exchange(6) * per_exchange
        for r in range(world_size):
            logged = scalar(run_dir / "tb" / f"replica_{r}", "comm/bytes_sent")
            assert logged == {s: float(steps_with_exchange(s) * per_exchange) for s in (1, 2, 4, 6)}, (
                case,
                r,
            )
            losses = scalar(run_dir / "tb" / f"replica_{r}", "train/loss")
            assert all(math.isfinite(v) for v in losses.values())
    # average: the replicas end identical (every rank decompressed the same bytes)
    weights = replica_weights(tmp_path / "average_int8_chunk100", world_size)
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name])


# ---- 6. bad configs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["coupling=ddp", "dist.compress=int8"],
            r"^dist\.compress=int8 is not available for coupling\.name=ddp \(it averages gradients in "
            r"DDP's own all_reduce\)$",
        ),
        (["dist.error_feedback=true"], r"^dist\.error_feedback needs compression"),
        (["dist.compress=fp8"], r"^dist\.compress must be one of none, bf16, int8; got 'fp8'$"),
        (["dist.compress=int8", "dist.compress_chunk=0"], r"^dist\.compress_chunk must be >= 1; got 0$"),
        (
            ["dist.compress=bf16", "dist.compress_chunk=64"],
            r"^dist\.compress_chunk is only used with dist\.compress=int8",
        ),
    ],
)
def test_bad_compression_configs_name_the_key_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config([f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "arguments"),
    [(["dist.compress=fp8"], {"compress": "fp8"}), (["dist.error_feedback=true"], {"error_feedback": True})],
)
def test_the_exchange_built_directly_refuses_what_the_config_refuses(tmp_path, overrides, arguments):
    """Before any collective (no process group here): the config's message, for the argument."""
    with pytest.raises(ConfigError) as from_config:
        load_config([f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ValueError) as from_exchange:
        dist.ReplicaExchange(NUMEL, ROW_LEN, torch.float32, torch.device("cpu"), 1e6, None, **arguments)
    assert str(from_exchange.value) == str(from_config.value).replace("dist.", "")
    assert dist.COMPRESSIONS == ("none", "bf16", "int8")


# ---- 7. resume through the public object, with the residual


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 40, generator=g)
    return x, x[:, :3].sum(1, keepdim=True)


def _build(rank: int):
    torch.manual_seed(rank)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    coupling = ReplicaCoupling(
        model, optimizer, "tanh", eta=0.1, compress="int8", compress_chunk=64, error_feedback=True
    )
    return model, optimizer, coupling


def _train(model, optimizer, coupling, rank: int, steps: range) -> None:
    for step in steps:
        x, y = _batch(rank, step)
        coupling.begin_step()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        coupling.step(loss)


def _resume_world(rank: int, world_size: int, out: str) -> None:
    model, optimizer, coupling = _build(rank)
    _train(model, optimizer, coupling, rank, range(1, 9))
    straight = [p.detach().clone() for p in model.parameters()]

    model, optimizer, coupling = _build(rank)
    _train(model, optimizer, coupling, rank, range(1, 5))
    buffer = io.BytesIO()
    torch.save([model.state_dict(), optimizer.state_dict(), coupling.state_dict()], buffer)
    saved = buffer.getvalue()
    results = {"straight": straight}

    for variant in ("resumed", "residual_dropped"):
        model, optimizer, coupling = _build(rank)  # fresh: other init, zero residual
        model_state, optimizer_state, coupling_state = torch.load(io.BytesIO(saved))
        if variant == "residual_dropped":
            coupling_state["residual"].zero_()
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        coupling.load_state_dict(coupling_state)
        _train(model, optimizer, coupling, rank, range(5, 9))
        results[variant] = [p.detach().clone() for p in model.parameters()]
        results[f"residual_norm_{variant}"] = float(coupling_state["residual"].abs().sum())
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_resume_with_the_error_feedback_residual_is_bit_for_bit(tmp_path):
    world_size = 2
    run_world(_resume_world, world_size, str(tmp_path))
    for r in range(world_size):
        results = torch.load(tmp_path / f"rank{r}.pt")
        assert results["residual_norm_resumed"] > 0  # the residual was in the state dict
        for straight, resumed in zip(results["straight"], results["resumed"]):
            assert torch.equal(straight, resumed)
        # without the residual the run goes elsewhere: the test can tell
        assert not all(torch.equal(a, b) for a, b in zip(results["straight"], results["residual_dropped"]))
