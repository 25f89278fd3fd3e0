#!/usr/bin/env python
"""Post-training quantization: full-precision checkpoint + recipe + audio -> quantized checkpoint.

  python scripts/calibrate.py --path FP.pt --quant-config w8a8 --data data/ls \
      --split train-clean-100 --num-utts 64 --out checkpoints/ptq_w8a8.pt [--observer percentile] [--bias-correction]

Transcripts are not needed: audio-only utterances are decoded by the full-precision model and the decoder is
calibrated on those transcripts. The output loads in fairseq-generate and the audit as it is.
"""
import argparse
import sys

import fairseq_qasr.checkpoints  # noqa: F401  (registers the plugin with fairseq)
from fairseq_qasr.ptq import quantize_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="full-precision checkpoint")
    p.add_argument("--quant-config", required=True, help="recipe name (configs/quant) or YAML path")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--split", default="train-clean-100", help="calibration split(s), comma-separated")
    p.add_argument("--num-utts", type=int, default=64, help="calibration utterances")
    p.add_argument("--out", required=True, help="quantized checkpoint to write")
    p.add_argument("--observer", choices=["minmax", "moving_average", "percentile", "mse"],
                   help="override the recipe's activation observers")
    p.add_argument("--bias-correction", action="store_true", help="empirical bias correction after calibration")
    p.add_argument("--requantize", action="store_true",
                   help="--path may be a quantized (e.g. QAT) checkpoint: quantize its latent float weights anew")
    p.add_argument("--max-tokens", type=int, default=30000, help="frames per calibration batch")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    try:
        r = quantize_checkpoint(args.path, args.quant_config, args.data, args.split, args.out, args.num_utts,
                                args.observer, args.bias_correction, args.max_tokens, args.seed,
                                requantize=args.requantize)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"calibrate: {e}")
    print(f"wrote {r.out}: recipe {r.recipe}, {r.utterances} utterances, {r.seconds:.1f} s"
          + (f", bias corrected in {len(r.bias_corrected)} layers" if r.bias_corrected else ""))


if __name__ == "__main__":
    main()
