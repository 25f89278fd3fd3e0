"""Equivalence of the integer engine with the fake-quantized model it was compiled from, op by op.

Teacher forcing: every op of the engine is fed exactly the fake model's input codes (an engine hook replaces its
own codes by the fake model's after recording the difference), so each quantizer's difference measures that op
alone, not drift accumulated upstream. Plain torch: the fake model is any module with the plugin's quantizers.

Free running (:func:`free_running_compare`): both decode an utterance greedily on their own; where the transcripts
differ, :func:`free_running_divergence` finds the first differing step and how strongly each model preferred its
token there. Here the fake model needs fairseq's encoder-decoder interface (``encoder``, ``decoder``,
``get_normalized_probs``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from fairseq_qasr.quant import Quantizer

from .engine import QT, _storage


def fake_inputs(model, inputs: Dict[str, Any]) -> Dict[str, Any]:
    """``inputs`` with the features in the fake model's float dtype (``model.double()``: its float64 evaluation)."""
    dtype = next(model.parameters()).dtype
    x = inputs["src_tokens"]
    return inputs if x.dtype == dtype or not x.is_floating_point() else dict(inputs, src_tokens=x.to(dtype))


def fake_codes(model, inputs) -> Tuple[Dict[str, Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Codes (round(x/s)+z) of every activation quantizer of the fake model on ``inputs``, and its logits."""
    fake: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def h(mod, args, out):
            s, z = mod.qparams(out.dim())
            x = out.detach()
            fin = torch.isfinite(x)
            fake[name] = (torch.round(torch.where(fin, x, torch.zeros_like(x)) / s) + z, fin)
        return h

    hs = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
          if isinstance(m, Quantizer) and (".in_q." in n or n.endswith(".out_q"))]
    try:
        with torch.no_grad():
            logits, _ = model(**fake_inputs(model, inputs))
    finally:
        for h in hs:
            h.remove()
    return fake, logits


def to_engine_layout(path: str, q: torch.Tensor, shape) -> torch.Tensor:
    """The fake model's codes of quantizer ``path`` in the engine's tensor layout."""
    if "encoder.frontend.blocks" in path:
        return q.permute(0, 2, 3, 1)
    if path.startswith(("encoder.frontend.conv", "encoder.frontend.gelu")):  # conv1d front-end: (B, C, T)
        return q.transpose(1, 2)
    if path.endswith("mul_0.in_q.0") or path.endswith("matmul_0.in_q.0"):
        return q.transpose(1, 2).reshape(shape)
    if path.endswith("matmul_0.in_q.1"):
        return q.permute(0, 3, 1, 2).reshape(shape)
    if path.endswith("matmul_1.in_q.1"):
        return q.transpose(1, 2).reshape(shape)
    if "conv_context.convs." in path:
        return q[:, :, q.shape[2] - shape[1]:].transpose(1, 2)
    if q.dim() == len(shape) and q.shape[0] == 1 and shape[0] != 1:  # batch-broadcast tables (positions)
        q = q.expand(shape[0], *q.shape[1:])
    if q.dim() == len(shape) - 1:
        q = q.unsqueeze(0).expand(shape)
    return q.reshape(shape)


def forced_run(engine, model, inputs, force: bool = True) -> Tuple[Dict[str, Dict[str, float]], torch.Tensor,
                                                                   torch.Tensor]:
    """Layer by layer: every op of the engine gets exactly the fake model's input codes (teacher forcing);
    returns per-quantizer stats {max_lsb, frac_diff, n}, the engine's logits and the fake logits. ``force=False``:
    the engine runs on its own codes (only recorded), so the stats show how differences carry through the network."""
    fake, ref = fake_codes(model, inputs)
    stats: Dict[str, Dict[str, float]] = {}

    def hook(path: str, out: QT, masked):
        if path not in fake:
            raise AssertionError(f"engine quantizer {path} never ran in the fake model")
        q, fin = fake[path]
        m = engine.meta["q:" + path]
        off, dtype = _storage(m["qmin"], m["qmax"])
        want = to_engine_layout(path, q + off, out.c.shape).to(out.c.dtype)
        ok = to_engine_layout(path, fin, out.c.shape)
        if masked is not None:
            ok = ok & ~masked
        diff = (out.c.long() - want.long()).abs()[ok]
        stats[path] = dict(max_lsb=int(diff.max()) if diff.numel() else 0,
                           frac_diff=float((diff > 0).float().mean()) if diff.numel() else 0.0, n=int(diff.numel()))
        if force:
            out.c = torch.where(ok, want, out.c).contiguous()

    engine.hook = hook
    try:
        with torch.no_grad():
            enc = engine.encode(engine.quantize_input(inputs["src_tokens"]), inputs["src_lengths"])
            logits = engine.decode_step(inputs["prev_output_tokens"], enc, None)
    finally:
        engine.hook = None
    return stats, logits, ref


def summarize(stats: Dict[str, Dict[str, float]], logits: torch.Tensor, ref: torch.Tensor, logit_scale: float,
              pad_mask: torch.Tensor | None = None) -> Dict[str, object]:
    """One teacher-forced run in numbers: quantizers beyond 1 LSB, share of bit-exact codes, how many codes differ per
    quantizer, logit error in LSB of the logit grid (suppressed lanes, -1e4 in the fake model, excluded), positions
    whose argmax differs."""
    n = sum(v["n"] for v in stats.values())
    diff_codes = sum(v["frac_diff"] * v["n"] for v in stats.values())
    kept = ref > -1e3
    err = ((logits.double() * logit_scale - ref.double()).abs() / logit_scale)[kept]
    argmax_diff = logits.argmax(-1) != ref.argmax(-1)
    if pad_mask is not None:
        argmax_diff = argmax_diff & ~pad_mask
    return dict(quantizers=len(stats), beyond_1lsb={k: v["max_lsb"] for k, v in stats.items() if v["max_lsb"] > 1},
                codes=n, bit_exact=1 - diff_codes / max(n, 1),
                differ={k: round(v["frac_diff"] * v["n"]) for k, v in stats.items() if v["frac_diff"] > 0}, logits_max_lsb=float(err.max()) if err.numel() else 0.0,
                argmax_positions=int(argmax_diff.numel() if pad_mask is None else (~pad_mask).sum()),
                argmax_differ=int(argmax_diff.sum()))


SCORES = "decoder.output_log_softmax.in_q.0"  # the grid greedy search decides on (log-softmax input codes)


def fake_greedy(model, inputs, max_len: int = 200, bos: int = 2, eos: int = 2, pad: int = 1,
                cache: bool = True) -> List[int]:
    """Greedy decoding of one utterance by the fake-quantized model, on its log-probabilities (the argmax; ``pad``
    never). ``cache=True`` decodes incrementally with the key/value cache, as fairseq's search does;
    ``cache=False`` runs the whole prefix every step (the shapes the teacher-forced comparisons see)."""
    toks = [bos]
    inputs = fake_inputs(model, inputs)
    state: Optional[Dict] = {} if cache else None
    with torch.no_grad():
        enc = model.encoder(inputs["src_tokens"], inputs["src_lengths"])
        for _ in range(max_len):
            out = model.decoder(torch.tensor([toks]), encoder_out=enc, incremental_state=state)
            lp = model.get_normalized_probs((out[0][:, -1:], out[1]), log_probs=True)[0, -1]
            lp[pad] = -float("inf")
            nxt = int(lp.argmax())
            if nxt == eos:
                break
            toks.append(nxt)
    return toks[1:]


def _fake_score_codes(model, inputs) -> torch.Tensor:
    """The fake model's codes minus zero point on the :data:`SCORES` grid (float; suppressed lanes -inf),
    teacher-forced."""
    q = model.get_submodule(SCORES)
    got = {}

    def hook(mod, args, out):
        s, _ = mod.qparams(out.dim())
        got["c"] = torch.where(torch.isfinite(out), torch.round(out / s), torch.full_like(out, -float("inf")))

    h = q.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.get_normalized_probs(model(**fake_inputs(model, inputs)), log_probs=True)
    finally:
        h.remove()
    return got["c"][0]


def _engine_score_codes(engine, inputs, pad: int) -> torch.Tensor:
    """The engine's codes minus zero point on the :data:`SCORES` grid (float; suppressed and ``pad`` lanes -inf),
    teacher-forced."""
    got = {}

    def hook(path, out, masked):
        if path == SCORES:
            c = (out.c.long() - out.z).double()
            got["c"] = c.masked_fill(masked, -float("inf")) if masked is not None else c

    prev, engine.hook = engine.hook, hook
    try:
        with torch.no_grad():
            enc = engine.encode(engine.quantize_input(inputs["src_tokens"]), inputs["src_lengths"])
            logits = engine.decode_step(inputs["prev_output_tokens"], enc, None)
            forbid = torch.zeros(logits.shape[-1], dtype=torch.bool)
            forbid[pad] = True
            engine.log_probs(logits, forbid)
    finally:
        engine.hook = prev
    return got["c"][0]


def free_running_divergence(engine, model, inputs, tokens: List[int], max_len: int = 200, bos: int = 2,
                            eos: int = 2, pad: int = 1) -> Dict[str, Any]:
    """Where the fake model's greedy choices would leave the engine's free-running ``tokens`` (its greedy output for
    one utterance).

    Both models run teacher-forced on the engine's tokens, so up to the first step where the fake model's choice
    differs they are in the very state free-running decoding puts them in. Returns that ``step`` (None: the fake
    model decodes the same tokens), the two tokens and both models' preference at that step in LSB of the grid the
    decision is made on (:data:`SCORES`, one LSB = ``lsb`` nats; ``fake_margin`` 0: a tie), the largest difference
    between the two models' codes over the common steps (``max_lsb``) and the fake model's top-2 margin at each of
    them (``margins``).
    """
    decided = tokens + [eos] if len(tokens) < max_len else list(tokens)
    forced = dict(inputs, prev_output_tokens=torch.tensor([[bos] + decided[:-1]]))
    f = _fake_score_codes(model, forced).double()
    f[:, pad] = -float("inf")
    e = _engine_score_codes(engine, forced, pad)
    lsb = float(model.get_submodule(SCORES).current_scale().reshape(-1)[0])
    step = next((t for t, tok in enumerate(decided) if f[t, tok] < f[t].max()), None)
    last = len(decided) if step is None else step + 1
    top2 = f[:last].topk(2, dim=-1).values
    both = torch.isfinite(f[:last]) & torch.isfinite(e[:last])
    out: Dict[str, Any] = dict(steps=len(decided), step=step, lsb=lsb, margins=(top2[:, 0] - top2[:, 1]).tolist(),
                               max_lsb=float((f[:last] - e[:last]).abs()[both].max()) if bool(both.any()) else 0.0)
    if step is not None:
        ft, et = int(f[step].argmax()), decided[step]
        out.update(fake_token=ft, engine_token=et, fake_margin=float(f[step, ft] - f[step, et]),
                   engine_margin=float(e[step, et] - e[step, ft]))
    return out


def free_running_compare(engine, model, inputs, max_len: int = 200, bos: int = 2, eos: int = 2,
                         pad: int = 1) -> Dict[str, Any]:
    """One utterance decoded free-running by both: the engine's greedy tokens (its integer log-softmax) and the fake
    model's (:func:`fake_greedy`, incremental as fairseq's search), whether they are identical, and where they are
    not, :func:`free_running_divergence`'s account of the first differing step."""
    tokens = engine.greedy(inputs["src_tokens"], inputs["src_lengths"], max_len=max_len, bos=bos, eos=eos, pad=pad,
                           scores="log_softmax")[0]
    fake = fake_greedy(model, inputs, max_len=max_len, bos=bos, eos=eos, pad=pad)
    row: Dict[str, Any] = dict(identical=tokens == fake, engine_tokens=tokens, fake_tokens=fake)
    if tokens != fake:
        row.update(free_running_divergence(engine, model, inputs, tokens, max_len, bos, eos, pad))
    return row
