#!/usr/bin/env python3
"""Rebuild the bundled LibriSpeech sample (data/sample/LibriSpeech) from a LibriSpeech root.

Picks the N shortest utterances of each split (ties broken by id), copies their FLAC files
byte-for-byte into the original layout, and restricts each copied chapter's trans.txt to the
copied utterances. Splits listed in --audio-only are copied without transcripts.

    python scripts/make_sample.py --root /work/shared/LibriSpeech --out data/sample/LibriSpeech
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

import soundfile as sf

DEFAULT_COUNTS = ["train-clean-5=40", "dev-clean=8", "test-clean=12", "test-other=4", "train-clean-100=6"]


def shortest(split_dir: str, n: int) -> list[tuple[int, str, str]]:
    """``(num_samples, id, flac_path)`` of the n shortest FLAC files under split_dir."""
    found = []
    for dirpath, _, files in os.walk(split_dir):
        for name in files:
            if name.endswith(".flac"):
                path = os.path.join(dirpath, name)
                found.append((sf.info(path).frames, name[: -len(".flac")], path))
    found.sort()
    if len(found) < n:
        sys.exit(f"error: {split_dir} has only {len(found)} .flac files, asked for {n}")
    return found[:n]


def copy_split(root: str, out: str, split: str, n: int, audio_only: bool) -> tuple[int, float]:
    src_split, dst_split = os.path.join(root, split), os.path.join(out, split)
    chosen = shortest(src_split, n)
    if os.path.isdir(dst_split):
        shutil.rmtree(dst_split)
    by_chapter: dict[str, set[str]] = {}
    for _, uid, path in chosen:
        rel = os.path.relpath(os.path.dirname(path), src_split)
        os.makedirs(os.path.join(dst_split, rel), exist_ok=True)
        shutil.copyfile(path, os.path.join(dst_split, rel, uid + ".flac"))
        by_chapter.setdefault(rel, set()).add(uid)
    if not audio_only:
        for rel, uids in by_chapter.items():
            speaker, chapter = rel.split(os.sep)[-2:]
            trans = os.path.join(src_split, rel, f"{speaker}-{chapter}.trans.txt")
            with open(trans, encoding="utf-8") as f:
                keep = [line for line in f.read().splitlines() if line.split(" ", 1)[0] in uids]
            missing = uids - {line.split(" ", 1)[0] for line in keep}
            if missing:
                sys.exit(f"error: {trans} has no transcript for {', '.join(sorted(missing))}")
            with open(os.path.join(dst_split, rel, os.path.basename(trans)), "w", encoding="utf-8") as f:
                f.write("\n".join(keep) + "\n")
    seconds = sum(frames for frames, _, _ in chosen) / 16000.0
    return len(chosen), seconds


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="LibriSpeech root (contains the split directories)")
    ap.add_argument("--out", default="data/sample/LibriSpeech")
    ap.add_argument("--counts", nargs="+", default=DEFAULT_COUNTS, metavar="SPLIT=N")
    ap.add_argument("--audio-only", nargs="*", default=["train-clean-100"], metavar="SPLIT")
    ap.add_argument("--max-bytes", type=int, default=4_500_000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for item in args.counts:
        split, n = item.split("=")
        count, seconds = copy_split(args.root, args.out, split, int(n), split in args.audio_only)
        label = "audio only" if split in args.audio_only else "with transcripts"
        print(f"{split:<16} {count:>3} utterances  {seconds:7.1f} s  ({label})")
    total = du(args.out)
    print(f"total {total} bytes in {args.out}")
    if total > args.max_bytes:
        sys.exit(f"error: sample is {total} bytes, over --max-bytes {args.max_bytes}")


if __name__ == "__main__":
    main()
