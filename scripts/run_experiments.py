#!/usr/bin/env python
"""Resumable WER study: full precision vs PTQ/QAT recipes on Whisper tiny.en, every cell audited.

  python scripts/run_experiments.py --teacher work/tiny.en/checkpoint.pt --data work/tiny.en --out work/exp \
      --cells fp:dev-clean ptq_w8a8:dev-clean headon_w8:dev-clean ... [--dry-run]

A cell is ``MODEL:SPLIT``. MODEL is ``fp``, ``ptq_<recipe>`` (scripts/calibrate.py on --calib-split), or
``qat_<recipe>`` (PTQ init, then fairseq-train with the qat_distillation criterion on --qat-split; it saves every 20
updates, so an interrupted run resumes where it stopped when the study is run again). Each step
runs the stock command line (printed and stored beside the result), results go to OUT/results.json atomically
after every step, and finished steps are skipped when the study is run again. ``--report`` renders the table.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def save_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def run(cmd: List[str], log: Path) -> str:
    """Run ``cmd``, streaming its output into ``log`` (``tail -f`` it to follow a long run)."""
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd) + f"\n  (log: {log})", flush=True)
    started = time.time()
    partial = log.with_suffix(".log.partial")
    with open(partial, "w") as f:
        rc = subprocess.run([str(c) for c in cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore")).returncode
    os.replace(partial, log)
    out = log.read_text()
    if rc != 0:
        raise RuntimeError(f"exit {rc}, see {log}:\n" + "\n".join(out.splitlines()[-8:]))
    print(f"  {time.time() - started:.0f} s", flush=True)
    return out


class Study:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.results: Dict[str, dict] = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

    def record(self, key: str, value: dict) -> None:
        self.results[key] = value
        save_json(self.results_path, self.results)

    def checkpoint(self, model: str) -> Path:
        a = self.args
        if model == "fp":
            return Path(a.teacher)
        kind, _, recipe = model.partition("_")
        ptq = self.out / f"ptq_{recipe}.pt"
        if f"build:ptq_{recipe}" not in self.results or not ptq.exists():
            start = dict(item.split("=", 1) for item in a.ptq_from).get(recipe)
            cmd = [sys.executable, "scripts/calibrate.py", "--path", start or a.teacher, "--quant-config", recipe,
                   "--data", a.data, "--split", a.calib_split, "--num-utts", str(a.calib_utts), "--out", ptq,
                   "--max-tokens", "48000"] + (["--requantize"] if start else [])
            t = time.time()
            run(cmd, self.out / "logs" / f"ptq_{recipe}.log")
            self.record(f"build:ptq_{recipe}", {"command": " ".join(map(str, cmd)), "seconds": round(time.time() - t)})
        if kind == "ptq":
            return ptq
        save = self.out / f"qat_{recipe}"
        final = save / "checkpoint_last.pt"
        if f"build:qat_{recipe}" not in self.results or not final.exists():
            cmd = [BIN / "fairseq-train", a.data, "--user-dir", "fairseq_qasr", "--task", "librispeech_asr",
                   "--arch", "qtransformer_conv", "--init-from", ptq, "--train-subset", a.qat_split,
                   "--valid-subset", "dev-clean", "--disable-validation", "--unlabeled", "keep",
                   "--criterion", "qat_distillation", "--teacher-path", a.teacher, "--alpha", str(a.qat_alpha), "--beta", "1.0",
                   "--distill-targets", a.qat_distill_targets,
                   "--temperature", "2", "--optimizer", "adam", "--lr", str(a.qat_lr), "--lr-scheduler", "fixed",
                   "--max-tokens", str(a.qat_max_tokens), "--max-update", str(a.qat_updates), "--save-dir", save,
                   "--no-epoch-checkpoints", "--save-interval-updates", "20", "--keep-interval-updates", "1",
                   "--cpu", "--num-workers", "0", "--log-format", "simple",
                   "--log-interval", "5", "--seed", "1", "--skip-audio-check"]
            t = time.time()
            log = run(cmd, self.out / "logs" / f"qat_{recipe}.log")
            losses = re.findall(r"train_inner .*? loss=([\d.]+).*?kl_loss=([\d.]+)", log)
            self.record(f"build:qat_{recipe}", {"command": " ".join(map(str, cmd)), "seconds": round(time.time() - t),
                                                "loss_curve": [[float(l), float(k)] for l, k in losses]})
        return final

    def cell(self, model: str, split: str) -> None:
        key = f"{model}:{split}"
        if key in self.results:
            print(f"= {key}: done ({self.results[key]['wer']} %)")
            return
        ckpt = self.checkpoint(model)
        a = self.args
        gen = [BIN / "fairseq-generate", a.data, "--user-dir", "fairseq_qasr", "--task", "librispeech_asr",
               "--path", ckpt, "--gen-subset", split, "--beam", "1", "--batch-size", "16", "--max-len-b", "224",
               "--scoring", "whisper_wer", "--cpu", "--num-workers", "0", "--skip-audio-check"]
        t = time.time()
        out = run(gen, self.out / "logs" / f"{model}_{split}.log")
        m = re.search(r"WER \(whisper-normalized\): ([\d.]+) \(errors (\d+) / ref words (\d+), (\d+) utts\)"
                      r" \| plain WER: ([\d.]+)", out)
        if not m:
            raise RuntimeError(f"no WER line in the output of {key}")
        result = {"wer": float(m.group(1)), "errors": int(m.group(2)), "words": int(m.group(3)),
                  "utts": int(m.group(4)), "plain_wer": float(m.group(5)), "seconds": round(time.time() - t),
                  "command": " ".join(map(str, gen))}
        if model != "fp":
            audit = [sys.executable, "-m", "fairseq_qasr.audit", "--path", ckpt, "--data",
                     Path(a.data) / f"{split}.tsv", "--max-utts", "1"]
            proc = subprocess.run([str(c) for c in audit], cwd=REPO, capture_output=True, text=True)
            (self.out / "logs" / f"{model}_{split}_audit.log").write_text(proc.stdout + proc.stderr)
            verdict = re.search(r"VERDICT: (\w+)", proc.stdout)
            result["audit"] = verdict.group(1) if verdict and proc.returncode == 0 else f"FAIL (exit {proc.returncode})"
            result["audit_command"] = " ".join(map(str, audit))
            result["audit_table"] = "\n".join(line for line in proc.stdout.splitlines()
                                               if AUDIT_ROW.match(line))
        self.record(key, result)
        print(f"= {key}: WER {result['wer']} % ({result['errors']}/{result['words']}), audit {result.get('audit', '-')}")


AUDIT_ROW = re.compile(r"^\S+\s+\S+\s+\d+\s+[\d.]+\s+\[")


def audit_table(results: Dict[str, dict], model: str, logs: Path):
    """The audit's per-op rows of ``model``: stored with the result, else read back from the audit log."""
    for key, r in results.items():
        if key.startswith(model + ":") and r.get("audit_table"):
            return r["audit_table"]
    for log in sorted(logs.glob(f"{model}_*_audit.log")):
        rows = [line for line in log.read_text().splitlines() if AUDIT_ROW.match(line)]
        if rows:
            return "\n".join(rows)
    return None


