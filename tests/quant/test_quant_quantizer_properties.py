"""Property tests of the affine fake-quantizer, observers and learnable quantizers."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fairseq_qasr.quant import QSpec, Quantizer, SpecError
from fairseq_qasr.quant.affine import fake_quantize, on_grid, expand_qparam, qparams_from_range

QUICK = settings(max_examples=40, deadline=None)
BITS = st.sampled_from([1, 2, 3, 4, 8, 16])
OBS = st.sampled_from(["minmax", "moving_average", "percentile", "mse"])


@st.composite
def specs(draw):
    bits = draw(BITS)
    signed = draw(st.booleans())
    symmetric = draw(st.booleans()) and not (signed and bits < 2)
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    return QSpec(bits=bits, signed=signed, symmetric=symmetric, granularity=gran, axis=0 if gran == "channel" else 1,
                 group_size=2 if gran == "group" else 0, observer=draw(OBS), pow2=draw(st.booleans()))


def tensors(seed: int, scale: float):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, generator=g) * scale + torch.randn((), generator=g) * scale


def calibrated(spec, x):
    q = Quantizer(spec, shape=x.shape)
    q.observing = True
    q(x)
    q.observing = False
    return q


@QUICK
@given(specs(), st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_outputs_on_grid_and_in_range(spec, seed, scale):
    x = tensors(seed, scale)
    q = calibrated(spec, x)
    y = q(x)
    s, z = q.qparams(x.dim())
    ok, why = on_grid(y, s, z, spec.qmin, spec.qmax)
    assert ok, why
    codes = torch.round(y / s + z)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    assert len(torch.unique(codes)) <= 2 ** spec.bits


@QUICK
@given(specs(), st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_idempotent(spec, seed, scale):
    x = tensors(seed, scale)
    q = calibrated(spec, x)
    y = q(x)
    assert torch.allclose(q(y), y, rtol=0, atol=1e-6 * float(y.abs().max() + 1))


@QUICK
@given(specs(), st.integers(0, 1000))
def test_qparam_shapes(spec, seed):
    x = tensors(seed, 1.0)
    q = calibrated(spec, x)
    expected = {"tensor": (), "channel": (3,), "group": (3, 2)}[spec.granularity]
    assert tuple(q.scale.shape) == expected
    assert q(x).shape == x.shape


@QUICK
@given(st.sampled_from([2, 4, 8]), st.integers(0, 1000))
def test_ste_gradient_one_inside_zero_outside(bits, seed):
    x = tensors(seed, 2.0).requires_grad_(True)
    scale = torch.tensor(0.1)
    zp = torch.tensor(0.0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    fake_quantize(x, scale, zp, qmin, qmax).sum().backward()
    code = torch.round(x.detach() / scale)  # STE: gradient 1 where the rounded code is not clipped
    inside = (code >= qmin) & (code <= qmax)
    assert torch.equal(x.grad, inside.float())


def test_pact_clip_gradient_goes_to_alpha_outside_only():
    q = calibrated(QSpec(bits=4, signed=False, symmetric=True, learning="pact"), torch.rand(10))
    with torch.no_grad():
        q.alpha.fill_(0.5)
    x = torch.tensor([0.1, 0.2, 0.9, 2.0], requires_grad=True)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert q.alpha.grad is not None and q.alpha.grad.item() > 0


@pytest.mark.parametrize("learning", ["lsq", "lsq_plus"])
def test_learnable_scale_gets_gradient(learning):
    x = torch.randn(4, 8)
    q = calibrated(QSpec(bits=4, learning=learning, granularity="channel", axis=0, symmetric=learning == "lsq"), x)
    q.train()
    ((q(x) - x) ** 2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0
    s, z = q.qparams(2)
    assert on_grid(q(x).detach(), s.detach(), z.detach(), q.spec.qmin, q.spec.qmax)[0]


def test_pow2_scales():
    q = calibrated(QSpec(bits=8, pow2=True, symmetric=True), torch.randn(100))
    assert float(torch.log2(q.scale)) == int(torch.log2(q.scale))


def test_per_group_expand():
    s = torch.arange(6.0).reshape(3, 2)
    e = expand_qparam(s, 2, "group", 1, 2)
    assert e.shape == (3, 4) and torch.equal(e[:, 0], e[:, 1])


def test_zero_exactly_representable():
    s, z = qparams_from_range(torch.tensor(0.3), torch.tensor(5.0), 0, 255, symmetric=False)
    assert fake_quantize(torch.zeros(1), s, z, 0, 255).item() == 0.0


def test_neg_inf_passthrough():
    q = Quantizer(QSpec(), keep_neg_inf=True)
    q.observing = True
    x = torch.tensor([0.5, float("-inf"), -1.0])
    y = q(x)
    assert torch.isneginf(y[1]) and torch.isfinite(q.lo) and torch.isfinite(y[[0, 2]]).all()


def test_uncalibrated_raises():
    from fairseq_qasr.quant import NotCalibratedError
    with pytest.raises(NotCalibratedError):
        Quantizer(QSpec())(torch.ones(2))


@pytest.mark.parametrize("kw,field", [({"bits": 9}, "bits"), ({"bits": 0}, "bits"),
                                      ({"granularity": "row"}, "granularity"),
                                      ({"granularity": "group"}, "group_size"),
                                      ({"bits": 1, "signed": True, "symmetric": True}, "bits")])
def test_spec_errors_name_the_field(kw, field):
    with pytest.raises(SpecError, match=field):
        QSpec(**kw)
