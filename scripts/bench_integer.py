#!/usr/bin/env python
"""Benchmark (not a test): encoder (one 30-s window) and a full greedy decode of the same model in
PyTorch FP32, PyTorch dynamic int8 (torch.ao quantize_dynamic), onnxruntime FP32 / dynamic int8, and the
all-integer engine (W8A8 export), in one run; prints times and ratios.

    # Whisper tiny.en imported + calibrated (docs/whisper.md, scripts/calibrate.py):
    python scripts/bench_integer.py --float-ckpt work/whisper_tiny.en/checkpoint.pt \
        --quant-ckpt work/whisper_tiny.en/w8a8.pt --data work/whisper_tiny.en --threads 2
    # no checkpoint: the Whisper layout at tiny.en dimensions (d=384, 4+4 layers, 6 heads), random weights
    python scripts/bench_integer.py --random --threads 2

Audio: the first utterance of --split in --data (padded/cut to the 30-s window); with --random, random
features. Decoding runs until EOS or --max-tokens (random weights: always --max-tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fairseq_qasr.integer.profiling import paired_ratios, pooled_ratios  # noqa: E402

WHISPER_TINY = dict(input_feat_per_channel=80, encoder_frontend="conv1d_gelu", encoder_pos="sinusoidal",
                    encoder_embed_dim=384, encoder_ffn_embed_dim=1536, encoder_layers=4, encoder_attention_heads=6,
                    decoder_context="learned_pos", decoder_embed_dim=384, decoder_ffn_embed_dim=1536,
                    decoder_layers=4, decoder_attention_heads=6, activation_fn="gelu", normalize_before=True,
                    attn_key_bias=False, share_decoder_input_output_embed=True, encoder_final_norm=True,
                    decoder_final_norm=True, layernorm_eps=1e-5, dropout=0.0, attention_dropout=0.0,
                    max_source_positions=3000, max_target_positions=448)


def interleaved(fns, repeat: int, warmup: int = 1):
    """Seconds per call of each function, ``repeat`` rounds that call every function once (after ``warmup``)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(0.2)  # let the previous runtime's spinning worker threads park (they steal cores otherwise)
            t = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t)
    return ts


def random_models(vocab: int):
    """Float model + W8A8 fake-quantized twin at tiny.en dimensions, random weights."""
    from fairseq.data import Dictionary
    import fairseq_qasr  # noqa: F401
    from fairseq_qasr.models.qtransformer_conv import (PRESETS, QTransformerConvDecoder, QTransformerConvEncoder,
                                                       QTransformerConvModel, apply_preset)
    from fairseq_qasr.quant import calibrate, quantize_model
    d = Dictionary()
    for i in range(vocab - 4):
        d.add_symbol(f"w{i}")
    cfg = argparse.Namespace(**WHISPER_TINY)
    apply_preset(cfg, PRESETS["qtransformer_conv"])
    torch.manual_seed(0)
    fmodel = QTransformerConvModel(QTransformerConvEncoder(cfg), QTransformerConvDecoder(cfg, d)).eval()
    qmodel = QTransformerConvModel(QTransformerConvEncoder(cfg), QTransformerConvDecoder(cfg, d)).eval()
    qmodel.load_state_dict(fmodel.state_dict())
    inp = {"src_tokens": torch.randn(1, 3000, 80), "src_lengths": torch.tensor([3000]),
           "prev_output_tokens": torch.tensor([[2, 5, 6]])}
    qmodel = quantize_model(qmodel, "w8a8", example_inputs=inp)
    with torch.no_grad():
        calibrate(qmodel, [inp])
    return fmodel, qmodel, vars(cfg), d


def torch_greedy(model, feats, lengths, max_tokens, bos=2, eos=2, pad=1):
    with torch.no_grad():
        enc = model.encoder(feats, lengths)
        tokens = torch.full((feats.size(0), 1), bos, dtype=torch.long)
        state: dict = {}
        for _ in range(max_tokens):
            logits = model.decoder(tokens, enc, incremental_state=state)[0][:, -1]
            logits[:, pad] = -float("inf")
            nxt = logits.argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if int(nxt[0]) == eos:
                break
    return tokens[0, 1:].tolist()


class _EncWrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, feats):
        return self.m.encoder(feats, torch.full((feats.size(0),), feats.size(1), dtype=torch.long))["encoder_out"][0]


