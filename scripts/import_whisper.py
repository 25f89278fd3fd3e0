#!/usr/bin/env python3
"""Convert an OpenAI Whisper checkpoint into a fairseq ``qtransformer_conv`` checkpoint + data directory.

    python scripts/import_whisper.py --checkpoint cache/whisper/tiny.en.pt --out work/whisper_tiny.en \
        [--manifests data/ls]

Writes OUT/checkpoint.pt, OUT/dict.txt, OUT/config.yaml (Whisper features + whisper BPE) and, with
--manifests, copies of the prepared <split>.tsv manifests (absolute audio paths). Then:

    fairseq-generate OUT --user-dir fairseq_qasr --task librispeech_asr --path OUT/checkpoint.pt \
        --gen-subset test-clean --beam 1 --batch-size 16 --max-len-b 224 --scoring whisper_wer
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="OpenAI Whisper .pt (scripts/fetch_whisper.py)")
    ap.add_argument("--out", required=True, help="output model + data directory")
    ap.add_argument("--manifests", default=None, help="prepared data dir (or one .tsv) whose manifests to copy")
    ap.add_argument("--language", default=None, help="multilingual models: language of the prompt (default en)")
    ap.add_argument("--window", choices=["transcribe", "pad_audio"], default="transcribe",
                    help="30-s window semantics of the features: whisper.transcribe's first window (default) "
                         "or log_mel_spectrogram(pad_or_trim(audio)) as in OpenAI's LibriSpeech notebook")
    ap.add_argument("--verify-sha256", action="store_true", help="require OpenAI's published hash for --model")
    ap.add_argument("--model", default=None, help="model name for --verify-sha256 (e.g. tiny.en)")
    ap.add_argument("--no-verify-load", action="store_true", help="skip reloading the written checkpoint")
    a = ap.parse_args(argv)

    from fairseq_qasr.whisper.fetch import FetchError, verify

    if not os.path.isfile(a.checkpoint):
        print(f"error: {a.checkpoint}: no such file (run scripts/fetch_whisper.py first)", file=sys.stderr)
        return 1
    if a.verify_sha256:
        model = a.model or os.path.basename(a.checkpoint)[: -len(".pt")]
        try:
            verify(a.checkpoint, model)
        except FetchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    from fairseq_qasr.whisper.importer import import_whisper

    import_whisper(a.checkpoint, a.out, manifests=a.manifests, verify_load=not a.no_verify_load,
                   language=a.language, window=a.window, log=lambda m: print(f"[import_whisper] {m}", file=sys.stderr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
