"""The coupling formulas, in one process, against values computed by hand."""

import math

import pytest
import torch

from replica_dist.config import CouplingConfig
from replica_dist.coupling import eta_at, is_coupling_step, schedule_note
from replica_dist.reference import pull

W = torch.tensor([0.0, 1.0, -2.0, 0.25], dtype=torch.float64)
MEAN = torch.tensor([0.5, 0.5, 0.5, 0.25], dtype=torch.float64)


def test_tanh_pull_is_the_notes_rule():
    expected = [0.1 * math.tanh(0.5), 0.1 * math.tanh(-0.5), 0.1 * math.tanh(2.5), 0.0]
    assert pull("tanh", W, MEAN, eta=0.1).tolist() == pytest.approx(expected, abs=1e-15)


def test_tanh_temperature_divides_the_difference():
    expected = [0.3 * math.tanh(0.5 / 0.25), 0.3 * math.tanh(-0.5 / 0.25), 0.3 * math.tanh(2.5 / 0.25), 0.0]
    assert pull("tanh", W, MEAN, eta=0.3, temperature=0.25).tolist() == pytest.approx(expected, abs=1e-15)


def test_tanh_pull_is_bounded_by_eta():
    far = pull("tanh", torch.tensor([-1e6, 1e6]), torch.zeros(2), eta=0.2)
    assert far.tolist() == pytest.approx([0.2, -0.2])


def test_linear_pull():
    assert pull("linear", W, MEAN, eta=0.1).tolist() == pytest.approx([0.05, -0.05, 0.25, 0.0], abs=1e-15)


def test_average_pull_moves_onto_the_mean():
    assert (W + pull("average", W, MEAN, eta=123.0)).tolist() == MEAN.tolist()


@pytest.mark.parametrize("form", ["none", "ddp"])
def test_forms_without_a_pull_refuse(form):
    with pytest.raises(ValueError, match=form):
        pull(form, W, MEAN, eta=0.1)


def test_one_step_each_form_from_hand_computed_tensors():
    """w_new = w - lr*g + pull(w, mean) with the pre-step w and mean, two replicas."""
    w = [torch.tensor([1.0, -1.0]), torch.tensor([3.0, 1.0])]
    g = [torch.tensor([0.5, 0.0]), torch.tensor([-1.0, 2.0])]
    lr, eta = 0.1, 0.5
    mean = (w[0] + w[1]) / 2  # [2, 0]
    stepped = [wa - lr * ga for wa, ga in zip(w, g)]  # [0.95, -1], [3.1, 0.8]
    tanh_new = [s + pull("tanh", wa, mean, eta) for s, wa in zip(stepped, w)]
    assert tanh_new[0].tolist() == pytest.approx([0.95 + 0.5 * math.tanh(1.0), -1 + 0.5 * math.tanh(1.0)])
    assert tanh_new[1].tolist() == pytest.approx([3.1 - 0.5 * math.tanh(1.0), 0.8 - 0.5 * math.tanh(1.0)])
    linear_new = [s + pull("linear", wa, mean, eta) for s, wa in zip(stepped, w)]
    assert linear_new[0].tolist() == pytest.approx([1.45, -0.5])
    assert linear_new[1].tolist() == pytest.approx([2.6, 0.3])
    # average: the mean of the post-step weights, the same for both replicas
    post_mean = (stepped[0] + stepped[1]) / 2
    average_new = [s + pull("average", s, post_mean, eta) for s in stepped]
    assert average_new[0].tolist() == pytest.approx([2.025, -0.1])
    assert average_new[1].tolist() == pytest.approx([2.025, -0.1])


def test_eta_schedule_scopes_and_caps():
    cfg = CouplingConfig(name="linear", eta=0.1, eta_growth=0.5, eta_max=0.3)
    assert [eta_at(cfg, s, 4) for s in (1, 2, 3, 4)] == pytest.approx([0.1, 0.15, 0.225, 0.3])
    assert eta_at(CouplingConfig(name="tanh", eta=0.2, eta_growth=0.0), 1000, 1000) == 0.2  # constant
    # (1 + g)^t overflows a float near t = 7500 for g = 0.1; the capped schedule must not.
    assert eta_at(CouplingConfig(name="tanh", eta=0.01, eta_growth=0.1, eta_max=0.5), 10**6, 10**6) == 0.5


@pytest.mark.parametrize("steps", [1, 2, 200, 1500, 10**6])
def test_eta_without_eta_final_ignores_the_run_length(steps):
    """eta_final unset keeps the growth per step: today's values, bit for bit, for any run length."""
    cfg = CouplingConfig(name="tanh", eta=0.001, eta_growth=0.004)
    for step in (1, 2, 100, 1500, 5000):
        log_eta = math.log(0.001) + (step - 1) * math.log1p(0.004)
        assert eta_at(cfg, step, steps) == min(1.0, math.exp(min(log_eta, 0.0)))
    assert eta_at(cfg, 1500, steps) == pytest.approx(0.001 * 1.004**1499, rel=1e-12)


