"""The all-integer engine against the fake-quantized model: layer by layer within 1 LSB, integer-only
execution, incremental decoding equal to the full forward."""
from __future__ import annotations

import os

import pytest
import torch

import int_helpers as H
from fairseq_qasr.integer import IntegerEngine
from fairseq_qasr.integer import kernels as K
from fairseq_qasr.integer.honesty import run_integer_only


@pytest.fixture(scope="module", params=["w8a8", "w4a8", "w2a8", H.GROUPED, "w8a8-whisper_layout",
                                                       "w4a8-whisper_layout", H.GROUPED + "-whisper_layout",
                                                       "w8a8_r16-whisper_layout",  # 16-bit residual stream, fc2 inputs
                                                       H.GROUPED_16BIT + "-whisper_layout",  # grouped -> 16-bit
                                                       "w8a8_g64_e8-whisper_layout"])  # per-channel 8-bit encoder
def compiled(request):
    return H.quantized_engine(request.param)


def _check_layer_by_layer(stats, min_exact=0.99):
    assert len(stats) > 100  # every activation quantizer of the xs model
    drift = {k: v for k, v in stats.items() if v["max_lsb"] > 1}
    assert not drift, f"ops drifting beyond 1 LSB: {drift}"
    n = sum(v["n"] for v in stats.values())
    exact = 1 - sum(v["frac_diff"] * v["n"] for v in stats.values()) / n
    assert exact >= min_exact, f"only {exact:.4%} of codes bit-exact"


def test_layer_by_layer_within_one_lsb(compiled):
    recipe, model, cfg, inp, eng = compiled
    stats, logits, ref = H.forced_run(eng, model, inp)
    _check_layer_by_layer(stats)
    s = eng.meta["logits.scale"]
    kept = ref > -1e3  # decoder_suppress_* lanes: -1e4 in the fake model, a very negative integer here
    assert bool((logits[~kept] < -(2 ** 39)).all())
    err = ((logits.double() * s - ref.double()).abs() / s)[kept].max()
    assert err <= 1.0, f"logits {err:.2f} LSB of the logit grid away from the fake model"


def test_layer_by_layer_on_real_audio(prepared_sample):
    feats, lengths = H.real_features(prepared_sample, n=3, max_frames=160)
    model, d, cfg, _ = H.quantized_xs("w8a8")
    eng = IntegerEngine.from_quantized(model, cfg)
    prev = torch.randint(4, len(d), (3, 6), generator=torch.Generator().manual_seed(0))
    prev[:, 0] = d.eos()
    stats, logits, ref = H.forced_run(eng, model, {"src_tokens": feats, "src_lengths": lengths,
                                                   "prev_output_tokens": prev})
    _check_layer_by_layer(stats)


