#!/usr/bin/env python3
"""Whole-process speed (and transcript agreement) of fairseq-generate on the imported Whisper vs.
openai-whisper's ``transcribe`` on the same utterances and CPU threads.

    python scripts/bench_whisper_decode.py --data work/whisper_tiny.en --split test-other \
        --whisper-checkpoint cache/whisper/tiny.en.pt --runs 3 --batch-size 16 --threads 2

Each run is a fresh process (python start, imports, model load, feature extraction, decoding, WER).
fairseq side: ``fairseq-generate DATA --path DATA/checkpoint.pt --beam 1 --max-len-b 224 --scoring
whisper_wer`` (stock ``fairseq_cli.generate``). openai-whisper side: ``whisper.transcribe(model, audio,
temperature=0.0, without_timestamps=True, fp16=False, language="en")`` per utterance (greedy, no
fallback; audio read with soundfile like the fairseq task). Reports median wall seconds, the ratio,
both normalized WERs and how many transcripts are identical.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from fairseq_qasr.transcripts import parse_generate  # noqa: E402


def whisper_worker(a) -> int:
    import soundfile as sf
    import torch
    import whisper

    from fairseq_qasr.data.manifest import read_manifest

    torch.set_num_threads(a.threads)
    model = whisper.load_model(a.whisper_checkpoint, device="cpu")
    out = []
    for row in read_manifest(os.path.join(a.data, f"{a.split}.tsv")):
        if not row.labeled and a.labeled_only:
            continue
        audio = sf.read(row.audio, dtype="float32")[0]
        r = whisper.transcribe(model, audio, temperature=0.0, without_timestamps=True, fp16=False,
                               language="en", verbose=None)
        out.append({"id": row.id, "ref": row.tgt_text, "hyp": r["text"].strip()})
    with open(a.out_json, "w") as f:
        json.dump(out, f)
    return 0


def generate_cmd(a, results: str):
    import fairseq_qasr

    regs = list(getattr(fairseq_qasr, "REGISTRATIONS", [])) + list(getattr(fairseq_qasr, "OPTIONAL_REGISTRATIONS", []))
    if "fairseq_qasr.whisper.register" in regs:
        head = [sys.executable, "-m", "fairseq_cli.generate"]
    else:  # stock generate, plus the registration the plugin does not (yet) run itself
        head = [sys.executable, "-c", "import sys, fairseq, fairseq_qasr, fairseq_qasr.whisper.register; "
                "fairseq_qasr.register(); from fairseq_cli.generate import cli_main; sys.argv[0]='fairseq-generate'; cli_main()"]
    return head + [a.data, "--user-dir", os.path.join(ROOT, "fairseq_qasr"), "--task", "librispeech_asr",
                   "--path", os.path.join(a.data, "checkpoint.pt"), "--gen-subset", a.split, "--beam", "1",
                   "--batch-size", str(a.batch_size), "--max-len-b", "224", "--scoring", "whisper_wer",
                   "--results-path", results]


def timed(cmd, env):
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise SystemExit(f"command failed: {' '.join(cmd[:4])} ...")
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="imported model + data dir (scripts/import_whisper.py --manifests)")
    ap.add_argument("--split", required=True)
    ap.add_argument("--whisper-checkpoint", required=True, help="the OpenAI .pt the import was made from")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both (OMP/MKL/torch)")
    ap.add_argument("--only", choices=["fairseq", "whisper"], default=None)
    ap.add_argument("--labeled-only", action="store_true", default=True)
    ap.add_argument("--_whisper-worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.data = os.path.abspath(a.data)
    if a.worker:
        return whisper_worker(a)

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    tmp = tempfile.mkdtemp(prefix="bench_whisper_")
    times = {"fairseq": [], "whisper": []}
    gen_cmd = generate_cmd(a, os.path.join(tmp, "gen"))
    w_json = os.path.join(tmp, "whisper.json")
    w_cmd = [sys.executable, os.path.abspath(__file__), "--_whisper-worker", "--data", a.data, "--split", a.split,
             "--whisper-checkpoint", a.whisper_checkpoint, "--threads", str(a.threads), "--out-json", w_json]
    for r in range(a.runs):  # interleaved, so load changes on a shared machine hit both alike
        for name, cmd in (("fairseq", gen_cmd), ("whisper", w_cmd)):
            if a.only and name != a.only:
                continue
            dt = timed(cmd, env)
            times[name].append(dt)
            print(f"run {r + 1}/{a.runs} {name}: {dt:.1f} s", file=sys.stderr, flush=True)

    report = {"split": a.split, "threads": a.threads, "batch_size": a.batch_size, "runs": a.runs,
              "fairseq_cmd": " ".join(gen_cmd), "whisper_call": "whisper.transcribe(model, audio, temperature=0.0, "
              "without_timestamps=True, fp16=False, language='en')"}
    for name, ts in times.items():
        if ts:
            report[f"{name}_seconds"] = [round(t, 2) for t in ts]
            report[f"{name}_median_s"] = round(statistics.median(ts), 2)
    if times["fairseq"] and times["whisper"]:
        report["ratio_fairseq_over_whisper"] = round(report["fairseq_median_s"] / report["whisper_median_s"], 3)
        from fairseq_qasr.data.manifest import read_manifest
        from fairseq_qasr.whisper.normalizer import whisper_wer

        rows = [r for r in read_manifest(os.path.join(a.data, f"{a.split}.tsv")) if r.labeled]
        hyps, score = parse_generate(os.path.join(tmp, "gen", f"generate-{a.split}.txt"))
        fs = {rows[i].id: h for i, h in hyps.items()}
        wh = {d["id"]: d for d in json.load(open(w_json))}
        ids = [r.id for r in rows]
        report["fairseq_score_line"] = score
        report["whisper_wer_normalized"] = round(whisper_wer([wh[i]["ref"] for i in ids], [wh[i]["hyp"] for i in ids]).wer, 2)
        report["fairseq_wer_normalized"] = round(whisper_wer([wh[i]["ref"] for i in ids], [fs.get(i, "") for i in ids]).wer, 2)
        same = [i for i in ids if fs.get(i) == wh[i]["hyp"]]
        report["identical_transcripts"] = f"{len(same)}/{len(ids)}"
        report["differing"] = [{"id": i, "fairseq": fs.get(i), "whisper": wh[i]["hyp"]} for i in ids if i not in same][:10]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
