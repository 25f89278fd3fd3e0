#!/usr/bin/env python3
"""Prepare LibriSpeech (original layout) into manifests, SentencePiece model, dict.txt and config.yaml.

    python scripts/prepare_librispeech.py --root /path/LibriSpeech --out data/ls \\
        --splits train-clean-100 dev-clean test-clean test-other [--vocab-size 1000]

Audio without a transcript line is kept as unlabeled (empty tgt_text). Re-running with the same
inputs changes no file and does not retrain SentencePiece. Exit status 2 on bad input data.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fairseq_qasr.data.errors import DataError  # noqa: E402
from fairseq_qasr.data.prepare import format_summary, prepare_librispeech  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="LibriSpeech root directory (contains <split>/ directories)")
    ap.add_argument("--out", required=True, help="output data directory, e.g. data/ls")
    ap.add_argument("--splits", nargs="+", required=True, metavar="SPLIT", help="e.g. train-clean-100 dev-clean")
    ap.add_argument("--vocab-size", type=int, default=1000, help="SentencePiece vocabulary size (soft limit)")
    ap.add_argument("--spm-train-splits", nargs="+", default=None, metavar="SPLIT",
                    help="splits whose transcripts train SentencePiece (default: those named train*)")
    ap.add_argument("--resample-audio", action="store_true",
                    help="accept audio that is not 16 kHz (it is resampled when loaded)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    start = time.time()
    try:
        result = prepare_librispeech(
            args.root,
            args.out,
            args.splits,
            vocab_size=args.vocab_size,
            spm_train_splits=args.spm_train_splits,
            resample_audio=args.resample_audio,
            progress=not args.no_progress,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result))
    print(f"done in {time.time() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
