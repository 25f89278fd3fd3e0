"""QAT schedules: observer freezing, learnable-scale warm-up, progressive bit lowering; bits survive save/load."""
import pytest
import torch
from torch import nn

from fairseq_qasr.quant import RecipeError, calibrate, load_recipe, quantize_model
from fairseq_qasr.quant.qtype import QSpec
from fairseq_qasr.quant.quantizer import Quantizer
from fairseq_qasr.quant.schedule import Schedule, activation_quantizers, weight_quantizers


def recipe(schedule, learning="none"):
    return {"version": 1, "name": "sched",
            "defaults": {"weight": {"bits": 8, "signed": True, "symmetric": True, "granularity": "channel",
                                    "observer": "minmax", "learning": learning},
                         "input": {"bits": 8, "signed": True, "symmetric": False, "observer": "minmax"},
                         "output": None},
            "schedule": schedule}


def model_and_batch(schedule, learning="none"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(32, 6)
    quantize_model(model, recipe(schedule, learning), example_inputs=(x,))
    calibrate(model, [(x,)])
    return model, x


def test_observers_run_only_during_the_observe_phase():
    model, x = model_and_batch({"observe_updates": 2})
    sched = model.qasr_recipe.schedule
    for update, expected in [(0, True), (1, True), (2, False), (5, False)]:
        sched.before_update(model, update)
        assert all(q.observing == expected for _, q in activation_quantizers(model))
    first = next(q for _, q in activation_quantizers(model))
    hi = first.hi.clone()
    model(x * 10)  # frozen: a wider batch does not move the range
    assert torch.equal(first.hi, hi)


def test_progressive_bits_lower_weight_grids_and_refit_ranges():
    model, x = model_and_batch({"weight_bits": [[0, 8], [3, 4], [6, 2]]})
    sched = model.qasr_recipe.schedule
    for update, bits in [(0, 8), (2, 8), (3, 4), (5, 4), (6, 2), (100, 2)]:
        events = sched.before_update(model, update)
        assert {q.spec.bits for _, _, q in weight_quantizers(model)} == {bits}
        assert bool(events) == (update in (3, 6))
    for module, name, q in weight_quantizers(model):
        w = q(getattr(module, name))
        scale = q.current_scale().view(-1, 1)
        levels = torch.unique(torch.round(w / scale), dim=None)
        assert levels.min() >= q.spec.qmin and levels.max() <= q.spec.qmax and len(levels) <= 4  # 2-bit grid
    activations = {q.spec.bits for _, q in activation_quantizers(model)}
    assert activations == {8}  # only weights are lowered


def test_scale_warmup_keeps_learnable_scales_fixed():
    model, x = model_and_batch({"scale_warmup_updates": 2}, learning="lsq")
    sched = model.qasr_recipe.schedule
    learnable = [p for _, _, q in weight_quantizers(model) for p in q.parameters(recurse=False)]
    assert learnable
    for update, frozen in [(0, True), (1, True), (2, False)]:
        model.zero_grad()
        model(x).pow(2).sum().backward()
        sched.after_backward(model, update)
        assert all((p.grad is None) == frozen for p in learnable)


def test_lowered_bits_are_saved_and_restored():
    q = Quantizer(QSpec(bits=8, symmetric=True))
    q.observe(torch.randn(100))
    q.set_bits(3)
    fresh = Quantizer(QSpec(bits=8, symmetric=True))
    fresh.load_state_dict(q.state_dict())
    assert fresh.spec.bits == 3 and torch.equal(fresh.scale, q.scale)


@pytest.mark.parametrize("schedule, message", [
    ({"observe": 3}, r"schedule: unknown key\(s\) \['observe'\]"),
    ({"observe_updates": -1}, r"schedule.observe_updates: expected an integer >= 0"),
    ({"weight_bits": [[0, 8], [5, 9]]}, r"schedule.weight_bits: bits 9 not in 1..8 or 16"),
    ({"weight_bits": [[5, 4]]}, r"the first phase must start at update 0"),
    ({"weight_bits": [[0, 8], [5, 4], [5, 2]]}, r"phase updates must increase strictly"),
])
def test_schedule_validation_names_the_field(schedule, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe(schedule))


def test_schedule_round_trips_through_recipe_dict():
    r = load_recipe(recipe({"observe_updates": 4, "scale_warmup_updates": 1, "weight_bits": [[0, 8], [2, 4]]}))
    again = load_recipe(r.to_dict())
    assert again.schedule == r.schedule == Schedule(4, 1, [(0, 8), (2, 4)])
