"""Export file: packed at recipe width, documented header, exact reload, size bound."""
from __future__ import annotations

import pytest
import torch

import int_helpers as H
from fairseq_qasr.export import export_model, load_engine, read_header, size_report
from fairseq_qasr.integer import IntegerEngine


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = {}
    d = tmp_path_factory.mktemp("export")
    for recipe in ("w8a8", "w4a8", "w2a8", H.GROUPED):
        model, dic, cfg, inp = H.quantized_xs(recipe)
        path = d / f"xs_{recipe}.safetensors"
        export_model(model, str(path), cfg=cfg)
        out[recipe] = (model, cfg, inp, path)
    return out


@pytest.mark.parametrize("recipe,bits", [("w8a8", 8), ("w4a8", 4), ("w2a8", 2), (H.GROUPED, 4)])
def test_header_names_recipe_bits_layout_requant(exported, recipe, bits):
    model, cfg, inp, path = exported[recipe]
    h = read_header(str(path))
    assert h["format"] == "fairseq-qasr-integer" and h["recipe"]["name"] == recipe
    assert h["bits"]["weights"]["encoder.layers.0.ffn.fc1"] == bits
    assert h["packed"]["w:encoder.layers.0.ffn.fc1"]["bits"] == bits
    assert set(h["layout"]) >= {"packing", "weights", "biases", "activations", "requant"}
    # every activation quantizer the engine uses has its integer requantization (multiplier, shift)
    rq = h["requant"]
    assert "encoder.layers.0.ffn.fc2.in_q.0" in rq
    assert "decoder.output_projection.in_q.0" in h["requant_layer_norm"]  # (a LayerNorm's consumer, version 5)
    one = rq["encoder.layers.0.ffn.fc2.in_q.0"]
    # (two words, format version 5: 62 bits of the exact ratio; one word of 31 bits for int64 accumulators)
    assert isinstance(one["multiplier"], str) or 2 ** 61 <= one["multiplier"] < 2 ** 62 \
        or 2 ** 30 <= one["multiplier"] < 2 ** 31
    act = h["activations"]["encoder.layers.0.ffn.fc2.in_q.0"]
    assert act["bits"] == 8 and act["qmin"] == -128 and isinstance(act["scale"], float)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w2a8", H.GROUPED])
def test_size_on_disk_within_bound(exported, recipe):
    model, cfg, inp, path = exported[recipe]
    r = size_report(str(path))
    assert r["weights_packed"] <= r["ideal_weights"] + 64  # byte rounding per tensor only
    assert r["total"] <= r["bound"]
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    assert r["weights_packed"] < fp32 / 4 * H_bits(recipe) / 8 + 1024


def H_bits(recipe):
    return {"w8a8": 8, "w4a8": 4, "w2a8": 2, H.GROUPED: 4}[recipe]


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", H.GROUPED])
def test_reloaded_file_runs_identically(exported, recipe):
    model, cfg, inp, path = exported[recipe]
    mem = IntegerEngine.from_quantized(model, cfg)
    disk = load_engine(str(path))
    outs = []
    for eng in (mem, disk):
        enc = eng.encode(eng.quantize_input(inp["src_tokens"]), inp["src_lengths"])
        outs.append(eng.decode_step(inp["prev_output_tokens"], enc, None))
    assert torch.equal(outs[0], outs[1])