def test_unforced_run_only_records():
    """``forced_run(force=False)`` (``compare_engine.py --unforced``): the engine runs on its own codes, recorded
    quantizer by quantizer, and gives the logits of a run without a hook; teacher forcing gives the fake codes."""
    recipe, model, cfg, inp, eng = H.quantized_engine("w8a8")
    stats, logits, ref = H.forced_run(eng, model, inp, force=False)
    with torch.no_grad():
        plain = eng.decode_step(inp["prev_output_tokens"], eng.encode(eng.quantize_input(inp["src_tokens"]),
                                                                      inp["src_lengths"]), None)
    assert torch.equal(logits, plain) and len(stats) > 100
    forced, _, _ = H.forced_run(eng, model, inp)
    assert set(forced) == set(stats)
    key = "rq:encoder.layers.1.ffn.relu_0.in_q.0.m"  # a planted 5 % error (fc1's output): teacher forcing stops it at
    saved = eng.t[key]  # its own grid, without forcing it reaches the next op's grid
    eng.t[key] = (saved.long() * 20 // 21).to(saved.dtype)
    eng._prep.clear()
    try:
        runs = [H.forced_run(eng, model, inp, force=f)[0] for f in (True, False)]
    finally:
        eng.t[key] = saved
        eng._prep.clear()
    nxt = "encoder.layers.1.ffn.fc2.in_q.0"
    assert runs[0][key[3:-2]]["max_lsb"] > 1 and runs[0][nxt]["max_lsb"] <= 1 < runs[1][nxt]["max_lsb"]


def test_a_drifting_op_is_caught(compiled):
    recipe, model, cfg, inp, eng = compiled
    key = next(k for k in (f"{p}encoder.layers.1.ffn.{a}.in_q.0.{w}" for a in ("relu_0", "gelu_0")
                           for p, w in (("rq:", "m"), ("gq:", "r"))) if k in eng.t)  # fc1's output (or its ratios)
    saved = eng.t[key]
    eng.t[key] = (saved.long() * 20 // 21).to(saved.dtype)  # 5% off: a planted requantization bug
    eng._prep.clear()
    try:
        stats, _, _ = H.forced_run(eng, model, inp)
    finally:
        eng.t[key] = saved
        eng._prep.clear()
    assert stats[key[3:-2]]["max_lsb"] > 1  # ("rq:" / "gq:" ... ".m" / ".r")
    with pytest.raises(AssertionError, match="drifting"):
        _check_layer_by_layer(stats)


def test_no_float_op_between_features_and_tokens(compiled):
    recipe, model, cfg, inp, eng = compiled
    x = eng.quantize_input(inp["src_tokens"])  # the input quantizer: the one float -> int step
    lengths = inp["src_lengths"]

    def run():
        enc = eng.encode(x, lengths)
        state: dict = {}
        tokens = torch.full((2, 1), 2)
        for _ in range(3):
            logits = eng.decode_step(tokens, enc, state)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return tokens

    tokens, mode = run_integer_only(run)
    assert tokens.dtype == torch.int64
    assert not mode.violations, f"float ops: {mode.violations[:5]}"
    gemm_ops = ("_int_mm", "mm", "bmm", "int16_gemm", "qgemm_avx2", "attention_avx2")
    gemms = {(name, dtypes) for name, dtypes in mode.ops if name in gemm_ops}
    # integer GEMMs (int32/int64 accumulators), on whichever backend is fastest here (K.int8_gemm_backend())
    assert gemms and all(set(d) <= {"int8", "int16", "int32", "int64"} for _, d in gemms), gemms
    big = {name for name, _ in gemms} - {"mm", "bmm"}  # encoder GEMMs on the probed backend, seen by the check
    expected = {"int_mm": {"_int_mm"}, "numba": {"int16_gemm"}, "avx2": {"qgemm_avx2"}}.get(K.int8_gemm_backend(), set())
    assert expected <= big <= expected | {"attention_avx2"}, big


def test_int8_gemm_backends_agree_and_wide_codes_are_exact(monkeypatch):
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (40, 96), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (96, 24), generator=g, dtype=torch.int8)
    ref = a.long() @ b.long()
    for backend in K.GEMM_BACKENDS:
        monkeypatch.setattr(K, "_BACKEND", backend)
        assert torch.equal(K.int_mm(a, b).long(), ref)
        assert torch.equal(K.int_mm(a, b, K.prepare_weight(b)).long(), ref)
        assert torch.equal(K.matmul_int(a[None], 3, b[None], -2)[0].long(), (a.long() - 3) @ (b.long() + 2))
    # 16-bit codes (stored as int32) against int8 and 16-bit operands: exact where an int32 matmul would wrap
    x = torch.randint(-(2 ** 15), 2 ** 15, (5, 1536), generator=g)
    x[0] = 2 ** 15 - 1
    w = torch.randint(-128, 128, (1536, 7), generator=g)
    w[:, 0] = 127
    assert (x.long() @ w.long()).abs().max() > 2 ** 31  # the int32 accumulator would overflow here
    assert torch.equal(K.int_mm(x.int(), w.to(torch.int8)), x.long() @ w.long())
    u = torch.randint(0, 2 ** 16, (1536, 3), generator=g)
    assert torch.equal(K.wide_mm(x.int(), u.int()), x.long() @ u.long())


def test_incremental_decoding_equals_full(compiled):
    recipe, model, cfg, inp, eng = compiled
    enc = eng.encode(eng.quantize_input(inp["src_tokens"]), inp["src_lengths"])
    prev = inp["prev_output_tokens"]
    full = eng.decode_step(prev, enc, None)
    state: dict = {}
    steps = [eng.decode_step(prev[:, : t + 1], enc, state) for t in range(prev.size(1))]
    assert torch.equal(torch.cat(steps, dim=1), full)


def test_self_attention_inputs_on_one_grid_are_requantized_once(compiled, monkeypatch):
    """Where q/k/v_proj's input quantizers share grid and multiplier (one calibration of one tensor), the engine
    reuses the codes; the result equals requantizing each, and a grid that differs is requantized on its own."""
    recipe, model, cfg, inp, eng = compiled
    layers = [n[:-len(".q_proj.in_q.0")] for n in eng.scales if n.endswith("self_attn.q_proj.in_q.0")]
    shared = [n for n in layers if eng._same_grid(n + ".q_proj.in_q.0", n + ".k_proj.in_q.0")]
    assert shared, "no layer shares the grid: the reuse is never exercised"
    x = eng.quantize_input(inp["src_tokens"])

    def encoder_codes():
        out = eng.encode(x, inp["src_lengths"])["out"]
        return out.c if hasattr(out, "c") else out.t

    reused = encoder_codes()
    monkeypatch.setattr(type(eng), "_same_grid", lambda self, a, b: False)
    assert torch.equal(reused, encoder_codes())
    monkeypatch.undo()
    k_in = shared[0] + ".k_proj.in_q.0"  # k's multiplier 1/8 larger (a folded one's 1: 2): another grid
    ln = "lnq:" + k_in in eng.t  # (a LayerNorm straight onto the grid: its multiplier A, the first constant)
    key = "lnq:" + k_in if ln else eng._rq_key(k_in)
    if ln:
        saved = eng.t[key]
        eng.t[key] = saved.clone()
        eng.t[key][0] += saved[0] // 8
    else:
        m, sh = eng._mult(key)
        eng._prep[key] = (m + torch.clamp(m // 8, min=1), sh)
    eng._prep.pop("same:" + shared[0] + ".q_proj.in_q.0:" + k_in, None)
    try:
        assert not eng._same_grid(shared[0] + ".q_proj.in_q.0", k_in)
        other = encoder_codes()
        assert not torch.equal(other, reused)
        monkeypatch.setattr(type(eng), "_same_grid", lambda self, a, b: False)
        assert torch.equal(other, encoder_codes())
    finally:
        monkeypatch.undo()
        if ln:
            eng.t[key] = saved
        else:
            eng._prep[key] = (m, sh)
        eng._prep.pop("same:" + shared[0] + ".q_proj.in_q.0:" + k_in, None)


def test_kernels_isqrt_and_requant():
    v = torch.randint(0, 2 ** 62, (5000,), generator=torch.Generator().manual_seed(0))
    r = K.isqrt(v)
    assert bool((r * r <= v).all()) and bool(((r + 1) * (r + 1) > v).all())
    m, sh = K.quantize_multiplier(torch.tensor([0.3, 1e-3, 7.5]))
    acc = torch.tensor([[1000, -1000, 12345]])
    got = K.requantize(acc, m.long(), sh.long(), 0, -(2 ** 31), 2 ** 31 - 1, torch.int64)
    assert got.tolist() == [[300, -1, 92588]]


def test_matmul_int_zero_points():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (2, 3, 17, 24), generator=g, dtype=torch.int64)
    b = torch.randint(-128, 128, (2, 3, 24, 9), generator=g, dtype=torch.int64)
    got = K.matmul_int(a.to(torch.int8), 5, b.to(torch.int8), -7)
    assert torch.equal(got.long(), (a - 5) @ (b + 7))


@pytest.fixture(scope="module")
def w8_engine():
    model, d, cfg, inp = H.quantized_xs("w8a8")
    return IntegerEngine.from_quantized(model, cfg)


def test_free_running_divergence_names_the_first_step_the_fake_model_would_not_take():
    """Tokens the fake model would not choose at step 0 (its least likely one): the divergence is reported there,
    with the fake model's own choice, a positive margin for it and one margin per common step."""
    from fairseq_qasr.integer.equivalence import free_running_divergence

    recipe, model, cfg, inp, eng = H.quantized_engine("w8a8-whisper_layout")
    one = {k: inp[k][:1] for k in ("src_tokens", "src_lengths")}
    tokens = eng.greedy(one["src_tokens"], one["src_lengths"], max_len=6, scores="log_softmax")[0]
    first = free_running_divergence(eng, model, one, tokens, max_len=6)
    assert first["steps"] == len(tokens) + (len(tokens) < 6) and first["max_lsb"] >= 0 and first["lsb"] > 0
    with torch.no_grad():
        logits = model(**one, prev_output_tokens=torch.tensor([[2]]))[0][0, 0]
    allowed = torch.isfinite(logits)  # (not the suppressed tokens)
    allowed[1] = False  # nor the pad token
    worst = int(torch.where(allowed, logits, torch.full_like(logits, float("inf"))).argmin())
    r = free_running_divergence(eng, model, one, [worst] + tokens[1:], max_len=6)
    assert r["step"] == 0 and r["engine_token"] == worst and r["fake_token"] != worst
    assert r["fake_margin"] > 0 and len(r["margins"]) == 1


def test_beam_search_batched_equals_single_and_beam1_equals_greedy(w8_engine):
    eng = w8_engine
    g = torch.Generator().manual_seed(5)
    feats, lengths = torch.randn(3, 48, 80, generator=g), torch.tensor([48, 48, 48])
    batched = eng.beam_search(feats, lengths, beam=3, max_len=10)
    for i in range(3):
        single = eng.beam_search(feats[i:i + 1], lengths[i:i + 1], beam=3, max_len=10)[0]
        assert single == batched[i]
    for hyps in batched:  # best first by score / (length + 1)
        norm = [s / (len(t) + 1) for t, s in hyps]
        assert norm == sorted(norm, reverse=True) and len(hyps) == 3
    beam1 = [h[0][0] for h in eng.beam_search(feats, lengths, beam=1, max_len=10)]
    greedy = eng.greedy(feats, lengths, max_len=9, scores="log_softmax")
    assert beam1 == [t[:9] for t in greedy]


def test_integer_log_softmax_matches_float(w8_engine):
    eng = w8_engine
    enc = eng.encode(eng.quantize_input(torch.randn(2, 40, 80)), torch.tensor([40, 40]))
    logits = eng.decode_step(torch.tensor([[2, 5, 6], [2, 7, 8]]), enc, None)
    lp = eng.log_probs(logits)
    q = H.torch_codes_of_last_requant(eng, "decoder.output_log_softmax.in_q.0", logits)
    ref = torch.log_softmax(q, dim=-1)
    assert (lp.double() / 2 ** 16 - ref).abs().max() < 2e-3  # nats


@pytest.mark.skipif(not os.environ.get("QASR_TEST_FUSED"), reason="compiles kernels (minutes); QASR_TEST_FUSED=1")
@pytest.mark.parametrize("recipe", ["w8a8", H.GROUPED_16BIT + "-whisper_layout"])  # 8-bit; 16-bit grids unfused
def test_fused_kernels_give_identical_results(recipe):
    eng = H.quantized_engine(recipe)[-1]
    feats, lengths = torch.randn(2, 64, 80), torch.tensor([64, 64])
    ref = eng.greedy(feats, lengths, max_len=6)
    enc_ref = eng.encode(eng.quantize_input(feats), lengths)["out"].t
    eng.fused = True
    try:
        assert torch.equal(eng.encode(eng.quantize_input(feats), lengths)["out"].t, enc_ref)
        assert eng.greedy(feats, lengths, max_len=6) == ref
    finally:
        eng.fused = False


def test_wide_codes_and_int64_accumulators_do_not_overflow():
    """16-bit x 16-bit products exceed int32 after a few terms; int64 accumulators need shortened multipliers."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 65536, (2, 3, 40), generator=g, dtype=torch.int32)
    b = torch.randint(-32768, 32768, (2, 40, 5), generator=g, dtype=torch.int32)
    out = K.matmul_int(a, 0, b, 7)
    ref = torch.matmul(a.long(), b.long() - 7)
    assert ref.abs().max() > 2 ** 33 and torch.equal(out.long(), ref)
    acc = torch.tensor([2 ** 40 + 12345, -(2 ** 39) - 777, 5], dtype=torch.int64)
    M = torch.tensor(0.7 * 2.0 ** -30, dtype=torch.float64)
    m, sh = K.quantize_multiplier(M)
    assert bool(((acc * m.long()).abs() < (acc.double() * float(m)).abs() - 1).any())  # the plain product wraps
    m2, sh2 = K.shorten_multiplier(m, sh, 12)
    y = K.requantize(acc, m2, sh2, 0, -(2 ** 31), 2 ** 31 - 1, torch.int64)
    assert ((y.double() - acc.double() * float(M)).abs() <= 1).all()


def test_softmax_output_multiplier_precision():
    """8-bit probabilities: the output multiplier near 2^30 (shift 22) keeps every code of rows of 1 500 lanes within
    2^-19 LSB of the exact e / sum / s_out before rounding; shift 16 (before format version 4) did not."""
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-128, 128, (64, 1500), generator=g, dtype=torch.int32)
    x[:, :3] = 127  # a few large probabilities per row
    s_in, s_out = 0.05, 1 / 255
    lut = K.exp_table(s_in, 256, 30)
    e = lut.double()[(x.amax(-1, keepdim=True) - x).long()]
    exact = e / e.sum(-1, keepdim=True) / s_out
    err = {}
    for mult, shift in (K.softmax_out_mult(s_out), (int(round(2 ** 16 / s_out)), 16)):
        R = K.recip_bits(mult)
        r = torch.div(mult << R, e.long().sum(-1, keepdim=True), rounding_mode="floor")
        err[shift] = float(((e.long() * r).double() * 2.0 ** -(R + shift) - exact).abs().max())
    assert K.softmax_out_mult(s_out)[1] == 22 and err[22] < 2 ** -19 < err[16]


def test_integer_layer_norm_on_16_bit_codes():
    """Residual streams at 16 bits: the shift that keeps LayerNorm's sums inside int64 depends on the code width."""
    n = 384
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-32768, 32768, (4, n), generator=g, dtype=torch.int32)
    x[0, 3] = 32767  # an outlier channel
    gain = torch.randint(-127, 128, (n,), generator=g, dtype=torch.int32)
    k = K.ln_shift_bits(n, 16)
    y = K.layer_norm_int(x, gain, None, eps_term=1, k=k).double() * 2.0 ** -16
    ref = torch.nn.functional.layer_norm(x.double(), (n,)) * gain.double()
    assert ((y - ref).abs() <= 1e-3 * gain.abs().max()).all()
    assert 5 <= K.ln_shift_bits(n, 16) < K.ln_shift_bits(n, 8)
    ones, exact = torch.ones(n, dtype=torch.int32), torch.nn.functional.layer_norm(x[:1].double(), (n,), eps=0)
    err = [float((K.layer_norm_int(x[:1], ones, None, 0, kk, 24).double() - exact * 2 ** 24).abs().max())
           for kk in (1, k)]  # the integer square root's precision: within one unit of 2^-24 with k, not at k = 1
    assert err[1] < 1 < err[0]


@pytest.mark.parametrize("param", ["w8a8", "w8a8-whisper_layout"])
def test_input_codes_equal_the_fake_input_quantizer(param):
    """The one float -> int step rounds every input exactly as the fake model's input quantizer does (ties included:
    about 1 input in 240 000 falls where dividing by the scale and multiplying by its float32 reciprocal differ)."""
    recipe, model, cfg, inp, eng = H.quantized_engine(param)
    first = eng._first_op() + ".in_q.0"
    # values within a few float32 ulps of the input grid's rounding ties, where x / s and x * (1 / s) can disagree
    s = torch.tensor(float(eng.scales[first]), dtype=torch.float64)
    ties = ((torch.arange(-100, 100, dtype=torch.float64) + 0.5) * s).float()
    inf, up, down, near = torch.tensor(float("inf")), ties, ties, [ties]
    for _ in range(3):  # up to 3 ulps either side
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        near += [up, down]
    vals = torch.cat(near)
    g = torch.Generator().manual_seed(11)
    feats = vals[torch.randint(0, vals.numel(), (8, 400, 80), generator=g)]
    batch = {"src_tokens": feats, "src_lengths": torch.full((8,), 400),
             "prev_output_tokens": inp["prev_output_tokens"][:1].expand(8, -1)}
    fake, _ = H.fake_codes(model, batch)
    q, _ = fake[first]
    x = eng.quantize_input(feats)
    m = eng.meta["q:" + first]
    off, _ = H._storage(m["qmin"], m["qmax"])
    want = (q.squeeze(1) if q.dim() == 4 else q.transpose(1, 2)) + off  # vgg2d (B, 1, T, F) / conv1d (B, F, T)
    assert int((x.c.long() != want.long()).sum()) == 0


def test_grouped_linears_fold_their_consumers_multiplier(monkeypatch):
    """Format version 4: a grouped Linear's output is requantized with its consumer's multiplier folded into the
    group ratios (``gq:``, one rounding of the exact sum). Against the fake model's float64 evaluation the codes on
    every grid a grouped Linear feeds are then (nearly) all exact; consumer-independent ratios and a shortened
    multiplier (version 3 files, ``FOLD_GROUPS`` off) miss far more."""
    from fairseq_qasr.quant.float64 import to_float64

    model, _, cfg, inp = H.quantized_xs(H.GROUPED_16BIT, **H.WHISPER_LAYOUT)
    folding = IntegerEngine.from_quantized(model, cfg)
    monkeypatch.setattr(IntegerEngine, "FOLD_GROUPS", False)
    plain = IntegerEngine.from_quantized(model, cfg)
    assert not any(k.startswith(("gq:", "rqg:")) for k in plain.t)
    folded = [k[3:-2] for k in folding.t if k.startswith("gq:") and k.endswith(".r")]
    assert len(folded) >= 20 and all(int(folding.t["gq:" + q + ".r"].max()) > 2 ** 26 for q in folded)
    to_float64(model, lambda m: m(**inp))

    def differ(eng):
        stats, _, _ = H.forced_run(eng, model, inp)
        _check_layer_by_layer(stats)
        return sum(round(stats[q]["frac_diff"] * stats[q]["n"]) for q in folded)

    assert differ(folding) <= 2 and differ(plain) >= 50


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8_g64_e8-whisper_layout", H.GROUPED_16BIT + "-whisper_layout"])
def test_float64_fake_model_keeps_integer_weights_and_stays_within_one_lsb(recipe):
    """``quant.float64.to_float64``: the fake model's float64 evaluation holds the weight codes of float32 and the bias
    codes the engine was compiled with (also for a bias planted where float32 and float64 division round apart), and
    the engine stays within 1 LSB of it, op by op."""
    from fairseq_qasr.quant.float64 import to_float64

    name, layout = recipe.partition("-")[::2]
    model, _, cfg, inp = H.quantized_xs(name, **(H.WHISPER_LAYOUT if layout else {}))
    fc1 = model.get_submodule("encoder.layers.0.ffn.fc1")
    in_s, w_s = fc1.bias_scales()
    g64 = float(in_s) * float(w_s.reshape(-1)[0])
    g32 = torch.tensor(g64, dtype=torch.float32)
    for k in range(1, 10000):  # a bias on a float32 rounding tie that float64 division rounds the other way
        b = torch.tensor((k + 0.5) * g64, dtype=torch.float32)
        if float(torch.round(b / g32)) != round(float(b) / g64):
            break
    else:
        pytest.fail("no planted tie found")
    with torch.no_grad():
        fc1.bias[0] = b
    eng = IntegerEngine.from_quantized(model, cfg)
    first = model.get_submodule(eng._first_op() + ".in_q.0")  # quantizes the features: float32 data
    s_in = float(first.current_scale())
    feats = inp["src_tokens"].clone()
    lo, hi = first.spec.qmin - int(first.zero_point), first.spec.qmax - int(first.zero_point)

    def ties():  # features next to code boundaries (float32 values one step either side of each half)
        for k in range(lo, hi):
            mid = torch.tensor((k + 0.5) * s_in, dtype=torch.float32)
            yield from (mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1))

    for x in ties():  # a feature that float32 and float64 round to different codes
        with torch.no_grad():
            got = {round(float(first(x.expand(2, 2).t())[0, 0]) / s_in),
                   round(float(first(x.expand(2, 2).contiguous())[0, 0]) / s_in)}  # (both kernels)
        if got != {round(float(x) / s_in)}:
            break
    else:
        pytest.fail("no input tie found")
    feats[0, 1, 2] = x
    inp = dict(inp, src_tokens=feats)
    codes32, _ = H.fake_codes(model, inp)
    wq = {n: m for n, m in model.named_modules() if n.endswith(".w_q.weight")}
    owners = {n: model.get_submodule(n[: -len(".w_q.weight")]) for n in wq}
    with torch.no_grad():
        weights32 = {n: wq[n](o.weight).clone() for n, o in owners.items() if getattr(o, "weight", None) is not None}
    to_float64(model, lambda m: m(**inp))
    assert next(model.parameters()).dtype == torch.float64
    with torch.no_grad():
        for n, w in weights32.items():  # float32's codes times the exact scale (float32 rounds that product)
            got, s = wq[n](owners[n].weight), wq[n].qparams(w.dim())[0].double()
            assert got.dtype == torch.float64 and torch.equal(got, torch.round(w.double() / s) * s), n
        biased = {n[: -len(".w_q.weight")]: o for n, o in owners.items()
                  if getattr(o, "bias", None) is not None and "b:" + n[: -len(".w_q.weight")] in eng.t}
        assert "encoder.layers.0.ffn.fc1" in biased and len(biased) > 20
        for n, m in biased.items():
            in_s, w_s = m.bias_scales()
            got = m._bias(m.bias)
            codes = torch.round(got / (in_s.double() * w_s.double()).expand(got.shape[-1:]))
            assert got.dtype == torch.float64 and torch.equal(codes.long(), eng.t["b:" + n].long()), n
    codes64, _ = H.fake_codes(model, inp)
    for q in (eng._first_op() + ".in_q.0",) + (("encoder.add_0.in_q.1",) if layout else ()):  # features, positions
        assert torch.equal(codes64[q][0], codes32[q][0]), q
    stats, _, _ = H.forced_run(eng, model, inp)
    _check_layer_by_layer(stats)
