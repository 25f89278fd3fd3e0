#!/usr/bin/env python
"""Quantized checkpoint -> deployable integer file, in one command.

    python scripts/export.py CKPT OUT.safetensors [--fairseq-checkpoint OUT.pt] [--data DIR]

CKPT is a quantized fairseq checkpoint of qtransformer_conv (scripts/calibrate.py, QAT training). Writes
OUT (safetensors: bit-packed integer weights, scales, int32 biases, fixed-point requantization parameters,
JSON header; docs/export.md) and a tensor-less fairseq checkpoint (default: OUT with suffix .pt) whose model
``qasr_integer`` runs the all-integer engine on OUT, for fairseq-generate. Prints the size report.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="quantized fairseq checkpoint")
    p.add_argument("out", help="exported file (.safetensors)")
    p.add_argument("--fairseq-checkpoint", default=None, help="tensor-less fairseq checkpoint to write "
                   "(default: OUT with suffix .pt; 'none' to skip)")
    p.add_argument("--data", default=None, help="data directory override (dictionary) for loading CKPT")
    args = p.parse_args()

    from fairseq_qasr.checkpoints import load_model
    from fairseq_qasr.export import export_model, size_report
    from fairseq_qasr.export.fairseq_model import write_fairseq_checkpoint
    from fairseq_qasr.quant import QModule

    model, task, cfg = load_model(args.ckpt, data=args.data)
    if not any(isinstance(m, QModule) for m in model.modules()):
        sys.exit(f"{args.ckpt}: not a quantized checkpoint (run scripts/calibrate.py or QAT first)")
    if getattr(cfg.model, "_name", "") != "qtransformer_conv" and not str(getattr(cfg.model, "arch", "")).startswith("qtransformer_conv"):
        print(f"warning: model {getattr(cfg.model, '_name', '?')}: the engine runs qtransformer_conv layouts", file=sys.stderr)
    header = export_model(model, args.out, cfg=cfg.model)
    fs = args.fairseq_checkpoint or os.path.splitext(args.out)[0] + ".pt"
    if fs != "none":
        write_fairseq_checkpoint(args.ckpt, args.out, fs)
    rep = size_report(args.out)
    fp32 = sum(t.numel() for t in model.parameters()) * 4  # unique parameters (tied counted once)
    print(json.dumps({"out": args.out, "fairseq_checkpoint": None if fs == "none" else fs,
                      "recipe": (header.get("recipe") or {}).get("name"), "size": rep,
                      "fp32_bytes": fp32, "fp16_bytes": fp32 // 2}, indent=1))


if __name__ == "__main__":
    main()