def test_not_an_export_is_refused(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(ValueError, match="not a fairseq-qasr-integer file"):
        read_header(str(p))


def test_whisper_layout_reload_identical_without_position_table(tmp_path):
    model, d, cfg, inp = H.quantized_xs("w8a8", **H.WHISPER_LAYOUT)
    path = tmp_path / "w.safetensors"
    header = export_model(model, str(path), cfg=cfg)
    assert header["meta"].get("pos:encoder") == "sinusoidal"  # rebuilt bit-exactly at load, not stored
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert "pos:encoder" not in set(f.keys())
    mem, disk = IntegerEngine.from_quantized(model, cfg), load_engine(str(path))
    outs = [e.decode_step(inp["prev_output_tokens"], e.encode(e.quantize_input(inp["src_tokens"]),
                                                               inp["src_lengths"]), None) for e in (mem, disk)]
    assert torch.equal(outs[0], outs[1])


def test_position_table_with_sparse_corrections(tmp_path):
    model, d, cfg, inp = H.quantized_xs("w8a8", **H.WHISPER_LAYOUT)
    with torch.no_grad():  # a buffer that is not exactly the formula (as Whisper's own, computed elsewhere)
        model.encoder.embed_positions.view(-1)[torch.arange(0, 600, 7)] += 0.05
    path = tmp_path / "w.safetensors"
    export_model(model, str(path), cfg=cfg)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "pos:encoder" not in keys and "pos:encoder.fix_idx" in keys
    mem, disk = IntegerEngine.from_quantized(model, cfg), load_engine(str(path))
    outs = [e.encode(e.quantize_input(inp["src_tokens"]), inp["src_lengths"])["out"].t for e in (mem, disk)]
    assert torch.equal(mem.t["pos:encoder"], disk.t["pos:encoder"]) and torch.equal(outs[0], outs[1])


def as_old_file(dst, tensors: dict, header: dict) -> str:
    """``tensors`` and ``header`` written as an exported file (an older version's, as the tests edit them)."""
    import json

    from safetensors.torch import save_file
    save_file(tensors, str(dst), metadata={"qasr": json.dumps(header)})
    return str(dst)


def logits_of(e, inp):
    """Teacher-forced logits of engine ``e`` on the test inputs."""
    return e.decode_step(inp["prev_output_tokens"], e.encode(e.quantize_input(inp["src_tokens"]), inp["src_lengths"]),
                         None)


def current_and_older(tmp_path, monkeypatch, model, cfg, inp, flag: str, version: int):
    """Exports ``model`` as today (it must reload bit-identically), then with ``IntegerEngine.<flag>`` off as format
    ``version`` wrote it, and loads that file with today's engine. Returns (today's header, today's logits, the older
    file's header and tensors, the logits of an engine compiled with ``flag`` off, the older file's logits)."""
    from safetensors.torch import load_file
    header = export_model(model, str(tmp_path / "new.safetensors"), cfg=cfg)
    want = logits_of(IntegerEngine.from_quantized(model, cfg), inp)
    assert torch.equal(want, logits_of(load_engine(str(tmp_path / "new.safetensors")), inp))
    monkeypatch.setattr(IntegerEngine, flag, False)
    plain = logits_of(IntegerEngine.from_quantized(model, cfg), inp)
    h_old = dict(export_model(model, str(tmp_path / "plain.safetensors"), cfg=cfg), version=version)
    t_old = load_file(str(tmp_path / "plain.safetensors"))
    old = as_old_file(tmp_path / "old.safetensors", t_old, h_old)
    monkeypatch.setattr(IntegerEngine, flag, True)
    return header, want, h_old, t_old, plain, logits_of(load_engine(old), inp)


def test_residual_adds_per_consumer_and_version_1_files(tmp_path, monkeypatch):
    """A pre-norm model with a 16-bit residual stream: the file (version 2 on) holds each add consumer's two
    multipliers (``rqa:``), reloads bit-identically, and a version-1 file (without them) still loads and runs on the
    add's fine sum."""
    from safetensors.torch import load_file
    model, d, cfg, inp = H.quantized_xs("w8a8_r16", **H.WHISPER_LAYOUT)
    path = tmp_path / "v3.safetensors"
    header = export_model(model, str(path), cfg=cfg)
    assert header["version"] == 5 and "encoder.layers.0.ffn_block.norm.in_q.0" in header["requant_add"]
    one = header["requant_add"]["encoder.layers.0.ffn_block.norm.in_q.0"]
    assert max(one["ma"], one["mb"]) >= 2 ** 30 and all(one[k] < 2 ** 31 for k in ("ma", "mb", "la", "lb"))
    mem, disk = IntegerEngine.from_quantized(model, cfg), load_engine(str(path))
    outs = [e.decode_step(inp["prev_output_tokens"], e.encode(e.quantize_input(inp["src_tokens"]),
                                                               inp["src_lengths"]), None) for e in (mem, disk)]
    assert torch.equal(outs[0], outs[1])
    old = tmp_path / "v1.safetensors"  # as written before version 2: no rqa: tensors
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("rqa:")}
    h1 = dict(read_header(str(path)), version=1)
    h1.pop("requant_add")
    as_old_file(old, tensors, h1)
    from fairseq_qasr.integer import kernels as K
    calls = []
    monkeypatch.setattr(K, "add_requant_int", lambda *a, **k: calls.append(1))  # must not run for version 1
    v1 = load_engine(str(old))
    lg = v1.decode_step(inp["prev_output_tokens"], v1.encode(v1.quantize_input(inp["src_tokens"]),
                                                              inp["src_lengths"]), None)
    assert not calls and lg.shape == outs[0].shape
    assert (lg.argmax(-1) == outs[0].argmax(-1)).float().mean() > 0.8  # the other arithmetic: close