class _DecWrap(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, tokens, memory):
        enc = {"encoder_out": [memory], "encoder_padding_mask": [torch.zeros(memory.shape[:2], dtype=torch.bool)]}
        return self.m.decoder(tokens, enc)[0][:, -1]


def onnx_sessions(fmodel, feats, tmp, threads):
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic
    enc_path, dec_path = os.path.join(tmp, "enc.onnx"), os.path.join(tmp, "dec.onnx")
    with torch.no_grad():
        mem = fmodel.encoder(feats, torch.tensor([feats.size(1)]))["encoder_out"][0]
        torch.onnx.export(_EncWrap(fmodel), (feats,), enc_path, input_names=["feats"], output_names=["out"],
                          opset_version=17, dynamo=False)
        torch.onnx.export(_DecWrap(fmodel), (torch.tensor([[2, 5, 6]]), mem), dec_path,
                          input_names=["tokens", "memory"], output_names=["logits"],
                          dynamic_axes={"tokens": {1: "t"}}, opset_version=17, dynamo=False)
    paths = {"fp32": (enc_path, dec_path)}
    q = (os.path.join(tmp, "enc.int8.onnx"), os.path.join(tmp, "dec.int8.onnx"))
    for src, dst in zip(paths["fp32"], q):
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    paths["int8"] = q
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return {k: tuple(ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]) for p in v)
            for k, v in paths.items()}


