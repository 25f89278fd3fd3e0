#!/usr/bin/env python
"""Per-op profile of the all-integer engine (not a test): encoder on one window and a greedy decode, the C kernels
(``qasr::*``) and the glue around them, medians of --rounds profiled runs.

    python scripts/profile_engine.py deploy/w8a8.safetensors --ckpt CKPT --data DIR --threads 1
    python scripts/profile_engine.py deploy/w8a8.safetensors --threads 1     # random features

Audio: the first utterance of --split (CKPT: any checkpoint of the model, for its data pipeline), padded/cut to
the encoder's window; without --ckpt, random features (the attention's zero-pair skipping then differs from speech).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engine", help="exported file (scripts/export.py)")
    p.add_argument("--ckpt", help="a checkpoint of the same model (its task reads --data)")
    p.add_argument("--data")
    p.add_argument("--split", default="test-clean")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--json", help="also write the profiles here")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from fairseq_qasr.export import load_engine
    from fairseq_qasr.integer.profiling import format_profile, op_profile

    eng = load_engine(args.engine)
    frames = int(eng.cfg.get("max_source_positions") or 3000)
    if args.ckpt:
        if not args.data:
            p.error("--ckpt needs --data")
        try:
            import fairseq_qasr.whisper.bpe  # noqa: F401  (Whisper-imported checkpoints)
        except ImportError:
            pass
        from fairseq_qasr.checkpoints import load_model
        _, task, _ = load_model(args.ckpt, data=args.data)
        task.load_dataset(args.split)
        feats = task.dataset(args.split)[0]["source"][None].float()
        feats = torch.nn.functional.pad(feats, (0, 0, 0, max(0, frames - feats.size(1))))[:, :frames]
    else:
        g = torch.Generator().manual_seed(0)
        feats = torch.randn(1, frames, int(eng.cfg["input_feat_per_channel"]), generator=g)
    lengths = torch.tensor([feats.size(1)])
    x = eng.quantize_input(feats)
    res = {"threads": args.threads, "frames": feats.size(1)}
    with torch.no_grad():
        res["encoder"] = op_profile(lambda: eng.encode(x, lengths), args.rounds)
        res["greedy"] = op_profile(lambda: eng.greedy(feats, lengths, max_len=args.max_tokens),
                                   max(1, args.rounds // 2))
    if torch.get_num_threads() != args.threads:
        raise SystemExit(f"torch ran on {torch.get_num_threads()} threads, not --threads {args.threads}")
    for part in ("encoder", "greedy"):
        print(f"{part} ({args.threads} thread{'s' if args.threads > 1 else ''}):\n{format_profile(res[part])}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