def test_layer_norm_fraction_bits_and_version_2_files(tmp_path, monkeypatch):
    """Version 3 files carry the LayerNorm's 24 fraction bits (``ln:`` meta ``frac``) and reload bit-identically; a
    version 2 file (16 fraction bits, no ``frac``) still loads and gives what an engine compiled with 16 bits gives."""
    from safetensors.torch import load_file
    model, d, cfg, inp = H.quantized_xs("w8a8", **H.WHISPER_LAYOUT)
    monkeypatch.setattr(IntegerEngine, "EXACT_MULTIPLIERS", False)  # the fixed-point LayerNorm of versions 1-4

    def logits(e):
        return logits_of(e, inp)

    path = tmp_path / "v3.safetensors"
    header = export_model(model, str(path), cfg=cfg)
    ln = {k: v for k, v in header["meta"].items() if k.startswith("ln:")}
    assert header["version"] == 5 and ln and all(v["frac"] == 24 for v in ln.values())
    assert torch.equal(logits(IntegerEngine.from_quantized(model, cfg)), logits(load_engine(str(path))))
    monkeypatch.setattr(IntegerEngine, "LN_FRAC_BITS", 16)
    want16 = logits(IntegerEngine.from_quantized(model, cfg))
    path16 = tmp_path / "v3_16.safetensors"
    export_model(model, str(path16), cfg=cfg)
    h2 = read_header(str(path16))
    h2 = dict(h2, version=2, meta={k: ({kk: vv for kk, vv in v.items() if kk != "frac"} if k.startswith("ln:") else v)
                                   for k, v in h2["meta"].items()})
    old = tmp_path / "v2.safetensors"
    as_old_file(old, load_file(str(path16)), h2)
    monkeypatch.setattr(IntegerEngine, "LN_FRAC_BITS", 24)
    assert torch.equal(logits(load_engine(str(old))), want16)
    assert not torch.equal(want16, logits(IntegerEngine.from_quantized(model, cfg)))  # 24 bits: other integers


def test_grouped_folding_and_version_3_files(tmp_path, monkeypatch):
    """Version 4 files carry the grouped Linears' folded ratios (``gq:``, ``rqg:``, header ``requant_grouped``) and
    reload bit-identically; a version 3 file (consumer-independent ratios only) still loads and gives what an engine
    compiled without folding gives."""
    model, d, cfg, inp = H.quantized_xs(H.GROUPED_16BIT, **H.WHISPER_LAYOUT)
    header, want, h3, _, plain, old = current_and_older(tmp_path, monkeypatch, model, cfg, inp, "FOLD_GROUPS", 3)
    folded = header["requant_grouped"]
    assert header["version"] == 5 and "decoder.layers.0.cross_attn.matmul_1.in_q.1" in folded
    assert all(1 <= v["shift"] <= 62 for v in folded.values())
    assert not h3["requant_grouped"]
    assert torch.equal(old, plain)
    assert not torch.equal(want, plain)  # folded: other integers


def test_two_word_multipliers_and_version_4_files(tmp_path, monkeypatch):
    """Version 5 files hold two-word (62-bit) multipliers (``rq:<q>.m`` int64 from 2^31; ``rqa:`` with its two low
    words) and reload bit-identically; a version 4 file (one-word multipliers throughout) still loads and gives what an
    engine compiled with ``EXACT_MULTIPLIERS`` off gives. (On a model this small the two give the same logits: one
    word already leaves about one code in 10^7 different, tests/integer/test_int_two_word.py plants the ties.)"""
    from safetensors.torch import load_file
    model, d, cfg, inp = H.quantized_xs("w8a8_r16", **H.WHISPER_LAYOUT)
    _, _, _, t4, plain, old = current_and_older(tmp_path, monkeypatch, model, cfg, inp, "EXACT_MULTIPLIERS", 4)
    t = load_file(str(tmp_path / "new.safetensors"))
    two = [k for k, v in t.items() if k.startswith("rq:") and k.endswith(".m") and int(v.max()) >= 2 ** 61]
    assert len(two) > 20 and all(t[k].dtype == torch.int64 for k in two)
    assert all(t[k].numel() == 7 for k in t if k.startswith("rqa:"))
    assert all(int(v.max()) < 2 ** 31 for k, v in t4.items() if k.startswith("rq:") and k.endswith(".m"))
    assert all(v.numel() == 5 for k, v in t4.items() if k.startswith("rqa:"))
    assert torch.equal(old, plain)