def ort_greedy(sessions, feats, max_tokens, bos=2, eos=2, pad=1):
    import numpy as np
    enc, dec = sessions
    mem = enc.run(None, {"feats": feats.numpy()})[0]
    tokens = [bos]
    for _ in range(max_tokens):  # no KV cache in the exported decoder: full prefix each step
        logits = dec.run(None, {"tokens": np.array([tokens], dtype=np.int64), "memory": mem})[0][0]
        logits[pad] = -np.inf
        nxt = int(logits.argmax())
        tokens.append(nxt)
        if nxt == eos:
            break
    return tokens[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--float-ckpt")
    p.add_argument("--quant-ckpt", help="W8A8 quantized checkpoint of the same model")
    p.add_argument("--data", help="prepared data dir (audio for the benchmark utterance)")
    p.add_argument("--split", default="test-clean")
    p.add_argument("--random", action="store_true", help="tiny.en dimensions, random weights")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--skip-onnx", action="store_true")
    p.add_argument("--fused", action="store_true", help="also torch.compile the engine's kernels that the C kernels "
                   "do not cover (the default: C / eager kernels)")
    p.add_argument("--no-fused", action="store_true", help=argparse.SUPPRESS)  # the default since session 5
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import fairseq  # noqa: F401
    import fairseq_qasr  # noqa: F401
    from fairseq_qasr.export import export_model, load_engine, size_report

    if args.random or not args.float_ckpt:
        which = "Whisper layout at tiny.en dimensions (d=384, 4+4 layers, 6 heads), RANDOM weights"
        fmodel, qmodel, cfg, d = random_models(51864)
        feats = torch.randn(1, 3000, 80)
    else:
        try:
            import fairseq_qasr.whisper.bpe  # noqa: F401
        except ImportError:
            pass
        from fairseq_qasr.checkpoints import load_model
        from fairseq_qasr.export.format import model_options
        fmodel, task, _ = load_model(args.float_ckpt, data=args.data)
        qmodel, task, qcfg = load_model(args.quant_ckpt, data=args.data)
        cfg = model_options(qcfg.model)
        which = f"{args.float_ckpt} (float) / {args.quant_ckpt} (W8A8)"
        ds_split = args.split
        task.load_dataset(ds_split)
        sample = task.dataset(ds_split)[0]
        feats = sample["source"][None].float()
        frames = int(cfg.get("max_source_positions") or 3000)
        feats = torch.nn.functional.pad(feats, (0, 0, 0, max(0, frames - feats.size(1))))[:, :frames]
    lengths = torch.tensor([feats.size(1)])
    res = {"model": which, "threads": args.threads, "frames": feats.size(1)}
    print(f"model: {which}\nthreads: {args.threads}, input frames: {feats.size(1)}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        qpath = os.path.join(tmp, "w8a8.safetensors")
        export_model(qmodel, qpath, cfg=cfg)
        res["export_size"] = size_report(qpath)
        eng = load_engine(qpath)
        ref_tokens = eng.greedy(feats, lengths, max_len=args.max_tokens)[0]  # eager integer kernels
        eng.fused = args.fused and not args.no_fused
        t0 = time.perf_counter()
        fused_tokens = eng.greedy(feats, lengths, max_len=args.max_tokens)[0]  # compiles the fused kernels
        res["fused_compile_s"] = time.perf_counter() - t0
        res["fused_equals_eager"] = fused_tokens == ref_tokens
        print(f"integer engine: fused kernels {'on' if eng.fused else 'off'} (first run incl. compile "
              f"{res['fused_compile_s']:.1f} s); tokens equal to the eager integer kernels: "
              f"{res['fused_equals_eager']}", flush=True)
        dyn = torch.ao.quantization.quantize_dynamic(fmodel, {nn.Linear}, dtype=torch.qint8)
        runs = {}
        with torch.no_grad():
            runs["pytorch_fp32"] = (lambda: fmodel.encoder(feats, lengths),
                                    lambda: torch_greedy(fmodel, feats, lengths, args.max_tokens))
            runs["pytorch_dynamic_int8"] = (lambda: dyn.encoder(feats, lengths),
                                            lambda: torch_greedy(dyn, feats, lengths, args.max_tokens))
            if not args.skip_onnx:
                sess = onnx_sessions(fmodel, feats, tmp, args.threads)
                runs["onnxruntime_fp32"] = (lambda: sess["fp32"][0].run(None, {"feats": feats.numpy()}),
                                            lambda: ort_greedy(sess["fp32"], feats, args.max_tokens))
                runs["onnxruntime_dynamic_int8"] = (lambda: sess["int8"][0].run(None, {"feats": feats.numpy()}),
                                                    lambda: ort_greedy(sess["int8"], feats, args.max_tokens))
            runs["integer_engine_w8a8"] = (lambda: eng.encode(eng.quantize_input(feats), lengths),
                                           lambda: eng.greedy(feats, lengths, max_len=args.max_tokens)[0])
            # round robin: each round times every runtime once, so drifts of this shared VM's speed hit all alike
            enc_t = interleaved({k: v[0] for k, v in runs.items()}, args.repeat)
            toks = {k: v[1]() for k, v in runs.items()}  # (also the decoders' warm-up)
            dec_t = interleaved({k: v[1] for k, v in runs.items()}, max(1, args.repeat // 2), warmup=0)
            for name in runs:
                t_enc, t_dec = statistics.median(enc_t[name]), statistics.median(dec_t[name])
                res[name] = {"encoder_ms": 1000 * t_enc, "decode_ms": 1000 * t_dec, "tokens": len(toks[name]),
                             "encoder_ms_all": [round(1000 * t, 1) for t in enc_t[name]],
                             "decode_ms_all": [round(1000 * t, 1) for t in dec_t[name]]}
                print(f"{name:28s} encoder {1000 * t_enc:8.1f} ms   full decode {1000 * t_dec:8.1f} ms "
                      f"({len(toks[name])} tokens; medians of {len(enc_t[name])} / {len(dec_t[name])} interleaved runs)",
                      flush=True)
    if torch.get_num_threads() != args.threads:  # (a library that resets OpenMP's count would void the timings)
        raise SystemExit(f"torch ran on {torch.get_num_threads()} threads, not --threads {args.threads}: timings void")
    base = res["integer_engine_w8a8"]
    print("\nratios (other / integer engine; >1 = engine faster), of the medians and of each round's pair:")
    for name in runs:
        if name != "integer_engine_w8a8":
            r = res[name]
            pairs = paired_ratios(r["encoder_ms_all"], base["encoder_ms_all"])
            r["encoder_ratio_rounds"] = pairs
            ci = pooled_ratios(pairs)
            print(f"  {name:28s} encoder x{r['encoder_ms'] / base['encoder_ms']:.2f}   "
                  f"decode x{r['decode_ms'] / base['decode_ms']:.2f}   encoder per round: median "
                  f"x{statistics.median(pairs):.2f} (95% CI x{ci['ci_low']:.2f}-x{ci['ci_high']:.2f}), "
                  f"x{min(pairs):.2f}-x{max(pairs):.2f}, engine faster in {ci['engine_faster']} of {len(pairs)}")
    print("(several runs: scripts/bench_pool.py pools their rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
