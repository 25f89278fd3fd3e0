"""Helpers shared by the Whisper tests (real LibriSpeech at ../shared/LibriSpeech)."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LIBRISPEECH = REPO_ROOT / ".." / "shared" / "LibriSpeech"


def read_split(split: str, limit: int = None):
    """[(utt_id, flac_path, transcript)] of a LibriSpeech split, sorted by id."""
    root = LIBRISPEECH / split
    out = []
    for trans in sorted(root.glob("*/*/*.trans.txt")):
        for line in trans.read_text().splitlines():
            uid, _, text = line.partition(" ")
            flac = trans.parent / f"{uid}.flac"
            if flac.is_file():
                out.append((uid, flac, text))
    out.sort()
    return out[:limit] if limit else out