def report(results: Dict[str, dict], logs: Path) -> str:
    splits = ["test-clean", "test-other", "dev-clean"]
    models = sorted({k.split(":")[0] for k in results if not k.startswith(("build:", "failed:"))},
                    key=lambda m: (m != "fp", m))
    lines = ["| model | " + " | ".join(splits) + " | audit |", "|---" * (len(splits) + 2) + "|"]
    for m in models:
        cells = []
        for s in splits:
            r = results.get(f"{m}:{s}")
            if r:
                fp = results.get(f"fp:{s}")
                rel = f" ({(r['wer'] - fp['wer']) / fp['wer'] * 100:+.0f} % rel.)" if fp and m != "fp" and fp["wer"] else ""
                cells.append(f"{r['wer']:.2f}{rel} [{r['errors']}/{r['words']}, {r['utts']} utts]")
            else:
                cells.append("not run")
        audits = {results[f'{m}:{s}'].get('audit', '-') for s in splits if f'{m}:{s}' in results}
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {', '.join(sorted(audits))} |")
    tables = {m: audit_table(results, m, logs) for m in models if m != "fp"}
    for m, table in tables.items():
        if table:
            lines += ["", f"Audited op types of `{m}` (op, aten op, count, share of MACs %, bits of each input):", "```",
                      table, "```"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="full-precision checkpoint (imported Whisper)")
    p.add_argument("--data", required=True, help="data directory of the teacher (manifests + whisper config)")
    p.add_argument("--out", required=True)
    p.add_argument("--cells", nargs="*", default=[], help="MODEL:SPLIT, in the order to run")
    p.add_argument("--calib-split", default="train-clean-100")
    p.add_argument("--calib-utts", type=int, default=32)
    p.add_argument("--ptq-from", nargs="*", default=[], metavar="RECIPE=CKPT",
                   help="calibrate RECIPE from the latent float weights of CKPT (e.g. a 4-bit QAT checkpoint, "
                        "for 2-bit) instead of the teacher; QAT still distills from --teacher")
    p.add_argument("--qat-split", default="train-clean-5")
    p.add_argument("--qat-updates", type=int, default=40)
    p.add_argument("--qat-lr", type=float, default=2e-5)
    p.add_argument("--qat-alpha", type=float, default=0.5, help="weight of the CE term (KL weight is 1)")
    p.add_argument("--qat-distill-targets", choices=["reference", "teacher"], default="reference")
    p.add_argument("--qat-max-tokens", type=int, default=24000, help="frames per QAT batch")
    p.add_argument("--report", action="store_true", help="print the markdown table of what has been measured")
    args = p.parse_args()
    study = Study(args)
    for cell in args.cells:
        model, _, split = cell.partition(":")
        try:
            study.cell(model, split)
        except RuntimeError as e:
            print(f"! {cell}: {e}", flush=True)
            study.record(f"failed:{cell}", {"error": str(e)[-1500:]})
    if args.report:
        print(report(study.results, study.out / "logs"))


if __name__ == "__main__":
    main()
