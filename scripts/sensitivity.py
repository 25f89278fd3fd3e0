#!/usr/bin/env python
"""Per-op sensitivity of a quantized checkpoint against its full-precision original (teacher-forced).

  python scripts/sensitivity.py --quantized ptq_w8a8.pt --float tiny.en/checkpoint.pt --data tiny.en \
      --split train-clean-5 --num-utts 8 [--by module] [--only 'dec:linear'] [--json out.json]

Each line switches on one group of quantizers only and reports next-token top-1 agreement and KL against the
float model on its own transcripts (transcripts of the split are not needed). See fairseq_qasr/sensitivity.py.
"""
import argparse
import dataclasses
import json
import os
import sys

from tqdm import tqdm

import fairseq_qasr.checkpoints as ckpt
from fairseq_qasr.models.quantized import is_quantized
from fairseq_qasr.ptq import calibration_batches, decoder_inputs
from fairseq_qasr.sensitivity import sensitivity, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantized", required=True, help="quantized checkpoint (scripts/calibrate.py, QAT)")
    p.add_argument("--float", dest="float_path", required=True, help="its full-precision checkpoint")
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--split", default="train-clean-5")
    p.add_argument("--num-utts", type=int, default=8)
    p.add_argument("--seed", type=int, default=7, help="utterance draw (pick one apart from calibration's)")
    p.add_argument("--by", choices=["op", "module"], default="op", help="group quantizers by op type or module")
    p.add_argument("--split-group", nargs="*", default=[], help="op groups (e.g. dec:linear:in_q) to list by module")
    p.add_argument("--only", help="regex: groups to try (default all)")
    p.add_argument("--max-tokens", type=int, default=30000)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    try:
        fp, task, _ = ckpt.load_model(args.float_path, data=args.data)
        q, _, _ = ckpt.load_model(args.quantized, data=args.data)
        if is_quantized(fp) or not is_quantized(q):
            raise ValueError("--float must be a full-precision checkpoint and --quantized a quantized one")
        batches = calibration_batches(task, args.split, args.num_utts, args.max_tokens, args.seed)
        decoder_inputs(fp, batches, task.target_dictionary, 200)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"sensitivity: {e}")
    rows = sensitivity(q, fp, batches, task.target_dictionary.pad(), args.by, args.split_group, args.only,
                       progress=lambda it: tqdm(it, desc="groups", unit="group", leave=False))
    print(table(rows))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
