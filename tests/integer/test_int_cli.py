"""One command from a quantized fairseq checkpoint to a deployable file, and fairseq-generate on it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from fairseq_cli_helpers import run_fairseq, train_args  # noqa: E402


@pytest.fixture(scope="module")
def quantized_ckpt(prepared_sample: Path, tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("fp")
    run_fairseq("train", train_args(prepared_sample, save, max_update=3))
    out = save / "w8a8.pt"
    proc = subprocess.run([sys.executable, "scripts/calibrate.py", "--path", str(save / "checkpoint_last.pt"),
                           "--quant-config", "w8a8", "--data", str(prepared_sample), "--split", "train-clean-100",
                           "--num-utts", "4", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_export_script_and_generate(prepared_sample: Path, quantized_ckpt: Path, tmp_path: Path):
    out = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, "scripts/export.py", str(quantized_ckpt), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["recipe"] == "w8a8" and out.exists() and (tmp_path / "model.pt").exists()
    assert report["size"]["total"] <= report["size"]["bound"]
    assert report["size"]["weights_packed"] <= report["fp32_bytes"] / 4 + 64  # 8-bit codes
    assert report["size"]["total"] < report["fp32_bytes"] / 2  # xs: the JSON header is a large share
    gen = subprocess.run([str(Path(sys.executable).parent / "fairseq-generate"), str(prepared_sample),
                          "--user-dir", "fairseq_qasr", "--task", "librispeech_asr", "--gen-subset", "dev-clean",
                          "--path", str(tmp_path / "model.pt"), "--scoring", "wer", "--beam", "2",
                          "--max-tokens", "8000", "--cpu", "--max-len-b", "10", "--num-workers", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "WER:" in gen.stdout
    assert gen.stdout.count("\nH-") + gen.stdout.startswith("H-") == 8  # every dev-clean utterance decoded


def test_compare_engine_script_on_real_audio(prepared_sample: Path, quantized_ckpt: Path, tmp_path: Path):
    """Teacher-forced, op by op, on the bundled dev-clean audio: no quantizer beyond 1 LSB, figures written."""
    out = tmp_path / "cmp.json"
    proc = subprocess.run([sys.executable, "scripts/compare_engine.py", str(quantized_ckpt), "--data",
                           str(prepared_sample), "--split", "dev-clean", "--utts", "2", "--json", str(out),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    total = res["total"]
    assert total["utterances"] == 2 and len(res["utterances"]) == 2 and total["quantizers"] > 100
    assert not total["beyond_1lsb"] and total["bit_exact"] > 0.99 and total["logits_max_lsb"] <= 1.0
    # the per-quantizer list of differing codes adds up to the bit-exact share
    differing = sum(r["codes"] * (1 - r["bit_exact"]) for r in res["utterances"])
    assert abs(sum(total["differ"].values()) - differing) <= len(total["differ"]) + 1
    assert all(".in_q." in k or k.endswith(".out_q") for k in total["differ"])
    assert "bit-exact codes" in proc.stdout


def test_compare_engine_free_running(prepared_sample: Path, quantized_ckpt: Path, tmp_path: Path):
    """--free-running: both decode on their own; the counts, tokens and divergence reports agree with each other."""
    out = tmp_path / "free.json"
    proc = subprocess.run([sys.executable, "scripts/compare_engine.py", str(quantized_ckpt), "--data",
                           str(prepared_sample), "--split", "dev-clean", "--utts", "2", "--json", str(out),
                           "--free-running", "--max-len", "12", "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    res = json.loads(out.read_text())
    rows = res["utterances"]
    same = sum(r["identical"] for r in rows)
    assert proc.returncode == (0 if same == 2 else 1), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert res["total"] == {"utterances": 2, "identical": same} and f"{same} of 2 greedy transcripts" in proc.stdout
    for r in rows:
        assert r["identical"] == (r["engine_tokens"] == r["fake_tokens"]) and len(r["engine_tokens"]) <= 12
        if not r["identical"] and r["step"] is not None:  # (None: only the fake model's incremental run differs)
            assert r["engine_token"] == (r["engine_tokens"] + [2])[r["step"]] and r["fake_token"] != r["engine_token"]
            assert r["fake_margin"] > 0 and len(r["margins"]) == r["step"] + 1 and r["lsb"] > 0


def test_generate_eval_float64(prepared_sample: Path, quantized_ckpt: Path):
    """fairseq-generate --eval-float64 decodes the fake-quantized checkpoint in float64; a checkpoint without
    quantizers is refused with a message naming the option."""
    args = [str(prepared_sample), "--user-dir", "fairseq_qasr", "--task", "librispeech_asr", "--gen-subset",
            "dev-clean", "--scoring", "wer", "--beam", "1", "--max-tokens", "8000", "--cpu", "--max-len-b", "10",
            "--num-workers", "0", "--eval-float64"]
    gen = run_fairseq("generate", args + ["--path", str(quantized_ckpt)])
    assert "runs in float64" in gen.stdout + gen.stderr
    assert gen.stdout.count("\nH-") + gen.stdout.startswith("H-") == 8 and "WER:" in gen.stdout
    fp = run_fairseq("generate", args + ["--path", str(quantized_ckpt.parent / "checkpoint_last.pt")], check=False)
    assert fp.returncode != 0 and "--eval-float64: the model has no quantizers" in fp.stderr
