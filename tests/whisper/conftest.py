"""Fixtures for the Whisper tests.

- ``librispeech``: ``<repo>/../shared/LibriSpeech`` (real audio), skipped when absent.
- ``whisper_ckpt``: verified tiny.en checkpoint from the cache (``<repo>/cache/whisper``,
  ``~/.cache/whisper``); skipped when absent (``python scripts/fetch_whisper.py --model tiny.en
  --out cache/whisper`` fetches it).
- ``whisper_pkg``: the ``openai-whisper`` package (reference implementation), skipped when absent.
- ``imported_tiny``: module-wide fairseq import of tiny.en (checkpoint.pt, dict.txt, config.yaml and
  manifests of a few real utterances) in a temp dir.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from whisper_testutil import LIBRISPEECH, REPO_ROOT, read_split
CACHE_DIRS = [REPO_ROOT / "cache" / "whisper", Path.home() / ".cache" / "whisper"]


@pytest.fixture(scope="session")
def librispeech() -> Path:
    if not (LIBRISPEECH / "dev-clean").is_dir():
        pytest.skip(f"real LibriSpeech not found at {LIBRISPEECH} (../shared/LibriSpeech relative to the repo root)")
    return LIBRISPEECH.resolve()


@pytest.fixture(scope="session")
def whisper_pkg():
    if importlib.util.find_spec("whisper") is None:
        pytest.skip("openai-whisper not installed (pip install --no-deps openai-whisper==20250625 tiktoken more-itertools numba)")
    import whisper

    return whisper


@pytest.fixture(scope="session")
def whisper_ckpt() -> Path:
    from fairseq_qasr.whisper.fetch import FetchError, verify

    for d in CACHE_DIRS:
        p = d / "tiny.en.pt"
        if p.is_file():
            try:
                verify(p, "tiny.en")
            except FetchError:
                continue
            return p
    pytest.skip("no verified tiny.en.pt in cache/whisper or ~/.cache/whisper "
                "(python scripts/fetch_whisper.py --model tiny.en --out cache/whisper)")


PARITY_UTTS = {"dev-clean": 3, "test-other": 2}


@pytest.fixture(scope="module")
def imported_tiny(tmp_path_factory, whisper_ckpt, librispeech):
    """fairseq import of tiny.en + a manifest ``parity.tsv`` of a few real utterances."""
    import soundfile as sf

    from fairseq_qasr.data.manifest import ManifestRow, write_manifest
    from fairseq_qasr.whisper.importer import import_whisper

    out = tmp_path_factory.mktemp("whisper_tiny_en")
    import_whisper(str(whisper_ckpt), str(out), verify_load=False, log=lambda m: None)
    rows = []
    for split, n in PARITY_UTTS.items():
        for uid, flac, text in read_split(split)[::5][:n]:
            frames = sf.info(str(flac)).frames // 160
            rows.append(ManifestRow(uid, str(flac), frames, text, uid.split("-")[0], 0))
    write_manifest(out / "parity.tsv", rows)
    return out
