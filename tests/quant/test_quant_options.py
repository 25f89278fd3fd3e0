"""Recipe options end to end: 16-bit residual adds, per-group weights, pow2 scales, LSQ training."""
import torch
import yaml

from fairseq_qasr.quant import calibrate, quantize_model
from fairseq_qasr.quant.audit import audit
from fairseq_qasr.quant.recipe import RECIPE_DIR

from quant_toy import ToyBlock, toy_inputs


def recipe(**changes):
    d = yaml.safe_load((RECIPE_DIR / "w8a8.yaml").read_text())
    for k, v in changes.items():
        d[k] = {**(d.get(k) or {}), **v}
    return d


def build(r):
    torch.manual_seed(0)
    m = ToyBlock().eval()
    inp = toy_inputs()
    quantize_model(m, r, example_inputs=inp)
    calibrate(m, [inp])
    return m, inp


def test_16bit_residual_add_is_reported():
    m, inp = build(recipe(ops={"add": {"input": {"bits": 16}}}))
    r = audit(m, [inp])
    assert r.ok and r.rows[("add", "add")].bits[0] == {16}, r.table()


def test_per_group_weights_and_pow2_scales_audit_clean():
    w = {"bits": 4, "symmetric": True, "granularity": "group", "group_size": 4, "pow2": True}
    m, inp = build(recipe(defaults={"weight": w, "input": {"bits": 8, "pow2": True}}))
    assert tuple(m.qkv.w_q["weight"].scale.shape) == (48, 4)
    s = m.qkv.w_q["weight"].scale
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    assert audit(m, [inp]).ok


def test_lsq_training_step_updates_scales():
    m, inp = build(recipe(defaults={"weight": {"learning": "lsq"}, "input": {"learning": "lsq_plus"}}))
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1e-2)
    before = m.o.w_q["weight"].scale.detach().clone()
    loss = m(*inp).pow(2).mean()
    loss.backward()
    assert m.o.w_q["weight"].scale.grad is not None and m.qkv.weight.grad is not None
    opt.step()
    assert not torch.equal(before, m.o.w_q["weight"].scale.detach())
    m.eval()
    assert audit(m, [inp]).ok