@pytest.mark.parametrize("steps", [2, 7, 300, 1500])
def test_eta_final_is_the_closed_form_over_the_run(steps):
    cfg = CouplingConfig(name="linear", eta=0.001, eta_final=0.4)
    for step in sorted({1, 2, steps // 2, steps - 1, steps}):
        expected = 0.001 * (0.4 / 0.001) ** ((step - 1) / (steps - 1))
        assert eta_at(cfg, step, steps) == pytest.approx(expected, rel=1e-12)
    assert eta_at(cfg, 1, steps) == pytest.approx(0.001, rel=1e-12)
    assert eta_at(cfg, steps, steps) == pytest.approx(0.4, rel=1e-12)


def test_eta_final_edge_cases():
    assert eta_at(CouplingConfig(name="tanh", eta=0.001, eta_final=0.4), 1, 1) == pytest.approx(0.4)
    # eta_final below eta_0: the schedule decays, still geometric
    decay = CouplingConfig(name="tanh", eta=0.5, eta_final=0.05)
    assert eta_at(decay, 6, 11) == pytest.approx(0.5 * 0.1**0.5)
    # steps beyond the run (a resumed run with more steps is a new schedule) stay capped
    capped = CouplingConfig(name="tanh", eta=0.001, eta_final=0.4, eta_max=0.5)
    assert eta_at(capped, 10**6, 100) == 0.5


def test_schedule_note_for_a_short_run_with_the_growth_per_step():
    # The study's growth per step: 0.001 * 1.004^199 = 0.00221 at 200
    cfg = CouplingConfig(name="tanh", eta_growth=0.004)
    note = schedule_note(cfg, 200)
    assert note == (
        "coupling: eta reaches only 0.0022 at the last step of 200; "
        "coupling.eta_final=0.4 keeps the shape the study chose"
    )
    assert schedule_note(CouplingConfig(name="linear", eta_growth=0.004), 300) is not None
    # 0.001 * 1.004^(t-1) >= 0.04 from t = 926 on (0.039990 at 925): the study's full run needs no note
    assert schedule_note(cfg, 925) is not None
    assert schedule_note(cfg, 926) is None
    assert schedule_note(cfg, 1500) is None


@pytest.mark.parametrize(
    "cfg",
    [
        CouplingConfig(name="tanh", eta_final=0.4),  # the run-relative schedule
        CouplingConfig(name="tanh"),  # the default: the same
        CouplingConfig(name="linear"),
        CouplingConfig(name="tanh", eta=0.05, eta_growth=0.0),  # a constant eta is a choice
        CouplingConfig(name="average"),
        CouplingConfig(name="none"),
        CouplingConfig(name="ddp"),
        CouplingConfig(name="tanh", eta_max=0.005),  # capped on purpose, reaches a tenth of it
    ],
)
def test_no_schedule_note(cfg):
    assert schedule_note(cfg, 200) is None


def test_schedule_note_respects_a_small_cap():
    note = schedule_note(CouplingConfig(name="tanh", eta=1e-5, eta_growth=0.001, eta_max=0.01), 100)
    assert note is not None and "coupling.eta_final=0.01 " in note


@pytest.mark.parametrize(
    "name, every, expected",
    [
        ("tanh", 1, [1, 2, 3, 4, 5, 6]),
        ("linear", 2, [2, 4, 6]),
        ("average", 3, [3, 6]),
        ("none", 1, []),
        ("ddp", 1, []),
    ],
)
def test_coupling_steps(name, every, expected):
    cfg = CouplingConfig(name=name, every=every)
    assert [s for s in range(1, 7) if is_coupling_step(cfg, s)] == expected


def test_stability_note_names_the_first_step_where_eta_over_t_exceeds_2():
    from replica_dist.coupling import stability_note

    cfg = CouplingConfig(name="tanh", temperature=0.1, eta_growth=0.004)  # eta 0.001 growing 0.4% a step
    # eta_t = 0.001 * 1.004^(t-1) > 0.2  <=>  t - 1 > ln(200) / ln(1.004)
    first = math.floor(math.log(200) / math.log(1.004)) + 2
    assert first == 1329
    assert f"from step {first} " in stability_note(cfg, 1500)
    assert stability_note(cfg, first - 1) is None  # a run that ends before it is fine
    assert stability_note(CouplingConfig(name="tanh", temperature=0.1, eta_max=0.05), 1500) is None
    assert stability_note(CouplingConfig(name="linear", eta_max=1.0), 1500) is None
    # The default schedule, relative to the run: 0.001 * 400^((t-1)/(T-1)) > 0.2 past 88.4% of it.
    relative = CouplingConfig(name="tanh", temperature=0.1)
    first = math.floor(math.log(200) / math.log(400) * 299) + 2
    assert f"from step {first} " in stability_note(relative, 300)


@pytest.mark.parametrize(("form", "temperature"), [("tanh", 1.0), ("tanh", 0.3), ("linear", 1.0)])
def test_the_fused_pull_equals_the_textbook_one(form, temperature):
    # The trainer's pull works in place on the replicas' sum with the mean's division folded
    # in; its result, times eta, must be `pull` of the weights and the mean.
    from replica_dist.flat import FlatState
    from replica_dist.forms import FORMS

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    state = FlatState(model)
    state.save_buffers()
    w = state.pack()
    others = [w + 0.3 * torch.randn_like(w) for _ in range(2)]
    total = w + others[0] + others[1]
    expected = pull(form, w, total / 3, eta=0.05, temperature=temperature)
    elastic = FORMS[form].from_config(CouplingConfig(name=form, temperature=temperature), 1)
    direction = elastic.direction_(total.clone(), state, 3, torch.tensor(True), 1)
    torch.testing.assert_close(0.05 * direction, expected, atol=1e-8, rtol=1e-6)
    # Not applied: exactly zero, even where the gap is not finite.
    total[0] = float("inf")
    assert torch.equal(elastic.direction_(total, state, 3, torch.tensor(False), 1), torch.zeros_like(w))
